"""Per-request state on the coordinator: detokenization, stop strings, timing, the stream queue.

Workers return token ids only. Here each request's ids become text; stop strings are matched
on the text (text that could still turn into a stop string is held back until it cannot), and
a match finishes the request here and aborts it on its worker (vLLM v1's output processor).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from workers.request import FinishReason, SamplingParams
from workers.scheduler import RequestOutput
from workers.tokenizer import Detokenizer


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list[tuple[float, list[int], list[float]]] | None = None


@dataclass
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop_token_id: int | None = None
    stop_string: str | None = None
    queue_time_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_preemptions: int = 0
    instance_id: int = -1
    error: str | None = None  # set when an engine fault ended the request (INTERNAL)


StreamEvent = Delta | Finished


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    instance_id: int
    detokenizer: Detokenizer | None
    arrival_time: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""
    num_emitted_chars: int = 0
    num_output_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    queue_time_s: float = 0.0
    num_preemptions: int = 0
    finished: Finished | None = None

    @property
    def kv_tokens(self) -> int:
        """Tokens this request holds KV for (for KV-demand routing)."""
        return len(self.prompt_token_ids) + self.num_output_tokens

    def process(self, out: RequestOutput, now: float) -> list[StreamEvent]:
        """Folds one step's output into events for the client; sets ``finished`` when done."""
        if out.queue_time_s is not None:
            self.queue_time_s = out.queue_time_s
        self.num_preemptions = out.num_preemptions
        events: list[StreamEvent] = []
        if out.new_token_ids:
            self.num_output_tokens += len(out.new_token_ids)
            if self.first_token_time is None:
                self.first_token_time = now
            self.last_token_time = now
            stop = self._append_text(out.new_token_ids)
            done = stop is not None or out.finish_reason is not None
            events.append(Delta(list(out.new_token_ids), self._take_text(done), out.logprobs))
            if stop is not None:
                return [*events, self._finish(FinishReason.STOP, now, stop_string=stop)]
        if out.finish_reason is not None:
            events.append(
                self._finish(
                    out.finish_reason, now, stop_token_id=out.stop_token_id, error=out.error
                )
            )
        return events

    def abort(self, now: float) -> Finished:
        return self._finish(FinishReason.ABORT, now)

    def _append_text(self, token_ids: list[int]) -> str | None:
        """Adds the tokens' text; on a stop-string match cuts the text and returns the string."""
        if self.detokenizer is None:
            return None
        start = max(0, len(self.text) - self._max_stop_len() + 1)
        self.text += self.detokenizer.step(token_ids)
        best: tuple[int, str] | None = None
        for s in self.sampling.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = (
            self.text[: i + len(s)] if self.sampling.include_stop_str_in_output else self.text[:i]
        )
        return s

    def _take_text(self, done: bool) -> str:
        """New text that can no longer become part of a stop string (all of it when done)."""
        hold = 0 if done else self._max_stop_len() - 1
        end = max(self.num_emitted_chars, len(self.text) - max(hold, 0))
        piece = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return piece

    def _max_stop_len(self) -> int:
        return max((len(s) for s in self.sampling.stop), default=0)

    def _finish(
        self,
        reason: FinishReason,
        now: float,
        stop_token_id: int | None = None,
        stop_string: str | None = None,
        error: str | None = None,
    ) -> Finished:
        first = self.first_token_time if self.first_token_time is not None else now
        self.finished = Finished(
            reason=reason,
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=self.num_output_tokens,
            stop_token_id=stop_token_id,
            stop_string=stop_string,
            queue_time_s=self.queue_time_s,
            ttft_s=first - self.arrival_time,
            e2e_s=now - self.arrival_time,
            num_preemptions=self.num_preemptions,
            instance_id=self.instance_id,
            error=error,
        )
        return self.finished

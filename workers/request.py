"""One request's state: the only place it lives on a worker (nano-vllm's ``Sequence``)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """Bad input from a client; ``field`` names the offending field (maps to INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Defaults follow vLLM/OpenAI."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def validate(self) -> None:
        """Raises InvalidRequestError naming the field (``sampling_params.<name>``)."""
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1 (off) or >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens > 0, "must be > 0"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("logprobs", 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(self.stop), "must not contain empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidRequestError(
                    f"sampling_params.{name}", f"{why}, got {getattr(self, name)!r}"
                )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "sampling_params.min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


PLACEHOLDER_TOKEN = -1
"""An output token sampled on the device and not yet read back to the host. A pipeline leader
schedules and launches the next micro-batch before it reads the tokens of the one it collects
(workers/engine.py), so a request that decodes on holds one for the length of that step."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or (decided by the frontend) a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client cancel, Abort RPC, or a stop string seen by the frontend


@dataclass(eq=False)
class Request:
    """All of one request's state on a worker.

    ``num_computed_tokens`` counts tokens whose KV is in the cache; each step schedules
    ``num_tokens - num_computed_tokens`` more (capped by the token budget), so prefill, chunked
    prefill, decode and recompute after preemption are one mechanism (vLLM v1).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int  # resolved: sampling.max_tokens or what is left of the context
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_scheduled_tokens: int = 0
    """Where the last chunk scheduled ends (tokens). Ahead of ``num_computed_tokens`` while
    that chunk's micro-batch is in flight and not applied yet: a pipeline leader launches a
    prompt's next chunk before the last one is applied (workers/scheduler.py)."""
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_started_tokens(self) -> int:
        """Tokens whose KV is computed or being computed in a micro-batch in flight: where
        the next chunk starts."""
        return max(self.num_computed_tokens, self.num_scheduled_tokens)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens no step has been given yet: the most the next one can schedule."""
        return self.num_tokens - self.num_started_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def awaits_token(self) -> bool:
        """Whether the last output token is a :data:`PLACEHOLDER_TOKEN`: its id is still on
        the device, and the step that schedules this request again feeds it from there."""
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PLACEHOLDER_TOKEN

    def stops_by_length(self, max_model_len: int) -> bool:
        """Whether the tokens held now (a placeholder counted) end the request by length."""
        return self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len

    def token_id(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return (
            self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]
        )

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Decides, after a token was appended, whether the request is done (engine-side stops)."""
        last = self.output_token_ids[-1]
        may_stop = self.num_output_tokens >= self.sampling.min_tokens
        if may_stop and not self.sampling.ignore_eos and last in self.eos_token_ids:
            self.stop_token_id = last
            return FinishReason.STOP
        if may_stop and last in self.sampling.stop_token_ids:
            self.stop_token_id = last
            return FinishReason.STOP
        if self.stops_by_length(max_model_len):
            return FinishReason.LENGTH
        return None

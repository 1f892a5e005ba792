"""What the replay observes: one RequestRecord per request, one ServerSample per poll.

Times are seconds on the replay's clock (time.perf_counter() minus the replay's start), so
records compare across requests. Derived latencies are properties, never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from client.api_types import Finished, InstanceInfo


@dataclass
class RequestRecord:
    """State and observations of one replayed request.

    Lifecycle: created unsent (start_s None, success False, error "not sent"); `mark_sent`
    when its RPC starts; `add_chunk` per received delta; then exactly one of `mark_finished`
    or `mark_failed`. A request is successful only if it ended with a non-abort Finished.
    """

    index: int
    request_id: str
    scheduled_s: float
    input_len: int
    requested_output_len: int
    start_s: float | None = None
    end_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    output_tokens: int = 0
    server_prompt_tokens: int | None = None
    success: bool = False
    error: str = "not sent"
    finish_reason: str = ""
    server_queue_s: float | None = None
    server_ttft_s: float | None = None
    instance_id: int = -1

    def mark_sent(self, now_s: float) -> None:
        """The RPC starts now."""
        self.start_s = now_s
        self.error = ""

    def add_chunk(self, now_s: float, num_tokens: int, text: str) -> None:
        """A delta of `num_tokens` tokens arrived at `now_s`."""
        assert self.start_s is not None, "add_chunk before mark_sent"
        self.chunk_times_s.append(now_s - self.start_s)
        self.chunk_tokens.append(num_tokens)
        self.text_parts.append(text)

    def mark_finished(self, now_s: float, event: Finished) -> None:
        """The Finished event arrived; an "abort" reason counts as a failure."""
        self.end_s = now_s
        self.finish_reason = event.reason
        self.output_tokens = event.usage.completion_tokens or sum(self.chunk_tokens)
        self.server_prompt_tokens = event.usage.prompt_tokens
        self.server_queue_s = event.timing.queue_time_s
        self.server_ttft_s = event.timing.ttft_s
        self.instance_id = event.timing.instance_id
        self.success = event.reason != "abort"
        self.error = "" if self.success else "ABORTED: finished with reason abort"

    def mark_failed(self, now_s: float, error: str) -> None:
        """The request failed (RPC error, cancelled, never sent) at `now_s`."""
        self.end_s = now_s
        self.success = False
        self.error = error or "unknown error"

    @property
    def done(self) -> bool:
        """True once the request finished or failed."""
        return self.end_s is not None

    @property
    def ttft_s(self) -> float | None:
        """Send to first delta (seconds); None before the first delta."""
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def latency_s(self) -> float | None:
        """E2EL: send to the Finished event (seconds); None if not finished."""
        if self.start_s is None or self.end_s is None:
            return None
        return self.end_s - self.start_s

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive deltas (seconds); one per delta after the first."""
        t = self.chunk_times_s
        return [b - a for a, b in zip(t[:-1], t[1:], strict=True)]

    @property
    def tpot_s(self) -> float | None:
        """(E2EL - TTFT) / (output_tokens - 1); None unless successful with > 1 token."""
        if not self.success or self.output_tokens <= 1 or self.ttft_s is None:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def generated_text(self) -> str:
        """The streamed text ("" when detokenize was off)."""
        return "".join(self.text_parts)


@dataclass(frozen=True)
class ServerSample:
    """One GetServerInfo poll at `t_s` seconds on the replay clock."""

    t_s: float
    instances: tuple[InstanceInfo, ...]
    unix_s: float = 0.0
    """The Unix time at `t_s` (maps the server's Unix times onto the replay clock; 0.0:
    unknown)."""

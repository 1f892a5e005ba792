"""Plain dataclasses for what the kunserve API returns, so callers never touch protobuf.

`from_proto_*` helpers convert the generated messages; nothing else in `client` reads protobuf
fields directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto.kunserve.v1 import inference_pb2

FINISH_REASONS: dict[int, str] = {
    inference_pb2.FINISH_REASON_UNSPECIFIED: "unspecified",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}

INSTANCE_STATES: dict[int, str] = {
    inference_pb2.INSTANCE_STATE_UNSPECIFIED: "unspecified",
    inference_pb2.INSTANCE_STATE_STARTING: "starting",
    inference_pb2.INSTANCE_STATE_NORMAL: "normal",
    inference_pb2.INSTANCE_STATE_DROPPING: "dropping",
    inference_pb2.INSTANCE_STATE_PIPELINED: "pipelined",
    inference_pb2.INSTANCE_STATE_RESTORING: "restoring",
    inference_pb2.INSTANCE_STATE_FAILED: "failed",
}


class KunserveError(Exception):
    """A gRPC call failed.

    Attributes:
        code_name: the gRPC status code name, e.g. "INVALID_ARGUMENT", "UNAVAILABLE".
        message: the server's message (for INVALID_ARGUMENT it names the field).
    """

    def __init__(self, code_name: str, message: str) -> None:
        super().__init__(f"{code_name}: {message}")
        self.code_name = code_name
        self.message = message

    @property
    def retryable(self) -> bool:
        """True for UNAVAILABLE and RESOURCE_EXHAUSTED, which the API documents as transient."""
        return self.code_name in ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token and, when asked for, its top-k alternatives."""

    logprob: float
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Delta:
    """Tokens generated since the previous event of the same request (>= 1 token).

    `text` is "" while a multi-byte UTF-8 character is incomplete or when detokenize=False.
    """

    token_ids: tuple[int, ...]
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    request_id: str = ""


@dataclass(frozen=True)
class Usage:
    """Token counts of one request (tokens)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ServerTiming:
    """Times measured inside the server (seconds from the request's arrival there)."""

    queue_time_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_preemptions: int = 0
    instance_id: int = -1


@dataclass(frozen=True)
class Finished:
    """The last event of every stream.

    Attributes:
        reason: "stop", "length", "abort" or "unspecified".
        usage: prompt and completion token counts.
        timing: server-side timings.
        stop: the stop token id or stop string that ended the request, or None.
    """

    reason: str
    usage: Usage = field(default_factory=Usage)
    timing: ServerTiming = field(default_factory=ServerTiming)
    stop: int | str | None = None
    request_id: str = ""


StreamEvent = Delta | Finished


@dataclass(frozen=True)
class ModelInfo:
    """The served model (GetModelInfo). Lengths in tokens."""

    served_model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    kv_block_size: int
    num_layers: int
    dtype: str
    has_chat_template: bool
    tokenizer_json: str = field(repr=False, default="")


@dataclass(frozen=True)
class InstanceInfo:
    """One serving instance at the time of a GetServerInfo call."""

    instance_id: int
    state: str
    worker_ranks: tuple[int, ...]
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_bytes_total: int
    kv_bytes_used: int
    num_preemptions: int
    device: str
    layer_range: tuple[int, ...]
    last_pause_unix_s: tuple[float, float] = (0.0, 0.0)
    """When the last transition that parked this instance asked it to park and when it had
    resumed it (Unix seconds; 0.0: not yet)."""

    @property
    def kv_usage(self) -> float:
        """Fraction of KV-cache blocks in use, in [0, 1]; 0 when the instance has none."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class ServerInfo:
    """GetServerInfo: the server's instances and counters."""

    version: str
    overload_policy: str
    instances: tuple[InstanceInfo, ...]
    uptime_s: float
    num_requests_total: int


def event_from_proto(response: inference_pb2.GenerateResponse) -> StreamEvent:
    """Converts one GenerateResponse into a Delta or a Finished.

    Raises:
        KunserveError: ("INTERNAL") when the response carries neither event.
    """
    kind = response.WhichOneof("event")
    if kind == "delta":
        d = response.delta
        logprobs = tuple(
            TokenLogprob(lp.logprob, tuple(lp.top_token_ids), tuple(lp.top_logprobs))
            for lp in d.logprobs
        )
        return Delta(tuple(d.token_ids), d.text, logprobs, response.request_id)
    if kind == "finished":
        return _finished_from_proto(response.finished, response.request_id)
    raise KunserveError("INTERNAL", "GenerateResponse carries neither delta nor finished")


def _finished_from_proto(f: inference_pb2.Finished, request_id: str) -> Finished:
    stop_kind = f.WhichOneof("matched_stop")
    stop: int | str | None = getattr(f, stop_kind) if stop_kind else None
    t = f.timing
    return Finished(
        reason=FINISH_REASONS.get(f.reason, "unspecified"),
        usage=Usage(f.usage.prompt_tokens, f.usage.completion_tokens),
        timing=ServerTiming(t.queue_time_s, t.ttft_s, t.e2e_s, t.num_preemptions, t.instance_id),
        stop=stop,
        request_id=request_id,
    )


def model_info_from_proto(m: inference_pb2.GetModelInfoResponse) -> ModelInfo:
    """Converts GetModelInfoResponse."""
    return ModelInfo(
        served_model_name=m.served_model_name,
        model_path=m.model_path,
        max_model_len=m.max_model_len,
        vocab_size=m.vocab_size,
        eos_token_ids=tuple(m.eos_token_ids),
        kv_block_size=m.kv_block_size,
        num_layers=m.num_layers,
        dtype=m.dtype,
        has_chat_template=m.has_chat_template,
        tokenizer_json=m.tokenizer_json,
    )


def server_info_from_proto(s: inference_pb2.GetServerInfoResponse) -> ServerInfo:
    """Converts GetServerInfoResponse."""
    instances = tuple(
        InstanceInfo(
            instance_id=i.instance_id,
            state=INSTANCE_STATES.get(i.state, "unspecified"),
            worker_ranks=tuple(i.worker_ranks),
            num_running=i.num_running,
            num_waiting=i.num_waiting,
            kv_blocks_total=i.kv_blocks_total,
            kv_blocks_used=i.kv_blocks_used,
            kv_bytes_total=i.kv_bytes_total,
            kv_bytes_used=i.kv_bytes_used,
            num_preemptions=i.num_preemptions,
            device=i.device,
            layer_range=tuple(i.layer_range),
            last_pause_unix_s=(i.last_pause_start_unix_s, i.last_pause_end_unix_s),
        )
        for i in s.instances
    )
    return ServerInfo(s.version, s.overload_policy, instances, s.uptime_s, s.num_requests_total)

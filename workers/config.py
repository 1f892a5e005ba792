"""Frozen, validated configuration for the model, the KV cache, the scheduler and the engine.

Each field's docstring doubles as the CLI help (coordinator/cli.py reads them).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attention.backends import DECODE_GEMMS
from kernels.rope import RopeScaling

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""One log line format for the CLI, the coordinator actor and the workers."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MEMORY_BACKENDS = ("auto", "vmm", "torch")


def parse_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU. Raises ValueError on unknown names."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES) + ['auto']}")
    return _DTYPES[name]


def resolve_memory_backend(name: str, device: torch.device | str) -> str:
    """'vmm' or 'torch' for ``EngineConfig.memory_backend`` on ``device``: ``auto`` is vmm on
    CUDA when cuda-python (``cuda.bindings``) is installed, else torch. Raises ValueError on
    unknown names."""
    if name not in _MEMORY_BACKENDS:
        raise ValueError(f"memory_backend {name!r} is not one of {list(_MEMORY_BACKENDS)}")
    if name != "auto":
        return name
    on_cuda = torch.device(device).type == "cuda"
    return "vmm" if on_cuda and importlib.util.find_spec("cuda.bindings") else "torch"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder, read from a HuggingFace ``config.json``."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one decoder layer's matmuls: q, k, v and o, and the MLP's gate, up and
        down (no norms)."""
        h, q, kv = self.hidden_size, self.q_size, self.kv_size
        return h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size

    @property
    def attention_break_even(self) -> float:
        """The context (tokens) at which a prompt token's attention costs as much as its pass
        through a layer's linear parts: those do 2 FLOPs per weight
        (:attr:`layer_matmul_params`), attention 4 per query head dimension per context
        token. Scaled by :data:`ATTENTION_EFFICIENCY`, the prefill kernel's rate against the
        GEMMs'. About 19k tokens for Llama-3-8B."""
        return ATTENTION_EFFICIENCY * 2 * self.layer_matmul_params / (4 * self.q_size)

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> ModelConfig:
        """Raises ValueError for architectures outside the Llama family."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(
                f"model_type {model_type!r} is not supported: expected llama, mistral or qwen2"
            )
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=_parse_rope_scaling(cfg.get("rope_scaling")),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))

    def weight_bytes(self, dtype: torch.dtype, layers: int | None = None) -> int:
        """Bytes of ``layers`` decoder layers' weights (all layers by default), no embeddings."""
        per_layer = self.layer_matmul_params + 2 * self.hidden_size  # and the two norms
        n = self.num_layers if layers is None else layers
        return n * per_layer * dtype.itemsize


def _parse_rope_scaling(raw: dict | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported: expected 'llama3'")
    return RopeScaling(
        factor=raw["factor"],
        low_freq_factor=raw["low_freq_factor"],
        high_freq_factor=raw["high_freq_factor"],
        original_max_position_embeddings=raw["original_max_position_embeddings"],
    )


PIPELINE_TOKENS = 1024
"""Default cap on a pipeline micro-batch's tokens. A drop admits a burst's queued prompts at
once; with 8,192-token micro-batches their prefill chunks held every decode token behind
them. On 2 H200s (dummy Llama-3-8B, docs/benchmarks.md) 1,024 cut P99 TPOT from 197 to 41 ms
and raised goodput from 2.3 to 4.9 req/s on the Azure code burst, and cut P99 TTFT from 882 to
359 ms on the conversation burst; 512 was worse there (950 ms)."""


EXCHANGE_STEP_S = 0.025
"""Link time a live step's KV exchange may take by default (seconds). On 2 H200s a step that
still runs remote attention for some pre-drop request costs 35-70 ms more than a replayed
one, whatever it moves, while the link moves ~1 GiB in 4 ms (docs/benchmarks.md, session 8):
a step that moves ~25 ms worth ends the exchange in fewer, cheaper steps."""

EXCHANGE_FALLBACK_BYTES = 2**30
"""The default exchange budget where no link bandwidth was measured (gloo on CPU)."""


def exchange_bytes_per_step(configured: int | None, link_bandwidth: float | None) -> int:
    """The live exchange's budget per step (bytes): ``configured`` when set, else what
    ``link_bandwidth`` (bytes/s, one way, measured at start-up) moves in
    :data:`EXCHANGE_STEP_S`, at least 256 MiB; :data:`EXCHANGE_FALLBACK_BYTES` without a
    measurement."""
    if configured is not None:
        return configured
    if not link_bandwidth:
        return EXCHANGE_FALLBACK_BYTES
    return max(256 * 2**20, int(link_bandwidth * EXCHANGE_STEP_S))


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    """Tokens per KV-cache block."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory this worker may use for weights, activations and KV cache."""
    cpu_kv_cache_gb: float = 1.0
    """KV-cache size in GiB on a CPU worker."""
    num_kv_blocks: int | None = None
    """Override the number of KV blocks (for tests and to force memory pressure)."""
    kv_exchange_bytes_per_step: int | None = None
    """Bytes a pipeline step moves between a group's workers while requests keep decoding:
    after a drop, pre-drop requests' KV to the stages that own their layers (at least one layer
    of one request a step; DESIGN.md §6.5), counted per worker and direction of its link
    (copies within a worker are not counted); during a restore, running requests' KV onto one
    home (every byte counted), and on VMM memory the dropped weights back (per link). None:
    what the link measured at start-up moves in :data:`EXCHANGE_STEP_S`
    (:func:`exchange_bytes_per_step`)."""

    def __post_init__(self) -> None:
        if self.kv_exchange_bytes_per_step is not None and self.kv_exchange_bytes_per_step < 0:
            raise ValueError(
                f"kv_exchange_bytes_per_step must be >= 0, got {self.kv_exchange_bytes_per_step}"
            )
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(
                f"block_size must be a power of two in [1, 256], got {self.block_size}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


ATTENTION_EFFICIENCY = 0.7
"""Prefill attention's FLOP rate against the linear layers' in a chunk deep in a long prompt:
on one H200, Llama-3-8B, the work a 1,024-token chunk ending at 7,168 adds beyond a shallow
one ran at 380-439 TFLOP/s against the chunk's 599 (docs/benchmarks.md, session 21)."""

PIPELINE_CHUNK_COSTS = ("tokens", "attention")


@dataclass(frozen=True)
class SchedulerConfig:
    """Token-budget continuous batching (vLLM v1 rules)."""

    max_num_batched_tokens: int = 2048
    """Most tokens (prefill chunks plus decodes) in one engine step."""
    max_num_seqs: int = 256
    """Most requests running at once on one instance."""
    max_model_len: int | None = None
    """Context length (prompt plus output); defaults to the model's max_position_embeddings."""
    max_waiting: int = 4096
    """Admission control: a request beyond this many waiting gets RESOURCE_EXHAUSTED."""
    pipeline_micro_batches: int | None = None
    """Micro-batches a pipeline group's leader keeps in flight, so that no stage idles while
    another computes (KunServe §3(c)); None: the group's stage count. 1 runs the stages in
    lockstep, one micro-batch at a time. Steps that carry pre-drop requests (remote attention,
    live KV exchange) always run alone."""
    pipeline_max_num_batched_tokens: int | None = None
    """Most tokens in one micro-batch of a pipeline group (None: max_num_batched_tokens, at
    most ``PIPELINE_TOKENS``). A decode token waits for its micro-batch to pass every stage,
    about the time one instance takes for this many tokens through the whole model, so this
    bounds the time between tokens while a drop admits a burst's prompts (Sarathi-Serve's token
    budget)."""
    pipeline_chunk_cost: str = "tokens"
    """How a pipeline micro-batch's budget counts a prompt chunk: ``tokens``, one per token;
    ``attention``, each token with its attention over the context before it
    (:func:`workers.scheduler.chunk_tokens`), so a chunk deep in a long prompt gets fewer
    tokens and the micro-batches cost about the same. Micro-batch k + 2 waits for k on the
    other stage, so a costlier micro-batch before a cheaper one idles both stages, and a
    decode token waits out two micro-batches (TeraPipe, Li et al. ICML 2021, slices a
    sequence unevenly for the same reason). The last prompt chunk grows into the rows a
    stage's piecewise graphs pad the micro-batch with. In one 2x H200 code-burst replay it
    moved P99 TPOT and TTFT within the runs' spread (docs/benchmarks.md, session 23)."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        pipelined = self.pipeline_max_num_batched_tokens
        if pipelined is not None and pipelined < 1:
            raise ValueError(
                "pipeline_max_num_batched_tokens must be >= 1 (or None: max_num_batched_tokens)"
            )
        if self.pipeline_chunk_cost not in PIPELINE_CHUNK_COSTS:
            raise ValueError(
                f"pipeline_chunk_cost must be one of {', '.join(PIPELINE_CHUNK_COSTS)}, "
                f"got {self.pipeline_chunk_cost!r}"
            )
        if self.pipeline_micro_batches is not None and self.pipeline_micro_batches < 1:
            raise ValueError("pipeline_micro_batches must be >= 1 (or None: the stage count)")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")

    @property
    def pipeline_token_budget(self) -> int:
        """Tokens per micro-batch in pipeline mode."""
        explicit = self.pipeline_max_num_batched_tokens
        return explicit or min(self.max_num_batched_tokens, PIPELINE_TOKENS)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one worker needs to build its engine."""

    model_path: str
    """HuggingFace directory (config.json, *.safetensors, tokenizer.json)."""
    load_format: str = "auto"
    """'auto' (safetensors) or 'dummy' (random weights of the config's shapes, for benchmarks)."""
    dtype: str = "auto"
    """Weights and activations: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."""
    attention_backend: str = "auto"
    """'torch' (reference), 'triton', or 'auto' (triton on GPU, torch on CPU)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    """Seed of the sampler for requests without their own seed."""
    cpu_threads: int = 1
    """torch threads per CPU worker."""
    enforce_eager: bool = False
    """Run every step eagerly: capture no CUDA graphs for decode steps (graphs are captured
    only on CUDA with the triton attention backend; CPU workers are always eager)."""
    memory_backend: str = "auto"
    """Where weights and KV cache live: 'vmm' (CUDA virtual memory: each layer and the KV cache
    on remappable physical chunks, so dropped layers become KV without a copy; emulated over
    shared memory on CPU), 'torch' (the torch allocator), or 'auto' (vmm on CUDA when
    cuda-python is installed, torch otherwise)."""
    stage_graphs_at_start: int = 0
    """Capture at start-up the decode graphs of every stage a drop into a group of this many
    stages would make of this worker (0: none; stages then capture each size on first use, a
    stall of tens of ms per size after a drop). CUDA graphs on VMM memory only; ``kunserve
    serve --overload-policy drop`` with two instances or more sets 2."""
    decode_gemm: str = "cublas"
    """Matmuls of batches of at most 16 tokens (decode) on the triton attention backend:
    'cublas' (torch's), or 'triton' (kernels/skinny_gemm.py: each weight read once, with the
    RMSNorm before q/k/v and gate/up and the SiLU-and-mul before down fused in). The torch
    backend always uses torch's."""

    def __post_init__(self) -> None:
        if self.decode_gemm not in DECODE_GEMMS:
            raise ValueError(
                f"decode_gemm must be one of {list(DECODE_GEMMS)}, got {self.decode_gemm!r}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES) + ['auto']}")
        if self.stage_graphs_at_start < 0 or self.stage_graphs_at_start == 1:
            raise ValueError(
                f"stage_graphs_at_start must be 0 or a group size >= 2, got {self.stage_graphs_at_start}"
            )
        if self.memory_backend not in _MEMORY_BACKENDS:
            raise ValueError(
                f"memory_backend must be one of {list(_MEMORY_BACKENDS)}, got {self.memory_backend!r}"
            )

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dir(Path(self.model_path))

    def max_model_len(self, model: ModelConfig) -> int:
        limit = self.scheduler.max_model_len
        return model.max_position_embeddings if limit is None else limit


def load_eos_token_ids(model_dir: str | Path) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json (the union: chat models often stop
    on the end-of-turn token listed only in the generation config)."""
    ids = set(ModelConfig.from_dir(Path(model_dir)).eos_token_ids)
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    return frozenset(ids)

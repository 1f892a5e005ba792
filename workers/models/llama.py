"""Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2) holding a layer range.

A model object holds decoder layers ``[start, end)`` of ``num_layers``: the embedding lives with
the first stage (start == 0), the final norm and LM head with the last (end == num_layers). A
stage that is not first takes hidden states and the residual stream from the previous stage;
one that is not last returns them. Weight names follow HuggingFace checkpoints; q/k/v and
gate/up are fused into one matmul each at load time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from attention.backends import AttentionBackend
from attention.metadata import AttentionMetadata
from kernels.rope import rope_cos_sin_cache
from workers.config import ModelConfig
from workers.forward_context import get_forward_context


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.backend = backend

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.rms_norm(x, self.weight, self.eps, residual)

    def forward_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, linear: nn.Linear
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(linear(RMSNorm(x + residual)), x + residual)``: the norm and the projection after
        it, which the backend may run as one kernel (a decode batch's skinny GEMM)."""
        return self.backend.rms_norm_linear(
            x, self.weight, self.eps, residual, linear.weight, linear.bias
        )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, local_layer: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.local_layer = local_layer  # index inside a KV block
        self.backend = backend
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> torch.Tensor:
        """Attention from this layer's ``qkv_proj`` output [n, q_size + 2 * kv_size] (the
        layer computes it, fused with its input norm) through ``o_proj``: [n, hidden]."""
        ctx = get_forward_context()
        meta = ctx.attn_metadata
        if ctx.router is not None:  # pre-drop requests in a pipeline step
            q, k, v = self.split_qkv(qkv)
            out = ctx.router.attend(self.local_layer, q, k, v, positions, ctx.kv_cache, meta)
            return self.project(out)
        q = self.rope_and_write_kv(qkv, positions, cos_sin_cache, ctx.kv_cache, meta.slot_mapping)
        return self.project(self.attend(q, ctx.kv_cache, meta))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[n, q_size + 2 * kv_size] -> q [n, heads, d], k and v [n, kv_heads, d] (views)."""
        cfg, n = self.cfg, qkv.shape[0]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        return (
            q.reshape(n, cfg.num_heads, cfg.head_dim),
            k.reshape(n, cfg.num_kv_heads, cfg.head_dim),
            v.reshape(n, cfg.num_kv_heads, cfg.head_dim),
        )

    def rope_and_write_kv(
        self,
        qkv: torch.Tensor,  # [n, q_size + 2 * kv_size]
        positions: torch.Tensor,  # [n] int64
        cos_sin_cache: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [n] int64; -1 writes nothing
    ) -> torch.Tensor:
        """Rotates q and k and writes k, v to their slots at this layer: rotated q [n, heads,
        d]. Reads no metadata beyond the slots, so a CUDA graph can hold it
        (workers/piecewise_graphs.py)."""
        q, k, v = self.split_qkv(qkv)
        q, _ = self.backend.rope_and_write_kv(
            q, k, v, positions, cos_sin_cache, kv_cache, self.local_layer, slot_mapping
        )
        return q

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Paged attention of rotated q [n, heads, d] over this layer's KV: [n, q_size]."""
        out = self.backend.attention(q, kv_cache, self.local_layer, meta)
        return out.reshape(q.shape[0], self.cfg.q_size)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """``o_proj`` of the attention output [n, q_size]: [n, hidden]."""
        return self.backend.linear(out.reshape(out.shape[0], self.cfg.q_size), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.backend = backend
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU and ``down_proj`` from this MLP's ``gate_up_proj`` output [n, 2 * inter] (the
        layer computes it, fused with its norm): [n, hidden]."""
        return self.backend.silu_and_mul_linear(gate_up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, local_layer: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = Attention(cfg, local_layer, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = MLP(cfg, backend)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.input_layernorm.forward_linear(
            hidden, residual, self.self_attn.qkv_proj
        )
        hidden = self.self_attn(qkv, positions, cos_sin_cache)
        return self.mlp_block(hidden, residual)

    def mlp_block(
        self, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after attention: post-attention norm (adding ``hidden`` [n, hidden] to the
        residual stream) and the MLP. Returns (hidden, residual), each [n, hidden]."""
        gate_up, residual = self.post_attention_layernorm.forward_linear(
            hidden, residual, self.mlp.gate_up_proj
        )
        return self.mlp(gate_up), residual


class LlamaModel(nn.Module):
    """Decoder layers ``[start, end)`` plus embedding (first stage) and head (last stage)."""

    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        layer_range: tuple[int, int] | None = None,
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        start, end = layer_range or (0, cfg.num_layers)
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside [0, {cfg.num_layers})")
        self.cfg, self.start, self.end = cfg, start, end
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, backend) for i in range(end - start))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend) if self.is_last else None
        self.lm_head = (
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        )
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.reset_rope_cache()

    @classmethod
    def of_modules(
        cls,
        cfg: ModelConfig,
        layer_range: tuple[int, int],
        layers: Sequence[nn.Module],
        embed_tokens: nn.Module | None,
        norm: nn.Module | None,
        lm_head: nn.Module | None,
        max_positions: int,
        cos_sin_cache: torch.Tensor,
    ) -> LlamaModel:
        """A model of layers ``layer_range`` over existing modules, making no parameter (a
        drop's stage model: building one on meta and replacing its modules costs ~0.5 ms a
        layer of host time). ``embed_tokens`` is kept on the first stage, ``norm`` and
        ``lm_head`` on the last; the caller points each layer at its KV slot. Raises
        ValueError when the range or the layer count is wrong."""
        start, end = layer_range
        if not 0 <= start < end <= cfg.num_layers or len(layers) != end - start:
            raise ValueError(
                f"{len(layers)} layers for range [{start}, {end}) of {cfg.num_layers} layers"
            )
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.cfg, model.start, model.end = cfg, start, end
        model.embed_tokens = embed_tokens if model.is_first else None
        model.layers = nn.ModuleList(layers)
        model.norm = norm if model.is_last else None
        model.lm_head = lm_head if model.is_last else None
        model.max_positions = max_positions
        model.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        return model

    def reset_rope_cache(self) -> None:
        """(Re)computes the RoPE table on the model's device; call after ``to_empty``."""
        cfg = self.cfg
        device = self.cos_sin_cache.device
        if device.type == "meta":
            return
        self.cos_sin_cache = rope_cos_sin_cache(
            cfg.head_dim, self.max_positions, cfg.rope_theta, cfg.rope_scaling
        ).to(device)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.cfg.num_layers

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        input_ids: torch.Tensor | None = None,  # [num_tokens] int64, first stage only
        hidden: torch.Tensor | None = None,  # [num_tokens, hidden], later stages
        residual: torch.Tensor | None = None,  # [num_tokens, hidden], later stages
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs this stage's layers. The last stage returns ``(normed_hidden, residual)``; the
        others return ``(hidden, residual)`` for the next stage."""
        if self.is_first:
            hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, self.cos_sin_cache)
        if self.is_last:
            hidden, residual = self.norm(hidden, residual)
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] normed states -> [n, vocab] logits (last stage only)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HuggingFace-named tensors into this stage's parameters.

        Tensors of layers outside ``[start, end)`` are skipped. Returns the names of the
        parameters that were filled, so the loader can report any left empty; a fused
        parameter (``qkv_proj``, ``gate_up_proj``) counts as filled only once all its shards are.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards: dict[str, set[str]] = {}
        for name, tensor in weights:
            for target, shard in self.map_weight_name(name):
                if target not in params:
                    continue
                _copy_shard(params[target], tensor, shard, self.cfg)
                if shard is None:
                    loaded.add(target)
                else:
                    shards.setdefault(target, set()).add(shard)
        loaded.update(t for t, got in shards.items() if got == _shards_of(next(iter(got))))
        return loaded

    def map_weight_name(self, name: str) -> list[tuple[str, str | None]]:
        """HF name -> [(our parameter name, shard)]; empty when this stage does not hold it."""
        if name == "model.embed_tokens.weight":
            out = [("embed_tokens.weight", None)]
            if self.cfg.tie_word_embeddings:
                out.append(("lm_head.weight", None))
            return out
        if name == "lm_head.weight":
            return [("lm_head.weight", None)]
        if name == "model.norm.weight":
            return [("norm.weight", None)]
        if not name.startswith("model.layers."):
            return []
        idx_str, rest = name[len("model.layers.") :].split(".", 1)
        idx = int(idx_str)
        if not self.start <= idx < self.end:
            return []
        prefix = f"layers.{idx - self.start}."
        for hf, ours in _FUSED.items():
            if rest.startswith(hf):
                return [(prefix + ours + rest[len(hf) :], hf)]
        return [(prefix + rest, None)]


_FUSED = {
    "self_attn.q_proj": "self_attn.qkv_proj",
    "self_attn.k_proj": "self_attn.qkv_proj",
    "self_attn.v_proj": "self_attn.qkv_proj",
    "mlp.gate_proj": "mlp.gate_up_proj",
    "mlp.up_proj": "mlp.gate_up_proj",
}


def _shards_of(shard: str) -> set[str]:
    """All HF projections fused with ``shard`` (e.g. q, k and v for ``self_attn.k_proj``)."""
    return {hf for hf, ours in _FUSED.items() if ours == _FUSED[shard]}


def _copy_shard(param: torch.Tensor, tensor: torch.Tensor, shard: str | None, cfg: ModelConfig):
    """Copies ``tensor`` into ``param`` or into its rows for a fused projection."""
    if shard is None:
        if param.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(tensor.shape)}"
            )
        param.data.copy_(tensor)
        return
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    offsets = {
        "self_attn.q_proj": (0, q),
        "self_attn.k_proj": (q, kv),
        "self_attn.v_proj": (q + kv, kv),
        "mlp.gate_proj": (0, inter),
        "mlp.up_proj": (inter, inter),
    }
    start, size = offsets[shard]
    if tensor.shape[0] != size:
        raise ValueError(f"{shard}: expected {size} rows, checkpoint has {tensor.shape[0]}")
    param.data[start : start + size].copy_(tensor)

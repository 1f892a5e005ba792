"""Convert a llama.cpp GGUF checkpoint into the HuggingFace directory the model runner loads.

GGUF (llama.cpp's single-file format) keeps the config as key/value metadata, the weights as
possibly quantized tensors under llama.cpp names, and the tokenizer as token/merge/score arrays.
``convert_gguf`` turns one file into ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json``:

- Weights are dequantized with ``gguf.quants.dequantize`` (exact for F32/F16/BF16; a quantized
  file yields its dequantized values, not the original checkpoint) and cast to ``dtype``.
- llama.cpp stores the q/k projections of ``llama`` models with rows permuted for its
  interleaved-pair RoPE; they are permuted back to HF's rotate-half layout (``unpermute_qk``).
- The tokenizer is rebuilt with the ``tokenizers`` library: byte-level BPE for
  ``tokenizer.ggml.model == "gpt2"``, sentencepiece-style BPE with byte fallback for ``"llama"``.

Supported architectures: ``llama`` and ``qwen2`` (q/k/v biases, no q/k permutation).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

logger = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SPIECE_SPACE = "\u2581"  # sentencepiece's visible space, "▁"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _Architecture:
    """How one GGUF ``general.architecture`` maps onto a HuggingFace model class."""

    hf_class: str
    model_type: str
    qk_interleaved: bool
    """llama.cpp stored q/k rows permuted for interleaved-pair RoPE; undo it."""
    attention_bias: bool
    """q/k/v projections carry a bias."""


_ARCHITECTURES = {
    "llama": _Architecture("LlamaForCausalLM", "llama", qk_interleaved=True, attention_bias=False),
    "qwen2": _Architecture("Qwen2ForCausalLM", "qwen2", qk_interleaved=False, attention_bias=True),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert ``gguf_path`` into a HuggingFace directory at ``out_dir`` and return ``out_dir``.

    Everything is written into a hidden sibling temp directory that is renamed onto ``out_dir``
    at the end, so ``out_dir`` either does not exist or holds a complete conversion; on any
    error the temp directory is removed (a killed process may leave a ``.<name>.*.tmp`` sibling,
    never a half ``out_dir``). Peak memory is about the output size plus one float32 tensor;
    SmolLM2-135M (Q4_1, 98 MB) takes about 5 s on 2 CPU cores and gives 270 MB in bf16.

    Args:
        gguf_path: a GGUF v2/v3 file of architecture ``llama`` or ``qwen2``.
        out_dir: the directory to create; its parent is created if missing.
        dtype: floating dtype of the saved tensors (float32, bfloat16 or float16).

    Raises:
        FileExistsError: ``out_dir`` already exists (before or, from a concurrent writer, after
            the conversion); it is never overwritten.
        ValueError: bad dtype, missing metadata, or unexpected/missing tensors.
        NotImplementedError: an unsupported architecture, tokenizer type, BPE pre-tokenizer,
            quantization type, partial RoPE or Llama-3 ``rope_freqs`` scaling.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; refusing to overwrite it")
    start = time.monotonic()
    logger.info("converting %s to %s (%s)", gguf_path, out_dir, dtype)
    reader = gguf.GGUFReader(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        _write_hf_dir(reader, tmp, dtype)
        try:
            tmp.rename(out_dir)
        except OSError as exc:  # a concurrent conversion renamed its copy first
            raise FileExistsError(f"{out_dir} appeared during the conversion") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - start)
    return out_dir


def _write_hf_dir(reader: gguf.GGUFReader, out: Path, dtype: torch.dtype) -> None:
    """Write all five files of the HuggingFace directory into ``out``."""
    config = build_config(reader, dtype)
    state = read_state_dict(reader, config, dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state
    tokenizer, tokenizer_config = build_tokenizer(reader)
    tokenizer.save(str(out / "tokenizer.json"))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    pad_id = _meta(reader, "tokenizer.ggml.padding_token_id", None)
    if pad_id is not None:
        generation["pad_token_id"] = pad_id
    _write_json(out / "config.json", config)
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "generation_config.json", generation)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Metadata and config.json
# ---------------------------------------------------------------------------------------------

_REQUIRED = object()


def _meta(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """The Python value of metadata ``key`` (str, int, float, bool or list); ValueError if a
    required key is missing."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _architecture(reader: gguf.GGUFReader) -> _Architecture:
    name = _meta(reader, "general.architecture")
    if name not in _ARCHITECTURES:
        raise NotImplementedError(
            f"GGUF architecture {name!r} is not supported; expected one of {sorted(_ARCHITECTURES)}"
        )
    return _ARCHITECTURES[name]


def _float32_value(x: float) -> float:
    """GGUF floats are float32: 1e-5 reads back as 9.99999974e-06; return the shortest decimal
    that rounds to the same float32 (1e-05) so config.json shows the intended value."""
    return float(str(np.float32(x)))


def build_config(reader: gguf.GGUFReader, dtype: torch.dtype) -> dict[str, Any]:
    """HuggingFace ``config.json`` contents for the model in ``reader``.

    ``vocab_size`` is the number of rows of ``token_embd``; ``tie_word_embeddings`` is true when
    the file has no ``output.weight``. ``eos_token_id`` is a list when the file names an
    end-of-turn token (``tokenizer.ggml.eot_token_id``) other than EOS.

    Raises:
        ValueError: a required ``{arch}.*`` key is missing.
        NotImplementedError: see ``convert_gguf``.
    """
    arch_name = _meta(reader, "general.architecture")
    arch = _architecture(reader)
    p = f"{arch_name}."
    hidden = _meta(reader, p + "embedding_length")
    heads = _meta(reader, p + "attention.head_count")
    head_dim = _meta(reader, p + "attention.key_length", hidden // heads)
    rope_dims = _meta(reader, p + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise NotImplementedError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise NotImplementedError("Llama-3 rope_freqs scaling cannot be mapped to rope_scaling")
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": _meta(reader, p + "feed_forward_length"),
        "num_hidden_layers": _meta(reader, p + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(reader, p + "attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(_meta(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(_meta(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": _meta(reader, p + "context_length"),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": arch.attention_bias,
        "mlp_bias": False,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _eos_token_ids(reader),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    rope_scaling = _rope_scaling(reader, p)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _eos_token_ids(reader: gguf.GGUFReader) -> int | list[int] | None:
    eos = _meta(reader, "tokenizer.ggml.eos_token_id", None)
    eot = _meta(reader, "tokenizer.ggml.eot_token_id", None)
    if eot is None or eot == eos:
        return eos
    return [eos, eot] if eos is not None else eot


def _rope_scaling(reader: gguf.GGUFReader, prefix: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*``: None, linear or yarn."""
    kind = _meta(reader, prefix + "rope.scaling.type", "none")
    factor = _meta(reader, prefix + "rope.scaling.factor", None)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(factor)}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": _float32_value(factor),
            "original_max_position_embeddings": _meta(
                reader, prefix + "rope.scaling.original_context_length"
            ),
        }
    raise NotImplementedError(f"rope scaling type {kind!r} is not supported")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str:
    """HF name of a llama.cpp tensor: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.
    q_proj.weight``. Raises ValueError for a name outside the Llama/Qwen2 set."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama-family model")
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, returning HF rotate-half layout.

    Within each head of ``head_dim`` rows, llama.cpp puts the two rows that RoPE rotates
    together next to each other (rows ``2i, 2i+1``: interleaved pairs, as in Meta's original
    Llama); HF rotates row ``i`` with row ``i + head_dim/2`` (rotate-half). GGUF row
    ``h*head_dim + 2i + j`` is HF row ``h*head_dim + j*head_dim/2 + i``.

    Args:
        w: [num_heads * head_dim, in_features] weight or [num_heads * head_dim] bias.
        num_heads: query heads for q, KV heads for k.

    Returns:
        A new array of the same shape and dtype.
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of even size")
    pairs = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(w.shape)


def _expected_names(config: dict[str, Any]) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    kinds = [f"{hf}.weight" for hf in _LAYER_TENSORS.values()]
    if config["attention_bias"]:
        kinds += [f"self_attn.{x}_proj.bias" for x in "qkv"]
    for layer in range(config["num_hidden_layers"]):
        names.update(f"model.layers.{layer}.{kind}" for kind in kinds)
    return names


def read_state_dict(
    reader: gguf.GGUFReader, config: dict[str, Any], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of ``reader`` into HF names, layout and ``dtype``.

    Each tensor is dequantized to float32, q/k are un-permuted for ``llama`` files, and the
    result is cast to ``dtype`` (round-to-nearest-even for bf16/fp16). Linear weights are
    [out_features, in_features], the embedding is [vocab_size, hidden_size].

    Raises:
        ValueError: an unknown tensor name, or the set of tensors differs from the one
            ``config`` implies (missing layers, absent biases).
        NotImplementedError: a quantization type ``gguf.quants`` cannot dequantize.
    """
    arch = _ARCHITECTURES[config["model_type"]]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # GGUF lists dims fastest-first ([in, out]); numpy/torch want [out, in].
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = np.array(values, dtype=np.float32).reshape(shape)  # a copy, not the memmap
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if arch.qk_interleaved and kind in heads:
            values = unpermute_qk(values, heads[kind])
        state[name] = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    expected = _expected_names(config)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"GGUF tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    return state


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer(reader: gguf.GGUFReader) -> tuple[Tokenizer, dict[str, Any]]:
    """The ``tokenizers`` tokenizer and ``tokenizer_config.json`` contents stored in ``reader``.

    Token ids are the GGUF token indices. Tokens of type CONTROL or UNKNOWN become special
    added tokens, USER_DEFINED ones non-special added tokens (never split, kept by
    ``skip_special_tokens``). BOS/EOS are added by the post-processor only if
    ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so (defaults: BOS for "llama",
    nothing for "gpt2").

    Raises:
        NotImplementedError: a tokenizer type other than "gpt2" and "llama", or a "gpt2"
            pre-tokenizer (``tokenizer.ggml.pre``) other than those in ``_bpe_pre_tokenizer``.
    """
    kind = _meta(reader, "tokenizer.ggml.model")
    arch_name = _meta(reader, "general.architecture")
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(reader, tokens)
        add_bos_default = False
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(reader, tokens, types)
        add_bos_default = True
    else:
        raise NotImplementedError(
            f"GGUF tokenizer type {kind!r} is not supported; expected 'gpt2' (byte-level BPE) "
            "or 'llama' (sentencepiece BPE)"
        )
    _add_added_tokens(tokenizer, tokens, types)
    add_bos = bool(_meta(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_meta(reader, "tokenizer.ggml.add_eos_token", False))
    specials = _special_token_names(reader, tokens)
    _set_post_processor(tokenizer, kind, specials, add_bos, add_eos)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _meta(reader, f"{arch_name}.context_length"),
    }
    template = _meta(reader, "tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return tokenizer, config


def _special_token_names(reader: gguf.GGUFReader, tokens: list[str]) -> dict[str, str]:
    """``{"bos_token": "<s>", ...}`` for the roles whose id the file names."""
    names = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _meta(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            names[f"{role}_token"] = tokens[token_id]
    return names


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a duplicated token string keeps its first id."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _byte_level_bpe(reader: gguf.GGUFReader, tokens: list[str]) -> Tokenizer:
    """GPT-2 style BPE: tokens and merges are in byte-to-unicode form ("Ġ" for a space)."""
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges))
    pre = _meta(reader, "tokenizer.ggml.pre", "gpt-2")
    normalizer, tokenizer.pre_tokenizer = _bpe_pre_tokenizer(pre)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bpe_pre_tokenizer(
    pre: str,
) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    """Normalizer and pre-tokenizer of the HF tokenizer.json that llama.cpp labelled ``pre``.

    - "gpt-2" (also assumed when the file has no ``tokenizer.ggml.pre``): GPT-2's regex, i.e.
      ByteLevel with ``use_regex``.
    - "smollm" (SmolLM/SmolLM2): every digit alone, then GPT-2's regex; checked against
      transformers on the real SmolLM2 GGUF.
    - "qwen2": NFC, Qwen2's split regex (digits one at a time), then byte-level without a
      regex; written from Qwen2's tokenizer.json layout, not checked on a real Qwen2 GGUF.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        return None, byte_level
    if pre == "smollm":
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    if pre == "qwen2":
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return normalizers.NFC(), pre_tokenizers.Sequence([split, no_regex])
    raise NotImplementedError(
        f"GGUF BPE pre-tokenizer {pre!r} is not supported; expected 'gpt-2', 'smollm' or 'qwen2'"
    )


def _sentencepiece_bpe(reader: gguf.GGUFReader, tokens: list[str], types: list[int]) -> Tokenizer:
    """Sentencepiece BPE as a ``tokenizers`` BPE with byte fallback.

    Sentencepiece BPE repeatedly merges the adjacent pair whose concatenation is the vocabulary
    piece with the highest score. The equivalent ranked merge list holds, for every NORMAL
    piece, each split into two vocabulary pieces, ordered by the piece's score (highest
    first; ties by piece id, then by the ids of the two halves). Spaces become "▁" and, when
    ``tokenizer.ggml.add_space_prefix`` (default true), a "▁" is prepended to the text.
    """
    scores: list[float] = _meta(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
    vocab = _vocab(tokens)
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece_id, piece in enumerate(tokens):
        if types[piece_id] != gguf.TokenType.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[piece_id], piece_id, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk_id = _meta(reader, "tokenizer.ggml.unknown_token_id", None)
    model = models.BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in ranked],
        unk_token=None if unk_id is None else tokens[unk_id],
        fuse_unk=True,
        byte_fallback=gguf.TokenType.BYTE in types,
    )
    tokenizer = Tokenizer(model)
    replace = normalizers.Replace(" ", _SPIECE_SPACE)
    add_prefix = bool(_meta(reader, "tokenizer.ggml.add_space_prefix", True))
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPIECE_SPACE), replace])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_added_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Register CONTROL/UNKNOWN tokens as special and USER_DEFINED as plain added tokens."""
    special_types = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    special, plain = [], []
    for token, kind in zip(tokens, types, strict=True):
        if kind in special_types:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == gguf.TokenType.USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _set_post_processor(
    tokenizer: Tokenizer, kind: str, specials: dict[str, str], add_bos: bool, add_eos: bool
) -> None:
    """BOS/EOS insertion as a TemplateProcessing; else ByteLevel (offsets only) for "gpt2"."""
    prefix = [specials["bos_token"]] if add_bos and "bos_token" in specials else []
    suffix = [specials["eos_token"]] if add_eos and "eos_token" in specials else []
    if not prefix and not suffix:
        if kind == "gpt2":
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        return

    def segment(sequence: str, type_id: int) -> list[str]:
        return [f"{piece}:{type_id}" for piece in (*prefix, f"${sequence}", *suffix)]

    tokenizer.post_processor = processors.TemplateProcessing(
        single=segment("A", 0),
        pair=segment("A", 0) + segment("B", 1),
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(prefix + suffix)],
    )

"""Turns a ``GenerateRequest`` into prompt ids and sampling parameters, or an error naming the
field (INVALID_ARGUMENT)."""

from __future__ import annotations

from dataclasses import dataclass

from proto.kunserve.v1 import inference_pb2 as pb
from workers.request import InvalidRequestError, SamplingParams
from workers.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelLimits:
    served_model_name: str
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class ParsedRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int  # resolved
    detokenize: bool


def parse_generate_request(
    req: pb.GenerateRequest, tokenizer: Tokenizer, limits: ModelLimits
) -> ParsedRequest:
    """Raises InvalidRequestError whose ``field`` is the proto field path."""
    if req.model and req.model != limits.served_model_name:
        raise InvalidRequestError(
            "model", f"unknown model {req.model!r}; this server serves {limits.served_model_name!r}"
        )
    prompt = _prompt_ids(req, tokenizer, limits)
    sampling = sampling_from_proto(req.sampling_params)
    sampling.validate()
    room = limits.max_model_len - len(prompt)
    if room <= 0:
        raise InvalidRequestError(
            "prompt",
            f"{len(prompt)} tokens leave no room in the model's context of "
            f"{limits.max_model_len} tokens",
        )
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else room
    if max_tokens > room:
        raise InvalidRequestError(
            "sampling_params.max_tokens",
            f"prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"context of {limits.max_model_len} tokens",
        )
    detokenize = req.detokenize if req.HasField("detokenize") else True
    return ParsedRequest(prompt, sampling, max_tokens, detokenize)


def _prompt_ids(req: pb.GenerateRequest, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input", "one of text, token_ids or messages is required")
    if kind == "text":
        if not req.text:
            raise InvalidRequestError("text", "the prompt must not be empty")
        return tokenizer.encode(req.text)
    if kind == "token_ids":
        ids = list(req.token_ids.ids)
        if not ids:
            raise InvalidRequestError("token_ids", "the prompt must not be empty")
        bad = [i for i in ids if i >= limits.vocab_size]
        if bad:
            raise InvalidRequestError(
                "token_ids", f"id {bad[0]} is outside the vocabulary of {limits.vocab_size}"
            )
        return ids
    msgs = [{"role": m.role, "content": m.content} for m in req.messages.messages]
    if not msgs:
        raise InvalidRequestError("messages", "at least one message is required")
    add_gen = (
        req.messages.add_generation_prompt
        if req.messages.HasField("add_generation_prompt")
        else True
    )
    return tokenizer.encode_chat(msgs, add_gen)


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    def opt(name: str, default):
        return getattr(sp, name) if sp.HasField(name) else default

    top_k = opt("top_k", -1)
    return SamplingParams(
        temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0),
        top_k=-1 if top_k == 0 else top_k,
        min_p=opt("min_p", 0.0),
        repetition_penalty=opt("repetition_penalty", 1.0),
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        max_tokens=opt("max_tokens", None),
        min_tokens=sp.min_tokens,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        seed=opt("seed", None),
        logprobs=sp.logprobs,
        skip_special_tokens=opt("skip_special_tokens", True),
        include_stop_str_in_output=opt("include_stop_str_in_output", False),
    )

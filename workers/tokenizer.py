"""Tokenization, chat templates and incremental detokenization from the checkpoint's own files."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from workers.request import InvalidRequestError


def _token_str(value: str | dict | None) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library plus ``tokenizer_config.json``.

    Raises FileNotFoundError when the directory has no tokenizer.json.
    """

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the model directory needs tokenizer.json")
        self.json = path.read_text()
        self._tok = HFTokenizer.from_str(self.json)
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self._template: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders ``[{"role", "content"}, ...]`` with the checkpoint's jinja2 template.

        Raises InvalidRequestError("messages", ...) when the model has no template or the
        template rejects the conversation.
        """
        if self.chat_template is None:
            raise InvalidRequestError("messages", "this model has no chat template")
        for i, m in enumerate(messages):
            if not m.get("role"):
                raise InvalidRequestError(f"messages[{i}].role", "must not be empty")
        try:
            return self._compiled().render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError("messages", f"chat template error: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat prompt ids; the template supplies any BOS, as HF's ``apply_chat_template``."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def _compiled(self) -> jinja2.Template:
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> Detokenizer:
        return Detokenizer(self, prompt_ids, skip_special_tokens)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


PRIME_MIN_TOKENS, PRIME_MAX_TOKENS = 4, 24
"""Bounds of the prompt suffix a Detokenizer is primed with (vLLM's fast incremental
detokenizer primes its stream the same way)."""
UTF8_MAX_BYTES = 4
_INVALID_PREFIX = "Invalid prefix encountered"
"""How ``DecodeStream.step`` says the text before the new token decodes differently now."""


def _prime(tokenizer: Tokenizer, prompt_ids: list[int], skip_special: bool) -> DecodeStream:
    """A ``DecodeStream`` primed with the end of the prompt: the shortest suffix of at least
    ``PRIME_MIN_TOKENS`` tokens that decodes to whole characters (no U+FFFD), then the last
    few prompt tokens that begin a character the prompt leaves unfinished (their text is the
    prompt's: dropped; the character comes out whole with the token that completes it).
    Falls back to the last ``PRIME_MAX_TOKENS`` tokens.

    ``DecodeStream`` keeps every id it was primed with and its step cost grows with them
    (about 22 us per token primed with none, 43 us with 1,000 and 107 us with 4,000 on a
    Llama-3 tokenizer), while only the last few ids decide how the next token's text joins.
    """
    ids = list(prompt_ids)
    if len(ids) <= PRIME_MIN_TOKENS:
        return DecodeStream(ids=ids, skip_special_tokens=skip_special)
    for unfinished in range(UTF8_MAX_BYTES + 1):  # a character spans at most 4 byte tokens
        body = ids[: len(ids) - unfinished]
        for n in range(PRIME_MIN_TOKENS, min(len(body), PRIME_MAX_TOKENS) + 1):
            if "\ufffd" not in tokenizer.decode(body[-n:], skip_special_tokens=skip_special):
                stream = DecodeStream(ids=body[-n:], skip_special_tokens=skip_special)
                for t in ids[len(body) :]:
                    stream.step(tokenizer._tok, t)
                return stream
    return DecodeStream(ids=ids[-PRIME_MAX_TOKENS:], skip_special_tokens=skip_special)


class Detokenizer:
    """Turns a request's generated ids into text, one step at a time.

    Multi-byte UTF-8 characters split across tokens (byte-fallback or byte-level BPE) are held
    back until complete, so each returned piece is valid text; the last prompt tokens are fed
    first (:func:`_prime`) so that leading-space handling matches a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self._tok = tokenizer._tok
        self._skip = skip_special_tokens
        self.num_resets = 0
        """Times the stream was restarted (:meth:`_step`); 0 for well-formed text."""
        try:
            self._stream = _prime(tokenizer, prompt_ids, skip_special_tokens)
        except Exception as e:
            if _INVALID_PREFIX not in str(e):
                raise
            self._reset()

    def step(self, token_ids: list[int]) -> str:
        pieces = (self._step(t) for t in token_ids)
        return "".join(p for p in pieces if p)

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._tok, token_id)
        except Exception as e:
            if _INVALID_PREFIX not in str(e):
                raise
            # ``DecodeStream`` cannot go on when a token changes how the text before it
            # decodes (a run of byte-fallback tokens that stops being valid UTF-8; random
            # or dummy-weight outputs do this often): restart it from this token, as vLLM's
            # detokenizer does (vllm-project/vllm#17448). The text may then miss a leading
            # space that a full decode would have.
            self._reset()
            return self._stream.step(self._tok, token_id)

    def _reset(self) -> None:
        self.num_resets += 1
        self._stream = DecodeStream(skip_special_tokens=self._skip)

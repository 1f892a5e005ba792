"""Real prompts of exact token lengths, cut from ShareGPT first turns.

Traces give only lengths. To send realistic content, `PromptFitter.fit(n)` starts at a randomly
chosen ShareGPT prompt, concatenates the following prompts (separated by a blank line) until it
has enough tokens, and trims to exactly n token ids in the served model's tokenizer, beginning
with the tokenizer's own special prefix (e.g. BOS). The ids are sent as `token_ids`, so the
server sees exactly n prompt tokens.

With Mooncake hash_ids, `fit_blocks` rebuilds the trace's prefix sharing: every hash id maps to
one fixed block of `block_size` tokens, so requests sharing leading hash ids share a prefix.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from client.replay.traces import DATA_DIR

SHAREGPT_PATH = DATA_DIR / "prompts" / "sharegpt_v3_first_turn3000.jsonl.gz"
"""The shipped ShareGPT first-turn prompts (see client/data/README.md)."""

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake hash_id block (FAST'25 trace README)."""


@dataclass(frozen=True)
class PromptPair:
    """One ShareGPT first turn: the human prompt and the reference response."""

    prompt: str
    response: str


def load_sharegpt(path: str | Path | None = None) -> list[PromptPair]:
    """Reads ShareGPT first-turn JSONL(.gz) (`prompt`, `response` per line); skips empty prompts."""
    path = Path(path) if path else SHAREGPT_PATH
    opener = gzip.open if path.suffix == ".gz" else open
    pairs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("prompt", "").strip():
                pairs.append(PromptPair(obj["prompt"], obj.get("response", "")))
    if not pairs:
        raise ValueError(f"{path}: no prompts")
    return pairs


def load_tokenizer(source: str) -> Tokenizer:
    """A tokenizer from tokenizer.json text (GetModelInfo.tokenizer_json) or a file path."""
    if source.lstrip().startswith("{"):
        return Tokenizer.from_str(source)
    return Tokenizer.from_file(str(source))


def special_prefix(tokenizer: Tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (e.g. [BOS]); [] if none."""
    bare = tokenizer.encode("hello", add_special_tokens=False).ids
    full = tokenizer.encode("hello", add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k]
    return []


class PromptFitter:
    """Builds prompts of exact token lengths from real text.

    `fit(n, start)` is a pure function of (n, start) and the texts; `start=None` draws a start
    from the seeded RNG. Encodings are computed lazily per text and cached (a few MB at most),
    so a first pass over a workload warms the cache and later fits are list slicing only.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        texts: Sequence[str],
        seed: int = 0,
        block_size: int = MOONCAKE_BLOCK_TOKENS,
    ) -> None:
        if not texts:
            raise ValueError("PromptFitter needs at least one text")
        self._tokenizer = tokenizer
        self._texts = list(texts)
        self._rng = random.Random(seed)
        self._seed = seed
        self.block_size = block_size
        self.prefix = special_prefix(tokenizer)
        self._sep = tokenizer.encode("\n\n", add_special_tokens=False).ids
        self._encoded: dict[int, list[int]] = {}

    def random_start(self) -> int:
        """The index of a random text (seeded) to start a prompt at."""
        return self._rng.randrange(len(self._texts))

    def fit(self, num_tokens: int, start: int | None = None) -> list[int]:
        """Exactly `num_tokens` ids: the special prefix, then real text from texts[start]."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        start = self.random_start() if start is None else start
        body = self._take(start, max(num_tokens - len(self.prefix), 0))
        return (self.prefix + body)[:num_tokens]

    def fit_blocks(
        self, num_tokens: int, hash_ids: Sequence[int], start: int | None = None
    ) -> list[int]:
        """Exactly `num_tokens` ids whose i-th block of `block_size` tokens is fixed by hash_ids[i].

        Tokens beyond len(hash_ids) blocks come from texts[start], as in `fit`.
        """
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        start = self.random_start() if start is None else start
        need = max(num_tokens - len(self.prefix), 0)
        body: list[int] = []
        for h in hash_ids:
            if len(body) >= need:
                break
            body.extend(
                self._take((h * 2654435761 + self._seed) % len(self._texts), self.block_size)
            )
        if len(body) < need:
            body.extend(self._take(start, need - len(body)))
        return (self.prefix + body)[:num_tokens]

    def _encode(self, i: int) -> list[int]:
        if i not in self._encoded:
            ids = self._tokenizer.encode(self._texts[i], add_special_tokens=False).ids
            self._encoded[i] = ids + self._sep
        return self._encoded[i]

    def _take(self, start: int, n: int) -> list[int]:
        """n content ids from texts[start], texts[start + 1], ... (cycling)."""
        out: list[int] = []
        i, empty_streak = start, 0
        while len(out) < n:
            ids = self._encode(i % len(self._texts))
            out.extend(ids[: n - len(out)])
            empty_streak = 0 if ids else empty_streak + 1
            if empty_streak > len(self._texts):
                raise ValueError("no text in the prompt set encodes to any token")
            i += 1
        return out


def sharegpt_lengths(
    pairs: Sequence[PromptPair], tokenizer: Tokenizer, n: int, seed: int = 0
) -> list[tuple[int, int]]:
    """n (input_len, output_len) pairs measured on random ShareGPT turns (tokens, >= 1 each)."""
    rng = random.Random(seed)
    prefix = len(special_prefix(tokenizer))
    out = []
    for _ in range(n):
        p = pairs[rng.randrange(len(pairs))]
        n_in = prefix + len(tokenizer.encode(p.prompt, add_special_tokens=False).ids)
        n_out = len(tokenizer.encode(p.response, add_special_tokens=False).ids)
        out.append((max(n_in, 1), max(n_out, 1)))
    return out

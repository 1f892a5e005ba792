"""Prompt fitting: exact token lengths of real ShareGPT text in the stories260K tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from client.replay.prompts import (
    PromptFitter,
    load_sharegpt,
    load_tokenizer,
    sharegpt_lengths,
    special_prefix,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [p.prompt for p in load_sharegpt()]


@pytest.fixture(scope="module")
def tokenizer(stories_tokenizer_path: Path) -> Tokenizer:
    return load_tokenizer(str(stories_tokenizer_path))


def test_sharegpt_file_has_3000_first_turns(texts: list[str]) -> None:
    assert len(texts) == 3000
    assert texts[0] == "Java add to the arraylist of a class type"


def test_tokenizer_from_json_text_equals_from_file(stories_tokenizer_path: Path) -> None:
    from_text = load_tokenizer(stories_tokenizer_path.read_text())
    assert (
        from_text.encode("Once upon a time").ids
        == load_tokenizer(str(stories_tokenizer_path)).encode("Once upon a time").ids
    )
    assert special_prefix(from_text) == [1]  # BOS


@pytest.mark.parametrize("n", [1, 2, 7, 100, 511, 4000])
def test_fit_gives_exact_length_starting_with_bos(
    tokenizer: Tokenizer, texts: list[str], n: int
) -> None:
    ids = PromptFitter(tokenizer, texts, seed=5).fit(n)
    assert len(ids) == n and ids[0] == 1
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)


def test_fit_uses_real_text_from_a_seeded_start(tokenizer: Tokenizer, texts: list[str]) -> None:
    ids = PromptFitter(tokenizer, texts, seed=3).fit(40)
    start = random.Random(3).randrange(len(texts))
    decoded = tokenizer.decode(ids)
    assert texts[start].startswith(decoded[:30])
    assert PromptFitter(tokenizer, texts, seed=3).fit(40) == ids


def test_fit_concatenates_prompts_past_one_text(tokenizer: Tokenizer) -> None:
    fitter = PromptFitter(tokenizer, ["hello", "world"], seed=0)
    ids = fitter.fit(50)
    assert len(ids) == 50
    assert "hello" in tokenizer.decode(ids) and "world" in tokenizer.decode(ids)


def test_fit_blocks_shares_prefixes_by_hash_id(tokenizer: Tokenizer, texts: list[str]) -> None:
    fitter = PromptFitter(tokenizer, texts, seed=0, block_size=64)
    a = fitter.fit_blocks(200, [7, 8, 9, 11])
    b = fitter.fit_blocks(150, [7, 8, 10])
    assert (len(a), len(b)) == (200, 150)
    assert a[: 1 + 128] == b[: 1 + 128]  # BOS + blocks 7 and 8
    assert a[129:150] != b[129:150]  # blocks 9 and 10 differ
    short = fitter.fit_blocks(300, [7])  # past the hash ids: random real text
    assert len(short) == 300 and short[:65] == a[:65]


def test_sharegpt_lengths_are_token_counts(tokenizer: Tokenizer, texts: list[str]) -> None:
    pairs = load_sharegpt()
    lengths = sharegpt_lengths(pairs, tokenizer, 5, seed=1)
    rng = random.Random(1)
    first = pairs[rng.randrange(len(pairs))]
    n_in = 1 + len(tokenizer.encode(first.prompt, add_special_tokens=False).ids)
    assert lengths[0][0] == n_in
    assert all(n_in >= 1 and n_out >= 1 for n_in, n_out in lengths)

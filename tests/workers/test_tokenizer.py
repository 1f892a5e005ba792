"""Tokenizer on stories260K: encoding like HF, streaming detokenization, chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.request import InvalidRequestError
from workers.tokenizer import Tokenizer

BOS = 1
TEXTS = ["", "Once upon a time", "café 日本 🙂", "  two  spaces\nnew line", "Lily's toy-box!"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(stories_dir: Path) -> Tokenizer:
    return Tokenizer(stories_dir)


@pytest.fixture(scope="module")
def hf_tok(stories_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(stories_dir)


def stream(tok: Tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    """The Detokenizer's piece for each generated id, fed one at a time."""
    detok = tok.detokenizer(prompt)
    return [detok.step([t]) for t in generated]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf_auto_tokenizer(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert ids[0] == BOS
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text


def test_encode_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.encode("") == [BOS]
    assert tok.vocab_size == 512
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.decode([BOS, 403, 2], skip_special_tokens=False) == "<s> Once</s>"


def test_streaming_equals_full_decode_of_golden_outputs(tok: Tokenizer, golden_cases) -> None:
    for case in golden_cases:
        prompt, generated = case["input_ids"], case["greedy_new_token_ids"]
        streamed = "".join(stream(tok, prompt, generated))
        assert tok.decode(prompt) + streamed == case["greedy_text"]
        assert tok.decode(prompt + generated) == case["greedy_text"]
    bos_only = golden_cases[0]
    assert bos_only["input_ids"] == [BOS]
    streamed = "".join(stream(tok, [BOS], bos_only["greedy_new_token_ids"]))
    assert streamed == tok.decode(bos_only["greedy_new_token_ids"])


def test_streaming_holds_back_split_utf8_characters(tok: Tokenizer) -> None:
    ids = tok.encode("café 日本 🙂", add_special_tokens=False)
    pieces = [tok._tok.id_to_token(i) for i in ids]
    assert pieces[4:8] == ["▁", "<0xE6>", "<0x97>", "<0xA5>"]  # 日 in byte-fallback tokens
    assert stream(tok, [BOS], ids) == [
        "c", "a", "f", "é", " ", "", "", "日", "", "", "本", " ", "", "", "", "🙂",
    ]  # fmt: skip
    assert tok.decode(ids) == "café 日本 🙂"


def test_streaming_several_ids_per_step(tok: Tokenizer) -> None:
    ids = tok.encode("café 日本 🙂", add_special_tokens=False)
    detok = tok.detokenizer([BOS])
    assert [detok.step(ids[i : i + 3]) for i in range(0, len(ids), 3)] == [
        "caf", "é ", "日", "本 ", "", "🙂",
    ]  # fmt: skip


def test_streaming_after_a_text_prompt_keeps_the_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("Once upon")
    generated = tok.encode("a time", add_special_tokens=False)
    assert "".join(stream(tok, prompt, generated)) == " a time"


def test_chat_template_renders(stories_dir: Path) -> None:
    tok = Tokenizer(stories_dir)
    tok.chat_template = TEMPLATE
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages)
    assert text == "<s><|system|>Be kind.\n<|user|>Hi\n<|assistant|>"
    without = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert without == "<s><|system|>Be kind.\n<|user|>Hi\n"
    ids = tok.encode_chat(messages)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == BOS and ids[1] != BOS  # the template's BOS, and only that one


def test_no_chat_template_is_an_invalid_request(tok: Tokenizer) -> None:
    assert tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template") as err:
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert err.value.field == "messages"


def test_chat_template_errors_are_invalid_requests(stories_dir: Path) -> None:
    tok = Tokenizer(stories_dir)
    tok.chat_template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(InvalidRequestError, match="user first") as err:
        tok.apply_chat_template([{"role": "assistant", "content": "Hi"}])
    assert err.value.field == "messages"
    with pytest.raises(InvalidRequestError) as err:
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])
    assert err.value.field == "messages[1].role"


LONG = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "sunshine. One day, she saw a big, red ball in the park. 日本 café 🙂 "
)


@pytest.mark.parametrize("model", ["stories260K", "llama-3-8b"])
def test_streaming_after_a_long_prompt_equals_full_decode(stories_dir: Path, model: str) -> None:
    """The stream is primed with a short clean suffix of the prompt, not all of it: what each
    step adds must still be exactly what a full decode adds, also after a prompt that ends
    inside a character (raw-id prompts may): that character comes out whole, and none of the
    prompt's other text does."""
    root = Path(__file__).parents[2] / "workers" / "checkpoint" / "configs" / "llama-3-8b"
    tok = Tokenizer(stories_dir if model == "stories260K" else root)
    prompt = tok.encode(LONG * 8)
    generated = tok.encode(" She ran to it, 日本語 and 🙂 too!", add_special_tokens=False)
    cuts = 0
    for cut in range(len(prompt) - 8, len(prompt) + 1):
        head, tail = prompt[:cut], prompt[cut:] + generated
        streamed = "".join(stream(tok, head, tail))
        full, head_text = tok.decode(head + tail), tok.decode(head)
        clean = head_text.rstrip("\ufffd")  # the prompt's whole characters
        assert full.startswith(clean) and streamed == full[len(clean) :], cut
        cuts += clean != head_text
    assert cuts > 0  # some cut ended inside a character


def test_stream_is_primed_with_a_short_suffix(tok: Tokenizer, monkeypatch) -> None:
    from workers import tokenizer as module

    primed = []
    real = module.DecodeStream

    def recording(ids, skip_special_tokens):
        primed.append(len(ids))
        return real(ids=ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(module, "DecodeStream", recording)
    prompt = tok.encode(LONG * 8)
    tok.detokenizer(prompt)
    tok.detokenizer(prompt[:3])
    assert len(prompt) > 500 and primed[0] <= module.PRIME_MAX_TOKENS and primed[1] == 3


def test_streaming_random_ids_never_raises(tok: Tokenizer) -> None:
    """Random ids (as a dummy-weight model samples) make ``DecodeStream`` fail about every
    other sequence here ('Invalid prefix encountered'); the Detokenizer restarts it instead
    and goes on. Where it never restarted and the text is well-formed, it is a full decode's.
    (Byte-fallback runs that are not valid UTF-8 have no streaming form equal to a full
    decode: a later byte turns earlier ASCII bytes into U+FFFD.)"""
    import random

    rng = random.Random(0)
    resets = clean_runs = 0
    for i in range(300):
        low = 3 if i % 2 else 259  # every other run without byte-fallback tokens (3-258)
        prompt = [rng.randrange(low, 512) for _ in range(rng.randrange(1, 60))]
        generated = [rng.randrange(low, 512) for _ in range(20)]
        detok = tok.detokenizer(prompt)
        text = "".join(detok.step([t]) for t in generated)
        resets += detok.num_resets
        if detok.num_resets == 0:
            full, head = tok.decode(prompt + generated), tok.decode(prompt)
            clean = head.rstrip("\ufffd")
            if "\ufffd" not in full:
                assert full.startswith(clean) and text == full[len(clean) :]
                clean_runs += 1
    assert (
        resets > 50 and clean_runs > 100
    )  # the failure is common on random ids, so this exercised the restart

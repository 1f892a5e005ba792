"""Sampler: greedy, seeds, top-k/top-p/min-p, temperature, penalties, min_tokens, logprobs."""

from __future__ import annotations

import pytest
import torch

from workers.sampler import Sampler, argmax_suffices

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
EOS = 2


def make_sampler(seed: int = 0) -> Sampler:
    return Sampler(CPU, seed=seed)


def random_logits(steps: int, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    """[steps, vocab] logits spread enough that sampling is far from greedy."""
    return torch.randn(steps, vocab, generator=torch.Generator().manual_seed(seed))


def draw(sampler: Sampler, logits: list[float], requests: list) -> torch.Tensor:
    """Samples once per request from the same logits row; returns the token ids."""
    rows = torch.tensor(logits).expand(len(requests), -1)
    return torch.tensor(sampler.sample(rows, requests)[0])


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


def test_greedy_is_argmax(make_request) -> None:
    logits = random_logits(6)
    reqs = [make_request(f"r{i}", temperature=0.0) for i in range(6)]
    tokens, logprobs = make_sampler().sample(logits, reqs)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 6


def test_seeded_sampling_does_not_depend_on_the_batch(make_request) -> None:
    logits = random_logits(20)
    alone, batched = make_sampler(seed=0), make_sampler(seed=123)
    alone_tokens, batched_tokens = [], []
    for t in range(20):
        req = make_request("s", seed=42)
        alone_tokens += alone.sample(logits[t : t + 1], [req])[0]
        batch = [make_request("u"), req, make_request("v", seed=7)]
        rows = torch.stack([random_logits(1, seed=100 + t)[0], logits[t], logits[t]])
        batched_tokens.append(batched.sample(rows, batch)[0][1])
    assert alone_tokens == batched_tokens
    assert alone_tokens != logits.argmax(dim=-1).tolist()


def test_same_seed_gives_the_same_tokens_different_seeds_differ(make_request) -> None:
    logits = random_logits(20)
    sampler = make_sampler()
    reqs = [
        make_request("a", seed=42),
        make_request("b", seed=42),
        make_request("c", seed=43),
    ]
    out = [sampler.sample(logits[t].expand(3, -1), reqs)[0] for t in range(20)]
    a, b, c = ([row[i] for row in out] for i in range(3))
    assert a == b
    assert a != c


def test_forget_restarts_a_seeded_generator(make_request) -> None:
    logits = random_logits(5)
    sampler = make_sampler()
    req = make_request("a", seed=9)
    first = [sampler.sample(logits[t : t + 1], [req])[0][0] for t in range(5)]
    sampler.forget("a")
    again = [sampler.sample(logits[t : t + 1], [req])[0][0] for t in range(5)]
    assert first == again


def test_top_k_1_is_greedy(make_request) -> None:
    logits = random_logits(16)
    reqs = [make_request(f"r{i}", top_k=1, temperature=1.5, seed=i) for i in range(16)]
    tokens, _ = make_sampler().sample(logits, reqs)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_most_likely_token(make_request) -> None:
    logits = random_logits(16)
    reqs = [make_request(f"r{i}", top_p=1e-6, seed=i) for i in range(16)]
    tokens, _ = make_sampler().sample(logits, reqs)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_the_k_most_likely_tokens(make_request) -> None:
    logits = [0.0, 3.0, 1.0, 2.0, -1.0]
    reqs = [make_request(f"r{i}", top_k=2) for i in range(2000)]
    tokens = draw(make_sampler(), logits, reqs)
    assert set(tokens.tolist()) == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p(make_request) -> None:
    probs = torch.tensor([0.1, 0.5, 0.25, 0.15])  # sorted: 1 (0.5), 2 (0.75), 3 (0.9), 0
    reqs = [make_request(f"r{i}", top_p=0.7) for i in range(2000)]
    tokens = draw(make_sampler(), probs.log().tolist(), reqs)
    assert set(tokens.tolist()) == {1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability(make_request) -> None:
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    reqs = [make_request(f"r{i}", min_p=0.5) for i in range(2000)]
    tokens = draw(make_sampler(), probs.log().tolist(), reqs)
    assert set(tokens.tolist()) == {1, 2}  # kept: p >= 0.25
    reqs = [make_request(f"r{i}", min_p=0.2) for i in range(2000)]
    tokens = draw(make_sampler(), probs.log().tolist(), reqs)
    assert set(tokens.tolist()) == {1, 2, 3}  # kept: p >= 0.1


def test_sampling_follows_softmax_of_logits_over_temperature(make_request) -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 10000
    observed = {}
    for temp in (0.5, 1.0, 2.0):
        reqs = [make_request(f"r{i}", temperature=temp) for i in range(n)]
        tokens = draw(make_sampler(seed=int(temp * 10)), logits.tolist(), reqs)
        observed[temp] = frequencies(tokens, 4)
        expected = torch.softmax(logits / temp, dim=-1)
        # 4 standard deviations of a frequency estimated from n draws are at most 0.02.
        assert (observed[temp] - expected).abs().max() < 0.02, (temp, observed[temp], expected)
    assert observed[0.5][0] > observed[1.0][0] + 0.1 > observed[2.0][0] + 0.2


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits(
    make_request,
) -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 0.0]])
    req = make_request("a", prompt=[0, 1], repetition_penalty=2.0)
    req.output_token_ids += [2, 2, 3]
    out = make_sampler()._apply_penalties(logits.clone(), [req])
    assert out.tolist() == [[0.5, -2.0, 1.0, 0.25, -0.5, 0.0]]


def test_presence_and_frequency_penalties_count_output_tokens_only(make_request) -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 0.0]])
    req = make_request("a", prompt=[0, 1], presence_penalty=0.5, frequency_penalty=0.25)
    req.output_token_ids += [2, 2, 3]
    out = make_sampler()._apply_penalties(logits.clone(), [req])
    # token 2: 2.0 - 2 * 0.25 - 0.5; token 3: 0.5 - 0.25 - 0.5; prompt tokens 0, 1 untouched
    assert out.tolist() == [[1.0, -1.0, 1.0, -0.25, -0.5, 0.0]]


def test_penalties_apply_per_row_and_change_the_greedy_choice(make_request) -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    penalized = make_request("p", prompt=[0], repetition_penalty=1.5, temperature=0.0)
    plain = make_request("q", prompt=[0], temperature=0.0)
    original = logits.clone()
    tokens, _ = make_sampler().sample(logits, [penalized, plain])
    assert tokens == [1, 0]
    assert torch.equal(logits, original)  # the caller's logits are not modified


def test_min_tokens_bans_eos_and_stop_token_ids(make_request) -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]])  # EOS (2) first, then 3, then 4
    sampler = make_sampler()
    req = make_request("a", temperature=0.0, min_tokens=2, stop_token_ids=(3,))
    assert sampler.sample(logits, [req])[0] == [4]
    req.output_token_ids += [4, 4]
    assert sampler.sample(logits, [req])[0] == [EOS]
    ignore = make_request("b", temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler.sample(logits, [ignore])[0] == [EOS]  # EOS is a plain token then


def test_min_tokens_bans_eos_when_sampling(make_request) -> None:
    reqs = [make_request(f"r{i}", min_tokens=1) for i in range(500)]
    tokens = draw(make_sampler(), [0.0, 0.0, 3.0, 0.0], reqs)
    assert EOS not in tokens.tolist()
    assert set(tokens.tolist()) == {0, 1, 3}


def test_logprobs_come_from_the_raw_logits(make_request) -> None:
    logits = random_logits(3, vocab=16)
    reqs = [
        make_request("a", [5], logprobs=3, temperature=0.7, repetition_penalty=1.3, seed=1),
        make_request("b", logprobs=0),
        make_request("c", logprobs=5, temperature=0.0),
    ]
    reqs[0].output_token_ids += [0, 1, 2, 3]
    tokens, logprobs = make_sampler().sample(logits, reqs)
    expected = torch.log_softmax(logits, dim=-1)
    assert logprobs[1] is None
    for row, n in ((0, 3), (2, 5)):
        chosen, top_ids, top_values = logprobs[row]
        assert chosen == expected[row, tokens[row]].item()
        assert top_ids == expected[row].argsort(descending=True)[:n].tolist()
        assert top_values == expected[row, top_ids].tolist()
        assert top_values == sorted(top_values, reverse=True)
    assert tokens[2] == logprobs[2][1][0]  # greedy picks the top logprob


def test_argmax_suffices_only_where_the_sampler_returns_the_raw_argmax(make_request) -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]]).expand(6, -1)  # argmax: EOS (2)
    reqs = [
        make_request("plain", temperature=0.0),
        make_request("met", temperature=0.0, min_tokens=1),
        make_request("hot", temperature=0.7),
        make_request("logprobs", temperature=0.0, logprobs=1),
        make_request("penalty", [0], temperature=0.0, repetition_penalty=1.2),
        make_request("min", temperature=0.0, min_tokens=1),
    ]
    reqs[1].output_token_ids.append(4)
    assert [argmax_suffices(r) for r in reqs] == [True, True, False, False, False, False]
    tokens, _ = make_sampler().sample(logits, reqs)
    assert tokens[:2] == [EOS, EOS] and tokens[5] == 3  # min_tokens bans EOS

"""Batched next-token sampling: penalties, temperature, top-k, top-p, min-p, seeds, logprobs."""

from __future__ import annotations

import torch

from attention.metadata import host_tensor
from workers.request import Request

TokenLogprobs = tuple[float, list[int], list[float]]
"""(logprob of the chosen token, top token ids, their logprobs), from the raw model logits."""


class Sampler:
    """Picks one token per row of ``logits``; each row belongs to one request.

    Seeded requests draw from their own ``torch.Generator`` (kept here, keyed by request id), so
    their output does not depend on what else is in the batch or on preemption. Others share the
    engine's generator.
    """

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._seeded: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        """Drops a finished request's generator."""
        self._seeded.pop(request_id, None)

    def export_state(self, request_id: str) -> bytes | None:
        """The request's generator state, for moving it to another worker (KunServe drop and
        restore); None when it has no generator yet (unseeded, or not sampled yet)."""
        g = self._seeded.get(request_id)
        return None if g is None else bytes(g.get_state().numpy())

    def import_state(self, request_id: str, seed: int | None, state: bytes | None) -> None:
        """Installs a generator state from :meth:`export_state`; a None state is a no-op (the
        generator is made from the seed at the first sample, as on the sending worker)."""
        if state is None or seed is None:
            return
        g = torch.Generator(device=self.device)
        g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        self._seeded[request_id] = g

    def sample(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """``logits``: [num_requests, vocab] (any float dtype). Returns token ids and logprobs."""
        return self.sample_async(logits, requests).result()

    def sample_async(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """:meth:`sample` without waiting for the device: the tokens stay on it (and are
        copied back in the background) until :meth:`SampledTokens.result` reads them."""
        logits = logits.float()
        raw_logprobs = (
            torch.log_softmax(logits, dim=-1)
            if any(r.sampling.logprobs for r in requests)
            else None
        )
        if any(r.sampling.needs_penalties for r in requests):
            logits = self._apply_penalties(logits.clone(), requests)
        logits = self._mask_early_stops(logits, requests)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if not r.sampling.greedy]
        if len(random_rows) == len(requests):
            tokens = self._sample_random(logits, requests)
        elif random_rows:
            rows = host_tensor(random_rows, torch.int64, logits.device)
            picked = self._sample_random(logits[rows], [requests[i] for i in random_rows])
            tokens[rows] = picked
        if raw_logprobs is None:
            return SampledTokens(tokens, requests)
        k = max(r.sampling.logprobs for r in requests)
        top_v, top_i = raw_logprobs.topk(k, dim=-1)
        chosen = raw_logprobs.gather(-1, tokens[:, None])[:, 0]
        return SampledTokens(tokens, requests, (chosen, top_i, top_v))

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Repetition penalty over prompt and output (CTRL, Keskar et al. 2019); presence and
        frequency penalties over the output (OpenAI's definition)."""
        for row, r in enumerate(requests):
            sp = r.sampling
            if not sp.needs_penalties:
                continue
            if sp.repetition_penalty != 1.0:
                seen = host_tensor(sorted(set(r.all_token_ids())), torch.int64, logits.device)
                vals = logits[row, seen]
                logits[row, seen] = torch.where(
                    vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty
                )
            if r.output_token_ids and (sp.presence_penalty or sp.frequency_penalty):
                out = host_tensor(r.output_token_ids, torch.int64, logits.device)
                counts = torch.bincount(out, minlength=logits.shape[-1]).float()
                logits[row] -= sp.frequency_penalty * counts
                logits[row] -= sp.presence_penalty * (counts > 0).float()
        return logits

    def _mask_early_stops(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Forbids EOS and stop token ids while a request has fewer than ``min_tokens``."""
        rows = [i for i, r in enumerate(requests) if r.num_output_tokens < r.sampling.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            r = requests[i]
            banned = set(r.sampling.stop_token_ids)
            if not r.sampling.ignore_eos:
                banned |= r.eos_token_ids
            if banned:
                logits[i, host_tensor(sorted(banned), torch.int64, logits.device)] = float("-inf")
        return logits

    def _sample_random(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, then top-k, top-p and min-p filtering, then an exponential race.

        ``argmax(p / E)`` with ``E ~ Exp(1)`` draws from ``p`` (the Gumbel-max trick in another
        form) and needs one random number per logit, which a per-request generator can supply.
        ``logits``: [n, vocab] float32; returns [n] int64 token ids. The parameters go to the
        device in one non-blocking copy; the filter (a full-vocabulary sort) is skipped when
        no row asks for top-k, top-p or min-p; rows without a seed draw their noise in one
        call on the shared generator, seeded rows each from their own.
        """
        vocab = logits.shape[-1]
        params = [
            (r.sampling.temperature, _top_k(r, vocab), r.sampling.top_p, r.sampling.min_p)
            for r in requests
        ]
        temp, top_k, top_p, min_p = host_tensor(params, torch.float32, logits.device).unbind(1)
        logits = logits / temp[:, None]
        if any(k < vocab or p < 1.0 or m > 0.0 for _, k, p, m in params):
            logits = _filter(logits, top_k.long(), top_p, min_p)
        probs = torch.softmax(logits, dim=-1)
        return (probs / self._exponential_noise(probs, requests)).argmax(dim=-1)

    def _exponential_noise(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """[n, vocab] float32 Exp(1) draws: one call on the shared generator for the rows
        without a seed, one per seeded row on that request's generator."""
        noise = torch.empty_like(probs)
        shared = [i for i, r in enumerate(requests) if r.sampling.seed is None]
        if len(shared) == len(requests):
            return noise.exponential_(generator=self._generator)
        for row, r in enumerate(requests):
            if r.sampling.seed is not None:
                noise[row].exponential_(generator=self._generator_for(r))
        if shared:
            rows = host_tensor(shared, torch.int64, probs.device)
            draws = torch.empty(len(shared), probs.shape[-1], device=probs.device)
            noise[rows] = draws.exponential_(generator=self._generator)
        return noise

    def _generator_for(self, r: Request) -> torch.Generator:
        if r.sampling.seed is None:
            return self._generator
        g = self._seeded.get(r.request_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(r.sampling.seed)
            self._seeded[r.request_id] = g
        return g


class SampledTokens:
    """One step's sampled tokens: on the device at once (:attr:`tokens`, which a pipeline
    leader feeds to its next micro-batch there), on the host when :meth:`result` asks (a
    copy queued behind the sampling, read without waiting for later work on the stream)."""

    def __init__(
        self,
        tokens: torch.Tensor,  # [n] int64, on the logits' device
        requests: list[Request],  # the rows' requests
        logprobs: tuple[torch.Tensor, ...] | None = None,  # chosen [n], top ids, top values
    ) -> None:
        self.tokens = tokens
        self.requests = requests
        parts = (tokens, *(logprobs or ()))
        self._event = None
        if tokens.device.type == "cuda":
            self._host = [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in parts
            ]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = list(parts)

    def rows(self) -> dict[str, int]:
        """Each request's row in :attr:`tokens`, by request id."""
        return {r.request_id: i for i, r in enumerate(self.requests)}

    def result(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Token ids and logprobs (None for a request that asked for none), in row order;
        waits for the copies only."""
        if self._event is not None:
            self._event.synchronize()
        tokens = self._host[0].tolist()
        if len(self._host) == 1:
            return tokens, [None] * len(self.requests)
        chosen, top_i, top_v = (t.tolist() for t in self._host[1:])
        out: list[TokenLogprobs | None] = []
        for row, r in enumerate(self.requests):
            n = r.sampling.logprobs
            out.append(None if n == 0 else (chosen[row], top_i[row][:n], top_v[row][:n]))
        return tokens, out

    def by_request(self) -> tuple[dict[str, int], dict[str, TokenLogprobs | None]]:
        """:meth:`result` keyed by request id."""
        tokens, logprobs = self.result()
        ids = [r.request_id for r in self.requests]
        return dict(zip(ids, tokens, strict=True)), dict(zip(ids, logprobs, strict=True))


def argmax_suffices(r: Request) -> bool:
    """True when :meth:`Sampler.sample` would return the argmax of ``r``'s raw logits and
    nothing else: greedy, no penalties, no logprobs, and no ``min_tokens`` mask in force. A
    captured decode step hands such rows its in-graph argmax without running the sampler."""
    sp = r.sampling
    return (
        sp.temperature == 0.0
        and not sp.logprobs
        and not sp.needs_penalties
        and len(r.output_token_ids) >= sp.min_tokens
    )


def _top_k(r: Request, vocab: int) -> int:
    k = r.sampling.top_k
    return vocab if k <= 0 else min(k, vocab)


def _filter(
    logits: torch.Tensor,  # [n, vocab] float32
    top_k: torch.Tensor,  # [n] int64, vocab when off
    top_p: torch.Tensor,  # [n] float32
    min_p: torch.Tensor,  # [n] float32
) -> torch.Tensor:
    """Sets filtered-out logits to -inf; always keeps each row's most likely token.

    Order: top-k, then top-p over the distribution renormalized to the top k, then min-p.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # renormalized over the top k, as vLLM and HF
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

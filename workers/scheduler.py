"""Token-budget continuous batching with chunked prefill and recompute preemption.

Rules (vLLM v1, reference/kunserve.md §5.1): running requests first, each given its
``num_pending_tokens`` (those no step has been given yet) capped by the step's budget, those
decoding before those mid-prefill and each kind in admission order (so a prompt's chunk never
starves a decode, as SGLang's mixed chunked prefill runs every decode each step); when blocks run
out, the newest running request is preempted (its blocks freed, ``num_computed_tokens`` reset,
back to the head of the waiting queue) until the allocation fits; waiting requests are admitted
FCFS, and not at all in a step that preempted.

A pipeline leader applies a collected micro-batch in two halves (vLLM's async scheduling):
:meth:`Scheduler.advance` before its tokens are read back, each sampled token a
:data:`~workers.request.PLACEHOLDER_TOKEN`, so the next micro-batch can be scheduled with
those requests in it; then :meth:`Scheduler.resolve` with the tokens. A request awaiting its
token is never preempted, and is not scheduled when that token ends it by length.

A prompt whose chunk is in a micro-batch still in flight gets its next chunk in the next
micro-batch when that chunk samples nothing (``Request.num_scheduled_tokens``): a stage
computes its micro-batches in launch order, so the first chunk's KV is in place before the
second reads it. Held back until the first was applied, a long prompt's chunks went into
every other micro-batch, and those between them often ran a few decodes alone; the stage
then waited out the other stage's prompt micro-batch before its next one. On 2 H200s (code
burst) stage 0 idled 2.29 ms before each prompt micro-batch that way, 1.25-1.54 ms with
the chunks back to back (docs/benchmarks.md, session 20). Requests in flight are still never
preempted.

The micro-batch's limit on running requests counts decodes only. Counting the chunk too, the
decodes filled the limit in every other micro-batch, so a long prompt's chunks again went
into every other one, with a fresh prompt's first chunk between them. The deep chunk's
attention made its micro-batch the heavier, and a stage computes micro-batch k + 2 only once
the other stage has computed k (k's decodes are in k + 2): both stages idled the difference
every two micro-batches, up to 4.8 ms of each 30 ms at 6k of context (2x H200, code burst,
profiled; docs/benchmarks.md, session 22).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from planner.policies import preemption_victim
from workers.block_pool import KVCacheManager
from workers.config import SchedulerConfig
from workers.request import PLACEHOLDER_TOKEN, FinishReason, Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int = field(init=False)
    """The position of the chunk's first token (``Request.num_started_tokens`` when it was
    scheduled): its KV goes to positions ``start .. start + num_new_tokens - 1``."""
    samples: bool = field(init=False)
    """True when this step computes the request's last pending token, so it samples one. Fixed
    at scheduling time: ``update`` advances ``num_computed_tokens`` afterwards."""

    def __post_init__(self) -> None:
        r = self.request
        self.start = r.num_started_tokens
        self.samples = self.start + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RequestOutput:
    """What one step produced for one request; the worker pushes a list of these per step."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    logprobs: list[tuple[float, list[int], list[float]]] | None = None
    num_prompt_tokens: int = 0
    num_preemptions: int = 0
    queue_time_s: float | None = None
    error: str | None = None  # set when an engine fault ended the request


class Scheduler:
    """Owns the waiting and running queues of one instance. Not thread-safe: one engine thread."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.admitting = True
        """Whether waiting requests may start; a live restore holds them until the split
        (workers/transition.py), so every running request's KV can be gathered."""
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        """Whether a step would do anything: running requests, or waiting ones it may admit."""
        return bool(self.running or (self.waiting and self.admitting))

    def schedule(
        self,
        busy: Collection[str] = frozenset(),
        micro_batches: int = 1,
        token_budget: int | None = None,
        admit: bool = True,
        decodes_only: bool = False,
        break_even: float | None = None,
        padded_size: Callable[[int], int | None] | None = None,
    ) -> SchedulerOutput:
        """The next batch. ``busy``: ids of running requests in a micro-batch still in flight
        (pipeline mode): they are never preempted, and scheduled only for the next chunk of
        a prompt whose chunk in flight samples nothing. ``micro_batches``: how many
        micro-batches the decoding requests (those with at most one token to compute,
        in flight or not) spread over (pipeline mode); this batch takes at most their
        share, rounded up. Prompt chunks and the waiting requests it admits do not count.
        ``token_budget``: most tokens in the batch (None: ``max_num_batched_tokens``).
        ``admit=False``: this batch starts no waiting request. ``decodes_only``: it takes
        only running requests with one token to compute and starts none (a short step: a
        drop is about to park the engine). ``break_even`` (a pipeline micro-batch with
        ``pipeline_chunk_cost="attention"``): a prompt chunk's tokens count with their
        attention (:func:`chunk_tokens`); None counts tokens. ``padded_size`` (with
        ``break_even``): the token count a batch of n tokens runs at (a stage's piecewise
        graphs pad to their next captured size; None: unpadded); the batch's last prompt
        chunk then grows into the padding, rows computed anyway (:meth:`_fill_padding`).
        The batch lists its one-token queries first."""
        out = SchedulerOutput()
        budget = token_budget or self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget, busy, micro_batches, decodes_only, break_even)
        if not out.preempted and admit and not decodes_only:
            self._schedule_waiting(out, budget, break_even)
        if break_even is not None and padded_size is not None and not out.preempted:
            self._fill_padding(out, padded_size)
        # single-token queries first: a mixed step runs their attention with the decode
        # kernel (attention/metadata.py, ``num_decodes``), as vLLM reorders its batches
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return out

    def _schedule_running(
        self,
        out: SchedulerOutput,
        budget: int,
        busy: Collection[str],
        micro_batches: int,
        decodes_only: bool = False,
        break_even: float | None = None,
    ) -> float:
        # Each request's pending tokens, read once (a chain of properties, about 0.5 us a
        # request on the engine's host path). Only a request preempted below changes them,
        # and the loop skips it by its status.
        pending = [(r, r.num_pending_tokens) for r in self.running]
        decoding = [(r, p) for r, p in pending if p <= 1]
        limit = max(1, -(-len(decoding) // micro_batches))
        decodes = 0  # decodes taken: the limit spreads them, and never keeps a chunk out
        # Decodes first, then prompts mid-prefill, each in admission order: a prompt's chunk
        # never takes the budget that a later-admitted request's decode needs, which would
        # make that token wait a whole step (2x H200, code burst: the slowest decoders, at
        # about 2x their neighbours' TPOT, ran beside 7k-token prompts' chunks).
        for req, p in decoding + [(r, p) for r, p in pending if p > 1]:
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted for an earlier one here
                continue
            if p == 0:  # its last tokens are in flight (``busy``)
                continue
            if req.request_id in busy and req.num_scheduled_tokens <= req.num_computed_tokens:
                continue  # busy, with no unapplied chunk of its own to follow
            decode = p == 1
            if (decodes_only and not decode) or (decode and decodes >= limit):
                continue
            if req.awaits_token and req.stops_by_length(self.max_model_len):
                continue  # its token in flight is its last
            if decode:  # fits while any budget is left (at most a token over)
                n, cost = 1, 1.0
            else:
                start = req.num_started_tokens if break_even else 0
                n, cost = chunk_tokens(p, start, budget, break_even, not out.scheduled)
                if n == 0:
                    break
            if not self._allocate_or_preempt(req, n, out, busy):
                break
            _take(out, req, n)
            budget -= cost
            decodes += decode
        return budget

    def _allocate_or_preempt(
        self, req: Request, n: int, out: SchedulerOutput, busy: Collection[str]
    ) -> bool:
        """Allocates ``n`` slots for ``req``, preempting the newest running request that is
        neither busy, in this step already, nor awaiting a token, until they fit. Returns
        False when ``req`` gets none: it was the one preempted, or no other could be."""
        while self.kv.allocate_slots(req, n) is None:
            taken = {s.request.request_id for s in out.scheduled}
            idle = [
                r
                for r in self.running
                if r.request_id not in busy and r.request_id not in taken and not r.awaits_token
            ]
            if not idle:
                return False
            victim = idle[preemption_victim(idle)]
            self.running.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _schedule_waiting(
        self, out: SchedulerOutput, budget: float, break_even: float | None = None
    ) -> None:
        while (
            self.admitting
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            first = not out.scheduled
            n, cost = chunk_tokens(req.num_pending_tokens, 0, budget, break_even, first)
            if n == 0 or self.kv.allocate_slots(req, n) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            _take(out, req, n)
            budget -= cost

    def _fill_padding(self, out: SchedulerOutput, padded_size: Callable[[int], int | None]) -> None:
        """Grows the batch's last prompt chunk by up to the rows that ``padded_size`` pads the
        batch with: the linear layers compute them anyway, and a chunk trimmed to its cost
        would otherwise leave them empty (at 6k of context Llama-3-8B's chunk is trimmed to
        758 tokens, which with 50 decodes a stage runs as 896 rows). Only when its blocks are
        free; never past the prompt, and nothing is preempted."""
        n = out.num_tokens
        size = padded_size(n) if n else None
        last = out.scheduled[-1] if out.scheduled else None
        if size is None or size <= n or last is None or last.num_new_tokens <= 1:
            return
        req = last.request
        extra = min(size - n, req.num_tokens - req.num_started_tokens)
        if extra <= 0 or self.kv.allocate_slots(req, extra) is None:
            return
        last.num_new_tokens += extra
        last.samples = last.start + last.num_new_tokens == req.num_tokens
        req.num_scheduled_tokens = last.start + last.num_new_tokens

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = req.num_scheduled_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.debug("preempted %s (recompute, %d tokens)", req.request_id, req.num_tokens)

    def update(
        self, out: SchedulerOutput, sampled: dict[str, int], logprobs: dict | None = None
    ) -> list[RequestOutput]:
        """Applies one executed step: advances computed tokens, appends samples, finishes."""
        self.advance(out)
        return self.resolve(out, sampled, logprobs)

    def advance(self, out: SchedulerOutput) -> None:
        """The first half of :meth:`update`, for a step whose tokens are not read back yet:
        advances computed tokens and appends a :data:`PLACEHOLDER_TOKEN` for each request
        that samples (and still runs). :meth:`resolve` must follow before anything but
        scheduling reads the requests."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            if s.samples and req.status is RequestStatus.RUNNING:
                req.output_token_ids.append(PLACEHOLDER_TOKEN)

    def resolve(
        self, out: SchedulerOutput, sampled: dict[str, int], logprobs: dict | None = None
    ) -> list[RequestOutput]:
        """The second half of :meth:`update`: puts each sampled token in its placeholder,
        finishes the requests it stops, and returns the step's outputs. A request finished
        (aborted) since :meth:`advance` gets none. Raises RuntimeError when a request that
        still runs has no placeholder to fill."""
        outputs = []
        for s in out.scheduled:
            req = s.request
            if not s.samples or req.status is not RequestStatus.RUNNING:
                continue
            if not req.awaits_token:
                raise RuntimeError(f"request {req.request_id} has no token placeholder to fill")
            req.output_token_ids[-1] = sampled[req.request_id]
            reason = req.check_stop(self.max_model_len)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(self._output(req, [req.output_token_ids[-1]], logprobs))
        return outputs

    def _output(self, req: Request, tokens: list[int], logprobs: dict | None) -> RequestOutput:
        first = req.num_output_tokens == len(tokens)
        queue_time = None
        if first and req.first_scheduled_time is not None:
            queue_time = req.first_scheduled_time - req.arrival_time
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            finish_reason=req.finish_reason,
            stop_token_id=req.stop_token_id,
            logprobs=_one(None if logprobs is None else logprobs.get(req.request_id)),
            num_prompt_tokens=req.num_prompt_tokens,
            num_preemptions=req.num_preemptions,
            queue_time_s=queue_time,
        )

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.running.remove(req)
        self.kv.free(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Removes a request from whichever queue holds it and frees its blocks.

        Returns its final output, or None when the id is unknown or already finished.
        """
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.kv.free(req)
                    req.status = RequestStatus.FINISHED
                    req.finish_reason = FinishReason.ABORT
                    logger.debug("aborted %s", request_id)
                    return self._output(req, [], None)
        return None

    def kv_demand_blocks(self) -> int:
        """Blocks that running and waiting requests need for the tokens they hold now."""
        return sum(self.kv.blocks_needed(r.num_tokens) for r in (*self.running, *self.waiting))

    def waiting_demand_blocks(self) -> int:
        """Blocks the waiting requests (new and preempted) need for the tokens they hold now:
        the part of ``kv_demand_blocks`` that is queued (the planner's drop condition)."""
        return sum(self.kv.blocks_needed(r.num_tokens) for r in self.waiting)


def chunk_tokens(
    pending: int, start: int, budget: float, break_even: float | None, first: bool = False
) -> tuple[int, float]:
    """How many of a request's ``pending`` tokens, from position ``start``, a batch with
    ``budget`` left takes, and what they cost of it. ``break_even`` None (the token budget):
    ``min(pending, budget)`` at one each. Otherwise a prompt chunk of n tokens costs
    ``n * (1 + (start + (n - 1) / 2) / break_even)``: each token's linear work plus its
    attention over the context before it, which equals the linear work at ``break_even``
    tokens of context (``ModelConfig.attention_break_even``); a decode costs 1. The chunk is
    the longest that fits; ``first`` (nothing in the batch yet) takes at least one token, so
    a batch always makes progress."""
    if break_even is None or pending <= 1:
        n = max(0, min(pending, int(budget)))
        return n, float(n)

    def cost(k: int) -> float:
        return k * (1 + (start + (k - 1) / 2) / break_even)

    # the positive root of k^2 / (2 kappa) + k (1 + (start - 1/2) / kappa) = budget
    b = 1 + (start - 0.5) / break_even
    n = min(pending, max(0, int(break_even * (math.sqrt(b * b + 2 * budget / break_even) - b))))
    while n < pending and cost(n + 1) <= budget:  # the float root, made exact
        n += 1
    while n > 0 and cost(n) > budget:
        n -= 1
    if n == 0 and first and pending > 0:
        n = 1
    return n, cost(n)


def _take(out: SchedulerOutput, req: Request, n: int) -> None:
    """Adds ``n`` tokens of ``req`` (its blocks allocated) to ``out``."""
    s = ScheduledRequest(req, n)
    out.scheduled.append(s)
    req.num_scheduled_tokens = s.start + n


def _one(lp: tuple | None) -> list[tuple] | None:
    """A step's logprobs entry for one token, as the list ``RequestOutput.logprobs`` holds."""
    return None if lp is None else [lp]

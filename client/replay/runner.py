"""The replay's core: send a Workload to one server on schedule and record what comes back.

`run_replay(config)` is the in-process entry point (the CLI and the end-to-end tests call it).
It contacts only config.host:config.port and always stops: every request still running at the
hard cap (last send + drain timeout) is cancelled, aborted on the server and counted as failed,
so `completed + failed == len(records)` always holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from client.api_types import Delta, KunserveError, ModelInfo
from client.grpc_client import AsyncKunserveClient
from client.replay import metrics as replay_metrics
from client.replay.config import ReplayConfig
from client.replay.metrics import BenchmarkMetrics, compute_metrics
from client.replay.prompts import PromptFitter, load_sharegpt, load_tokenizer
from client.replay.records import RequestRecord, ServerSample
from client.replay.workload import Workload, build_workload, load_configured_trace

CLIENT_STALL_S = 0.1
"""A client event loop this late is recorded as a client stall (``ReplayResult.client_stalls``)."""
_WATCH_PERIOD_S = 0.05


@dataclass
class ReplayResult:
    """Everything one replay observed. Times in seconds on the replay clock."""

    config: ReplayConfig
    model: ModelInfo
    workload: Workload
    records: list[RequestRecord]
    samples: list[ServerSample]
    metrics: BenchmarkMetrics
    date: str
    duration_s: float
    hard_cap_s: float
    num_aborted_at_cap: int
    num_sample_errors: int
    client_stalls: list[tuple[float, float]] = field(default_factory=list)
    """(replay time, seconds late) of every time this client's event loop woke more than
    ``CLIENT_STALL_S`` late: around them the client, not the server, delayed what it saw."""
    result_path: Path | None = None
    plot_path: Path | None = None

    @functools.cached_property
    def transition_gaps(self) -> list[dict]:
        """Token gaps across each state change the samples saw (``metrics.transition_gaps``),
        computed once for the summary and the result JSON."""
        return replay_metrics.transition_gaps(self.records, self.samples)

    @property
    def num_requests(self) -> int:
        """Requests in the schedule."""
        return len(self.records)

    @property
    def all_accounted(self) -> bool:
        """True if every request ended (finished or failed) and completed + failed adds up."""
        return all(
            r.done for r in self.records
        ) and self.metrics.completed + self.metrics.failed == len(self.records)


def run_replay(config: ReplayConfig) -> ReplayResult:
    """Runs one replay to completion in a fresh event loop; writes JSON/PNG if configured.

    Call `run_replay_async` instead from inside a running event loop.

    Raises:
        KunserveError: the server was not ready in time or GetModelInfo failed.
        ValueError / FileNotFoundError: a bad trace, tokenizer or prompt file.
    """
    return asyncio.run(run_replay_async(config))


async def run_replay_async(config: ReplayConfig) -> ReplayResult:
    """Async form of `run_replay`."""
    async with AsyncKunserveClient(config.host, config.port) as client:
        await client.wait_ready(config.ready_timeout_s)
        model = await client.model_info()
        workload, prompts = _prepare(model, config)
        session = _Session(client, config, workload, prompts)
        date = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        duration_s = await session.run()
    metrics = compute_metrics(
        session.records,
        duration_s,
        config.percentile_metrics,
        config.metric_percentiles,
        config.goodput_slos_ms,
    )
    result = ReplayResult(
        config=config,
        model=model,
        workload=workload,
        records=session.records,
        samples=session.samples,
        metrics=metrics,
        date=date,
        duration_s=duration_s,
        hard_cap_s=session.hard_cap_s,
        num_aborted_at_cap=session.num_aborted_at_cap,
        num_sample_errors=session.num_sample_errors,
        client_stalls=session.stalls,
    )
    _write_outputs(result)
    return result


def _prepare(model: ModelInfo, config: ReplayConfig) -> tuple[Workload, Callable[[int], list[int]]]:
    """The schedule and its prompt source, in the served model's tokens.

    Raises:
        ValueError: the window holds no requests, or a bad trace/tokenizer/prompt file.
    """
    tokenizer = load_tokenizer(config.tokenizer or model.tokenizer_json)
    trace = load_configured_trace(config, tokenizer)
    workload = build_workload(trace, config, model.max_model_len or None)
    if not workload.requests:
        raise ValueError(
            f"the window [{workload.window_start_s:g}, {workload.window_end_s:g}) s of "
            f"{workload.trace_name} holds no requests"
        )
    return workload, make_prompt_source(workload, tokenizer, config)


def make_prompt_source(
    workload: Workload, tokenizer: Tokenizer, config: ReplayConfig
) -> Callable[[int], list[int]]:
    """A function from request index to token ids of exactly its planned input length.

    Each request gets its own seeded start among the ShareGPT prompts (Mooncake requests
    with hash_ids share their prefix blocks). Every prompt is fitted once here to warm the
    tokenizer cache, then discarded, so fitting at send time is only list slicing and the
    run never holds all prompts in memory.
    """
    fitter = PromptFitter(tokenizer, [p.prompt for p in load_sharegpt(config.prompts)], config.seed)
    starts = [fitter.random_start() for _ in workload.requests]

    def prompt_ids(index: int) -> list[int]:
        r = workload.requests[index]
        if r.hash_ids and not config.ignore_hash_ids:
            return fitter.fit_blocks(r.input_len, r.hash_ids, starts[index])
        return fitter.fit(r.input_len, starts[index])

    for i in range(len(workload.requests)):
        prompt_ids(i)
    return prompt_ids


def _write_outputs(result: ReplayResult) -> None:
    from client.replay.report import save_result, saved_result_path

    config = result.config
    if config.save_result:
        result.result_path = save_result(result, saved_result_path(result))
    if config.plot:
        from client.replay.plot import plot_timeline
        from client.replay.report import result_to_json

        result.plot_path = plot_timeline(result_to_json(result), Path(config.plot))


class _Session:
    """One replay's dispatch loop, per-request streams and server-info sampler."""

    def __init__(
        self,
        client: AsyncKunserveClient,
        config: ReplayConfig,
        workload: Workload,
        prompts: Callable[[int], list[int]],
    ) -> None:
        self.client = client
        self.config = config
        self.workload = workload
        self.prompts = prompts
        prefix = config.request_id_prefix or f"replay-{secrets.token_hex(4)}-"
        self.records = [
            RequestRecord(r.index, f"{prefix}{r.index}", r.send_s, r.input_len, r.output_len)
            for r in workload.requests
        ]
        self.samples: list[ServerSample] = []
        self.hard_cap_s = workload.span_s + config.drain_timeout_s
        self.num_aborted_at_cap = 0
        self.num_sample_errors = 0
        self.stalls: list[tuple[float, float]] = []
        self._t0 = 0.0
        self._limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        self._bar: tqdm | None = None

    def now(self) -> float:
        """Seconds since the replay started."""
        return time.perf_counter() - self._t0

    async def run(self) -> float:
        """Sends every request on schedule, waits up to the hard cap; returns the duration (s)."""
        self._bar = tqdm(
            total=len(self.records), desc="replay", unit="req", disable=self.config.disable_tqdm
        )
        self._t0 = time.perf_counter()
        sampler = asyncio.create_task(self._sample_loop())
        watch = asyncio.create_task(self._watch_loop())
        try:
            tasks = await self._dispatch()
            if tasks:
                timeout = max(self.hard_cap_s - self.now(), 0.0)
                _, pending = await asyncio.wait(tasks, timeout=timeout)
                if pending:
                    await self._abort_at_cap(pending)
            return self.now()
        finally:
            sampler.cancel()
            watch.cancel()
            await asyncio.gather(sampler, watch, return_exceptions=True)
            self._bar.close()

    async def _dispatch(self) -> list[asyncio.Task]:
        """Starts one task per request at its scheduled time; returns the tasks."""
        tasks: list[asyncio.Task] = []
        for record in self.records:
            delay = record.scheduled_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.now() >= self.hard_cap_s:
                self._fail_unsent("not sent: the hard cap passed before its send time")
                break
            prompt = self.prompts(record.index)
            tasks.append(asyncio.create_task(self._run_one(record, prompt)))
        return tasks

    async def _run_one(self, record: RequestRecord, prompt: list[int]) -> None:
        try:
            if self._limit is None:
                await self._stream(record, prompt)
            else:
                async with self._limit:
                    await self._stream(record, prompt)
        finally:
            if self._bar is not None:
                self._bar.update(1)

    async def _stream(self, record: RequestRecord, prompt: list[int]) -> None:
        """Sends one request and records its deltas; every RPC error ends it as failed."""
        cfg = self.config
        stream = self.client.generate(
            prompt,
            request_id=record.request_id,
            max_tokens=record.requested_output_len,
            ignore_eos=cfg.ignore_eos,
            temperature=cfg.temperature,
        )
        record.mark_sent(self.now())
        try:
            async for event in stream:
                now = self.now()
                if isinstance(event, Delta):
                    record.add_chunk(now, len(event.token_ids), event.text)
                else:
                    record.mark_finished(now, event)
            if not record.done:
                record.mark_failed(self.now(), "INTERNAL: stream ended without a Finished event")
        except KunserveError as err:
            record.mark_failed(self.now(), f"{err.code_name}: {err.message}")

    async def _abort_at_cap(self, pending: set[asyncio.Task]) -> None:
        """Cancels what is still running at the hard cap, aborts it on the server, fails it."""
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        now = self.now()
        live = [r for r in self.records if r.start_s is not None and not r.done]
        reason = f"ABORTED: still running at the hard cap ({self.hard_cap_s:.1f} s)"
        for r in live:
            r.mark_failed(now, reason)
        self._fail_unsent("not sent: waiting for a --max-concurrency slot at the hard cap")
        self.num_aborted_at_cap = len(live)
        if live:
            # Cancelling the RPCs already aborts them; Abort is a second notice.
            with contextlib.suppress(KunserveError):
                await self.client.abort([r.request_id for r in live], timeout=5.0)

    def _fail_unsent(self, reason: str) -> None:
        now = self.now()
        for r in self.records:
            if r.start_s is None and not r.done:
                r.mark_failed(now, reason)

    async def _watch_loop(self) -> None:
        """Records when this event loop wakes ``CLIENT_STALL_S`` late (``self.stalls``): a
        busy client delays every stream it reads and would blame the server for it."""
        while True:
            start = self.now()
            await asyncio.sleep(_WATCH_PERIOD_S)
            late = self.now() - start - _WATCH_PERIOD_S
            if late > CLIENT_STALL_S:
                self.stalls.append((start, late))

    async def _sample_loop(self) -> None:
        """Polls GetServerInfo every sample_interval_s, on a fixed grid from t = 0."""
        period, k = self.config.sample_interval_s, 0
        while True:
            t, unix = self.now(), time.time()
            try:
                info = await self.client.server_info(timeout=max(period, 1.0))
                self.samples.append(ServerSample(t, info.instances, unix))
            except KunserveError:
                self.num_sample_errors += 1
            k += 1
            await asyncio.sleep(max(k * period - self.now(), 0.0))

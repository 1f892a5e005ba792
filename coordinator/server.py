"""The coordinator process: a Ray actor hosting the coordinator, the gRPC server and /metrics.

Its event loop runs in a thread of its own; Ray's threads call ``push_outputs`` and hand the
result to that loop. Start-up is two-phase so clients see UNAVAILABLE rather than a refused
connection while workers load: the gRPC server binds first, then the workers start.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from coordinator.admin import ADMIN_SERVICE_NAME, AdminServicer
from coordinator.coordinator import Coordinator
from coordinator.frontend import VERSION, InferenceServicer, set_serving, start_grpc_server
from coordinator.metrics import Metrics
from coordinator.overload import OverloadController, model_shape
from coordinator.transitions import Transitions
from coordinator.validation import ModelLimits
from planner.config import PlannerConfig
from proto.kunserve.v1 import inference_pb2 as pb
from proto.kunserve.v1.admin_pb2_grpc import add_AdminServiceServicer_to_server as add_admin
from workers.config import LOG_FORMAT, EngineConfig, load_eos_token_ids, parse_dtype
from workers.stalls import LateLog, freeze_startup_heap, install_gc_monitor, watch_event_loop
from workers.tokenizer import Tokenizer
from workers.worker import StepResult, Worker, WorkerInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig
    served_model_name: str
    host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    port: int = 50051
    """gRPC port."""
    metrics_port: int | None = 8000
    """Prometheus /metrics HTTP port; None disables it."""
    num_workers: int = 1
    """Workers (one per GPU, or CPU workers)."""
    use_gpu: bool = True
    """One GPU per worker; False runs CPU workers."""
    overload_policy: str = "drop"
    """What an instance does when its KV cache runs out: ``drop`` (KunServe: data-parallel
    instances drop replicated layers and serve as a pipeline; needs two instances or more, and
    a single instance serves as ``recompute``) or ``recompute`` (preempt and recompute, as vLLM
    does)."""
    worker_env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the worker processes."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """When to drop and restore; its sample_interval_s is also how often every instance's load
    is sampled."""
    auto_transitions: bool = True
    """Whether the planner drops and restores on its own (overload policy drop only); when off
    (--no-auto-transitions) only admin RPCs force transitions and the planner just observes
    and logs."""
    log_level: str = "INFO"
    """Log level of the coordinator and worker processes (``logging`` level name)."""


class CoordinatorServer:
    """Body of the coordinator actor (``ray.remote(CoordinatorServer)`` in the CLI)."""

    def __init__(self, config: ServeConfig) -> None:
        logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
        install_gc_monitor()
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="frontend", daemon=True)
        self._thread.start()
        self._ready: Future = Future()
        self.workers: list = []
        self.core: Coordinator | None = None
        self._pg = None
        self._late_stats = LateLog("GetServerInfo waited on", threshold_s=0.5)

    def start(self) -> str:
        """Binds the gRPC server (health NOT_SERVING) and starts the workers in the background.
        Returns the bound address; raises what binding raised."""
        me = ray.get_runtime_context().current_actor
        bound: Future = Future()
        asyncio.run_coroutine_threadsafe(self._main(me, bound), self.loop)
        return bound.result(timeout=120)

    def wait_ready(self, timeout: float) -> bool:
        """Blocks until workers are serving; re-raises a start-up failure."""
        self._ready.result(timeout=timeout)
        return True

    def push_outputs(self, result: StepResult) -> None:
        self.loop.call_soon_threadsafe(self.core.on_step, result)

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown.remote()
        if self._pg is not None:
            remove_placement_group(self._pg)

    async def _main(self, me, bound: Future) -> None:
        cfg = self.config
        self._watch_task = asyncio.ensure_future(watch_event_loop(name="coordinator event loop"))
        try:
            tokenizer = Tokenizer(cfg.engine.model_path)
            model_cfg = cfg.engine.model_config()
            limits = ModelLimits(
                cfg.served_model_name,
                cfg.engine.max_model_len(model_cfg),
                max(model_cfg.vocab_size, tokenizer.vocab_size),
            )
            metrics = Metrics(cfg.served_model_name)
            if cfg.metrics_port is not None:
                metrics.serve(cfg.metrics_port)
            self.core = Coordinator(
                tokenizer,
                limits,
                metrics,
                cfg.engine.cache.block_size,
                cfg.engine.scheduler.max_waiting,
                cfg.overload_policy,
            )
            servicer = InferenceServicer(
                self.core, self._model_info(tokenizer, limits), self.server_info
            )
            self.transitions = Transitions(self.core, model_cfg.num_layers, cfg.overload_policy)
            device = "cuda" if cfg.use_gpu else "cpu"
            dtype_bytes = parse_dtype(cfg.engine.dtype, device).itemsize
            shape = model_shape(model_cfg, dtype_bytes, cfg.engine.cache.block_size)
            admin = AdminServicer(self.transitions, self.server_info)
            extra = [(ADMIN_SERVICE_NAME, lambda s: add_admin(admin, s))]
            self.server, self.health = await start_grpc_server(servicer, cfg.host, cfg.port, extra)
            bound.set_result(f"{cfg.host}:{cfg.port}")
        except BaseException as e:
            bound.set_exception(e)
            return
        try:
            infos = await self._start_workers(me)
            self.core.attach(self.workers, infos)
            freeze_startup_heap()
            await set_serving(self.health, True)
            self._ready.set_result(True)
            interval = cfg.planner.sample_interval_s
            self._monitor_task = asyncio.ensure_future(self.core.monitor(interval))
            act = cfg.auto_transitions and cfg.overload_policy == "drop"
            alone = act and len(infos) < 2  # a drop merges two instances or more
            act = act and not alone
            self.overload = OverloadController(self.core, self.transitions, shape, cfg.planner, act)
            self._overload_task = asyncio.ensure_future(self.overload.run())
            what = "drops and restores" if act else "observes only"
            if alone:
                what += " (one instance: nothing to drop into, it serves as recompute)"
            logger.info("planner: %s, sampling every %g s", what, interval)
            logger.info(
                "serving %s on %s:%d with %d instance(s)",
                cfg.served_model_name,
                cfg.host,
                cfg.port,
                len(infos),
            )
        except BaseException as e:
            logger.exception("start-up failed")
            self._ready.set_exception(e)

    async def _start_workers(self, me) -> list[WorkerInfo]:
        cfg = self.config
        bundle = {"GPU": 1, "CPU": 1} if cfg.use_gpu else {"CPU": 1}
        self._pg = placement_group([bundle] * cfg.num_workers, strategy="PACK")
        await self._pg.ready()
        actor = ray.remote(Worker)
        env = {"env_vars": dict(cfg.worker_env)} if cfg.worker_env else None
        self.workers = [
            actor.options(
                num_cpus=1,
                num_gpus=1 if cfg.use_gpu else 0,
                max_concurrency=4,
                runtime_env=env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank
                ),
            ).remote(rank, cfg.engine, me, cfg.use_gpu, cfg.log_level)
            for rank in range(cfg.num_workers)
        ]
        url = await self.workers[0].rendezvous_address.remote()
        await asyncio.gather(
            *[w.init_distributed.remote(url, cfg.num_workers) for w in self.workers]
        )
        infos = await asyncio.gather(*[w.load.remote() for w in self.workers])
        await asyncio.gather(*[w.start.remote() for w in self.workers])
        return list(infos)

    def _model_info(self, tokenizer: Tokenizer, limits: ModelLimits) -> pb.GetModelInfoResponse:
        e = self.config.engine
        mc = e.model_config()
        return pb.GetModelInfoResponse(
            served_model_name=limits.served_model_name,
            model_path=e.model_path,
            max_model_len=limits.max_model_len,
            vocab_size=limits.vocab_size,
            eos_token_ids=sorted(load_eos_token_ids(e.model_path)),
            kv_block_size=e.cache.block_size,
            num_layers=mc.num_layers,
            dtype=e.dtype,
            has_chat_template=tokenizer.chat_template is not None,
            tokenizer_json=tokenizer.json,
        )

    async def server_info(self) -> pb.GetServerInfoResponse:
        core = self.core
        resp = pb.GetServerInfoResponse(
            version=VERSION,
            overload_policy=self.config.overload_policy,
            uptime_s=time.monotonic() - core.start_time,
            num_requests_total=core.num_requests_total,
        )
        if not core.ready:
            return resp
        asked = time.monotonic()
        fresh = await asyncio.gather(*[i.leader.stats.remote() for i in core.instances])
        self._late_stats.observe("the workers' stats", time.monotonic() - asked)
        by_rank = {i.info.rank: s for i, s in zip(core.instances, fresh, strict=True)}
        for inst, s in zip(core.instances, fresh, strict=True):
            # a pipeline group: the leader holds its requests; each stage holds the same
            # block ids (the group pool), in blocks of its own layers
            used = by_rank[inst.group[0]].kv_blocks_used if inst.group else s.kv_blocks_used
            resp.instances.add(
                instance_id=inst.instance_id,
                state=pb.InstanceState.Value("INSTANCE_STATE_" + inst.state.name),
                worker_ranks=list(inst.group or [inst.info.rank]),
                num_running=s.num_running,
                num_waiting=s.num_waiting,
                kv_blocks_total=s.kv_blocks_total,
                kv_blocks_used=used,
                kv_bytes_total=s.kv_blocks_total * s.kv_block_bytes,
                kv_bytes_used=used * s.kv_block_bytes,
                num_preemptions=s.num_preemptions,
                device=inst.info.device,
                layer_range=list(inst.info.layer_range),
                last_pause_start_unix_s=inst.last_pause[0],
                last_pause_end_unix_s=inst.last_pause[1],
            )
        return resp

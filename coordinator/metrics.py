"""Prometheus metrics: vLLM's names and buckets under the ``kunserve:`` prefix.

Request-level histograms are observed here in the coordinator, which sees every request's
arrival, tokens and finish; per-instance gauges are set from the stats each worker sends with
every step. Labels: ``model_name`` everywhere, plus ``instance`` on per-instance series.
(vLLM uses colons too, so dashboards port by prefix substitution: reference/anchors.md B.4.1.)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from coordinator.request_state import Finished, RequestState
from planner.types import InstanceState

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

P = "kunserve:"


class Metrics:
    """All of the server's metrics in one registry (tests build their own instance)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r, m, mi = self.registry, ["model_name"], ["model_name", "instance"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(P + name, doc, m, buckets=buckets, registry=r)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS)
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "Per-request mean time per output token after the first.",
            ITL_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end latency.", E2E_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", E2E_BUCKETS
        )
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens.", m, registry=r)
        self.generation_tokens = Counter(
            P + "generation_tokens", "Generated tokens.", m, registry=r
        )
        self.request_success = Counter(
            P + "request_success",
            "Finished requests.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.preemptions = Counter(P + "num_preemptions", "Preemptions.", mi, registry=r)
        self.running = Gauge(
            P + "num_requests_running", "Requests in execution batches.", mi, registry=r
        )
        self.waiting = Gauge(P + "num_requests_waiting", "Queued requests.", mi, registry=r)
        self.kv_usage = Gauge(
            P + "kv_cache_usage_perc", "KV-cache usage, a fraction 0..1.", mi, registry=r
        )
        self.kv_demand = Gauge(
            P + "kv_demand_perc",
            "Smoothed KV demand (running and waiting requests' blocks) over normal KV capacity, "
            "as the overload planner sees it; a group's members share the group's. May exceed 1.",
            mi,
            registry=r,
        )
        self.instance_state = Gauge(
            P + "instance_state",
            "1 for the instance's serving mode (normal, dropping, pipelined, restoring, ...), "
            "0 for the others.",
            ["model_name", "instance", "state"],
            registry=r,
        )
        self.transitions = Counter(
            P + "transitions",
            "Drops and restores by kind, trigger (admin, planner) and outcome (ok; refused: "
            "nothing changed; failed: the group's requests were ended).",
            ["model_name", "kind", "trigger", "outcome"],
            registry=r,
        )
        self._preemptions_seen: dict[int, int] = {}
        # per-token series, resolved once: ``labels()`` costs a locked lookup per call
        self._tokens = self.generation_tokens.labels(model_name)
        self._ttft = self.ttft.labels(model_name)
        self._itl = self.itl.labels(model_name)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serves ``/metrics`` over HTTP in a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)

    def on_tokens(
        self, state: RequestState, num_new: int, prev_token_time: float | None, now: float
    ) -> None:
        self._tokens.inc(num_new)
        if prev_token_time is None:
            self._ttft.observe(now - state.arrival_time)
        else:
            self._itl.observe(now - prev_token_time)

    def on_finished(self, state: RequestState, fin: Finished) -> None:
        name = self.model_name
        self.request_success.labels(name, fin.reason.value).inc()
        self.e2e.labels(name).observe(fin.e2e_s)
        self.queue_time.labels(name).observe(fin.queue_time_s)
        self.prompt_tokens.labels(name).inc(fin.prompt_tokens)
        if fin.completion_tokens > 1:
            self.tpot.labels(name).observe((fin.e2e_s - fin.ttft_s) / (fin.completion_tokens - 1))

    def on_instance_stats(
        self, instance: int, running: int, waiting: int, usage: float, preemptions: int
    ) -> None:
        labels = (self.model_name, str(instance))
        self.running.labels(*labels).set(running)
        self.waiting.labels(*labels).set(waiting)
        self.kv_usage.labels(*labels).set(usage)
        seen = self._preemptions_seen.get(instance, 0)
        if preemptions > seen:
            self.preemptions.labels(*labels).inc(preemptions - seen)
            self._preemptions_seen[instance] = preemptions

    def on_instance_state(self, instance: int, state: InstanceState) -> None:
        for s in InstanceState:
            self.instance_state.labels(self.model_name, str(instance), s.value).set(
                1.0 if s is state else 0.0
            )

    def on_demand(self, instance: int, demand: float) -> None:
        self.kv_demand.labels(self.model_name, str(instance)).set(demand)

    def on_transition(self, kind: str, trigger: str, outcome: str) -> None:
        self.transitions.labels(self.model_name, kind, trigger, outcome).inc()

"""Starts a real ``kunserve serve`` process on loopback for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.kunserve.v1 import inference_pb2 as pb
from proto.kunserve.v1 import inference_pb2_grpc as pb_grpc

STORIES = Path(__file__).parent / "fixtures" / "stories260K"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    port: int
    metrics_port: int
    proc: subprocess.Popen
    log_path: Path
    startup_codes: list[str] = field(default_factory=list)  # Generate status codes seen early

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def start_server(log_dir: Path, *extra: str, timeout: float = 180.0) -> ServerProcess:
    """Starts ``kunserve serve`` with 2 CPU workers on stories260K; returns once health says
    SERVING. While it starts, sends Generate calls and records their status codes."""
    port, metrics_port = free_port(), free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "coordinator.cli",
        "serve",
        "--model",
        str(STORIES),
        "--cpu-workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *extra,
    ]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent.parent
    )
    server = ServerProcess(port, metrics_port, proc, log_path)
    # gRPC's default reconnect backoff grows past a second after a few refused connects, which
    # can hide the whole NOT_SERVING window (workers starting) from the probes below.
    channel = grpc.insecure_channel(server.address, options=_FAST_RECONNECT)
    health = health_pb2_grpc.HealthStub(channel)
    stub = pb_grpc.InferenceServiceStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError:
            time.sleep(0.2)
            continue
        if status == health_pb2.HealthCheckResponse.SERVING:
            channel.close()
            return server
        code = _probe_generate(stub)
        if code == "OK" and _serving(health):
            continue  # it became ready between the health check and the probe
        server.startup_codes.append(code)
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"server not SERVING after {timeout} s:\n{server.log()}")


def _serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def _probe_generate(stub: pb_grpc.InferenceServiceStub) -> str:
    req = pb.GenerateRequest(text="Once", sampling_params=pb.SamplingParams(max_tokens=1))
    try:
        for _ in stub.Generate(req, timeout=5):
            pass
        return "OK"
    except grpc.RpcError as e:
        return e.code().name

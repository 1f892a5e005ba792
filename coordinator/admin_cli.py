"""``kunserve admin``: force drop and restore on a running server, and show its groups.

    kunserve admin status [--json] [--check-integrity]
    kunserve admin drop [--instances 0,1]
    kunserve admin restore [--group 0]

Talks to ``kunserve.v1.AdminService`` on the serving port. Exit status 0 on success, 1 with
the server's message on stderr when the RPC fails.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import json_format

from proto.kunserve.v1 import admin_pb2 as apb
from proto.kunserve.v1 import admin_pb2_grpc as apb_grpc
from proto.kunserve.v1 import inference_pb2 as pb


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1", help="server address")
    common.add_argument("--port", type=int, default=50051, help="server gRPC port")
    common.add_argument("--timeout", type=float, default=300.0, help="RPC deadline (seconds)")
    common.add_argument("--json", action="store_true", help="print the response as JSON")
    p = argparse.ArgumentParser(prog="kunserve admin", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", parents=[common], help="pipeline groups and instances")
    status.add_argument(
        "--check-integrity", action="store_true", help="also check every block pool (idle server)"
    )
    drop = sub.add_parser("drop", parents=[common], help="merge instances into one group")
    drop.add_argument(
        "--instances", default="", help="instance ids in stage order (default: every NORMAL)"
    )
    restore = sub.add_parser("restore", parents=[common], help="split a pipeline group back")
    restore.add_argument("--group", type=int, default=None, help="group id (default: the only)")
    return p


def admin_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with grpc.insecure_channel(f"{args.host}:{args.port}") as channel:
        stub = apb_grpc.AdminServiceStub(channel)
        try:
            resp = _call(stub, args)
        except grpc.RpcError as e:
            print(f"kunserve admin {args.command}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(
            json_format.MessageToJson(
                resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )
    elif isinstance(resp, apb.StatusResponse):
        print(format_status(resp))
    else:
        print(format_group(resp.group))
    return 0


def _call(stub: apb_grpc.AdminServiceStub, args: argparse.Namespace):
    if args.command == "status":
        req = apb.StatusRequest(check_integrity=args.check_integrity)
        return stub.Status(req, timeout=args.timeout)
    if args.command == "drop":
        ids = [int(x) for x in args.instances.split(",") if x.strip()]
        return stub.Drop(apb.DropRequest(instance_ids=ids), timeout=args.timeout)
    req = apb.RestoreRequest() if args.group is None else apb.RestoreRequest(group_id=args.group)
    return stub.Restore(req, timeout=args.timeout)


def _state(value: int) -> str:
    return pb.InstanceState.Name(value).removeprefix("INSTANCE_STATE_")


def format_group(g: apb.GroupInfo) -> str:
    ranges = " ".join(f"[{r.start},{r.end})" for r in g.stage_layer_ranges)
    return (
        f"group {g.group_id}: {_state(g.state)} instances {list(g.instance_ids)} "
        f"ranks {list(g.worker_ranks)} layers {ranges} "
        f"KV {g.kv_blocks_before} -> {g.kv_blocks_after} blocks "
        f"(stages {list(g.stage_kv_blocks)}), {g.num_requests_moved} requests moved "
        f"in {g.transition_s:.3f} s (paused {g.paused_s:.3f} s)"
    )


def format_status(resp: apb.StatusResponse) -> str:
    lines = [f"overload policy: {resp.overload_policy}"]
    lines += [format_group(g) for g in resp.groups] or ["no pipeline groups"]
    lines.append("instance  state      ranks   layers  running waiting  KV used/total")
    for i in resp.instances:
        lines.append(
            f"{i.instance_id:>8}  {_state(i.state):<9}  {','.join(map(str, i.worker_ranks)):<6}  "
            f"{'-'.join(map(str, i.layer_range)):<6}  {i.num_running:>7} {i.num_waiting:>7}  "
            f"{i.kv_blocks_used}/{i.kv_blocks_total}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(admin_main(sys.argv[1:]))

"""gRPC ``kunserve.v1.AdminService``: force and inspect drop and restore transitions.

Errors map as the proto says: ValueError (bad instance or group ids) is INVALID_ARGUMENT,
TransitionError (wrong policy or state, KV does not fit) FAILED_PRECONDITION, anything else
INTERNAL (the transition failed part-way and ended its group's requests).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from coordinator.transitions import GroupRecord, Transitions
from proto.kunserve.v1 import admin_pb2 as apb
from proto.kunserve.v1 import admin_pb2_grpc as apb_grpc
from proto.kunserve.v1 import inference_pb2 as pb
from workers.transition import TransitionError

logger = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["AdminService"].full_name


class AdminServicer(apb_grpc.AdminServiceServicer):
    def __init__(
        self,
        transitions: Transitions,
        server_info: Callable[[], Awaitable[pb.GetServerInfoResponse]],
    ) -> None:
        self.transitions = transitions
        self.server_info = server_info

    async def Drop(self, request: apb.DropRequest, context) -> apb.DropResponse:
        ids = list(request.instance_ids) or None
        record = await _run(context, self.transitions.drop(ids))
        return apb.DropResponse(group=group_pb(record))

    async def Restore(self, request: apb.RestoreRequest, context) -> apb.RestoreResponse:
        gid = request.group_id if request.HasField("group_id") else None
        record = await _run(context, self.transitions.restore(gid))
        return apb.RestoreResponse(group=group_pb(record))

    async def Status(self, request: apb.StatusRequest, context) -> apb.StatusResponse:
        if request.check_integrity:
            try:
                await self.transitions.check_integrity()
            except Exception as e:
                await context.abort(grpc.StatusCode.INTERNAL, f"integrity: {_cause(e)}")
        info = await self.server_info()
        return apb.StatusResponse(
            overload_policy=info.overload_policy,
            groups=[group_pb(g) for g in self.transitions.status()],
            instances=list(info.instances),
            integrity_checked=request.check_integrity,
        )


async def _run(context: grpc.aio.ServicerContext, transition: Awaitable[GroupRecord]):
    try:
        return await transition
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except TransitionError as e:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(_cause(e)))
    except Exception as e:  # a worker step failed after the point of no return
        logger.exception("transition failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"transition failed: {_cause(e)}")


def _cause(e: BaseException) -> BaseException:
    """The worker's exception inside a Ray task error."""
    return getattr(e, "cause", None) or e


def group_pb(g: GroupRecord) -> apb.GroupInfo:
    return apb.GroupInfo(
        group_id=g.group_id,
        state=pb.InstanceState.Value("INSTANCE_STATE_" + g.state.name),
        instance_ids=list(g.instance_ids),
        worker_ranks=list(g.spec.ranks),
        stage_layer_ranges=[apb.LayerRange(start=s, end=e) for s, e in g.spec.ranges],
        kv_blocks_before=g.kv_blocks_before,
        kv_blocks_after=g.kv_blocks_after,
        stage_kv_blocks=list(g.stage_blocks),
        num_requests_moved=g.num_moved,
        transition_s=g.transition_s,
        paused_s=g.paused_s,
    )

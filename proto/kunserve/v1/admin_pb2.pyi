from proto.kunserve.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DropRequest(_message.Message):
    __slots__ = ("instance_ids",)
    INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    instance_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, instance_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: GroupInfo
    def __init__(self, group: _Optional[_Union[GroupInfo, _Mapping]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: int
    def __init__(self, group_id: _Optional[int] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: GroupInfo
    def __init__(self, group: _Optional[_Union[GroupInfo, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("check_integrity",)
    CHECK_INTEGRITY_FIELD_NUMBER: _ClassVar[int]
    check_integrity: bool
    def __init__(self, check_integrity: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("overload_policy", "groups", "instances", "integrity_checked")
    OVERLOAD_POLICY_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_CHECKED_FIELD_NUMBER: _ClassVar[int]
    overload_policy: str
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    instances: _containers.RepeatedCompositeFieldContainer[_inference_pb2.InstanceInfo]
    integrity_checked: bool
    def __init__(self, overload_policy: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[_inference_pb2.InstanceInfo, _Mapping]]] = ..., integrity_checked: _Optional[bool] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("group_id", "state", "instance_ids", "worker_ranks", "stage_layer_ranges", "kv_blocks_before", "kv_blocks_after", "stage_kv_blocks", "num_requests_moved", "transition_s", "paused_s")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_RANKS_FIELD_NUMBER: _ClassVar[int]
    STAGE_LAYER_RANGES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_AFTER_FIELD_NUMBER: _ClassVar[int]
    STAGE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_S_FIELD_NUMBER: _ClassVar[int]
    PAUSED_S_FIELD_NUMBER: _ClassVar[int]
    group_id: int
    state: _inference_pb2.InstanceState
    instance_ids: _containers.RepeatedScalarFieldContainer[int]
    worker_ranks: _containers.RepeatedScalarFieldContainer[int]
    stage_layer_ranges: _containers.RepeatedCompositeFieldContainer[LayerRange]
    kv_blocks_before: int
    kv_blocks_after: int
    stage_kv_blocks: _containers.RepeatedScalarFieldContainer[int]
    num_requests_moved: int
    transition_s: float
    paused_s: float
    def __init__(self, group_id: _Optional[int] = ..., state: _Optional[_Union[_inference_pb2.InstanceState, str]] = ..., instance_ids: _Optional[_Iterable[int]] = ..., worker_ranks: _Optional[_Iterable[int]] = ..., stage_layer_ranges: _Optional[_Iterable[_Union[LayerRange, _Mapping]]] = ..., kv_blocks_before: _Optional[int] = ..., kv_blocks_after: _Optional[int] = ..., stage_kv_blocks: _Optional[_Iterable[int]] = ..., num_requests_moved: _Optional[int] = ..., transition_s: _Optional[float] = ..., paused_s: _Optional[float] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SetPeersRequest(_message.Message):
    __slots__ = ("peers", "revision", "leases", "generation")
    class LeasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    leases: _containers.ScalarMap[str, int]
    generation: int
    def __init__(self, peers: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ..., leases: _Optional[_Mapping[str, int]] = ..., generation: _Optional[int] = ...) -> None: ...

class SetPeersResponse(_message.Message):
    __slots__ = ("applied", "revision", "generation")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    revision: int
    generation: int
    def __init__(self, applied: _Optional[bool] = ..., revision: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("drain_timeout",)
    DRAIN_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    drain_timeout: float
    def __init__(self, drain_timeout: _Optional[float] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("text", "addr")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    text: str
    addr: str
    def __init__(self, text: _Optional[str] = ..., addr: _Optional[str] = ...) -> None: ...

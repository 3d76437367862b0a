from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetManyRequest(_message.Message):
    __slots__ = ("group", "keys")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    group: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class KeyResult(_message.Message):
    __slots__ = ("key", "value", "code", "error", "ttl")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    code: int
    error: str
    ttl: float
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., code: _Optional[int] = ..., error: _Optional[str] = ..., ttl: _Optional[float] = ...) -> None: ...

class GetManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[KeyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[KeyResult, _Mapping]]] = ...) -> None: ...

class SetRequest(_message.Message):
    __slots__ = ("group", "key", "value", "ttl")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    group: str
    key: str
    value: bytes
    ttl: float
    def __init__(self, group: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., ttl: _Optional[float] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("group", "key")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    group: str
    key: str
    def __init__(self, group: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class PeerAck(_message.Message):
    __slots__ = ("addr", "confirmed", "error")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    addr: str
    confirmed: bool
    error: str
    def __init__(self, addr: _Optional[str] = ..., confirmed: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ChangeResponse(_message.Message):
    __slots__ = ("owner", "peers")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    owner: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerAck]
    def __init__(self, owner: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerAck, _Mapping]]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("id", "group", "key", "timeout")
    ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    id: int
    group: str
    key: str
    timeout: float
    def __init__(self, id: _Optional[int] = ..., group: _Optional[str] = ..., key: _Optional[str] = ..., timeout: _Optional[float] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("id", "response", "code", "reason", "error", "ttl")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    id: int
    response: bytes
    code: int
    reason: str
    error: str
    ttl: float
    def __init__(self, id: _Optional[int] = ..., response: _Optional[bytes] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ..., ttl: _Optional[float] = ...) -> None: ...

class PeekRequest(_message.Message):
    __slots__ = ("group", "key")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    group: str
    key: str
    def __init__(self, group: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class PeekResponse(_message.Message):
    __slots__ = ("found", "response", "ttl")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    found: bool
    response: bytes
    ttl: float
    def __init__(self, found: _Optional[bool] = ..., response: _Optional[bytes] = ..., ttl: _Optional[float] = ...) -> None: ...

class HandoffEntry(_message.Message):
    __slots__ = ("key", "value", "ttl")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    ttl: float
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., ttl: _Optional[float] = ...) -> None: ...

class HandoffRequest(_message.Message):
    __slots__ = ("source", "group", "entries")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    source: str
    group: str
    entries: _containers.RepeatedCompositeFieldContainer[HandoffEntry]
    def __init__(self, source: _Optional[str] = ..., group: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[HandoffEntry, _Mapping]]] = ...) -> None: ...

class HandoffResponse(_message.Message):
    __slots__ = ("accepted", "refused")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    refused: int
    def __init__(self, accepted: _Optional[int] = ..., refused: _Optional[int] = ...) -> None: ...

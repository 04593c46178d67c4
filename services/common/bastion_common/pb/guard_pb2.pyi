from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_ALLOW: _ClassVar[Verdict]
    VERDICT_BLOCK: _ClassVar[Verdict]
    VERDICT_FLAG: _ClassVar[Verdict]
VERDICT_UNSPECIFIED: Verdict
VERDICT_ALLOW: Verdict
VERDICT_BLOCK: Verdict
VERDICT_FLAG: Verdict

class Segment(_message.Message):
    __slots__ = ("role", "text")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    role: str
    text: str
    def __init__(self, role: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class CheckInputRequest(_message.Message):
    __slots__ = ("request_id", "tenant", "segments")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("kind", "score", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    score: float
    detail: str
    def __init__(self, kind: _Optional[str] = ..., score: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class CheckInputResponse(_message.Message):
    __slots__ = ("verdict", "sanitised", "findings", "removed_characters")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    SANITISED_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    sanitised: _containers.RepeatedCompositeFieldContainer[Segment]
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    removed_characters: int
    def __init__(self, verdict: _Optional[_Union[Verdict, str]] = ..., sanitised: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., removed_characters: _Optional[int] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("request_id", "tenant", "text", "final", "abandon")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ABANDON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    text: str
    final: bool
    abandon: bool
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., text: _Optional[str] = ..., final: _Optional[bool] = ..., abandon: _Optional[bool] = ...) -> None: ...

class FilteredChunk(_message.Message):
    __slots__ = ("text", "findings", "final", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    final: bool
    request_id: str
    def __init__(self, text: _Optional[str] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., final: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class OutputBatch(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[OutputChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[OutputChunk, _Mapping]]] = ...) -> None: ...

class FilteredBatch(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[FilteredChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[FilteredChunk, _Mapping]]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListStudiesRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class StudyRecord(_message.Message):
    __slots__ = ("study_key", "state", "calling_ae", "instances", "rule", "protocol", "case_id", "job_id", "destination", "send_attempts", "detail", "updated")
    STUDY_KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CALLING_AE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    SEND_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    study_key: str
    state: str
    calling_ae: str
    instances: int
    rule: str
    protocol: str
    case_id: str
    job_id: str
    destination: str
    send_attempts: int
    detail: str
    updated: str
    def __init__(self, study_key: _Optional[str] = ..., state: _Optional[str] = ..., calling_ae: _Optional[str] = ..., instances: _Optional[int] = ..., rule: _Optional[str] = ..., protocol: _Optional[str] = ..., case_id: _Optional[str] = ..., job_id: _Optional[str] = ..., destination: _Optional[str] = ..., send_attempts: _Optional[int] = ..., detail: _Optional[str] = ..., updated: _Optional[str] = ...) -> None: ...

class ListStudiesResponse(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[StudyRecord]
    def __init__(self, studies: _Optional[_Iterable[_Union[StudyRecord, _Mapping]]] = ...) -> None: ...

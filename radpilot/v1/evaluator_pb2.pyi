from radpilot.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_NEEDS_IMPROVEMENT: _ClassVar[Decision]
    DECISION_MEETS_PROTOCOL: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_NEEDS_IMPROVEMENT: Decision
DECISION_MEETS_PROTOCOL: Decision

class EvaluateRequest(_message.Message):
    __slots__ = ("case_id", "dose", "protocol_yaml", "agent", "include_images", "references", "physician_feedback")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    DOSE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_YAML_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    PHYSICIAN_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    dose: _types_pb2.ArtefactRef
    protocol_yaml: str
    agent: str
    include_images: bool
    references: _containers.RepeatedCompositeFieldContainer[_types_pb2.ReferencePlan]
    physician_feedback: str
    def __init__(self, case_id: _Optional[str] = ..., dose: _Optional[_Union[_types_pb2.ArtefactRef, _Mapping]] = ..., protocol_yaml: _Optional[str] = ..., agent: _Optional[str] = ..., include_images: _Optional[bool] = ..., references: _Optional[_Iterable[_Union[_types_pb2.ReferencePlan, _Mapping]]] = ..., physician_feedback: _Optional[str] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("decision", "goals", "structures", "dvh", "findings", "images", "all_hard_goals_met", "llm_decision", "disagreement", "llm_calls")
    class ImagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _types_pb2.ArtefactRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_types_pb2.ArtefactRef, _Mapping]] = ...) -> None: ...
    DECISION_FIELD_NUMBER: _ClassVar[int]
    GOALS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURES_FIELD_NUMBER: _ClassVar[int]
    DVH_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ALL_HARD_GOALS_MET_FIELD_NUMBER: _ClassVar[int]
    LLM_DECISION_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LLM_CALLS_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    goals: _containers.RepeatedCompositeFieldContainer[_types_pb2.GoalResult]
    structures: _containers.RepeatedCompositeFieldContainer[_types_pb2.StructureStats]
    dvh: _types_pb2.DvhTable
    findings: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.MessageMap[str, _types_pb2.ArtefactRef]
    all_hard_goals_met: bool
    llm_decision: str
    disagreement: bool
    llm_calls: _containers.RepeatedCompositeFieldContainer[_types_pb2.LlmCall]
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., goals: _Optional[_Iterable[_Union[_types_pb2.GoalResult, _Mapping]]] = ..., structures: _Optional[_Iterable[_Union[_types_pb2.StructureStats, _Mapping]]] = ..., dvh: _Optional[_Union[_types_pb2.DvhTable, _Mapping]] = ..., findings: _Optional[_Iterable[str]] = ..., images: _Optional[_Mapping[str, _types_pb2.ArtefactRef]] = ..., all_hard_goals_met: _Optional[bool] = ..., llm_decision: _Optional[str] = ..., disagreement: _Optional[bool] = ..., llm_calls: _Optional[_Iterable[_Union[_types_pb2.LlmCall, _Mapping]]] = ...) -> None: ...

class GetEvaluatorCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEvaluatorCapabilitiesResponse(_message.Message):
    __slots__ = ("agents", "llm_configured", "llm_step_budget_s", "llm_model", "llm_endpoint")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    LLM_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    LLM_STEP_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    LLM_MODEL_FIELD_NUMBER: _ClassVar[int]
    LLM_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedScalarFieldContainer[str]
    llm_configured: bool
    llm_step_budget_s: float
    llm_model: str
    llm_endpoint: str
    def __init__(self, agents: _Optional[_Iterable[str]] = ..., llm_configured: _Optional[bool] = ..., llm_step_budget_s: _Optional[float] = ..., llm_model: _Optional[str] = ..., llm_endpoint: _Optional[str] = ...) -> None: ...

from radpilot.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IterationMemory(_message.Message):
    __slots__ = ("iteration", "objectives", "goals", "findings", "physician_feedback", "stats", "dvh", "scale_factor")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    GOALS_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    PHYSICIAN_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    DVH_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    objectives: _containers.RepeatedCompositeFieldContainer[_types_pb2.ObjectiveTerm]
    goals: _containers.RepeatedCompositeFieldContainer[_types_pb2.GoalResult]
    findings: _containers.RepeatedScalarFieldContainer[str]
    physician_feedback: str
    stats: _containers.RepeatedCompositeFieldContainer[_types_pb2.StructureStats]
    dvh: _types_pb2.DvhTable
    scale_factor: float
    def __init__(self, iteration: _Optional[int] = ..., objectives: _Optional[_Iterable[_Union[_types_pb2.ObjectiveTerm, _Mapping]]] = ..., goals: _Optional[_Iterable[_Union[_types_pb2.GoalResult, _Mapping]]] = ..., findings: _Optional[_Iterable[str]] = ..., physician_feedback: _Optional[str] = ..., stats: _Optional[_Iterable[_Union[_types_pb2.StructureStats, _Mapping]]] = ..., dvh: _Optional[_Union[_types_pb2.DvhTable, _Mapping]] = ..., scale_factor: _Optional[float] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("protocol_yaml", "agent", "current", "memory", "physician_feedback", "references", "candidates")
    PROTOCOL_YAML_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    PHYSICIAN_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    protocol_yaml: str
    agent: str
    current: _containers.RepeatedCompositeFieldContainer[_types_pb2.ObjectiveTerm]
    memory: _containers.RepeatedCompositeFieldContainer[IterationMemory]
    physician_feedback: str
    references: _containers.RepeatedCompositeFieldContainer[_types_pb2.ReferencePlan]
    candidates: int
    def __init__(self, protocol_yaml: _Optional[str] = ..., agent: _Optional[str] = ..., current: _Optional[_Iterable[_Union[_types_pb2.ObjectiveTerm, _Mapping]]] = ..., memory: _Optional[_Iterable[_Union[IterationMemory, _Mapping]]] = ..., physician_feedback: _Optional[str] = ..., references: _Optional[_Iterable[_Union[_types_pb2.ReferencePlan, _Mapping]]] = ..., candidates: _Optional[int] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("objectives", "rationale", "llm_calls", "fallback", "alternatives")
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    LLM_CALLS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    objectives: _containers.RepeatedCompositeFieldContainer[_types_pb2.ObjectiveTerm]
    rationale: str
    llm_calls: _containers.RepeatedCompositeFieldContainer[_types_pb2.LlmCall]
    fallback: bool
    alternatives: _containers.RepeatedCompositeFieldContainer[_types_pb2.ParameterSet]
    def __init__(self, objectives: _Optional[_Iterable[_Union[_types_pb2.ObjectiveTerm, _Mapping]]] = ..., rationale: _Optional[str] = ..., llm_calls: _Optional[_Iterable[_Union[_types_pb2.LlmCall, _Mapping]]] = ..., fallback: _Optional[bool] = ..., alternatives: _Optional[_Iterable[_Union[_types_pb2.ParameterSet, _Mapping]]] = ...) -> None: ...

class GetPlannerCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPlannerCapabilitiesResponse(_message.Message):
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

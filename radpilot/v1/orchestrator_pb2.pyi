from radpilot.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_ITERATION_STARTED: _ClassVar[EventKind]
    EVENT_KIND_FMO_DONE: _ClassVar[EventKind]
    EVENT_KIND_EVALUATED: _ClassVar[EventKind]
    EVENT_KIND_PROPOSAL: _ClassVar[EventKind]
    EVENT_KIND_FINISHED: _ClassVar[EventKind]
    EVENT_KIND_FAILED: _ClassVar[EventKind]
    EVENT_KIND_CANCELLED: _ClassVar[EventKind]
    EVENT_KIND_SEQUENCED: _ClassVar[EventKind]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_ITERATION_STARTED: EventKind
EVENT_KIND_FMO_DONE: EventKind
EVENT_KIND_EVALUATED: EventKind
EVENT_KIND_PROPOSAL: EventKind
EVENT_KIND_FINISHED: EventKind
EVENT_KIND_FAILED: EventKind
EVENT_KIND_CANCELLED: EventKind
EVENT_KIND_SEQUENCED: EventKind

class CreateCaseRequest(_message.Message):
    __slots__ = ("builtin", "parameters", "dicom_zip_chunk", "protocol_yaml")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DICOM_ZIP_CHUNK_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_YAML_FIELD_NUMBER: _ClassVar[int]
    builtin: str
    parameters: _containers.ScalarMap[str, str]
    dicom_zip_chunk: bytes
    protocol_yaml: str
    def __init__(self, builtin: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ..., dicom_zip_chunk: _Optional[bytes] = ..., protocol_yaml: _Optional[str] = ...) -> None: ...

class CreateCaseResponse(_message.Message):
    __slots__ = ("case_id", "structures", "notes")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    STRUCTURES_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    structures: _containers.RepeatedScalarFieldContainer[str]
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, case_id: _Optional[str] = ..., structures: _Optional[_Iterable[str]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class StartPlanningRequest(_message.Message):
    __slots__ = ("case_id", "protocol_yaml", "max_iterations", "memory_length", "agent", "idempotency_key", "physician_feedback", "candidates")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_YAML_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PHYSICIAN_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    protocol_yaml: str
    max_iterations: int
    memory_length: int
    agent: str
    idempotency_key: str
    physician_feedback: str
    candidates: int
    def __init__(self, case_id: _Optional[str] = ..., protocol_yaml: _Optional[str] = ..., max_iterations: _Optional[int] = ..., memory_length: _Optional[int] = ..., agent: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., physician_feedback: _Optional[str] = ..., candidates: _Optional[int] = ...) -> None: ...

class StartPlanningResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchPlanningRequest(_message.Message):
    __slots__ = ("job_id", "from_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., from_sequence: _Optional[int] = ...) -> None: ...

class WatchPlanningResponse(_message.Message):
    __slots__ = ("sequence", "kind", "iteration", "fmo", "goals", "proposal", "message", "round", "candidate")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    FMO_FIELD_NUMBER: _ClassVar[int]
    GOALS_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    kind: EventKind
    iteration: int
    fmo: _types_pb2.FmoStats
    goals: _containers.RepeatedCompositeFieldContainer[_types_pb2.GoalResult]
    proposal: _containers.RepeatedCompositeFieldContainer[_types_pb2.ObjectiveTerm]
    message: str
    round: int
    candidate: int
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[EventKind, str]] = ..., iteration: _Optional[int] = ..., fmo: _Optional[_Union[_types_pb2.FmoStats, _Mapping]] = ..., goals: _Optional[_Iterable[_Union[_types_pb2.GoalResult, _Mapping]]] = ..., proposal: _Optional[_Iterable[_Union[_types_pb2.ObjectiveTerm, _Mapping]]] = ..., message: _Optional[str] = ..., round: _Optional[int] = ..., candidate: _Optional[int] = ...) -> None: ...

class GetPlanningJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class IterationRecord(_message.Message):
    __slots__ = ("iteration", "objectives", "fmo", "goals", "findings", "rationale", "physician_feedback", "decision", "llm_decision", "disagreement", "llm_calls", "reference_ids", "round", "candidate", "proposals", "dose_basis", "delivery_json", "cold_start")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    FMO_FIELD_NUMBER: _ClassVar[int]
    GOALS_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    PHYSICIAN_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    LLM_DECISION_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LLM_CALLS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    DOSE_BASIS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_JSON_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    objectives: _containers.RepeatedCompositeFieldContainer[_types_pb2.ObjectiveTerm]
    fmo: _types_pb2.FmoStats
    goals: _containers.RepeatedCompositeFieldContainer[_types_pb2.GoalResult]
    findings: _containers.RepeatedScalarFieldContainer[str]
    rationale: str
    physician_feedback: str
    decision: str
    llm_decision: str
    disagreement: bool
    llm_calls: _containers.RepeatedCompositeFieldContainer[_types_pb2.LlmCall]
    reference_ids: _containers.RepeatedScalarFieldContainer[str]
    round: int
    candidate: int
    proposals: _containers.RepeatedCompositeFieldContainer[_types_pb2.ParameterSet]
    dose_basis: str
    delivery_json: str
    cold_start: str
    def __init__(self, iteration: _Optional[int] = ..., objectives: _Optional[_Iterable[_Union[_types_pb2.ObjectiveTerm, _Mapping]]] = ..., fmo: _Optional[_Union[_types_pb2.FmoStats, _Mapping]] = ..., goals: _Optional[_Iterable[_Union[_types_pb2.GoalResult, _Mapping]]] = ..., findings: _Optional[_Iterable[str]] = ..., rationale: _Optional[str] = ..., physician_feedback: _Optional[str] = ..., decision: _Optional[str] = ..., llm_decision: _Optional[str] = ..., disagreement: _Optional[bool] = ..., llm_calls: _Optional[_Iterable[_Union[_types_pb2.LlmCall, _Mapping]]] = ..., reference_ids: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., candidate: _Optional[int] = ..., proposals: _Optional[_Iterable[_Union[_types_pb2.ParameterSet, _Mapping]]] = ..., dose_basis: _Optional[str] = ..., delivery_json: _Optional[str] = ..., cold_start: _Optional[str] = ...) -> None: ...

class GetPlanningJobResponse(_message.Message):
    __slots__ = ("job_id", "case_id", "state", "iterations", "best_iteration", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    BEST_ITERATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    case_id: str
    state: JobState
    iterations: _containers.RepeatedCompositeFieldContainer[IterationRecord]
    best_iteration: int
    error: str
    def __init__(self, job_id: _Optional[str] = ..., case_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., iterations: _Optional[_Iterable[_Union[IterationRecord, _Mapping]]] = ..., best_iteration: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("job_id", "text")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    text: str
    def __init__(self, job_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("applies_from_iteration",)
    APPLIES_FROM_ITERATION_FIELD_NUMBER: _ClassVar[int]
    applies_from_iteration: int
    def __init__(self, applies_from_iteration: _Optional[int] = ...) -> None: ...

class CancelPlanningRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelPlanningResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ExportPlanRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ExportPlanResponse(_message.Message):
    __slots__ = ("bundle", "filename")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    filename: str
    def __init__(self, bundle: _Optional[bytes] = ..., filename: _Optional[str] = ...) -> None: ...

class ApprovePlanRequest(_message.Message):
    __slots__ = ("job_id", "iteration", "description")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    iteration: int
    description: str
    def __init__(self, job_id: _Optional[str] = ..., iteration: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class ApprovePlanResponse(_message.Message):
    __slots__ = ("reference_id", "protocol", "references")
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    reference_id: str
    protocol: str
    references: int
    def __init__(self, reference_id: _Optional[str] = ..., protocol: _Optional[str] = ..., references: _Optional[int] = ...) -> None: ...

class ListPlanningJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class JobSummary(_message.Message):
    __slots__ = ("job_id", "case_id", "state", "agent", "protocol", "iterations", "best_iteration", "created", "updated")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    BEST_ITERATION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    case_id: str
    state: JobState
    agent: str
    protocol: str
    iterations: int
    best_iteration: int
    created: float
    updated: float
    def __init__(self, job_id: _Optional[str] = ..., case_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., agent: _Optional[str] = ..., protocol: _Optional[str] = ..., iterations: _Optional[int] = ..., best_iteration: _Optional[int] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ...) -> None: ...

class ListPlanningJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSummary]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobSummary, _Mapping]]] = ...) -> None: ...

class GetIterationViewRequest(_message.Message):
    __slots__ = ("job_id", "iteration", "slice")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    iteration: int
    slice: int
    def __init__(self, job_id: _Optional[str] = ..., iteration: _Optional[int] = ..., slice: _Optional[int] = ...) -> None: ...

class DvhCurve(_message.Message):
    __slots__ = ("structure", "volume_pct")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_PCT_FIELD_NUMBER: _ClassVar[int]
    structure: str
    volume_pct: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, structure: _Optional[str] = ..., volume_pct: _Optional[_Iterable[float]] = ...) -> None: ...

class GetIterationViewResponse(_message.Message):
    __slots__ = ("iteration", "levels_gy", "dvh", "num_slices", "start_slice", "slice_png", "slice_z_mm", "prescription_gy")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    LEVELS_GY_FIELD_NUMBER: _ClassVar[int]
    DVH_FIELD_NUMBER: _ClassVar[int]
    NUM_SLICES_FIELD_NUMBER: _ClassVar[int]
    START_SLICE_FIELD_NUMBER: _ClassVar[int]
    SLICE_PNG_FIELD_NUMBER: _ClassVar[int]
    SLICE_Z_MM_FIELD_NUMBER: _ClassVar[int]
    PRESCRIPTION_GY_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    levels_gy: _containers.RepeatedScalarFieldContainer[float]
    dvh: _containers.RepeatedCompositeFieldContainer[DvhCurve]
    num_slices: int
    start_slice: int
    slice_png: bytes
    slice_z_mm: float
    prescription_gy: float
    def __init__(self, iteration: _Optional[int] = ..., levels_gy: _Optional[_Iterable[float]] = ..., dvh: _Optional[_Iterable[_Union[DvhCurve, _Mapping]]] = ..., num_slices: _Optional[int] = ..., start_slice: _Optional[int] = ..., slice_png: _Optional[bytes] = ..., slice_z_mm: _Optional[float] = ..., prescription_gy: _Optional[float] = ...) -> None: ...

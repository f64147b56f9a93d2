from radpilot.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrepareCaseRequest(_message.Message):
    __slots__ = ("case_id",)
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    def __init__(self, case_id: _Optional[str] = ...) -> None: ...

class PrepareCaseResponse(_message.Message):
    __slots__ = ("case_id", "rows", "beamlets", "nnz", "backend", "seconds")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BEAMLETS_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    rows: int
    beamlets: int
    nnz: int
    backend: str
    seconds: float
    def __init__(self, case_id: _Optional[str] = ..., rows: _Optional[int] = ..., beamlets: _Optional[int] = ..., nnz: _Optional[int] = ..., backend: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class OptimizeRequest(_message.Message):
    __slots__ = ("case_id", "objectives", "normalize_to", "warm_start", "max_iterations", "prescription_gy", "coverage_pct", "helpers")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_TO_FIELD_NUMBER: _ClassVar[int]
    WARM_START_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    PRESCRIPTION_GY_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_PCT_FIELD_NUMBER: _ClassVar[int]
    HELPERS_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    objectives: _containers.RepeatedCompositeFieldContainer[_types_pb2.ObjectiveTerm]
    normalize_to: str
    warm_start: _types_pb2.NDArray
    max_iterations: int
    prescription_gy: float
    coverage_pct: float
    helpers: _containers.RepeatedCompositeFieldContainer[_types_pb2.HelperStructure]
    def __init__(self, case_id: _Optional[str] = ..., objectives: _Optional[_Iterable[_Union[_types_pb2.ObjectiveTerm, _Mapping]]] = ..., normalize_to: _Optional[str] = ..., warm_start: _Optional[_Union[_types_pb2.NDArray, _Mapping]] = ..., max_iterations: _Optional[int] = ..., prescription_gy: _Optional[float] = ..., coverage_pct: _Optional[float] = ..., helpers: _Optional[_Iterable[_Union[_types_pb2.HelperStructure, _Mapping]]] = ...) -> None: ...

class OptimizeResponse(_message.Message):
    __slots__ = ("stats", "fluence", "dose", "replica", "case_load_seconds")
    STATS_FIELD_NUMBER: _ClassVar[int]
    FLUENCE_FIELD_NUMBER: _ClassVar[int]
    DOSE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    CASE_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stats: _types_pb2.FmoStats
    fluence: _types_pb2.NDArray
    dose: _types_pb2.ArtefactRef
    replica: str
    case_load_seconds: float
    def __init__(self, stats: _Optional[_Union[_types_pb2.FmoStats, _Mapping]] = ..., fluence: _Optional[_Union[_types_pb2.NDArray, _Mapping]] = ..., dose: _Optional[_Union[_types_pb2.ArtefactRef, _Mapping]] = ..., replica: _Optional[str] = ..., case_load_seconds: _Optional[float] = ...) -> None: ...

class SequenceRequest(_message.Message):
    __slots__ = ("case_id", "fluence", "normalize_to", "prescription_gy", "coverage_pct", "fractions", "mlc", "levels", "min_segment_mu", "refit", "objectives", "helpers", "max_segments_per_beam", "keep_leaves")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    FLUENCE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_TO_FIELD_NUMBER: _ClassVar[int]
    PRESCRIPTION_GY_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_PCT_FIELD_NUMBER: _ClassVar[int]
    FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    MLC_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MIN_SEGMENT_MU_FIELD_NUMBER: _ClassVar[int]
    REFIT_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    HELPERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEGMENTS_PER_BEAM_FIELD_NUMBER: _ClassVar[int]
    KEEP_LEAVES_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    fluence: _types_pb2.NDArray
    normalize_to: str
    prescription_gy: float
    coverage_pct: float
    fractions: int
    mlc: str
    levels: int
    min_segment_mu: float
    refit: bool
    objectives: _containers.RepeatedCompositeFieldContainer[_types_pb2.ObjectiveTerm]
    helpers: _containers.RepeatedCompositeFieldContainer[_types_pb2.HelperStructure]
    max_segments_per_beam: int
    keep_leaves: bool
    def __init__(self, case_id: _Optional[str] = ..., fluence: _Optional[_Union[_types_pb2.NDArray, _Mapping]] = ..., normalize_to: _Optional[str] = ..., prescription_gy: _Optional[float] = ..., coverage_pct: _Optional[float] = ..., fractions: _Optional[int] = ..., mlc: _Optional[str] = ..., levels: _Optional[int] = ..., min_segment_mu: _Optional[float] = ..., refit: _Optional[bool] = ..., objectives: _Optional[_Iterable[_Union[_types_pb2.ObjectiveTerm, _Mapping]]] = ..., helpers: _Optional[_Iterable[_Union[_types_pb2.HelperStructure, _Mapping]]] = ..., max_segments_per_beam: _Optional[int] = ..., keep_leaves: _Optional[bool] = ...) -> None: ...

class SequenceResponse(_message.Message):
    __slots__ = ("plan_json", "dose", "fluence", "replica")
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    DOSE_FIELD_NUMBER: _ClassVar[int]
    FLUENCE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    plan_json: str
    dose: _types_pb2.ArtefactRef
    fluence: _types_pb2.NDArray
    replica: str
    def __init__(self, plan_json: _Optional[str] = ..., dose: _Optional[_Union[_types_pb2.ArtefactRef, _Mapping]] = ..., fluence: _Optional[_Union[_types_pb2.NDArray, _Mapping]] = ..., replica: _Optional[str] = ...) -> None: ...

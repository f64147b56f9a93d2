from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Comparator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARATOR_UNSPECIFIED: _ClassVar[Comparator]
    COMPARATOR_AT_MOST: _ClassVar[Comparator]
    COMPARATOR_AT_LEAST: _ClassVar[Comparator]
COMPARATOR_UNSPECIFIED: Comparator
COMPARATOR_AT_MOST: Comparator
COMPARATOR_AT_LEAST: Comparator

class NDArray(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ObjectiveTerm(_message.Message):
    __slots__ = ("structure", "kind", "dose_gy", "weight", "parameter")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DOSE_GY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    structure: str
    kind: str
    dose_gy: float
    weight: float
    parameter: float
    def __init__(self, structure: _Optional[str] = ..., kind: _Optional[str] = ..., dose_gy: _Optional[float] = ..., weight: _Optional[float] = ..., parameter: _Optional[float] = ...) -> None: ...

class HelperStructure(_message.Message):
    __slots__ = ("name", "kind", "of", "subtract", "inner_mm", "outer_mm", "margin_mm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OF_FIELD_NUMBER: _ClassVar[int]
    SUBTRACT_FIELD_NUMBER: _ClassVar[int]
    INNER_MM_FIELD_NUMBER: _ClassVar[int]
    OUTER_MM_FIELD_NUMBER: _ClassVar[int]
    MARGIN_MM_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    of: str
    subtract: str
    inner_mm: float
    outer_mm: float
    margin_mm: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., of: _Optional[str] = ..., subtract: _Optional[str] = ..., inner_mm: _Optional[float] = ..., outer_mm: _Optional[float] = ..., margin_mm: _Optional[float] = ...) -> None: ...

class ParameterSet(_message.Message):
    __slots__ = ("terms",)
    TERMS_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[ObjectiveTerm]
    def __init__(self, terms: _Optional[_Iterable[_Union[ObjectiveTerm, _Mapping]]] = ...) -> None: ...

class ClinicalGoal(_message.Message):
    __slots__ = ("structure", "metric", "comparator", "limit", "priority", "hard")
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    COMPARATOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    HARD_FIELD_NUMBER: _ClassVar[int]
    structure: str
    metric: str
    comparator: Comparator
    limit: float
    priority: int
    hard: bool
    def __init__(self, structure: _Optional[str] = ..., metric: _Optional[str] = ..., comparator: _Optional[_Union[Comparator, str]] = ..., limit: _Optional[float] = ..., priority: _Optional[int] = ..., hard: _Optional[bool] = ...) -> None: ...

class GoalResult(_message.Message):
    __slots__ = ("goal", "achieved", "passed", "margin")
    GOAL_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    goal: ClinicalGoal
    achieved: float
    passed: bool
    margin: float
    def __init__(self, goal: _Optional[_Union[ClinicalGoal, _Mapping]] = ..., achieved: _Optional[float] = ..., passed: _Optional[bool] = ..., margin: _Optional[float] = ...) -> None: ...

class StructureStats(_message.Message):
    __slots__ = ("name", "kind", "volume_cc", "min_gy", "mean_gy", "max_gy", "d95_gy", "d50_gy", "d5_gy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VOLUME_CC_FIELD_NUMBER: _ClassVar[int]
    MIN_GY_FIELD_NUMBER: _ClassVar[int]
    MEAN_GY_FIELD_NUMBER: _ClassVar[int]
    MAX_GY_FIELD_NUMBER: _ClassVar[int]
    D95_GY_FIELD_NUMBER: _ClassVar[int]
    D50_GY_FIELD_NUMBER: _ClassVar[int]
    D5_GY_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    volume_cc: float
    min_gy: float
    mean_gy: float
    max_gy: float
    d95_gy: float
    d50_gy: float
    d5_gy: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., volume_cc: _Optional[float] = ..., min_gy: _Optional[float] = ..., mean_gy: _Optional[float] = ..., max_gy: _Optional[float] = ..., d95_gy: _Optional[float] = ..., d50_gy: _Optional[float] = ..., d5_gy: _Optional[float] = ...) -> None: ...

class DvhTable(_message.Message):
    __slots__ = ("levels_gy", "structures", "volume_pct")
    LEVELS_GY_FIELD_NUMBER: _ClassVar[int]
    STRUCTURES_FIELD_NUMBER: _ClassVar[int]
    VOLUME_PCT_FIELD_NUMBER: _ClassVar[int]
    levels_gy: _containers.RepeatedScalarFieldContainer[float]
    structures: _containers.RepeatedScalarFieldContainer[str]
    volume_pct: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, levels_gy: _Optional[_Iterable[float]] = ..., structures: _Optional[_Iterable[str]] = ..., volume_pct: _Optional[_Iterable[float]] = ...) -> None: ...

class FmoStats(_message.Message):
    __slots__ = ("objective", "objective_normalized", "iterations", "seconds", "backend", "converged", "stop_reason", "scale_factor", "sparse_products", "working_set_rows")
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SPARSE_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    WORKING_SET_ROWS_FIELD_NUMBER: _ClassVar[int]
    objective: float
    objective_normalized: float
    iterations: int
    seconds: float
    backend: str
    converged: bool
    stop_reason: str
    scale_factor: float
    sparse_products: int
    working_set_rows: int
    def __init__(self, objective: _Optional[float] = ..., objective_normalized: _Optional[float] = ..., iterations: _Optional[int] = ..., seconds: _Optional[float] = ..., backend: _Optional[str] = ..., converged: _Optional[bool] = ..., stop_reason: _Optional[str] = ..., scale_factor: _Optional[float] = ..., sparse_products: _Optional[int] = ..., working_set_rows: _Optional[int] = ...) -> None: ...

class ArtefactRef(_message.Message):
    __slots__ = ("case_id", "path", "sha256")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    path: str
    sha256: str
    def __init__(self, case_id: _Optional[str] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class LlmCall(_message.Message):
    __slots__ = ("iteration", "role", "model", "images", "image_sha256", "outcome", "validation", "error", "seconds", "attempts", "prompt_tokens", "completion_tokens", "request_json", "response_text", "endpoint")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    role: str
    model: str
    images: int
    image_sha256: _containers.RepeatedScalarFieldContainer[str]
    outcome: str
    validation: str
    error: str
    seconds: float
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    request_json: str
    response_text: str
    endpoint: str
    def __init__(self, iteration: _Optional[int] = ..., role: _Optional[str] = ..., model: _Optional[str] = ..., images: _Optional[int] = ..., image_sha256: _Optional[_Iterable[str]] = ..., outcome: _Optional[str] = ..., validation: _Optional[str] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ..., attempts: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., request_json: _Optional[str] = ..., response_text: _Optional[str] = ..., endpoint: _Optional[str] = ...) -> None: ...

class ReferencePlan(_message.Message):
    __slots__ = ("reference_id", "description", "objectives", "results_text", "distance")
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    reference_id: str
    description: str
    objectives: _containers.RepeatedCompositeFieldContainer[ObjectiveTerm]
    results_text: str
    distance: float
    def __init__(self, reference_id: _Optional[str] = ..., description: _Optional[str] = ..., objectives: _Optional[_Iterable[_Union[ObjectiveTerm, _Mapping]]] = ..., results_text: _Optional[str] = ..., distance: _Optional[float] = ...) -> None: ...

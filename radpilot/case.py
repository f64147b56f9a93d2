"""The planning case: dose grid, CT on that grid, structures, beams and the dose influence matrix.

Array order convention: every 3-D array is a NumPy array indexed ``[z, y, x]`` (C order), and every
linear voxel index is the C-order index into that array. Grid spacing and origin are given in the
same ``(z, y, x)`` order, in millimetres. Doses are in Gy per unit fluence (``A``) or in Gy.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from radpilot.errors import CaseError

NORMAL_TISSUE = "NormalTissue"  # derived: the body minus the targets grown by 10 mm
DERIVED = (NORMAL_TISSUE,)  # RadPilot's own structures (not exported, no crops)
# the body outside every target: the implicit hot-spot goal's region (a protocol's safety goals)
OUTSIDE_TARGETS = "OutsideTargets"


class StructureKind(enum.StrEnum):
    TARGET = "target"
    OAR = "oar"
    EXTERNAL = "external"


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid; all tuples are ``(z, y, x)``."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def voxel_volume_cc(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def index_of(self, point_mm: tuple[float, float, float]) -> tuple[int, int, int]:
        """Nearest voxel ``(z, y, x)`` to a world point given in ``(z, y, x)`` millimetres."""
        idx = [
            int(np.clip(round((p - o) / s), 0, n - 1))
            for p, o, s, n in zip(
                point_mm, self.origin_mm, self.spacing_mm, self.shape, strict=True
            )
        ]
        return idx[0], idx[1], idx[2]

    def centre_of(self, voxel: int) -> tuple[float, float, float]:
        """World ``(z, y, x)`` millimetres of a voxel's centre (its C-order linear index)."""
        z, y, x = (
            o + i * s
            for o, i, s in zip(
                self.origin_mm, np.unravel_index(voxel, self.shape), self.spacing_mm, strict=True
            )
        )
        return float(z), float(y), float(x)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "origin_mm": list(self.origin_mm),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        shape = tuple(int(v) for v in d["shape"])
        spacing = tuple(float(v) for v in d["spacing_mm"])
        origin = tuple(float(v) for v in d["origin_mm"])
        if len(shape) != 3 or len(spacing) != 3 or len(origin) != 3:
            raise CaseError("grid shape, spacing_mm and origin_mm must each have three values")
        return cls(shape, spacing, origin)


@dataclass
class DoseSamples:
    """Where dosimetry reads a structure's dose: points on a grid finer than the dose grid,
    each holding part of the structure's volume (``weights``, in dose voxels), the dose there
    interpolated trilinearly from the case's rows (``matrix``: points x rows). This is how an
    independent checker samples an exported RTDOSE on the contours."""

    matrix: sp.csr_matrix
    weights: np.ndarray


@dataclass
class Structure:
    """A named region: sorted, unique C-order voxel indices on the case's dose grid, and for
    each voxel the fraction of its volume inside the structure (``weights``; None = whole
    voxels). Dosimetry and the FMO's objective terms weight every voxel by that fraction; where
    the structure has ``samples`` (an imported patient), dosimetry reads those instead."""

    name: str
    kind: StructureKind
    voxel_indices: np.ndarray
    weights: np.ndarray | None = None
    samples: DoseSamples | None = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float32)
            if w.shape != self.voxel_indices.shape:
                raise CaseError(f"structure {self.name!r}: one weight per voxel is needed")
            if w.size and not (np.all(w > 0) and np.all(w <= 1.0 + 1e-6)):
                raise CaseError(f"structure {self.name!r}: voxel fractions must be in (0, 1]")
            self.weights = np.minimum(w, 1.0) if not np.all(w == 1.0) else None

    @property
    def num_voxels(self) -> int:
        return int(self.voxel_indices.size)

    @property
    def volume_voxels(self) -> float:
        """The structure's volume in whole-voxel units (the sum of the fractions)."""
        return (
            float(self.weights.sum(dtype=np.float64))
            if self.weights is not None
            else float(self.voxel_indices.size)
        )

    def mask(self, grid: Grid) -> np.ndarray:
        m = np.zeros(grid.num_voxels, dtype=bool)
        m[self.voxel_indices] = True
        return m.reshape(grid.shape)


@dataclass(frozen=True)
class Beam:
    """One field. ``beamlets_mm`` holds each beamlet's centre in the beam's eye view at the
    isocentre plane, ``(x, z)`` in mm (x: the leaf travel direction, z: across the leaf pairs),
    in the order of the matrix columns; with ``bixel_mm`` it places the fluence map under an
    MLC. Cases stored before RadPilot kept it have ``None`` (they cannot be sequenced)."""

    gantry_deg: float
    couch_deg: float
    num_beamlets: int
    bixel_mm: float = 0.0
    beamlets_mm: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.beamlets_mm is not None:
            xy = np.asarray(self.beamlets_mm, dtype=np.float64).reshape(-1, 2)
            if xy.shape[0] != self.num_beamlets:
                raise CaseError(
                    f"beam at gantry {self.gantry_deg:g}: {xy.shape[0]} beamlet positions for "
                    f"{self.num_beamlets} beamlets"
                )
            if self.bixel_mm <= 0:
                raise CaseError(f"beam at gantry {self.gantry_deg:g}: bixel_mm must be positive")
            object.__setattr__(self, "beamlets_mm", xy)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "gantry_deg": self.gantry_deg,
            "couch_deg": self.couch_deg,
            "num_beamlets": self.num_beamlets,
        }
        if self.beamlets_mm is not None:
            d["bixel_mm"] = self.bixel_mm
            d["beamlets_mm"] = np.round(self.beamlets_mm, 4).tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Beam:
        xy = d.get("beamlets_mm")
        return cls(
            float(d["gantry_deg"]),
            float(d["couch_deg"]),
            int(d["num_beamlets"]),
            float(d.get("bixel_mm", 0.0)),
            None if xy is None else np.asarray(xy, dtype=np.float64),
        )


@dataclass
class Case:
    """Everything the optimiser and evaluator need about one patient or phantom.

    ``dose_influence`` is CSR float32 with one row per entry of ``row_voxels`` (the sorted voxel
    indices that lie in any structure) and one column per beamlet, beams in order.
    """

    name: str
    grid: Grid
    ct_hu: np.ndarray
    structures: list[Structure]
    beams: list[Beam]
    isocenter_mm: tuple[float, float, float]
    prescription_gy: float
    row_voxels: np.ndarray
    dose_influence: sp.csr_matrix
    metadata: dict[str, Any] = field(default_factory=dict)
    case_id: str = ""
    # loaded without its dose influence matrix (an empty one stands in): enough for dose
    # statistics, images, DICOM export; not for optimisation or computing a dose
    geometry_only: bool = False
    # the matrix in the compressed layout without quantising it again (the case store it was
    # loaded from: ``CaseStore.compressed``); None: the optimizer quantises ``dose_influence``
    compressed_source: Callable[[], Any] | None = field(default=None, repr=False, compare=False)
    # quantities computed once from the matrix and kept with the case (``derived``)
    _derived: dict[str, tuple[Any, Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.validate()

    # -- structure access -------------------------------------------------------------------
    def structure(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.structures)
        raise CaseError(f"unknown structure {name!r}; this case has: {known}")

    @property
    def structure_names(self) -> list[str]:
        return [s.name for s in self.structures]

    @property
    def targets(self) -> list[Structure]:
        return [s for s in self.structures if s.kind is StructureKind.TARGET]

    @property
    def external(self) -> Structure | None:
        return next((s for s in self.structures if s.kind is StructureKind.EXTERNAL), None)

    def rows_of(self, name: str) -> np.ndarray:
        """Positions in ``row_voxels`` (rows of ``A``) of every voxel with volume in a structure."""
        s = self.structure(name)
        return np.searchsorted(self.row_voxels, s.voxel_indices)

    def objective_rows(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows the FMO's objective terms on a structure act on, and each row's volume
        fraction in it (None: whole voxels): every voxel with volume in the structure, so a
        boundary voxel counts by its part inside, as dosimetry counts it. A voxel in two
        structures (PTV and rectum) counts in the terms of both; their weights decide."""
        s = self.structure(name)
        return self.rows_of(name), s.weights

    def dose_in(self, name: str, dose_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Where dosimetry reads a structure's dose, and the volume each value stands for (in
        voxels; None = whole voxels): at its sample points (trilinear between voxels) when the
        case has them, else at every voxel with volume in it, weighted by its fraction."""
        s = self.structure(name)
        if s.samples is not None:
            return (
                np.asarray(s.samples.matrix @ dose_rows, dtype=np.float32),
                s.samples.weights,
            )
        return dose_rows[self.rows_of(name)], s.weights

    def derived(self, key: str, compute: Callable[[Case], Any]) -> Any:
        """``compute(self)``, computed once for this case's matrix and kept (sequencing's
        open-field doses and fit rows: the same for every plan of the case)."""
        held = self._derived.get(key)
        if held is None or held[0] is not self.dose_influence:
            held = self._derived[key] = (self.dose_influence, compute(self))
        return held[1]

    @property
    def num_beamlets(self) -> int:
        return int(self.dose_influence.shape[1])

    # -- dose ---------------------------------------------------------------------------------
    def require_matrix(self) -> None:
        if self.geometry_only:
            raise CaseError(
                f"case {self.case_id or self.name} was loaded without its dose influence matrix"
            )

    def dose_rows(self, fluence: np.ndarray) -> np.ndarray:
        self.require_matrix()
        return np.asarray(self.dose_influence @ np.asarray(fluence, dtype=np.float32))

    def dose_cube(self, dose_rows: np.ndarray) -> np.ndarray:
        """Scatter per-row dose onto the full grid (zero outside every structure)."""
        cube = np.zeros(self.grid.num_voxels, dtype=np.float32)
        cube[self.row_voxels] = dose_rows
        return cube.reshape(self.grid.shape)

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        g = self.grid
        if self.ct_hu.shape != g.shape:
            raise CaseError(f"CT shape {self.ct_hu.shape} does not match grid shape {g.shape}")
        if not self.structures:
            raise CaseError("a case needs at least one structure")
        names = [s.name for s in self.structures]
        if len(set(names)) != len(names):
            raise CaseError(f"duplicate structure names in {names}")
        for s in self.structures:
            idx = s.voxel_indices
            if idx.size == 0:
                raise CaseError(f"structure {s.name!r} is empty on the dose grid")
            if idx.min() < 0 or idx.max() >= g.num_voxels:
                raise CaseError(f"structure {s.name!r} has voxel indices outside the grid")
        if not self.targets:
            raise CaseError("a case needs at least one target structure")
        if self.dose_influence.shape[0] != self.row_voxels.size:
            raise CaseError("dose influence rows do not match row_voxels")
        if sum(b.num_beamlets for b in self.beams) != self.dose_influence.shape[1]:
            raise CaseError("beamlet counts of the beams do not add up to the matrix columns")
        if not np.isfinite(self.prescription_gy) or self.prescription_gy <= 0:
            raise CaseError("prescription_gy must be a positive number")

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "case_id": self.case_id,
            "grid": self.grid.to_dict(),
            "structures": {
                s.name: {"kind": s.kind.value, "voxels": s.num_voxels} for s in self.structures
            },
            "beams": len(self.beams),
            "beamlets": self.num_beamlets,
            "rows": int(self.row_voxels.size),
            "nnz": int(self.dose_influence.nnz),
            "prescription_gy": self.prescription_gy,
        }


def restrict_rows(
    full_matrix: sp.spmatrix, structures: list[Structure]
) -> tuple[np.ndarray, sp.csr_matrix]:
    """Keep the rows of a full-grid influence matrix that fall inside any structure."""
    rows = np.unique(np.concatenate([s.voxel_indices for s in structures]))
    A = sp.csr_matrix(full_matrix)[rows]
    return rows.astype(np.int64), as_csr32(A)


def as_csr32(A: sp.spmatrix) -> sp.csr_matrix:
    """CSR, float32 values, int32 indices *and* indptr.

    Mixed index types make SciPy copy the matrix on every product.
    """
    if not (
        isinstance(A, sp.csr_matrix)
        and A.dtype == np.float32
        and A.indices.dtype == np.int32
        and A.indptr.dtype == np.int32
        and A.has_canonical_format
    ):
        A = sp.csr_matrix(A, dtype=np.float32)
        A.sum_duplicates()
        A.sort_indices()
    if A.nnz < np.iinfo(np.int32).max:
        A.indices = A.indices.astype(np.int32, copy=False)
        A.indptr = A.indptr.astype(np.int32, copy=False)
    return A

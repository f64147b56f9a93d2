"""Step-and-shoot leaf sequencing: from an optimised fluence map to MLC segments and back.

Per beam the fluence is quantised to ``levels`` equal steps of the beam's largest beamlet value
and decomposed into uniform-intensity apertures by the reducing-level idea of Xia and Verhey
(Xia P, Verhey LJ. Multileaf collimator leaf sequencing algorithm for intensity modulated beams
with multiple static segments. Med Phys 1998;25(8):1424-34): the remaining integer map is
thresholded at a level that halves each round (the largest power of two not above its maximum),
each leaf-pair row of the threshold mask opens one interval per segment, and the level is taken
off where the mask is set, until nothing remains. Our own choices on top of that: apertures that
would make a leaf pass its neighbour's opposing leaf (when the MLC forbids interdigitation) are
split into further segments of the same weight, identical apertures are merged, segments below the
minimum MU are dropped, and (by default) the segment weights are re-optimised as a bounded linear
least-squares problem on the case's own dose influence matrix against the fluence-optimal dose,
and (by default) the leaf tips are then moved together with the weights on the same measure,
which then also holds the optimum's hot spots (``radpilot.delivery.apertures``).
A beam held to fewer segments than its map needs (``max_segments_per_beam``) is quantised more
coarsely: fewer equal steps, or Lloyd-Max levels stacked as isointensity apertures.

Units: a segment's ``weight`` is in the plan's fluence units (the matrix gives Gy per unit over
the whole course). MU per fraction = weight x the beam's MU per unit fluence / fractions, where a
beam's MU per unit fluence = ``mu_per_gy_at_dmax`` x the maximum dose of that beam's open field
(every beamlet at unit fluence): 1 MU gives 1 cGy at dmax of the open field by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp
from scipy.optimize import lsq_linear, minimize

from radpilot.case import NORMAL_TISSUE, OUTSIDE_TARGETS, Case, StructureKind
from radpilot.delivery.apertures import Objective, park_closed, refine_apertures
from radpilot.delivery.mlc import DEFAULT_MLC, BeamGrid, MlcModel, load_mlc
from radpilot.dosimetry import dose_at_volume
from radpilot.errors import DeliveryError
from radpilot.fmo.backend import CpuOps, take_rows
from radpilot.fmo.compressed import times_sparse
from radpilot.fmo.objectives import ObjectiveTerm

T = TypeVar("T")
W = TypeVar("W", int, float)  # an aperture's weight: integer levels, or fluence units
OBJECTIVE_REFIT_ITERATIONS = 150  # at most; fewer on big matrices (``_objective_iterations``)
OBJECTIVE_REFIT_NONZEROS = 3e7  # a matrix this size or smaller gets them all
MIN_OBJECTIVE_REFIT_ITERATIONS = 30
MAX_FIT_ROWS = 60_000  # rows of A the segment-weight fit reads (targets always all of theirs)
TARGET_FIT_WEIGHT = 10.0  # a target's rows against an organ's, per unit of volume
DEFAULT_MAX_SEGMENTS = 12  # per beam: what a step-and-shoot plan is usually held to
HOLD_WEIGHT = 0.1  # the hot-spot hold's penalty per Gy^2 above a cap, per row (``_HotSpotHold``)
HOLD_MARGIN = 0.1  # rows within this fraction of their cap are held
ORGAN_WEIGHT = 0.01  # per Gy^2 above an organ row's own optimum dose, per row (``_HotSpotHold``)


@dataclass(frozen=True)
class SequencingSettings:
    """How a plan is turned into segments: MLC model (shipped name or YAML path), intensity
    levels per beam, the smallest segment in MU per fraction, whether segment weights are
    re-optimised on the dose influence matrix after sequencing, the most segments a beam may
    have (0: no limit; a beam over it is sequenced with fewer levels), and whether every
    iteration is judged on its deliverable dose (else only the best plan is sequenced)."""

    mlc: str = DEFAULT_MLC
    levels: int = 10
    min_segment_mu: float = 2.0
    refit: bool = True
    max_segments_per_beam: int = DEFAULT_MAX_SEGMENTS
    # sequence every iteration's plan (not only the best one), so that the protocol check, the
    # ranking and "meets the protocol" judge what would be delivered all along
    every_iteration: bool = False
    # after the weight fits, move the leaves too (``refine_apertures``; needs ``refit``)
    apertures: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int):
            raise DeliveryError(f"levels must be an integer, got {self.levels!r}")
        if not 1 <= self.levels <= 255:
            raise DeliveryError(f"levels must be within 1..255, got {self.levels}")
        if not 0 <= self.min_segment_mu <= 100:
            raise DeliveryError(
                f"min_segment_mu must be within 0..100 MU, got {self.min_segment_mu!r}"
            )
        cap = self.max_segments_per_beam
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= 1000:
            raise DeliveryError(
                f"max_segments_per_beam must be an integer within 0..1000 (0: no limit), "
                f"got {cap!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mlc": self.mlc,
            "levels": self.levels,
            "min_segment_mu": self.min_segment_mu,
            "refit": self.refit,
            "max_segments_per_beam": self.max_segments_per_beam,
            "every_iteration": self.every_iteration,
            "apertures": self.apertures,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SequencingSettings:
        d = dict(d or {})
        known = (
            "mlc",
            "levels",
            "min_segment_mu",
            "refit",
            "max_segments_per_beam",
            "every_iteration",
            "apertures",
        )
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise DeliveryError(f"unknown delivery field(s) {unknown}; known: {', '.join(known)}")
        refit, every = d.get("refit", True), d.get("every_iteration", False)
        apertures = d.get("apertures", True)
        if not all(isinstance(v, bool) for v in (refit, every, apertures)):
            raise DeliveryError(
                "delivery.refit, delivery.every_iteration and delivery.apertures are true or false"
            )
        mu = d.get("min_segment_mu", 2.0)
        if isinstance(mu, bool) or not isinstance(mu, int | float):
            raise DeliveryError(f"delivery.min_segment_mu must be a number, got {mu!r}")
        cap = d.get("max_segments_per_beam", DEFAULT_MAX_SEGMENTS)
        return cls(
            str(d.get("mlc", DEFAULT_MLC)),
            d.get("levels", 10),
            float(mu),
            refit,
            0 if cap is None else cap,
            every,
            apertures,
        )


@dataclass
class Segment:
    """One static aperture: each leaf pair's bank positions in mm (left <= right; a closed pair
    keeps the MLC's minimum gap), the jaws, and its weight in fluence units."""

    weight: float
    left_mm: np.ndarray
    right_mm: np.ndarray
    jaw_x_mm: tuple[float, float]
    jaw_y_mm: tuple[float, float]


@dataclass
class BeamSequence:
    index: int
    gantry_deg: float
    couch_deg: float
    grid: BeamGrid
    segments: list[Segment]
    mu_per_unit: float  # MU (whole course) per unit of fluence for this beam
    levels: int = 0  # the intensity levels its fluence was quantised to

    def apertures(self, mlc: MlcModel) -> np.ndarray:
        """Open fraction of every beamlet (rows) in every segment (columns)."""
        return (
            np.stack([open_fractions(self.grid, mlc, s) for s in self.segments], axis=1)
            if self.segments
            else np.zeros((self.grid.rows.size, 0))
        )

    def fluence(self, mlc: MlcModel) -> np.ndarray:
        if not self.segments:
            return np.zeros(self.grid.rows.size)
        return self.apertures(mlc) @ np.array([s.weight for s in self.segments])


def open_fractions(grid: BeamGrid, mlc: MlcModel, seg: Segment) -> np.ndarray:
    """The fraction of each beamlet's area that the aperture leaves open: per leaf pair the
    overlap of [left, right] (clipped by the X jaws) with the beamlet's column, weighted by the
    part of the beamlet's row that pair (clipped by the Y jaws) covers."""
    w = grid.bixel_mm
    b = mlc.boundaries_mm
    out = np.zeros(grid.shape, dtype=np.float64)
    col_lo = grid.x0_mm + np.arange(grid.shape[1]) * w
    for r in range(grid.shape[0]):
        for p in range(int(grid.pair_lo[r]), int(grid.pair_hi[r])):
            z_lo = max(b[p], seg.jaw_y_mm[0])
            z_hi = min(b[p + 1], seg.jaw_y_mm[1])
            if z_hi <= z_lo:
                continue
            x_lo = max(float(seg.left_mm[p]), seg.jaw_x_mm[0])
            x_hi = min(float(seg.right_mm[p]), seg.jaw_x_mm[1])
            if x_hi <= x_lo:
                continue
            across = np.clip(np.minimum(col_lo + w, x_hi) - np.maximum(col_lo, x_lo), 0, None)
            out[r] += across / w * (z_hi - z_lo) / w
    return grid.from_map(out)


def _intervals(row: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a boolean row as [start, stop) column pairs."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    d = np.diff(padded)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


Aperture = dict[int, tuple[int, int]]  # beamlet row -> open columns [start, stop)


def _mask_apertures(mask: np.ndarray) -> list[Aperture]:
    """The open beamlets of a boolean map as apertures: the j-th run of every row that has one
    opens in the j-th aperture (a row with one run opens in the first only)."""
    runs = {r: _intervals(mask[r]) for r in range(mask.shape[0]) if mask[r].any()}
    return [
        {r: v[j] for r, v in runs.items() if j < len(v)}
        for j in range(max((len(v) for v in runs.values()), default=0))
    ]


def _feasible(
    apertures: list[tuple[W, Aperture]], interdigitation: bool
) -> list[tuple[W, Aperture]]:
    """Split apertures in which a leaf would pass its neighbour's opposing leaf (consecutive
    open rows that do not overlap) into several of the same weight; merge identical ones."""
    out: list[tuple[W, Aperture]] = []
    for level, rows in apertures:
        pending = [rows]
        while pending:
            keep: Aperture = {}
            defer: Aperture = {}
            last: tuple[int, int] | None = None
            for r, (a, b) in sorted(pending.pop().items()):
                if interdigitation or last is None or (a < last[1] and last[0] < b):
                    keep[r] = (a, b)
                    last = (a, b)
                else:
                    defer[r] = (a, b)
            out.append((level, keep))
            if defer:
                pending.append(defer)
    merged: dict[tuple[tuple[int, int, int], ...], W] = {}
    for level, rows in out:
        key = tuple((r, a, b) for r, (a, b) in sorted(rows.items()))
        merged[key] = merged.get(key, 0) + level
    return [(lv, {r: (a, b) for r, a, b in key}) for key, lv in merged.items()]


def reducing_levels(levels_map: np.ndarray) -> list[tuple[int, Aperture]]:
    """Xia and Verhey's reducing-level decomposition (levels halving as powers of two)."""
    remaining = levels_map.astype(np.int64).copy()
    out: list[tuple[int, Aperture]] = []
    while remaining.max() > 0:
        level = 1 << int(np.floor(np.log2(remaining.max())))
        mask = remaining >= level
        out += [(level, rows) for rows in _mask_apertures(mask)]
        remaining[mask] -= level
    return out


def unidirectional_sweep(levels_map: np.ndarray) -> list[tuple[int, Aperture]]:
    """The unidirectional leaf-sweep decomposition (Bortfeld TR et al., X-ray field compensation
    with multileaf collimators, Int J Radiat Oncol Biol Phys 1994;28:723-30): in each row, unit
    k is open over [first column where the running sum of rises reaches k, first column where
    the running sum of falls reaches k). Each row then takes exactly its total rise in units,
    the fewest MU any decomposition of that row can have."""
    m = levels_map.astype(np.int64)
    padded = np.concatenate([np.zeros((m.shape[0], 1), np.int64), m], axis=1)
    step = np.diff(padded, axis=1)
    rise = np.cumsum(np.clip(step, 0, None), axis=1)
    fall = np.cumsum(np.clip(-step, 0, None), axis=1)
    n_cols = m.shape[1]
    out: list[tuple[int, Aperture]] = []
    for k in range(1, int(rise[:, -1].max()) + 1):
        rows: Aperture = {}
        for r in np.flatnonzero(rise[:, -1] >= k):
            a = int(np.searchsorted(rise[r], k))
            b = int(np.searchsorted(fall[r], k))
            rows[int(r)] = (a, min(b, n_cols))
        out.append((1, rows))
    return out


def decompose(levels_map: np.ndarray, interdigitation: bool) -> list[tuple[int, Aperture]]:
    """Integer intensity map -> [(level, {row: (start, stop)})]: apertures whose weighted sum is
    the map. Both decompositions are tried; the one with fewer segments (then fewer MU) wins."""
    if levels_map.max() <= 0:
        return []
    options = [
        _feasible(reducing_levels(levels_map), interdigitation),
        _feasible(unidirectional_sweep(levels_map), interdigitation),
    ]
    return min(options, key=lambda o: (len(o), sum(lv for lv, _ in o)))


def _segment(
    grid: BeamGrid, mlc: MlcModel, rows: dict[int, tuple[int, int]], weight: float
) -> Segment:
    """Leaf and jaw positions for an aperture given as open column intervals per beamlet row.
    Closed pairs park (minimum gap) inside the opening of their nearest open rows, so no leaf
    passes an opposing neighbour; pairs outside the open rows hide behind the Y jaws."""
    n = mlc.num_pairs
    left = np.full(n, np.nan)
    right = np.full(n, np.nan)
    for r, (a, b) in rows.items():
        left[grid.pair_lo[r] : grid.pair_hi[r]] = grid.col_edge(a)
        right[grid.pair_lo[r] : grid.pair_hi[r]] = grid.col_edge(b)
    is_open = ~np.isnan(left)
    # the gap sits as far left as the neighbours allow (left < their right, right > their
    # left): mostly under the X jaw when a neighbour opens from the field's left edge
    park_closed(left, right, is_open, mlc.min_leaf_gap_mm)
    open_pairs = np.flatnonzero(is_open)
    first, last = min(rows), max(rows)
    jaw_y = (
        float(mlc.boundaries_mm[grid.pair_lo[first]]),
        float(mlc.boundaries_mm[grid.pair_hi[last]]),
    )
    jaw_x = (float(left[open_pairs].min()), float(right[open_pairs].max()))
    return Segment(float(weight), left, right, jaw_x, jaw_y)


def lloyd_max_levels(values: np.ndarray, k: int, iterations: int = 40) -> np.ndarray:
    """``k`` intensity levels (ascending, all > 0) that minimise the squared quantisation error
    of ``values`` when each value goes to the nearest of 0 and the levels (Lloyd SP, Least
    squares quantization in PCM, IEEE Trans Inf Theory 1982;28:129-37; 0 stays a fixed level,
    the closed leaves)."""
    v = np.sort(values[values > 0])
    if v.size == 0:
        return np.zeros(0)
    # from the equal steps: each round can only lower the error, so the result is never worse
    # than rounding to ``k`` equal steps of the largest value
    levels = v[-1] * np.arange(1, k + 1) / k
    for _ in range(iterations):
        which = _quantised(v, levels) - 1  # -1: nearer to 0
        new = np.array(
            [v[which == i].mean() if np.any(which == i) else levels[i] for i in range(levels.size)]
        )
        if np.allclose(new, levels, rtol=1e-6, atol=0):
            break
        levels = np.unique(new)
    return levels[levels > 0]


def _quantised(m: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index (0 = closed, i = ``levels[i-1]``) of the nearest level for every value."""
    edges = (np.concatenate([[0.0], levels[:-1]]) + levels) / 2
    return np.searchsorted(edges, m, side="right")


def threshold_apertures(index_map: np.ndarray, levels: np.ndarray) -> list[tuple[float, Aperture]]:
    """A map quantised to arbitrary ``levels`` as stacked isointensity apertures: the beamlets at
    level i or above, weighted by the step from level i-1 (one segment per open interval)."""
    out: list[tuple[float, Aperture]] = []
    steps = np.diff(np.concatenate([[0.0], levels]))
    for i, step in enumerate(steps, start=1):
        out += [(float(step), rows) for rows in _mask_apertures(index_map >= i)]
    return out


def sequence_beam(
    grid: BeamGrid, mlc: MlcModel, fluence: np.ndarray, levels: int, max_segments: int = 0
) -> tuple[list[Segment], int]:
    """A beam's fluence (one value per beamlet, the grid's order) as step-and-shoot segments,
    and the intensity levels they use. Without a limit: ``levels`` equal steps, decomposed by
    ``decompose``. With ``max_segments`` (> 0), a beam that needs more is quantised more
    coarsely: the most equal steps, and the most Lloyd-Max levels (stacked isointensity
    apertures), that fit, whichever of the two reproduces the fluence better (the segment
    weights are refitted afterwards); if even one level needs more apertures, those that
    deliver the least (weight x open beamlets) are left out."""
    m = grid.to_map(np.clip(fluence, 0, None))
    top = float(m.max())
    if top <= 0:
        return [], levels
    candidates: list[tuple[float, int, list[tuple[float, Aperture]]]] = []
    for n in range(levels, 0, -1):
        step = top / n
        q = np.rint(m / step).astype(np.int64)
        apertures = [(lv * step, rows) for lv, rows in decompose(q, mlc.interdigitation)]
        if not max_segments or len(apertures) <= max_segments:
            candidates.append((float(np.sum((q * step - m) ** 2)), n, apertures))
            break
    if max_segments:
        for k in range(levels, 0, -1):
            lm = lloyd_max_levels(m.ravel(), k)
            idx = _quantised(m, lm)
            apertures = _feasible(threshold_apertures(idx, lm), mlc.interdigitation)
            if len(apertures) <= max_segments:
                recon = np.concatenate([[0.0], lm])[idx]
                candidates.append((float(np.sum((recon - m) ** 2)), lm.size, apertures))
                break
    if candidates:
        _, n, apertures = min(candidates, key=lambda c: (c[0], len(c[2])))
    else:  # a single level still needs more apertures than allowed
        apertures = sorted(apertures, key=lambda a: -a[0] * sum(b - c for c, b in a[1].values()))[
            :max_segments
        ]
    return [_segment(grid, mlc, rows, w) for w, rows in apertures], n


@dataclass
class Deliverable:
    """A plan as the linac would deliver it, with the numbers that compare it to its optimum."""

    mlc: MlcModel
    settings: SequencingSettings
    fractions: int
    beams: list[BeamSequence]
    fluence: np.ndarray  # delivered fluence per beamlet (the plan's units, normalised)
    dose_rows: np.ndarray  # its dose on the case's rows, normalised like the plan
    scale_factor: float  # the normalisation applied after sequencing
    dropped_segments: int
    seconds: float
    max_dose_difference_gy: float = 0.0
    max_difference_at_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extra: dict[str, Any] = field(default_factory=dict)

    def mu(self, beam: BeamSequence) -> list[float]:
        """MU per fraction of each of the beam's segments."""
        return [s.weight * beam.mu_per_unit / self.fractions for s in beam.segments]

    @property
    def total_mu(self) -> float:
        return float(sum(sum(self.mu(b)) for b in self.beams))

    def summary(self, prescription_gy: float) -> dict[str, Any]:
        per_fraction = prescription_gy / self.fractions
        return {
            "mlc": self.mlc.to_dict(),
            "settings": self.settings.to_dict(),
            "fractions": self.fractions,
            "segments_per_beam": [len(b.segments) for b in self.beams],
            "levels_per_beam": [b.levels for b in self.beams],
            "segments": sum(len(b.segments) for b in self.beams),
            "mu_per_beam": [round(sum(self.mu(b)), 1) for b in self.beams],
            "total_mu": round(self.total_mu, 1),
            "mu_per_gy": round(self.total_mu / per_fraction, 2),
            "dropped_segments": self.dropped_segments,
            "scale_factor": round(self.scale_factor, 4),
            "max_dose_difference_gy": round(self.max_dose_difference_gy, 3),
            "max_difference_at_mm": [round(v, 1) for v in self.max_difference_at_mm],
            "seconds": round(self.seconds, 3),
            **self.extra,
        }

    def to_json(self, prescription_gy: float) -> dict[str, Any]:
        """The sequenced plan as stored and sent: summary, and per beam its segments (leaf and
        jaw positions in mm, weight in fluence units, MU per fraction)."""
        return {
            "summary": self.summary(prescription_gy),
            "beams": [
                {
                    "gantry_deg": b.gantry_deg,
                    "couch_deg": b.couch_deg,
                    "mu_per_unit": b.mu_per_unit,
                    "segments": [
                        {
                            "weight": s.weight,
                            "mu": mu,
                            "left_mm": np.round(s.left_mm, 3).tolist(),
                            "right_mm": np.round(s.right_mm, 3).tolist(),
                            "jaw_x_mm": list(s.jaw_x_mm),
                            "jaw_y_mm": list(s.jaw_y_mm),
                        }
                        for s, mu in zip(b.segments, self.mu(b), strict=True)
                    ],
                }
                for b in self.beams
            ],
        }


def segments_from_json(beam: dict[str, Any]) -> list[Segment]:
    return [
        Segment(
            float(s["weight"]),
            np.asarray(s["left_mm"], dtype=np.float64),
            np.asarray(s["right_mm"], dtype=np.float64),
            (float(s["jaw_x_mm"][0]), float(s["jaw_x_mm"][1])),
            (float(s["jaw_y_mm"][0]), float(s["jaw_y_mm"][1])),
        )
        for s in beam["segments"]
    ]


def fluence_of_segments(case: Case, mlc: MlcModel, beams: list[list[Segment]]) -> np.ndarray:
    """The fluence per beamlet that segments deliver (each beam's open fractions x weights):
    how a stored or imported plan's apertures are turned back into the case's fluence."""
    if len(beams) != len(case.beams):
        raise DeliveryError(f"{len(beams)} beams of segments for a case of {len(case.beams)}")
    out = []
    for i, (b, segs) in enumerate(zip(case.beams, beams, strict=True)):
        grid = BeamGrid.of(b, mlc, i)
        f = np.zeros(b.num_beamlets)
        for sg in segs:
            f += sg.weight * open_fractions(grid, mlc, sg)
        out.append(f)
    return np.concatenate(out)


def _mu_per_unit(case: Case, mlc: MlcModel) -> list[float]:
    """Each beam's MU (whole course) per unit fluence: its open field's largest dose x the
    calibration (MU per Gy at dmax)."""
    return [float(m) * mlc.mu_per_gy_at_dmax for m in case.derived("open_fields", _open_fields)]


def _open_fields(case: Case) -> np.ndarray:
    """Each beam's open field's largest dose per unit fluence (once per case)."""
    ops = CpuOps(case.dose_influence)
    out, start = [], 0
    for b in case.beams:
        ones = np.zeros(case.num_beamlets, dtype=np.float32)
        ones[start : start + b.num_beamlets] = 1.0
        start += b.num_beamlets
        out.append(float(ops.matvec(ones).max()))
    return np.array(out)


def _row_mask(case: Case, names: list[str]) -> np.ndarray:
    """Which rows of A (positions in ``row_voxels``) have volume in any of the structures."""
    mask = np.zeros(case.row_voxels.size, dtype=bool)
    for name in names:
        mask[case.rows_of(name)] = True
    return mask


def _fit_matrix(case: Case) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """The fit's rows, their weights and those rows of the case's matrix."""
    rows, weights = _fit_rows(case)
    return rows, weights, take_rows(case.dose_influence, rows)


def _fit_rows(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Rows (positions in ``row_voxels``) and weights for the segment-weight fit: every target
    row; other rows thinned to at most MAX_FIT_ROWS; each structure weighted per unit volume."""
    n = case.row_voxels.size
    weight = np.zeros(n, dtype=np.float64)
    target_names = {t.name for t in case.targets}
    for s in case.structures:
        rows = case.rows_of(s.name)
        per = (TARGET_FIT_WEIGHT if s.name in target_names else 1.0) / max(s.volume_voxels, 1.0)
        weight[rows] += per * (1.0 if s.weights is None else s.weights)
    target = _row_mask(case, [t.name for t in case.targets])
    rest = np.flatnonzero(~target & (weight > 0))
    stride = max(1, int(np.ceil(rest.size / MAX_FIT_ROWS)))
    chosen = np.sort(np.concatenate([np.flatnonzero(target), rest[::stride]]))
    w = weight[chosen] * np.where(target[chosen], 1.0, float(stride))
    return chosen, w


def deliver(
    case: Case,
    fluence: np.ndarray,
    settings: SequencingSettings,
    *,
    fractions: int,
    target: str,
    prescription_gy: float,
    coverage_pct: float = 95.0,
    objective: Objective | None = None,
) -> Deliverable:
    """Sequence a (normalised) plan fluence, compute the delivered fluence's dose with the case's
    matrix and normalise it as the plan was (``target``'s D``coverage_pct`` = prescription).
    With ``settings.apertures`` the leaf tips then move with the weights on the fit's measure
    and the hot-spot hold (``refine_apertures``, ``_HotSpotHold``); with ``objective`` (the
    plan's FMO objective and its gradient in beamlet space) the segment weights are last
    optimised on that objective itself."""
    if case.geometry_only:
        raise DeliveryError("sequencing needs the case's dose influence matrix")
    if fluence.shape != (case.num_beamlets,):
        raise DeliveryError(
            f"a fluence of {case.num_beamlets} beamlets is needed, got {fluence.shape}"
        )
    if fractions < 1:
        raise DeliveryError(f"fractions must be at least 1, got {fractions}")
    t0 = time.perf_counter()
    mlc = load_mlc(settings.mlc)
    mu_unit = _mu_per_unit(case, mlc)
    beams: list[BeamSequence] = []
    start = 0
    for i, b in enumerate(case.beams):
        grid = BeamGrid.of(b, mlc, i)
        segs, levels = sequence_beam(
            grid,
            mlc,
            fluence[start : start + b.num_beamlets],
            settings.levels,
            settings.max_segments_per_beam,
        )
        beams.append(BeamSequence(i, b.gantry_deg, b.couch_deg, grid, segs, mu_unit[i], levels))
        start += b.num_beamlets
    # drop segments below the minimum MU (per fraction)
    dropped = 0
    for bs in beams:
        keep = [
            s
            for s in bs.segments
            if s.weight * bs.mu_per_unit / fractions >= settings.min_segment_mu
        ]
        dropped += len(bs.segments) - len(keep)
        bs.segments = keep
    A = case.dose_influence
    optimum = np.asarray(A @ fluence.astype(np.float32), dtype=np.float64)
    extra: dict[str, Any] = {}
    if settings.refit:
        t = time.perf_counter()
        fit = _DoseFit.of(case, optimum)  # rows of A read once, for both fits
        extra["refit"] = _refit(case, mlc, beams, fit, settings.min_segment_mu, fractions)
        extra["refit"]["seconds"] = round(time.perf_counter() - t, 3)
        if settings.apertures:
            t = time.perf_counter()
            # on the fit's own measure (rows of A, a few seconds even at a 3 mm grid), not on
            # ``objective``: that reads the whole matrix at every one of its evaluations; plus
            # the hot-spot hold, on the rows near the optimum's hot spots and the targets'
            hold = (
                _HotSpotHold.of(
                    case,
                    optimum,
                    np.asarray(A @ _delivered_fluence(case, mlc, beams).astype(np.float32)),
                    coverage_pct,
                )
                if HOLD_WEIGHT > 0 or ORGAN_WEIGHT > 0
                else None
            )
            extra["apertures"] = refine_apertures(
                beams,
                mlc,
                case.num_beamlets,
                fit.objective(case, hold),
                _weight_floor(beams, settings.min_segment_mu, fractions),
            )
            if hold is not None:
                extra["apertures"]["hold"] = hold.described
            extra["apertures"]["seconds"] = round(time.perf_counter() - t, 3)
        if objective is not None:
            t = time.perf_counter()
            extra["objective_refit"] = _objective_refit(
                case, mlc, beams, objective, settings.min_segment_mu, fractions
            )
            extra["objective_refit"]["seconds"] = round(time.perf_counter() - t, 3)
    delivered = _delivered_fluence(case, mlc, beams)
    dose = np.asarray(A @ delivered.astype(np.float32), dtype=np.float64)
    tdose, tw = case.dose_in(target, dose.astype(np.float32))
    dx = dose_at_volume(tdose, coverage_pct, tw)
    if dx <= 0:
        raise DeliveryError(f"the sequenced plan gives {target} no dose")
    scale = prescription_gy / dx
    for bs in beams:
        for s in bs.segments:
            s.weight *= scale
    dose *= scale
    delivered *= scale
    diff = np.abs(dose - optimum)
    at = int(np.argmax(diff)) if diff.size else 0
    return Deliverable(
        mlc,
        settings,
        fractions,
        beams,
        delivered.astype(np.float32),
        dose.astype(np.float32),
        float(scale),
        dropped,
        time.perf_counter() - t0,
        float(diff[at]) if diff.size else 0.0,
        case.grid.centre_of(int(case.row_voxels[at])) if diff.size else (0.0, 0.0, 0.0),
        extra,
    )


@dataclass
class _DoseFit:
    """The segment-weight fit's problem: the fit's rows of A (``_fit_rows``), the fluence-optimal
    dose there and each row's weight."""

    rows: np.ndarray  # positions in ``row_voxels``
    A: sp.csr_matrix
    target: np.ndarray
    weights: np.ndarray

    @classmethod
    def of(cls, case: Case, optimum: np.ndarray) -> _DoseFit:
        # the rows and their part of A are the same for every plan of the case: read once
        rows, rw, A = case.derived("fit_rows", _fit_matrix)
        return cls(rows, A, optimum[rows], rw)

    def objective(self, case: Case, hold: _HotSpotHold | None = None) -> Objective:
        """The fit's measure as a function of fluence: the weighted mean squared difference
        (Gy^2) from the fluence-optimal dose on the fit's rows, with its gradient; with ``hold``,
        plus its penalty on the rows it holds (those among the fit's rows, every target row,
        share the fit's products; only the rest are read from ``case``'s matrix)."""
        ops = CpuOps(self.A)  # the FMO's block-parallel products
        wn = self.weights / self.weights.sum()
        if hold is not None:
            at = np.searchsorted(self.rows, hold.rows).clip(max=self.rows.size - 1)
            shared = self.rows[at] == hold.rows
            at = at[shared]
            others = hold.rows[~shared]
            extra = CpuOps(take_rows(case.dose_influence, others)) if others.size else None

        def f(x: np.ndarray) -> tuple[float, np.ndarray]:
            d = np.asarray(ops.matvec(x), dtype=np.float64)
            r = d - self.target
            value, coef = float(np.sum(wn * r * r)), 2.0 * wn * r
            if hold is None:
                return value, np.asarray(ops.rmatvec(coef), dtype=np.float64)
            held = np.empty(hold.rows.size)
            held[shared] = d[at]
            if extra is not None:
                held[~shared] = np.asarray(extra.matvec(x), dtype=np.float64)
            hv, hg = hold.penalty(held)
            coef[at] += hg[shared]
            g = np.asarray(ops.rmatvec(coef), dtype=np.float64)
            if extra is not None:
                g += np.asarray(extra.rmatvec(hg[~shared]), dtype=np.float64)
            return value + hv, g

        return f


@dataclass
class _HotSpotHold:
    """Rows where the sequenced plan may run hotter than its fluence optimum's hot spots, each
    with its cap: outside every target, the optimum's hottest point there, or in an organ at risk
    the organ's own maximum (its part outside the targets); in the targets, the optimum's target
    maximum. The fit's measure keeps dose near the optimum on average and lets a few voxels
    overshoot; a hot spot is exactly such a voxel, so these rows pay for every gray above their
    cap (HOLD_WEIGHT per Gy^2, per row: a max-dose penalty, not a mean). The plan is scaled
    afterwards so that the prescription target's D``coverage`` is the prescription, so lowering
    the whole dose would only come back as hot spots: every target's rows pay the same for every
    gray below the optimum's D``coverage`` of that target (its floor), or below their own dose
    in the optimum where that is less (the cold tail). And since the fit pays as much for an
    organ's row below its optimum dose as above it, while the organ's goals only mind the dose
    above, every organ row outside the targets also pays ORGAN_WEIGHT per Gy^2 above its own
    dose in the optimum (``ceilings``): what sequencing takes from the organs, it cannot trade
    for dose elsewhere in them."""

    rows: np.ndarray  # positions in ``row_voxels``, ascending
    caps: np.ndarray  # per row: Gy (inf: none)
    floors: np.ndarray  # per row: Gy (0: none)
    ceilings: np.ndarray  # per row: Gy (inf: none), paid at ORGAN_WEIGHT
    described: dict[str, Any]

    @classmethod
    def of(
        cls,
        case: Case,
        optimum: np.ndarray,
        sequenced: np.ndarray,
        coverage_pct: float,
    ) -> _HotSpotHold:
        """The rows within HOLD_MARGIN of their cap in the optimum or in the ``sequenced`` dose
        (both on every row of A), and every target's rows with their floors."""
        n = case.row_voxels.size
        in_target = _row_mask(case, [t.name for t in case.targets])
        ext = case.external
        body = _row_mask(case, [ext.name]) if ext is not None else np.ones(n, dtype=bool)
        caps = np.full(n, np.inf)
        described: dict[str, Any] = {
            "weight": HOLD_WEIGHT,
            "caps_gy": {},
            "rows": {},
            "organ_weight": ORGAN_WEIGHT,
            "organ_rows": 0,
        }
        regions = [(OUTSIDE_TARGETS, body & ~in_target), ("targets", in_target)]
        organs = np.zeros(n, dtype=bool)
        for s in case.structures:  # an organ's maximum is a hot spot too (outside the targets)
            if s.kind is StructureKind.OAR and s.name != NORMAL_TISSUE:
                regions.append((s.name, _row_mask(case, [s.name]) & ~in_target))
                organs |= regions[-1][1]
        for name, region in regions:
            at = np.flatnonzero(region)
            if at.size == 0:
                continue
            cap = float(optimum[at].max())
            near = cap * (1.0 - HOLD_MARGIN)
            pick = at[(optimum[at] >= near) | (sequenced[at] >= near)]
            caps[pick] = np.minimum(caps[pick], cap)
            described["caps_gy"][name] = round(cap, 3)
            described["rows"][name] = int(pick.size)
        floors = np.zeros(n)
        described["floors_gy"] = {}
        for t in case.targets:  # every target: a plan with several dose levels keeps each one's
            t_rows, t_volume = case.objective_rows(t.name)
            floor = dose_at_volume(optimum[t_rows], coverage_pct, t_volume)
            # a row the optimum leaves colder than that (the cold tail: D98, D99) keeps its own
            floors[t_rows] = np.maximum(floors[t_rows], np.minimum(optimum[t_rows], floor))
            described["floors_gy"][t.name] = round(floor, 3)
        ceilings = np.full(n, np.inf)
        if ORGAN_WEIGHT > 0:
            ceilings[organs] = optimum[organs]
            described["organ_rows"] = int(organs.sum())
        rows = np.flatnonzero(np.isfinite(caps) | (floors > 0) | np.isfinite(ceilings))
        return cls(rows, caps[rows], floors[rows], ceilings[rows], described)

    def penalty(self, dose: np.ndarray) -> tuple[float, np.ndarray]:
        """The penalty of the held rows' ``dose`` (Gy) and its gradient in that dose."""
        miss = np.maximum(dose - self.caps, 0.0) - np.maximum(self.floors - dose, 0.0)
        over = np.maximum(dose - self.ceilings, 0.0)
        value = HOLD_WEIGHT * np.sum(miss * miss) + ORGAN_WEIGHT * np.sum(over * over)
        return float(value), 2.0 * (HOLD_WEIGHT * miss + ORGAN_WEIGHT * over)


def _delivered_fluence(case: Case, mlc: MlcModel, beams: list[BeamSequence]) -> np.ndarray:
    return np.concatenate([bs.fluence(mlc) for bs in beams]) if beams else np.zeros(0)


def _refit(
    case: Case,
    mlc: MlcModel,
    beams: list[BeamSequence],
    fit: _DoseFit,
    min_mu: float,
    fractions: int,
) -> dict[str, Any]:
    """Segment weights that best reproduce the fluence-optimal dose (weighted least squares on
    the case's rows, each segment at least the minimum MU); updates the segments in place."""
    S = _segment_matrix(case, mlc, beams)
    if S.shape[1] == 0:
        return {"segments": 0}
    before = np.array([s.weight for bs in beams for s in bs.segments])
    lower = _weight_floor(beams, min_mu, fractions)
    rw, target = fit.weights, fit.target
    M = times_sparse(fit.A, S)  # rows x segments, dense
    sq = np.sqrt(rw)
    # a light pull towards the sequenced weights keeps the fit well posed when apertures are
    # nearly collinear (ridge: lambda = 1e-4 of the mean squared column norm)
    # solved on the normal equations (segments x segments): the same minimiser, a small system
    Mw = M * sq[:, None]
    gram = Mw.T @ Mw
    lam = 1e-4 * float(np.mean(np.diag(gram)))
    gram += lam * np.eye(gram.shape[0])
    rhs = Mw.T @ (target * sq) + lam * before
    factor = np.linalg.cholesky(gram)  # gram = L L^T: minimise |L^T w - L^-1 rhs|^2
    res = lsq_linear(
        factor.T,
        np.linalg.solve(factor, rhs),
        bounds=(lower, np.inf),
        method="bvls",
    )
    err_before = float(np.sqrt(np.sum(rw * (M @ before - target) ** 2) / rw.sum()))
    err_after = float(np.sqrt(np.sum(rw * (M @ res.x - target) ** 2) / rw.sum()))
    _set_weights(beams, res.x)
    return {
        "segments": S.shape[1],
        "rms_error_before_gy": round(err_before, 4),
        "rms_error_after_gy": round(err_after, 4),
    }


def _weight_floor(beams: list[BeamSequence], min_mu: float, fractions: int) -> np.ndarray:
    """Each segment's (beam order) least weight in the fits: the minimum MU per fraction, or its
    own weight where that is less (a segment the sequencer made smaller than that is kept)."""
    return np.array(
        [min(min_mu * fractions / bs.mu_per_unit, s.weight) for bs in beams for s in bs.segments]
    )


def _set_weights(beams: list[BeamSequence], weights: np.ndarray) -> None:
    """Give the segments, in beam order, the fitted ``weights``."""
    for sg, w in zip([sg for bs in beams for sg in bs.segments], weights, strict=True):
        sg.weight = float(w)


def _segment_matrix(case: Case, mlc: MlcModel, beams: list[BeamSequence]) -> sp.csc_matrix:
    """Beamlets x segments open fractions (every beam's apertures in one matrix)."""
    blocks, start = [], 0
    for bs, b in zip(beams, case.beams, strict=True):
        ap = bs.apertures(mlc)
        m = sp.lil_matrix((case.num_beamlets, ap.shape[1]))
        m[start : start + b.num_beamlets, :] = ap
        blocks.append(m.tocsc())
        start += b.num_beamlets
    return sp.hstack(blocks, format="csc")


def _objective_refit(
    case: Case,
    mlc: MlcModel,
    beams: list[BeamSequence],
    objective: Objective,
    min_mu: float,
    fractions: int,
) -> dict[str, Any]:
    """Segment weights that minimise the plan's own FMO objective (L-BFGS-B, each segment at
    least the minimum MU): the direct answer to what the fluence optimum was for."""
    S = _segment_matrix(case, mlc, beams)
    if S.shape[1] == 0:
        return {"segments": 0}
    w0 = np.array([s.weight for bs in beams for s in bs.segments])
    lower = _weight_floor(beams, min_mu, fractions)
    calls = 0

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal calls
        calls += 1
        value, grad = objective(S @ w)
        return value, S.T @ grad

    before = f(w0)[0]
    res = minimize(
        f,
        w0,
        jac=True,
        method="L-BFGS-B",
        bounds=[(lo, None) for lo in lower],
        options={"maxiter": _objective_iterations(case)},
    )
    _set_weights(beams, res.x)
    return {
        "objective_before": round(float(before), 4),
        "objective_after": round(float(res.fun), 4),
        "evaluations": calls,
    }


def _objective_iterations(case: Case) -> int:
    """The objective refit's iteration cap: each evaluation streams the whole matrix (about 0.1 s
    at the 3 mm C-shape's 1.7e8 non-zeros), and its objective is within 1 % of where 150
    iterations take it after 30 there, so the cap shrinks with the matrix, deterministically."""
    nnz = max(int(case.dose_influence.nnz), 1)
    scaled = round(OBJECTIVE_REFIT_ITERATIONS * OBJECTIVE_REFIT_NONZEROS / nnz)
    return int(min(OBJECTIVE_REFIT_ITERATIONS, max(MIN_OBJECTIVE_REFIT_ITERATIONS, scaled)))


def protocol_fractions(prescription_gy: float, fractions: int | None) -> int:
    """The protocol's number of fractions, or 2 Gy per fraction when it does not say."""
    return int(fractions) if fractions else max(1, round(prescription_gy / 2.0))


MAX_TRIES = 3  # sequencing at the protocol's levels, then twice and four times as many


def merged_terms(base: list[ObjectiveTerm], extra: list[ObjectiveTerm]) -> list[ObjectiveTerm]:
    """``base`` with ``extra`` added; an extra term replaces one of the same structure:kind."""
    out = {t.key(): t for t in base}
    out.update({t.key(): t for t in extra})
    return list(out.values())


def keep_goals(
    sequence: Callable[[SequencingSettings, list[ObjectiveTerm]], tuple[dict[str, Any], T]],
    lost_goals: Callable[[T], list[str]],
    settings: SequencingSettings,
    goal_terms: Callable[[list[str], float], list[ObjectiveTerm]] | None = None,
    rank: Callable[[T], Any] | None = None,
) -> tuple[dict[str, Any], T]:
    """Sequence, and when the deliverable dose loses a goal the fluence optimum met, sequence
    again with twice the intensity levels (finer steps, more segments) and, where segments are
    limited, half as many more allowed per beam (12, 18, 24: goals before segment count), up to
    MAX_TRIES. Each retry is first fitted like the first try (``sequence`` gets no terms: a
    least-squares fit to the optimum only); if that loses a goal and ``goal_terms`` is given, the
    same steps are sequenced again with the segment weights also optimised on the plan's
    objective plus a term shaped like each goal lost so far (``goal_terms(labels, weight
    factor)``: 1, then 10; ``sequence`` gets them as its terms). The first plan that loses
    nothing is kept, else the best by ``rank`` (bigger is better: the protocol's ranking,
    priority and size of each miss) or, without it, the one that loses the fewest goals; the
    earliest of equals. With ``settings.apertures`` the first try is made twice, with the leaves
    moved and with the weights fitted alone (leaves where the sequencer put them): one that loses
    no goal beats one that does, and between equals ``rank`` (which, between plans that lose
    nothing, prefers the one that spares more) chooses; the retries follow only if both lose a
    goal. Every try is recorded in the plan's summary (``tries``)."""
    tries: list[dict[str, Any]] = []
    best: tuple[dict[str, Any], T, Any] | None = None
    current = settings
    lost_so_far: list[str] = []
    extra: list[ObjectiveTerm] = []
    for attempt in range(MAX_TRIES):
        # the first try is made both ways, the leaves moved and the weights fitted alone (seconds
        # more): moving the leaves lowers the fit's measure overall, yet may trade an organ's
        # dose or a goal's last tenth of a gray for the target's, so the ranking chooses
        variants: list[tuple[SequencingSettings, list[ObjectiveTerm]]] = [(current, [])]
        if attempt == 0 and current.apertures and current.refit:
            variants.append((replace(current, apertures=False), []))
        elif extra:
            # a retry first fits its finer steps to the optimum alone, as the first try did; the
            # objective refit with the lost goals' terms follows only if that loses a goal (it
            # moves dose where no term looks: a head & neck retry with the terms lost PTV D99
            # where the same steps fitted alone kept every goal)
            variants.append((current, extra))
        kept_all = False
        for variant, terms in variants:
            if kept_all and attempt > 0:
                break
            plan, dose = sequence(variant, terms)
            lost = lost_goals(dose)
            lost_so_far += [g for g in lost if g not in lost_so_far]
            tries.append(
                {
                    "levels": variant.levels,
                    "max_segments_per_beam": variant.max_segments_per_beam,
                    "apertures": variant.apertures,
                    "segments": plan["summary"]["segments"],
                    "total_mu": plan["summary"]["total_mu"],
                    "goal_terms": [t.label() for t in terms],
                    "lost_goals": lost,
                }
            )
            # a try that keeps every goal the optimum met beats any that loses one
            key = (not lost, rank(dose) if rank is not None else -len(lost))
            if best is None or key > best[2]:
                best = (plan, dose, key)
            kept_all = kept_all or not lost
        if kept_all or current.levels >= 255:
            break
        cap = current.max_segments_per_beam
        current = replace(
            current,
            levels=min(2 * current.levels, 255),
            max_segments_per_beam=cap and cap + settings.max_segments_per_beam // 2,
        )
        extra = goal_terms(lost_so_far, 10.0**attempt) if goal_terms and settings.refit else []
    assert best is not None
    plan, dose, _ = best
    plan["summary"]["tries"] = tries
    return plan, dose

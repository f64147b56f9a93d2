"""Multileaf collimator models (YAML data) and how a beam's beamlet grid lies under one.

A model gives the leaf-pair boundaries across the field (``z`` in the beam's eye view), where a
leaf tip may stand along ``x``, the smallest gap of a closed pair, whether a leaf may pass the
opposing leaf of its neighbour (interdigitation), the jaws' range and the MU calibration. The
shipped models live beside this module (``machines/*.yaml``); ``load_mlc`` takes a shipped name
or a path to a file of the same form.

A beamlet row of width ``bixel_mm`` centred at ``z`` maps onto the leaf pairs that tile
``[z - w/2, z + w/2]`` exactly; ``BeamGrid`` refuses, naming the row and the nearest leaf
boundaries, when the grid cannot be delivered by whole leaf pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from radpilot.case import Beam
from radpilot.errors import DeliveryError

MACHINES = Path(__file__).with_name("machines")
DEFAULT_MLC = "uniform-5mm"
TOL_MM = 1e-3
FIELDS = {
    "name",
    "description",
    "machine",
    "energy_mv",
    "leaf_pairs",
    "leaf_travel_mm",
    "max_leaf_span_mm",
    "min_leaf_gap_mm",
    "interdigitation",
    "jaws",
    "mu_per_gy_at_dmax",
}


@dataclass(frozen=True)
class MlcModel:
    name: str
    description: str
    machine: str
    energy_mv: float
    boundaries_mm: np.ndarray  # leaf-pair boundaries along z, ascending: pairs + 1 values
    leaf_travel_mm: tuple[float, float]
    max_leaf_span_mm: float
    min_leaf_gap_mm: float
    interdigitation: bool
    jaw_x_mm: tuple[float, float]
    jaw_y_mm: tuple[float, float]
    mu_per_gy_at_dmax: float

    @property
    def num_pairs(self) -> int:
        return int(self.boundaries_mm.size - 1)

    def to_dict(self) -> dict[str, Any]:
        widths = np.diff(self.boundaries_mm)
        return {
            "name": self.name,
            "description": self.description,
            "machine": self.machine,
            "energy_mv": self.energy_mv,
            "leaf_pairs": self.num_pairs,
            "leaf_widths_mm": sorted({round(float(w), 3) for w in widths}),
            "leaf_boundaries_mm": [round(float(v), 3) for v in self.boundaries_mm],
            "leaf_travel_mm": list(self.leaf_travel_mm),
            "min_leaf_gap_mm": self.min_leaf_gap_mm,
            "interdigitation": self.interdigitation,
            "mu_per_gy_at_dmax": self.mu_per_gy_at_dmax,
        }


def shipped_mlcs() -> list[str]:
    return sorted(p.stem for p in MACHINES.glob("*.yaml"))


def _pair(raw: Any, where: str) -> tuple[float, float]:
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise DeliveryError(f"{where} must be two numbers [low, high] in mm")
    lo, hi = (_number(v, where) for v in raw)
    if not lo < hi:
        raise DeliveryError(f"{where}: low ({lo:g}) must be below high ({hi:g})")
    return lo, hi


def _number(v: Any, where: str, low: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
        raise DeliveryError(f"{where} must be a number, got {v!r}")
    if low is not None and v <= low:
        raise DeliveryError(f"{where} must be above {low:g}, got {v!r}")
    return float(v)


def mlc_from_dict(d: dict[str, Any], source: str = "<mlc>") -> MlcModel:
    if not isinstance(d, dict):
        raise DeliveryError(f"{source}: an MLC model is a mapping")
    unknown = sorted(set(d) - FIELDS)
    if unknown:
        raise DeliveryError(f"{source}: unknown field(s) {unknown}; known: {sorted(FIELDS)}")
    missing = sorted({"name", "leaf_pairs", "leaf_travel_mm", "jaws"} - set(d))
    if missing:
        raise DeliveryError(f"{source}: missing field(s) {missing}")
    pairs = d["leaf_pairs"]
    if not isinstance(pairs, dict) or not isinstance(pairs.get("widths_mm"), list):
        raise DeliveryError(
            f"{source}: leaf_pairs needs first_boundary_mm and widths_mm: [{{count, width_mm}}]"
        )
    bounds = [_number(pairs.get("first_boundary_mm"), f"{source}: leaf_pairs.first_boundary_mm")]
    for i, group in enumerate(pairs["widths_mm"]):
        where = f"{source}: leaf_pairs.widths_mm[{i}]"
        if not isinstance(group, dict) or set(group) != {"count", "width_mm"}:
            raise DeliveryError(f"{where} must be {{count, width_mm}}")
        count = group["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise DeliveryError(f"{where}.count must be a positive integer, got {count!r}")
        width = _number(group["width_mm"], f"{where}.width_mm", 0.0)
        edge = bounds[-1]
        bounds.extend(edge + width * (k + 1) for k in range(count))
    jaws = d["jaws"]
    if not isinstance(jaws, dict) or set(jaws) != {"x_mm", "y_mm"}:
        raise DeliveryError(f"{source}: jaws needs x_mm and y_mm, each [low, high]")
    gap = _number(d.get("min_leaf_gap_mm", 0.5), f"{source}: min_leaf_gap_mm")
    if gap < 0:
        raise DeliveryError(f"{source}: min_leaf_gap_mm must not be negative")
    inter = d.get("interdigitation", False)
    if not isinstance(inter, bool):
        raise DeliveryError(f"{source}: interdigitation must be true or false")
    return MlcModel(
        name=str(d["name"]),
        description=str(d.get("description", "")),
        machine=str(d.get("machine", "RadPilot-Generic-6MV")),
        energy_mv=_number(d.get("energy_mv", 6), f"{source}: energy_mv", 0.0),
        boundaries_mm=np.asarray(bounds, dtype=np.float64),
        leaf_travel_mm=_pair(d["leaf_travel_mm"], f"{source}: leaf_travel_mm"),
        max_leaf_span_mm=_number(
            d.get("max_leaf_span_mm", 400.0), f"{source}: max_leaf_span_mm", 0
        ),
        min_leaf_gap_mm=gap,
        interdigitation=inter,
        jaw_x_mm=_pair(jaws["x_mm"], f"{source}: jaws.x_mm"),
        jaw_y_mm=_pair(jaws["y_mm"], f"{source}: jaws.y_mm"),
        mu_per_gy_at_dmax=_number(
            d.get("mu_per_gy_at_dmax", 100.0), f"{source}: mu_per_gy_at_dmax", 0
        ),
    )


def _edge_boundaries(b: np.ndarray, z0: float, w: float, rows: int) -> np.ndarray:
    """For each of the ``rows + 1`` edges of beamlet rows ``z0 + i w``, the index of the leaf
    boundary of ``b`` on it, -1 where none is: whole leaf pairs tile the rows where none is -1,
    row ``r`` then by pairs ``[i_r, i_(r + 1))``."""
    edges = z0 + w * np.arange(rows + 1)
    on = np.abs(b[None, :] - edges[:, None]) <= TOL_MM
    return np.where(on.any(axis=1), on.argmax(axis=1), -1).astype(np.int64)


def load_mlc(name_or_path: str = DEFAULT_MLC) -> MlcModel:
    """A shipped MLC model by name (``uniform-5mm``) or a YAML file of the same form."""
    path = MACHINES / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise DeliveryError(
                f"unknown MLC model {name_or_path!r}: give a shipped one "
                f"({', '.join(shipped_mlcs())}) or a path to a YAML file"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DeliveryError(f"{path}: not valid YAML: {e}") from e
    return mlc_from_dict(data, str(path.name))


@dataclass(frozen=True)
class BeamGrid:
    """One beam's beamlets on a regular (row, column) grid under an MLC: beamlet ``j`` sits at
    ``rows[j], cols[j]``; row ``r`` is delivered by leaf pairs ``pair_lo[r]:pair_hi[r]``;
    column ``c``'s left edge lies at ``x0 + c * w`` (a leaf tip stands on column edges)."""

    bixel_mm: float
    rows: np.ndarray
    cols: np.ndarray
    shape: tuple[int, int]
    x0_mm: float  # left edge of column 0
    z0_mm: float  # lower edge of row 0
    pair_lo: np.ndarray
    pair_hi: np.ndarray

    @classmethod
    def of(cls, beam: Beam, mlc: MlcModel, index: int = 0) -> BeamGrid:
        where = f"beam {index + 1} (gantry {beam.gantry_deg:g} deg)"
        if beam.beamlets_mm is None or beam.bixel_mm <= 0:
            raise DeliveryError(
                f"{where}: the case keeps no beamlet positions (stored before RadPilot "
                "recorded them); rebuild the case to sequence its plans"
            )
        if beam.num_beamlets == 0:
            raise DeliveryError(f"{where}: the beam has no beamlets")
        w = beam.bixel_mm
        xz = beam.beamlets_mm
        x0 = float(xz[:, 0].min()) - w / 2
        z0 = float(xz[:, 1].min()) - w / 2
        cols = np.rint((xz[:, 0] - w / 2 - x0) / w).astype(np.int64)
        rows = np.rint((xz[:, 1] - w / 2 - z0) / w).astype(np.int64)
        off = np.abs(x0 + (cols + 0.5) * w - xz[:, 0]) + np.abs(z0 + (rows + 0.5) * w - xz[:, 1])
        if off.max() > TOL_MM:
            raise DeliveryError(f"{where}: beamlets do not lie on a regular {w:g} mm grid")
        shape = (int(rows.max()) + 1, int(cols.max()) + 1)
        if np.unique(rows * shape[1] + cols).size != rows.size:
            raise DeliveryError(f"{where}: two beamlets share one grid position")
        b = mlc.boundaries_mm
        at = _edge_boundaries(b, z0, w, shape[0])
        if np.any(at < 0):
            i = int(np.flatnonzero(at < 0)[0])  # the lower edge of row i, the upper of row i - 1
            r, e = max(i - 1, 0), z0 + i * w
            near = b[np.argsort(np.abs(b - e))[:2]]
            fits = [
                name
                for name in shipped_mlcs()
                if name != mlc.name
                and np.all(_edge_boundaries(load_mlc(name).boundaries_mm, z0, w, shape[0]) >= 0)
            ]
            raise DeliveryError(
                f"{where}: the {w:g} mm beamlet row centred at z = {z0 + (r + 0.5) * w:g} mm "
                f"spans {z0 + r * w:g} to {z0 + (r + 1) * w:g} mm, but the MLC {mlc.name!r} has "
                f"no leaf boundary at {e:g} mm (nearest: {sorted(near.tolist())}); use an MLC "
                "whose leaf boundaries fall on the beamlet rows' edges"
                + (f" (shipped: {', '.join(fits)})" if fits else "")
                + ", or another beamlet size"
            )
        lo, hi = at[:-1], at[1:]
        x_lo, x_hi = x0, x0 + shape[1] * w
        t_lo, t_hi = mlc.leaf_travel_mm
        if x_lo < t_lo - TOL_MM or x_hi > t_hi + TOL_MM:
            raise DeliveryError(
                f"{where}: the field spans x = {x_lo:g} to {x_hi:g} mm, beyond the leaf travel "
                f"of {mlc.name!r} ({t_lo:g} to {t_hi:g} mm)"
            )
        if x_hi - x_lo > mlc.max_leaf_span_mm + TOL_MM:
            raise DeliveryError(
                f"{where}: the field is {x_hi - x_lo:g} mm wide, more than the MLC's largest "
                f"leaf span ({mlc.max_leaf_span_mm:g} mm)"
            )
        return cls(w, rows, cols, shape, x0, z0, lo, hi)

    def to_map(self, values: np.ndarray) -> np.ndarray:
        """The beam's beamlet values as a (rows, cols) map; zero where no beamlet lies."""
        m = np.zeros(self.shape, dtype=np.float64)
        m[self.rows, self.cols] = values
        return m

    def from_map(self, m: np.ndarray) -> np.ndarray:
        return np.asarray(m[self.rows, self.cols], dtype=np.float64)

    def col_edge(self, c: np.ndarray | int) -> np.ndarray:
        return self.x0_mm + np.asarray(c, dtype=np.float64) * self.bixel_mm

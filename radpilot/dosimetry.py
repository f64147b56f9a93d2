"""The ground floor of dosimetry: DVHs, Dx and Vx, and the metric grammar protocols use.

Nothing here knows cases, protocols or plans; ``protocol.py``, ``fmo/`` and ``evaluation/``
build on it.

Every function takes the structure's voxel doses and, optionally, each voxel's *volume weight*:
the fraction of the voxel inside the structure (boundary voxels are partly inside; RadPilot
rasterises contours with sub-voxel accuracy). Without weights every voxel counts fully. The
definitions used throughout RadPilot:

- ``Dx``: the dose that at least ``x`` % of the structure's volume receives: with the voxels
  sorted from hottest to coldest, the dose of the first voxel at which the accumulated volume
  reaches ``x`` % (for equal volumes, voxel number ``ceil(x/100 * n)``). ``D95`` is the coverage
  dose; ``D0``/``D100`` are the maximum/minimum.
- ``Vd``: the percentage of the structure's volume receiving at least ``d`` Gy.
- mean: the volume-weighted mean dose; max/min: over the voxels with any volume in the structure.
- cumulative DVH: ``V(d)`` for a set of dose levels, in %; non-increasing in ``d``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from radpilot.errors import MetricError


def dose_at_volume(dose: Any, volume_pct: float, weights: Any = None) -> float:
    """``D{volume_pct}`` of the voxel doses (NumPy or CuPy array), volume-weighted if given."""
    n = int(dose.size)
    if n == 0:
        raise ValueError("Dx of an empty structure is undefined")
    if not 0.0 <= volume_pct <= 100.0:
        raise ValueError(f"volume percentage must be within 0..100, got {volume_pct}")
    xp = _namespace(dose)
    if weights is None:
        k = min(n, max(1, math.ceil(volume_pct / 100.0 * n - 1e-9)))
        # the k-th largest value is the (n-k)-th smallest
        return float(xp.partition(dose.ravel(), n - k)[n - k])
    order = xp.argsort(-dose.ravel(), kind="stable")
    cum = xp.cumsum(xp.asarray(weights, dtype=xp.float64).ravel()[order])
    total = float(cum[-1])
    if total <= 0:
        raise ValueError("Dx of a structure with no volume is undefined")
    need = volume_pct / 100.0 * total
    k = int(xp.searchsorted(cum, need - 1e-9 * total, side="left"))
    return float(dose.ravel()[order[min(k, n - 1)]])


def volume_at_dose(dose: Any, dose_gy: float, weights: Any = None) -> float:
    """``V{dose_gy}`` in % of the structure's volume."""
    n = int(dose.size)
    if n == 0:
        raise ValueError("Vx of an empty structure is undefined")
    if weights is None:
        return 100.0 * float((dose >= dose_gy).sum()) / n
    w = np.asarray(weights, dtype=np.float64)
    return 100.0 * float(w[np.asarray(dose) >= dose_gy].sum()) / float(w.sum())


def mean_dose(dose: Any, weights: Any = None) -> float:
    if weights is None:
        return float(np.mean(dose, dtype=np.float64))
    w = np.asarray(weights, dtype=np.float64)
    return float(np.dot(np.asarray(dose, dtype=np.float64), w) / w.sum())


def cumulative_dvh(dose: np.ndarray, levels_gy: np.ndarray, weights: Any = None) -> np.ndarray:
    """% of the volume receiving at least each level (vectorised via one sort)."""
    d = np.asarray(dose, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("DVH of an empty structure is undefined")
    levels = np.asarray(levels_gy, dtype=np.float64)
    if weights is None:
        d = np.sort(d)
        below = np.searchsorted(d, levels, side="left")
        return 100.0 * (d.size - below) / d.size
    order = np.argsort(d, kind="stable")
    d = d[order]
    w = np.asarray(weights, dtype=np.float64).ravel()[order]
    above = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])  # volume at or above each dose
    below = np.searchsorted(d, levels, side="left")
    return 100.0 * above[below] / above[0]


def dvh_levels(max_dose_gy: float, step_gy: float = 0.1) -> np.ndarray:
    top = max(step_gy, math.ceil(max_dose_gy / step_gy) * step_gy)
    return np.round(np.arange(0.0, top + step_gy / 2, step_gy), 6)


def _namespace(a: Any) -> Any:
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":  # pragma: no cover - GPU only
        import cupy

        return cupy
    return np


_METRIC = re.compile(r"^(?P<kind>[DV])(?P<x>\d+(?:\.\d+)?)$")


def parse_metric(name: str) -> tuple[str, float | None]:
    """Split a metric name: ``"D95"`` -> ``("D", 95.0)``, ``"mean"`` -> ``("mean", None)``."""
    n = name.strip()
    if n.lower() in ("mean", "max", "min"):
        return n.lower(), None
    m = _METRIC.match(n)
    if not m:
        raise MetricError(
            f"unknown metric {name!r}: use Dx (dose to x % of the volume, e.g. D95), "
            "Vx (% of the volume receiving x Gy, e.g. V30), mean, max or min"
        )
    x = float(m.group("x"))
    if m.group("kind") == "D" and not 0 <= x <= 100:
        raise MetricError(f"{name}: Dx needs x within 0..100 %")
    return m.group("kind"), x


def metric_value(dose: np.ndarray, name: str, weights: Any = None) -> float:
    """Evaluate one metric on a structure's voxel doses (Gy, or % for Vx), volume-weighted."""
    kind, x = parse_metric(name)
    if dose.size == 0:
        raise MetricError("cannot evaluate a metric on an empty structure")
    if kind == "mean":
        return mean_dose(dose, weights)
    if kind == "max":
        return float(np.max(dose))
    if kind == "min":
        return float(np.min(dose))
    assert x is not None
    return dose_at_volume(dose, x, weights) if kind == "D" else volume_at_dose(dose, x, weights)

"""The ground floor of dosimetry: DVHs, Dx and Vx, and the metric grammar protocols use.

Nothing here knows cases, protocols or plans; ``protocol.py``, ``fmo/`` and ``evaluation/``
build on it.

Definitions used throughout RadPilot (each voxel has equal volume):

- ``Dx``: the dose that at least ``x`` % of the structure receives, i.e. with the voxel doses
  sorted from hottest to coldest, the dose of voxel number ``ceil(x/100 * n)`` (at least the
  first). ``D95`` is the coverage dose, ``D0``/``D100`` are the maximum/minimum.
- ``Vd``: the percentage of the structure's voxels receiving at least ``d`` Gy.
- cumulative DVH: ``V(d)`` for a set of dose levels, in %; non-increasing in ``d``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from radpilot.errors import MetricError


def dose_at_volume(dose: Any, volume_pct: float) -> float:
    """``D{volume_pct}`` of the voxel doses (NumPy or CuPy array)."""
    n = int(dose.size)
    if n == 0:
        raise ValueError("Dx of an empty structure is undefined")
    if not 0.0 <= volume_pct <= 100.0:
        raise ValueError(f"volume percentage must be within 0..100, got {volume_pct}")
    k = min(n, max(1, math.ceil(volume_pct / 100.0 * n - 1e-9)))
    # the k-th largest value is the (n-k)-th smallest
    xp = _namespace(dose)
    return float(xp.partition(dose.ravel(), n - k)[n - k])


def volume_at_dose(dose: Any, dose_gy: float) -> float:
    """``V{dose_gy}`` in % of the structure's voxels."""
    n = int(dose.size)
    if n == 0:
        raise ValueError("Vx of an empty structure is undefined")
    return 100.0 * float((dose >= dose_gy).sum()) / n


def cumulative_dvh(dose: np.ndarray, levels_gy: np.ndarray) -> np.ndarray:
    """% of voxels receiving at least each level (vectorised via one sort)."""
    d = np.sort(np.asarray(dose, dtype=np.float64).ravel())
    if d.size == 0:
        raise ValueError("DVH of an empty structure is undefined")
    below = np.searchsorted(d, np.asarray(levels_gy, dtype=np.float64), side="left")
    return 100.0 * (d.size - below) / d.size


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


def metric_value(dose: np.ndarray, name: str) -> float:
    """Evaluate one metric on a structure's voxel doses (Gy, or % for Vx)."""
    kind, x = parse_metric(name)
    if dose.size == 0:
        raise MetricError("cannot evaluate a metric on an empty structure")
    if kind == "mean":
        return float(np.mean(dose, dtype=np.float64))
    if kind == "max":
        return float(np.max(dose))
    if kind == "min":
        return float(np.min(dose))
    assert x is not None
    return dose_at_volume(dose, x) if kind == "D" else volume_at_dose(dose, x)

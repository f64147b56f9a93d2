"""Known-answer tests for DVH, Dx/Vx, statistics, HI and CI."""

from __future__ import annotations

import numpy as np
import pytest

from radpilot.dosimetry import (
    cumulative_dvh,
    dose_at_volume,
    metric_value,
    parse_metric,
    volume_at_dose,
)
from radpilot.errors import MetricError
from radpilot.evaluation.metrics import conformity_index, homogeneity_index

DOSE = np.arange(1, 101, dtype=np.float32)  # 100 voxels, 1..100 Gy


def test_dx_is_dose_covering_x_percent() -> None:
    # 95 voxels receive >= 6 Gy, 96 do not receive >= 7 Gy
    assert dose_at_volume(DOSE, 95) == 6.0
    assert dose_at_volume(DOSE, 10) == 91.0
    assert dose_at_volume(DOSE, 50) == 51.0
    assert dose_at_volume(DOSE, 100) == 1.0
    assert dose_at_volume(DOSE, 0) == 100.0
    shuffled = np.random.default_rng(1).permutation(DOSE)
    assert dose_at_volume(shuffled, 95) == 6.0


def test_vx_is_percent_volume_at_or_above_dose() -> None:
    assert volume_at_dose(DOSE, 50) == 51.0
    assert volume_at_dose(DOSE, 100.5) == 0.0
    assert volume_at_dose(DOSE, 0) == 100.0


def test_stats_and_metric_names() -> None:
    assert metric_value(DOSE, "mean") == pytest.approx(50.5)
    assert metric_value(DOSE, "max") == 100.0
    assert metric_value(DOSE, "min") == 1.0
    assert metric_value(DOSE, "D95") == 6.0
    assert metric_value(DOSE, "V30") == 71.0
    assert parse_metric("D2.5") == ("D", 2.5)
    with pytest.raises(MetricError, match="unknown metric"):
        parse_metric("Dmean")
    with pytest.raises(MetricError, match=r"0\.\.100"):
        parse_metric("D120")


def test_cumulative_dvh_known_values_and_monotone() -> None:
    levels = np.array([0.0, 1.0, 50.0, 100.0, 101.0])
    np.testing.assert_allclose(cumulative_dvh(DOSE, levels), [100, 100, 51, 1, 0])
    rng = np.random.default_rng(0)
    d = rng.gamma(4.0, 10.0, size=5000)
    v = cumulative_dvh(d, np.linspace(0, d.max() + 1, 200))
    assert np.all(np.diff(v) <= 0)
    assert v[0] == 100.0 and v[-1] == 0.0


def test_homogeneity_index_eq2() -> None:
    # D5 = 96, D95 = 6 -> (96 - 6) / 50 * 100 = 180
    assert homogeneity_index(DOSE, 50.0) == pytest.approx(180.0)
    assert homogeneity_index(np.full(10, 50.0), 50.0) == 0.0


def test_conformity_index_eq3() -> None:
    target = np.array([50.0] * 8 + [40.0] * 2)  # TV = 10, TV95_PTV = 8
    outside = np.array([48.0] * 4 + [10.0] * 50)  # 4 more body voxels >= 47.5
    body = np.concatenate([target, outside])
    # 8^2 / (10 * 12)
    assert conformity_index(target, body, 50.0) == pytest.approx(64 / 120)
    assert conformity_index(np.full(5, 50.0), np.full(5, 50.0), 50.0) == 1.0

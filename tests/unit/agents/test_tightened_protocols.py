"""The tightened-protocol benchmark's variants: limits lowered, never loosened, met or not."""

from __future__ import annotations

import pytest

from benchmarks.tightened import VARIANTS, tightened
from radpilot.protocol import load_protocol
from tests.paths import REPO_ROOT


def test_every_variant_lowers_existing_upper_limits_and_stops_once_met() -> None:
    for path, limits in VARIANTS:
        base = load_protocol(REPO_ROOT / path)
        tight = tightened(base, limits)
        assert tight.after_goals_met == "stop"
        for old, new in zip(base.goals, tight.goals, strict=True):
            key = (old.structure, old.metric)
            assert new.limit == limits.get(key, old.limit)
            assert new.limit <= old.limit


def test_a_looser_or_unknown_limit_is_refused() -> None:
    base = load_protocol(REPO_ROOT / "protocols/tg119_prostate.yaml")
    with pytest.raises(ValueError, match="not a tighter upper limit"):
        tightened(base, {("Rectum", "D30"): 80.0})
    with pytest.raises(ValueError, match="not a tighter upper limit"):
        tightened(base, {("PTV", "D95"): 70.0})  # a lower limit
    with pytest.raises(ValueError, match="has no goals"):
        tightened(base, {("Rectum", "D50"): 30.0})

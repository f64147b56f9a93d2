"""Built-in cases, built on first use and kept in the case store.

``load_builtin("tg119-cshape", store, dose_grid_mm=3, bixel_mm=5)`` returns the stored case when
one with the same recipe exists, and builds and stores it otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from radpilot.case import Case, CaseError
from radpilot.case_store import CaseStore, recipe_id
from radpilot.cases import analytic, phantoms, tg119

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    params_type: type
    build: Callable[[Any], Case]
    recipe: Callable[[Any], dict[str, Any]]
    description: str


BUILTIN_CASES: dict[str, Builtin] = {
    "tg119-cshape": Builtin(
        tg119.TG119Params,
        tg119.build_tg119_cshape,
        tg119.recipe,
        "TG-119 C-shape, pyRadPlan phantom and photon pencil-beam engine, 9 fields",
    ),
    "analytic-cshape": Builtin(
        analytic.AnalyticParams,
        analytic.build_analytic_cshape,
        analytic.recipe,
        "TG-119-like C-shape in a water cylinder, analytic pencil beams (NumPy only)",
    ),
    **{
        name: Builtin(
            phantoms.PhantomParams,
            phantoms.builder_for(name),
            phantoms.recipe_for(name),
            f"{spec.description}, water phantom, pyRadPlan pencil beams, {len(spec.gantry)} fields",
        )
        for name, spec in phantoms.PHANTOMS.items()
    },
}


# the allowed range of every built-in case parameter (checked before anything is built)
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "spacing_mm": (1.0, 20.0),
    "dose_grid_mm": (1.0, 20.0),
    "bixel_mm": (1.0, 20.0),
    "ct_grid_mm": (0.5, 2.5),
    "num_beams": (1, 72),
    "prescription_gy": (1.0, 150.0),
    "body_radius_mm": (30.0, 300.0),
    "body_length_mm": (30.0, 600.0),
    "sigma_mm": (0.5, 20.0),
    "sigma_per_mm_depth": (0.0, 0.2),
    "cutoff_sigmas": (1.0, 6.0),
    "mu_per_mm": (0.0, 0.05),
    "buildup_mm": (0.0, 50.0),
}


def _checked(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            v: Any = int(value)
        elif kind is int:
            f = float(value)
            if not math.isfinite(f) or f != int(f):
                raise ValueError
            v = int(f)
        else:
            v = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise CaseError(f"case parameter {key}={value!r} is not a {kind.__name__}") from None
    low, high = PARAM_RANGES[key]
    if not (math.isfinite(v) and low <= v <= high):
        raise CaseError(f"case parameter {key}={value!r} is outside its range {low:g}..{high:g}")
    return v


def builtin_params(name: str, **overrides: Any) -> Any:
    """Typed parameters for a built-in case; unknown names or parameters raise CaseError."""
    if name not in BUILTIN_CASES:
        raise CaseError(f"unknown case {name!r}; built-in cases are: {', '.join(BUILTIN_CASES)}")
    ptype = BUILTIN_CASES[name].params_type
    fields = {f.name: f for f in dataclasses.fields(ptype)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise CaseError(f"case {name!r} has no parameter(s) {unknown}; it takes {sorted(fields)}")
    values = {key: _checked(key, value, getattr(ptype(), key)) for key, value in overrides.items()}
    return ptype(**values)


def builtin_case_id(name: str, **overrides: Any) -> str:
    params = builtin_params(name, **overrides)
    return f"{name}-{recipe_id(BUILTIN_CASES[name].recipe(params))[:16]}"


def load_builtin(name: str, store: CaseStore, **overrides: Any) -> Case:
    """The stored case for this recipe, or a freshly built one that is then stored."""
    params = builtin_params(name, **overrides)
    spec = BUILTIN_CASES[name]
    case_id = f"{name}-{recipe_id(spec.recipe(params))[:16]}"
    if case_id in store:
        t0 = time.perf_counter()
        case = store.load(case_id)
        log.info("loaded case %s from the store in %.1f s", case_id, time.perf_counter() - t0)
        return case
    t0 = time.perf_counter()
    case = spec.build(params)
    log.info("built case %s in %.1f s", case_id, time.perf_counter() - t0)
    case.case_id = case_id
    store.save(case, case_id, recipe=spec.recipe(params))
    return case

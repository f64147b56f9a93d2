"""Built-in cases, built on first use and kept in the case store.

``load_builtin("tg119-cshape", store, dose_grid_mm=3, bixel_mm=5)`` returns the stored case when
one with the same recipe exists, and builds and stores it otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
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


def builtin_params(name: str, **overrides: Any) -> Any:
    """Typed parameters for a built-in case; unknown names or parameters raise CaseError."""
    if name not in BUILTIN_CASES:
        raise CaseError(f"unknown case {name!r}; built-in cases are: {', '.join(BUILTIN_CASES)}")
    ptype = BUILTIN_CASES[name].params_type
    fields = {f.name: f for f in dataclasses.fields(ptype)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise CaseError(f"case {name!r} has no parameter(s) {unknown}; it takes {sorted(fields)}")
    values = {}
    for key, value in overrides.items():
        default = getattr(ptype(), key)
        try:
            values[key] = type(default)(value)
        except (TypeError, ValueError) as exc:
            raise CaseError(
                f"case parameter {key}={value!r} is not a {type(default).__name__}"
            ) from exc
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

"""Fluence map optimisation: objective kinds, array backends and the solver."""

from radpilot.fmo.objectives import (
    ObjectiveError,
    ObjectiveTerm,
    objective_kind,
    objective_kinds,
    register,
)
from radpilot.fmo.solver import FluenceOptimizer, FMOResult, FMOSettings

__all__ = [
    "FMOResult",
    "FMOSettings",
    "FluenceOptimizer",
    "ObjectiveError",
    "ObjectiveTerm",
    "objective_kind",
    "objective_kinds",
    "register",
]

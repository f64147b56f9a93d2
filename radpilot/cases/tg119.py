"""The TG-119 C-shape case from pyRadPlan's bundled phantom and photon pencil-beam engine.

Nine coplanar 6 MV fields 40 degrees apart (TG-119's arrangement). pyRadPlan is imported lazily so
that the rest of RadPilot (and the GPU benchmark machine) works without it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from radpilot.case import Case, CaseError, StructureKind
from radpilot.cases.engine import BeamSetup, build_case, pyradplan

BUILDER_VERSION = 2  # 2: beams keep their beamlet positions (MLC sequencing)
log = logging.getLogger(__name__)

# pyRadPlan's names -> RadPilot's, and each one's kind.
_STRUCTURES = {
    "OuterTarget": ("PTV", StructureKind.TARGET),
    "Core": ("Core", StructureKind.OAR),
    "BODY": ("BODY", StructureKind.EXTERNAL),
}


@dataclass(frozen=True)
class TG119Params:
    dose_grid_mm: float = 5.0
    bixel_mm: float = 5.0
    num_beams: int = 9
    prescription_gy: float = 50.0


def recipe(params: TG119Params) -> dict[str, Any]:
    return {"builder": "tg119-cshape", "version": BUILDER_VERSION, "params": asdict(params)}


def build_tg119_cshape(params: TG119Params | None = None) -> Case:
    p = params or TG119Params()
    if p.dose_grid_mm <= 0 or p.bixel_mm <= 0 or p.num_beams < 1:
        raise CaseError("dose_grid_mm and bixel_mm must be positive and num_beams at least 1")
    ct, cst = pyradplan().load_tg119()
    beams = BeamSetup(
        gantry_deg=tuple(360.0 * k / p.num_beams for k in range(p.num_beams)),
        bixel_mm=p.bixel_mm,
        dose_grid_mm=p.dose_grid_mm,
    )
    return build_case(
        "tg119-cshape",
        ct,
        cst,
        _STRUCTURES,
        beams,
        p.prescription_gy,
        {
            "builder": "tg119-cshape",
            "params": asdict(p),
            "source": "pyRadPlan 0.5.0 TG119 phantom, photon pencil-beam (Generic machine)",
            "structure_names": {k: v[0] for k, v in _STRUCTURES.items()},
        },
    )

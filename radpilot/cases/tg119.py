"""The TG-119 C-shape case from pyRadPlan's bundled phantom and photon pencil-beam engine.

Nine coplanar 6 MV fields 40 degrees apart (TG-119's arrangement). pyRadPlan is imported lazily so
that the rest of RadPilot (and the GPU benchmark machine) works without it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from radpilot.case import Beam, Case, CaseError, Grid, Structure, StructureKind, restrict_rows
from radpilot.cases.derived import with_normal_tissue

BUILDER_VERSION = 1
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


def _sitk_to_zyx(image: Any) -> np.ndarray:
    import SimpleITK

    return SimpleITK.GetArrayFromImage(image)


def build_tg119_cshape(params: TG119Params | None = None) -> Case:
    p = params or TG119Params()
    if p.dose_grid_mm <= 0 or p.bixel_mm <= 0 or p.num_beams < 1:
        raise CaseError("dose_grid_mm and bixel_mm must be positive and num_beams at least 1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # pyRadPlan's progress bars flood service logs
    try:
        from pyRadPlan import PhotonPlan, calc_dose_influence, generate_stf, load_tg119
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CaseError(
            "the tg119-cshape case needs pyRadPlan (pip install pyradplan==0.5.0); "
            "use the analytic-cshape case where it is not installed"
        ) from exc

    ct, cst = load_tg119()
    gantries = [360.0 * k / p.num_beams for k in range(p.num_beams)]
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {
        "gantry_angles": gantries,
        "couch_angles": [0.0] * p.num_beams,
        "bixel_width": p.bixel_mm,
    }
    res = {"x": p.dose_grid_mm, "y": p.dose_grid_mm, "z": p.dose_grid_mm}
    pln.prop_dose_calc = {"dose_grid": {"resolution": res}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # raytracer divide-by-zero chatter on axis-aligned rays
        stf = generate_stf(ct, cst, pln)
        dij = calc_dose_influence(ct, cst, stf, pln)
        ct_dose = ct.resample_to_grid(dij.dose_grid)
        cst_dose = cst.resample_on_new_ct(ct_dose)

    dg = dij.dose_grid
    nx, ny, nz = (int(v) for v in dg.dimensions)
    grid = Grid(
        shape=(nz, ny, nx),
        spacing_mm=(
            float(dg.resolution["z"]),
            float(dg.resolution["y"]),
            float(dg.resolution["x"]),
        ),
        origin_mm=(float(dg.origin[2]), float(dg.origin[1]), float(dg.origin[0])),
    )
    ct_hu = _sitk_to_zyx(ct_dose.cube_hu).astype(np.float32)
    structures = []
    for voi in cst_dose.vois:
        if voi.name not in _STRUCTURES:
            continue
        name, kind = _STRUCTURES[voi.name]
        idx = np.unique(np.asarray(voi.indices_numpy, dtype=np.int64))
        structures.append(Structure(name, kind, idx))
    structures = with_normal_tissue(structures, grid)
    rows, A = restrict_rows(dij.physical_dose.flat[0], structures)
    iso = stf.beams[0].iso_center
    return Case(
        name="tg119-cshape",
        grid=grid,
        ct_hu=ct_hu,
        structures=structures,
        beams=[
            Beam(float(b.gantry_angle), float(b.couch_angle), int(b.total_number_of_bixels))
            for b in stf.beams
        ],
        isocenter_mm=(float(iso[2]), float(iso[1]), float(iso[0])),
        prescription_gy=p.prescription_gy,
        row_voxels=rows,
        dose_influence=A,
        metadata={
            "builder": "tg119-cshape",
            "params": asdict(p),
            "source": "pyRadPlan 0.5.0 TG119 phantom, photon pencil-beam (Generic machine)",
            "structure_names": {k: v[0] for k, v in _STRUCTURES.items()},
        },
    )

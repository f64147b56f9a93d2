"""Dose influence from pyRadPlan for any CT and set of structure masks.

The built-in phantoms, the TG-119 C-shape and imported DICOM patients all go through here: a
pyRadPlan CT and structure set (with RadPilot's structure kinds), photon pencil-beam fields from
the given gantry angles, the dose influence matrix on the dose grid, and a RadPilot ``Case`` with
the rows restricted to the delineated voxels and a derived ``NormalTissue``. pyRadPlan is imported
lazily, so the rest of RadPilot works without it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radpilot.case import Beam, Case, CaseError, Grid, Structure, StructureKind, restrict_rows
from radpilot.cases.derived import with_normal_tissue

log = logging.getLogger(__name__)
VOI_TYPES = {
    StructureKind.TARGET: "TARGET",
    StructureKind.OAR: "OAR",
    StructureKind.EXTERNAL: "EXTERNAL",
}


@dataclass(frozen=True)
class BeamSetup:
    gantry_deg: tuple[float, ...]
    couch_deg: tuple[float, ...] = ()
    bixel_mm: float = 5.0
    dose_grid_mm: float = 5.0
    isocenter_xyz_mm: tuple[float, float, float] | None = None  # None: the targets' centroid

    def __post_init__(self) -> None:
        if not self.gantry_deg:
            raise CaseError("at least one beam (gantry angle) is needed")
        if self.couch_deg and len(self.couch_deg) != len(self.gantry_deg):
            raise CaseError("give one couch angle per gantry angle (or none)")
        if self.bixel_mm <= 0 or self.dose_grid_mm <= 0:
            raise CaseError("bixel_mm and dose_grid_mm must be positive")


@dataclass
class MaskedStructure:
    """A structure on the CT grid: boolean ``[z, y, x]`` mask."""

    name: str
    kind: StructureKind
    mask: np.ndarray
    color: tuple[int, int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pyradplan() -> Any:
    os.environ.setdefault("TQDM_DISABLE", "1")  # pyRadPlan's progress bars flood service logs
    try:
        import pyRadPlan
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CaseError(
            "this case needs pyRadPlan (pip install pyradplan==0.5.0); use the analytic-cshape "
            "case where it is not installed"
        ) from exc
    return pyRadPlan


def ct_from_array(hu_zyx: np.ndarray, spacing_zyx: tuple, origin_zyx: tuple) -> Any:
    """A pyRadPlan CT from a HU cube ``[z, y, x]`` (LPS, identity direction)."""
    import SimpleITK
    from pyRadPlan.ct import create_ct

    image = SimpleITK.GetImageFromArray(np.ascontiguousarray(hu_zyx, dtype=np.float32))
    image.SetSpacing(tuple(float(v) for v in reversed(spacing_zyx)))
    image.SetOrigin(tuple(float(v) for v in reversed(origin_zyx)))
    return create_ct(cube_hu=image)


def cst_from_masks(ct: Any, structures: list[MaskedStructure]) -> Any:
    import SimpleITK
    from pyRadPlan.cst import create_cst, validate_voi

    vois = []
    for s in structures:
        mask = SimpleITK.GetImageFromArray(np.ascontiguousarray(s.mask, dtype=np.uint8))
        mask.CopyInformation(ct.cube_hu)
        kwargs: dict[str, Any] = {}
        if s.color is not None:
            kwargs["visible_color"] = s.color
        vois.append(
            validate_voi(name=s.name, voi_type=VOI_TYPES[s.kind], mask=mask, ct_image=ct, **kwargs)
        )
    return create_cst(vois, ct)


def build_case(
    name: str,
    ct: Any,
    cst: Any,
    names: dict[str, tuple[str, StructureKind]],
    beams: BeamSetup,
    prescription_gy: float,
    metadata: dict[str, Any],
) -> Case:
    """Compute the dose influence matrix and make the Case. ``names`` maps pyRadPlan VOI names to
    RadPilot (name, kind); VOIs not in it are left out."""
    prp = pyradplan()
    n = len(beams.gantry_deg)
    pln = prp.PhotonPlan(machine="Generic")
    prop_stf: dict[str, Any] = {
        "gantry_angles": [float(g) for g in beams.gantry_deg],
        "couch_angles": [float(c) for c in beams.couch_deg] or [0.0] * n,
        "bixel_width": beams.bixel_mm,
    }
    if beams.isocenter_xyz_mm is not None:
        prop_stf["iso_center"] = [list(beams.isocenter_xyz_mm)] * n
    pln.prop_stf = prop_stf
    res = {"x": beams.dose_grid_mm, "y": beams.dose_grid_mm, "z": beams.dose_grid_mm}
    pln.prop_dose_calc = {"dose_grid": {"resolution": res}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # raytracer divide-by-zero chatter on axis-aligned rays
        stf = prp.generate_stf(ct, cst, pln)
        dij = prp.calc_dose_influence(ct, cst, stf, pln)
        ct_dose = ct.resample_to_grid(dij.dose_grid)
        cst_dose = cst.resample_on_new_ct(ct_dose)

    import SimpleITK

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
    ct_hu = SimpleITK.GetArrayFromImage(ct_dose.cube_hu).astype(np.float32)
    if ct_hu.ndim == 4:
        ct_hu = ct_hu[0]
    structures = []
    for voi in cst_dose.vois:
        if voi.name not in names:
            continue
        new_name, kind = names[voi.name]
        idx = np.unique(np.asarray(voi.indices_numpy, dtype=np.int64))
        if idx.size == 0:
            raise CaseError(
                f"structure {new_name!r} has no voxel on the {beams.dose_grid_mm:g} mm dose grid; "
                "use a finer dose grid or check its contours"
            )
        structures.append(Structure(new_name, kind, idx))
    structures = with_normal_tissue(structures, grid)
    rows, A = restrict_rows(dij.physical_dose.flat[0], structures)
    iso = stf.beams[0].iso_center
    log.info("%s: %d beams, %d beamlets, %d rows, %d nnz", name, n, A.shape[1], *A.shape[:1], A.nnz)
    return Case(
        name=name,
        grid=grid,
        ct_hu=ct_hu,
        structures=structures,
        beams=[
            Beam(float(b.gantry_angle), float(b.couch_angle), int(b.total_number_of_bixels))
            for b in stf.beams
        ],
        isocenter_mm=(float(iso[2]), float(iso[1]), float(iso[0])),
        prescription_gy=prescription_gy,
        row_voxels=rows,
        dose_influence=A,
        metadata=metadata,
    )

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

from radpilot.case import (
    Beam,
    Case,
    CaseError,
    DoseSamples,
    Grid,
    Structure,
    StructureKind,
    restrict_rows,
)
from radpilot.cases.derived import with_normal_tissue
from radpilot.contours import (
    AxisGrid,
    interpolation_matrix,
    resample_fractions,
    sample_points,
    sparse_fractions,
)

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
    """A structure on the CT grid: boolean ``[z, y, x]`` mask (voxels at least half inside)
    and, where known, the fraction of each CT voxel inside it (rasterised contours)."""

    name: str
    kind: StructureKind
    mask: np.ndarray
    color: tuple[int, int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    fraction: np.ndarray | None = None  # float32 [z, y, x] in 0..1; None: the mask itself

    def ct_fraction(self) -> np.ndarray:
        return self.fraction if self.fraction is not None else self.mask.astype(np.float32)


SAMPLE_MM = 1.25  # dosimetry sample spacing, at most (a finer grid than the dose grid's)


def sample_factor(dose_grid_mm: float) -> int:
    """Sample points per dose-voxel edge: spacing at most ``SAMPLE_MM``, at least 2."""
    return max(2, int(np.ceil(dose_grid_mm / SAMPLE_MM - 1e-9)))


DOSE_REGION = "radpilot-dose-region"  # a helper VOI: every voxel a structure touches gets dose


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


def _axes(origin_zyx: Any, spacing_zyx: Any, shape_zyx: Any) -> tuple[AxisGrid, AxisGrid, AxisGrid]:
    z, y, x = (
        AxisGrid(float(o), float(s), int(n))
        for o, s, n in zip(origin_zyx, spacing_zyx, shape_zyx, strict=True)
    )
    return z, y, x


def _dose_region(structures: list[MaskedStructure], spacing_zyx: Any, dose_mm: float) -> Any:
    """Every CT voxel any structure touches, grown by one dose voxel: pyRadPlan computes dose
    for the voxels of its VOIs, and a dose voxel partly inside a structure must have a row."""
    from scipy.ndimage import binary_dilation

    touched = np.zeros(structures[0].mask.shape, dtype=bool)
    for s in structures:
        touched |= s.ct_fraction() > 0
    steps = [max(1, int(np.ceil(dose_mm / float(sp)))) for sp in spacing_zyx]
    return binary_dilation(touched, structure=np.ones([2 * k + 1 for k in steps], dtype=bool))


def _dose_influence(ct: Any, cst: Any, beams: BeamSetup) -> tuple[Any, Any, Grid, np.ndarray]:
    """pyRadPlan's beams and dose influence for the VOIs of ``cst``: (stf, dij, the dose grid,
    the CT resampled to it)."""
    import SimpleITK

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
    return stf, dij, grid, ct_hu


def _case(
    name: str,
    grid: Grid,
    ct_hu: np.ndarray,
    structures: list[Structure],
    stf: Any,
    dij: Any,
    prescription_gy: float,
    metadata: dict[str, Any],
    samples: dict[str, DoseSamples] | None = None,
) -> Case:
    """The Case from structures on the dose grid (NormalTissue added) and pyRadPlan's result;
    ``samples`` builds each named structure's dosimetry points from the case's rows."""
    structures = with_normal_tissue(structures, grid)
    rows, A = restrict_rows(dij.physical_dose.flat[0], structures)
    iso = stf.beams[0].iso_center
    log.info("%s: %d beams, %d rows x %d beamlets, %d nnz", name, len(stf.beams), *A.shape, A.nnz)
    return Case(
        name=name,
        grid=grid,
        ct_hu=ct_hu,
        structures=structures,
        beams=[
            Beam(
                float(b.gantry_angle),
                float(b.couch_angle),
                int(b.total_number_of_bixels),
                float(b.bixel_width),
                np.array([[r.ray_pos_bev[0], r.ray_pos_bev[2]] for r in b.rays]),
            )
            for b in stf.beams
        ],
        isocenter_mm=(float(iso[2]), float(iso[1]), float(iso[0])),
        prescription_gy=prescription_gy,
        row_voxels=rows,
        dose_influence=A,
        metadata=metadata,
    )


def build_case(
    name: str,
    ct: Any,
    cst: Any,
    names: dict[str, tuple[str, StructureKind]],
    beams: BeamSetup,
    prescription_gy: float,
    metadata: dict[str, Any],
) -> Case:
    """A case whose structures are voxel masks (the phantoms, TG-119): pyRadPlan resamples them
    to the dose grid, whole voxels. ``names`` maps pyRadPlan VOI names to RadPilot (name, kind);
    VOIs not in it are left out."""
    stf, dij, grid, ct_hu = _dose_influence(ct, cst, beams)
    ct_dose = ct.resample_to_grid(dij.dose_grid)
    cst_dose = cst.resample_on_new_ct(ct_dose)
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
    return _case(name, grid, ct_hu, structures, stf, dij, prescription_gy, metadata)


def build_contoured_case(
    name: str,
    ct: Any,
    structures: list[MaskedStructure],
    beams: BeamSetup,
    prescription_gy: float,
    metadata: dict[str, Any],
) -> Case:
    """A case whose structures RadPilot rasterised from contours (CT-grid fractions): each
    structure's voxels and volume fractions on the dose grid come from them by exact box overlap
    (overlaps between structures kept), and its dosimetry points sample the contours at <=
    ``SAMPLE_MM`` with the dose interpolated between voxels, as an independent check of the
    exported RTDOSE reads it. pyRadPlan sees the masks (and a region around them, so every voxel
    a structure touches gets dose) for beam and dose geometry."""
    spacing_zyx = tuple(reversed(ct.cube_hu.GetSpacing()))
    region = MaskedStructure(
        DOSE_REGION,
        StructureKind.OAR,
        _dose_region(structures, spacing_zyx, beams.dose_grid_mm),
    )
    stf, dij, grid, ct_hu = _dose_influence(ct, cst_from_masks(ct, [*structures, region]), beams)
    ct_axes = _axes(tuple(reversed(ct.cube_hu.GetOrigin())), spacing_zyx, structures[0].mask.shape)
    dose_axes = _axes(grid.origin_mm, grid.spacing_mm, grid.shape)
    on_dose: list[Structure] = []
    volumes: dict[str, dict[str, float]] = {}
    ct_cc = float(np.prod(spacing_zyx)) / 1000.0
    for ms in structures:
        ct_fraction = ms.ct_fraction()
        idx, frac = sparse_fractions(resample_fractions(ct_fraction, ct_axes, dose_axes))
        if idx.size == 0:
            raise CaseError(
                f"structure {ms.name!r} has no voxel on the {beams.dose_grid_mm:g} mm dose grid; "
                "check its contours"
            )
        on_dose.append(Structure(ms.name, ms.kind, idx, frac))
        volumes[ms.name] = {
            "ct_grid_cc": round(float(ct_fraction.sum(dtype=np.float64)) * ct_cc, 3),
            "dose_grid_cc": round(float(frac.sum(dtype=np.float64)) * grid.voxel_volume_cc, 3),
            **({"contour_cc": ms.extra["contour_cc"]} if "contour_cc" in ms.extra else {}),
        }
    metadata = {**metadata, "structure_volumes": volumes}
    case = _case(name, grid, ct_hu, on_dose, stf, dij, prescription_gy, metadata)
    factor = sample_factor(beams.dose_grid_mm)
    for ms in structures:
        st = case.structure(ms.name)
        if st.kind is not StructureKind.EXTERNAL:
            points, weights = sample_points(ms.ct_fraction(), ct_axes, dose_axes, factor)
            st.samples = DoseSamples(
                interpolation_matrix(points, dose_axes, case.row_voxels), weights
            )
    return case

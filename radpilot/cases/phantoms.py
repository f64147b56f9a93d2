"""The TG-119 test geometries as water-equivalent phantoms, planned with pyRadPlan's engine.

Built from the facts in the TG-119 report (Ezzell et al. 2009): a water slab 30 cm (RL) x 20 cm
(AP) x 20 cm (SI) in air, CT grid 2.5 mm by default, patient coordinates LPS in mm with the
phantom centred on the origin.

- ``tg119-prostate``: CTV = ellipsoid RL/AP/SI 4.0/2.6/6.5 cm with a posterior concavity around
  the rectum (a 1.5 cm cylinder); PTV = CTV + 6 mm, which takes in about a third of the rectal
  cross-section; bladder = ellipsoid 5.0/4.0/5.0 cm on the superior aspect of the prostate,
  overlapping the PTV (not the CTV); two femoral heads (for the paper-style protocol). 7 fields,
  50 deg apart.
- ``tg119-headneck``: a horseshoe PTV around the anterior and lateral neck including posterior
  nodes, 6 mm from the skin, 1.5 cm from the cord; parotids beside the superior part of the PTV,
  about a third of each inside it. 9 fields, 40 deg apart. ``paper-headneck`` splits the PTV
  into PTV70, PTV56 and PTV52, keeps its parotids above the PTV and adds brainstem, oral cavity
  and larynx (the paper's head & neck protocol).

A voxel may belong to several structures (rectum, bladder and parotids overlap the PTV), as in
the TG-119 report's own structure sets; protocols plan the organs where they do not overlap the
target through helper structures (``helpers:``, "organ minus PTV").
- ``tg119-multitarget``: three cylinders 4 cm diameter x 4 cm long, centres 4 cm apart along SI.
  7 fields, 50 deg apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from radpilot.case import Case, CaseError, StructureKind
from radpilot.cases.derived import expand
from radpilot.cases.engine import (
    BeamSetup,
    MaskedStructure,
    build_case,
    cst_from_masks,
    ct_from_array,
)

BUILDER_VERSION = 9  # 9: bladder and parotids overlap the PTV, as in TG-119 (calibrated)
SEVEN_FIELDS = (0.0, 50.0, 100.0, 150.0, 210.0, 260.0, 310.0)  # TG-119's 7-field arrangement
NINE_FIELDS = tuple(40.0 * k for k in range(9))
SLAB_MM = (200.0, 200.0, 300.0)  # SI (z), AP (y), RL (x)
AIR_MARGIN_MM = 10.0

T, OAR, E = StructureKind.TARGET, StructureKind.OAR, StructureKind.EXTERNAL


@dataclass(frozen=True)
class PhantomParams:
    ct_grid_mm: float = 2.5
    dose_grid_mm: float = 5.0
    bixel_mm: float = 5.0


class Geometry:
    """World coordinates (mm) of every CT voxel centre, and shape helpers returning masks."""

    def __init__(self, spacing_mm: float) -> None:
        if not 0.5 <= spacing_mm <= 2.5:
            raise CaseError("ct_grid_mm must be within 0.5..2.5 mm (TG-119 asks for <= 2.5)")
        # square slices (air around the slab), as CT images are: some DICOM readers assume it
        side = max(SLAB_MM[1], SLAB_MM[2]) / 2 + AIR_MARGIN_MM
        half = [SLAB_MM[0] / 2, side, side]
        n = [int(np.ceil(2 * h / spacing_mm)) for h in half]
        self.spacing = (spacing_mm, spacing_mm, spacing_mm)
        self.origin = (
            -(n[0] - 1) * spacing_mm / 2,
            -(n[1] - 1) * spacing_mm / 2,
            -(n[2] - 1) * spacing_mm / 2,
        )
        self.shape = (n[0], n[1], n[2])
        axes = [o + spacing_mm * np.arange(k) for o, k in zip(self.origin, n, strict=True)]
        self.z, self.y, self.x = np.meshgrid(*axes, indexing="ij", sparse=True)

    def ellipsoid(self, c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
        """Centre and semi-axes as (x, y, z) mm."""
        return (
            ((self.x - c[0]) / r[0]) ** 2
            + ((self.y - c[1]) / r[1]) ** 2
            + ((self.z - c[2]) / r[2]) ** 2
        ) <= 1.0

    def cylinder_z(self, cx: float, cy: float, radius: float, z0: float, z1: float) -> np.ndarray:
        return (((self.x - cx) ** 2 + (self.y - cy) ** 2) <= radius**2) & (
            (self.z >= z0) & (self.z <= z1)
        )

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> np.ndarray:
        return (
            (self.x >= lo[0]) & (self.x <= hi[0])
            & (self.y >= lo[1]) & (self.y <= hi[1])
            & (self.z >= lo[2]) & (self.z <= hi[2])
        )  # fmt: skip

    def expand(self, mask: np.ndarray, mm: float) -> np.ndarray:
        from radpilot.case import Grid

        return expand(mask, Grid(self.shape, self.spacing, self.origin), mm)

    def slab(self) -> np.ndarray:
        hz, hy, hx = (v / 2 for v in SLAB_MM)
        return np.broadcast_to(self.box((-hx, -hy, -hz), (hx, hy, hz)), self.shape).copy()


def _full(g: Geometry, m: np.ndarray) -> np.ndarray:
    return np.broadcast_to(m, g.shape).copy()


# the bladder's centre (x, y, z mm): 5.5 mm above the CTV's superior tip, 14 mm anterior; about
# a tenth of it lies in the PTV. Calibrated (with bench-phantoms) so that the class solution's
# bladder D30/D10 fall within the TG-119 institutions' mean +- 2 SD.
BLADDER_CENTRE = (0.0, -14.0, 38.0)


def prostate(g: Geometry) -> list[MaskedStructure]:
    rectum = _full(g, g.cylinder_z(0.0, 17.0, 7.5, -75.0, 65.0))
    ctv = _full(g, g.ellipsoid((0.0, 0.0, 0.0), (20.0, 13.0, 32.5))) & ~g.expand(rectum, 3.0)
    ptv = g.expand(ctv, 6.0)
    # on the superior aspect of the prostate, anterior, overlapping the PTV, not the CTV (nor
    # what lies posterior of the CTV: a slice of the bladder never encloses the prostate's)
    behind_ctv = np.logical_or.accumulate(ctv, axis=1)  # axis 1 is y, posterior increasing
    bladder = _full(g, g.ellipsoid(BLADDER_CENTRE, (25.0, 20.0, 25.0))) & ~behind_ctv
    fem_l = _full(g, g.ellipsoid((90.0, 5.0, -25.0), (22.0, 22.0, 22.0)))
    fem_r = _full(g, g.ellipsoid((-90.0, 5.0, -25.0), (22.0, 22.0, 22.0)))
    return [
        MaskedStructure("PTV", T, ptv),
        MaskedStructure("CTV", T, ctv),
        MaskedStructure("Rectum", OAR, rectum),
        MaskedStructure("Bladder", OAR, bladder),
        MaskedStructure("FemoralHeadL", OAR, fem_l),
        MaskedStructure("FemoralHeadR", OAR, fem_r),
    ]


# TG-119 head & neck: the parotids lie beside the superior part of the PTV, about a third of
# each inside it (the overlap belongs to both); calibrated (bench-phantoms) so that the class
# solution's parotid D50 falls within the TG-119 institutions' mean +- 2 SD
PAROTID = (55.0, 10.0, 38.0)  # the left one's centre (x, y, z mm); the right one mirrored in x
PAROTID_R = (14.0, 18.0, 18.0)
# the paper-style head & neck keeps its own parotids: above the PTV's superior edge, outside it
PAPER_PAROTID = (42.0, 12.0, 50.0)
PAPER_PAROTID_R = (14.0, 18.0, 16.0)


def _neck(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    cord = _full(g, g.cylinder_z(0.0, 45.0, 7.5, -80.0, 70.0))
    # an elliptic cylinder from the skull base (z = +45) to the upper neck (z = -45)
    region = _full(g, g.ellipsoid((0.0, 0.0, 0.0), (55.0, 55.0, 1e9))) & (
        np.abs(_full(g, g.z)) <= 45.0
    )
    ptv = region & ~g.expand(cord, 15.0)
    skin = g.slab() & ~g.expand(~g.slab(), 6.0)
    return cord, ptv & skin


def headneck(g: Geometry) -> list[MaskedStructure]:
    cord, ptv = _neck(g)
    x, y, z = PAROTID
    par_l = _full(g, g.ellipsoid((x, y, z), PAROTID_R))
    par_r = _full(g, g.ellipsoid((-x, y, z), PAROTID_R))
    return [
        MaskedStructure("PTV", T, ptv),
        MaskedStructure("Cord", OAR, cord),
        MaskedStructure("ParotidL", OAR, par_l),
        MaskedStructure("ParotidR", OAR, par_r),
    ]


def paper_headneck(g: Geometry) -> list[MaskedStructure]:
    cord, ptv = _neck(g)
    # primary (right, upper neck), contralateral upper nodes, lower neck nodes: pieces of the
    # horseshoe cut by planes (no structure encloses another: contours without holes)
    x, z = _full(g, g.x), _full(g, g.z)
    ptv70 = ptv & (x < 0.0) & (z >= -15.0)
    ptv56 = ptv & (x >= 0.0) & (z >= -15.0) & ~g.expand(ptv70, 5.0)
    ptv52 = ptv & (z < -20.0)
    brainstem = _full(g, g.cylinder_z(0.0, 45.0, 12.0, 72.0, 100.0))
    px, py, pz = PAPER_PAROTID
    par_l = _full(g, g.ellipsoid((px, py, pz), PAPER_PAROTID_R))
    par_r = _full(g, g.ellipsoid((-px, py, pz), PAPER_PAROTID_R))
    oral = _full(g, g.ellipsoid((0.0, -35.0, 62.0), (28.0, 18.0, 14.0)))
    larynx = _full(g, g.ellipsoid((0.0, -58.0, -30.0), (14.0, 12.0, 20.0)))
    targets = ptv70 | ptv56 | ptv52
    return [
        MaskedStructure("PTV70", T, ptv70),
        MaskedStructure("PTV56", T, ptv56),
        MaskedStructure("PTV52", T, ptv52),
        MaskedStructure("Brainstem", OAR, brainstem),
        MaskedStructure("SpinalCord", OAR, cord),
        MaskedStructure("ParotidLeft", OAR, par_l & ~targets),
        MaskedStructure("ParotidRight", OAR, par_r & ~targets),
        MaskedStructure("OralCavity", OAR, oral & ~targets),
        MaskedStructure("Larynx", OAR, larynx & ~targets),
    ]


def multitarget(g: Geometry) -> list[MaskedStructure]:
    return [
        MaskedStructure("Center", T, _full(g, g.cylinder_z(0, 0, 20.0, -20.0, 20.0))),
        MaskedStructure("Superior", T, _full(g, g.cylinder_z(0, 0, 20.0, 20.01, 60.0))),
        MaskedStructure("Inferior", T, _full(g, g.cylinder_z(0, 0, 20.0, -60.0, -20.01))),
    ]


@dataclass(frozen=True)
class PhantomSpec:
    structures: Callable[[Geometry], list[MaskedStructure]]
    gantry: tuple[float, ...]
    prescription_gy: float
    description: str


PHANTOMS: dict[str, PhantomSpec] = {
    "tg119-prostate": PhantomSpec(prostate, SEVEN_FIELDS, 75.6, "TG-119 mock prostate"),
    "tg119-headneck": PhantomSpec(headneck, NINE_FIELDS, 50.0, "TG-119 mock head & neck"),
    "paper-headneck": PhantomSpec(
        paper_headneck, NINE_FIELDS, 70.0, "head & neck with PTV70/56/52 and the paper's OARs"
    ),
    "tg119-multitarget": PhantomSpec(multitarget, SEVEN_FIELDS, 50.0, "TG-119 multitarget"),
}


def phantom_structures(
    name: str, ct_grid_mm: float = 2.5
) -> tuple[Geometry, list[MaskedStructure]]:
    g = Geometry(ct_grid_mm)
    body = MaskedStructure("BODY", E, g.slab())
    return g, [*PHANTOMS[name].structures(g), body]


def build_phantom(name: str, p: PhantomParams) -> Case:
    spec = PHANTOMS[name]
    g, structures = phantom_structures(name, p.ct_grid_mm)
    for s in structures:
        if not s.mask.any():
            raise CaseError(f"phantom {name}: structure {s.name} is empty at {p.ct_grid_mm} mm")
    hu = np.where(structures[-1].mask, 0.0, -1000.0).astype(np.float32)
    ct = ct_from_array(hu, g.spacing, g.origin)
    cst = cst_from_masks(ct, structures)
    beams = BeamSetup(gantry_deg=spec.gantry, bixel_mm=p.bixel_mm, dose_grid_mm=p.dose_grid_mm)
    return build_case(
        name,
        ct,
        cst,
        {s.name: (s.name, s.kind) for s in structures},
        beams,
        spec.prescription_gy,
        {
            "builder": name,
            "params": asdict(p),
            "source": f"{spec.description}: water phantom from the TG-119 report's geometry, "
            "pyRadPlan 0.5.0 photon pencil-beam (Generic machine)",
        },
    )


def recipe_for(name: str) -> Callable[[PhantomParams], dict[str, object]]:
    def recipe(p: PhantomParams) -> dict[str, object]:
        return {"builder": name, "version": BUILDER_VERSION, "params": asdict(p)}

    return recipe


def builder_for(name: str) -> Callable[[PhantomParams], Case]:
    return lambda p: build_phantom(name, p)

"""Every number RadPilot reports is checked against an independent computation.

Patients made of analytic shapes (a concave PTV, a rectum overlapping it, a bladder, a tube
with a hole) are written by other software: the CT by pydicom, the RTSTRUCT by rt-utils (contour
vertices on boundary pixel centres, square pixels) or as the shapes' exact cross-sections
(non-square pixels, an odd slice spacing). RadPilot imports, plans and exports them; then this
test reads the exported RTDOSE with SimpleITK, samples it trilinearly at <= 1 mm on the
patient's own contours (each contour a slab one slice thick, holes by the even-odd rule), and
compares volumes and D95 / D50 / D2 / mean with what RadPilot reported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolyPath
from scipy.ndimage import map_coordinates

from radpilot.dicom.read import import_dicom
from radpilot.loop.inprocess import plan_once
from radpilot.protocol import load_protocol_text
from tests.doubles.analytic_patient import (
    Grid,
    Patient,
    pelvis,
    write_ct,
    write_rtstruct_polygons,
    write_rtstruct_rt_utils,
)

PROTOCOL = """
name: analytic-pelvis
prescription: {target: PTV, dose_gy: 70.0}
intent: Cover the PTV, spare the rectum and bladder.
goals:
  - {structure: PTV, metric: D95, comparator: ">=", limit: 70}
  - {structure: Rectum, metric: D30, comparator: "<=", limit: 65}
  - {structure: Bladder, metric: D30, comparator: "<=", limit: 60}
  - {structure: Tube, metric: mean, comparator: "<=", limit: 60, hard: false, priority: 3}
objectives:
  - {structure: PTV, kind: squared_deviation, dose_gy: 70, weight: 100}
  - {structure: Rectum, kind: squared_overdose, dose_gy: 45, weight: 10}
  - {structure: Bladder, kind: squared_overdose, dose_gy: 35, weight: 5}
  - {structure: NormalTissue, kind: squared_overdose, dose_gy: 35, weight: 5}
beams: {gantry_deg: [0, 72, 144, 216, 288], bixel_mm: 6, dose_grid_mm: 4}
"""
CHECKED = ("PTV", "Rectum", "Bladder", "Tube")
SAMPLE_MM = 0.5  # in-plane lattice (and at most this in z)
LATTICE_OFFSET = 0.1234  # mm: no lattice line sits on a symmetry axis of the shapes

PATIENTS: dict[str, tuple[Grid, Callable[[Patient, Path], None]]] = {
    # square 2 mm pixels, 3 mm slices; contours traced by rt-utils
    "rt-utils": (
        Grid((25, 100, 100), (3.0, 2.0, 2.0), (-36.0, -99.0, -99.0)),
        write_rtstruct_rt_utils,
    ),
    # non-square 1.7 x 2.3 mm pixels, 2.7 mm slices; exact cross-sections
    "polygons": (
        Grid((27, 72, 118), (2.7, 2.3, 1.7), (-35.1, -81.65, -99.45)),
        write_rtstruct_polygons,
    ),
}


def _contours(rs: pydicom.Dataset) -> dict[str, dict[float, list[np.ndarray]]]:
    names = {int(r.ROINumber): str(r.ROIName) for r in rs.StructureSetROISequence}
    out: dict[str, dict[float, list[np.ndarray]]] = {}
    for rc in rs.ROIContourSequence:
        by_z = out.setdefault(names[int(rc.ReferencedROINumber)], {})
        for c in getattr(rc, "ContourSequence", []):
            pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
            by_z.setdefault(round(float(pts[0, 2]), 3), []).append(pts[:, :2])
    return out


def _samples(slices: dict[float, list[np.ndarray]], dz: float) -> tuple[np.ndarray, float]:
    """Points (z, y, x) on a SAMPLE_MM lattice inside the contour solid, and each one's cc."""
    pts = []
    nz = max(1, int(np.ceil(dz / SAMPLE_MM)))
    for z, polys in slices.items():
        lo = np.min([p.min(axis=0) for p in polys], axis=0) - SAMPLE_MM
        hi = np.max([p.max(axis=0) for p in polys], axis=0) + SAMPLE_MM
        gx, gy = np.meshgrid(
            np.arange(lo[0] + LATTICE_OFFSET, hi[0], SAMPLE_MM),
            np.arange(lo[1] + LATTICE_OFFSET, hi[1], SAMPLE_MM),
        )
        xy = np.column_stack([gx.ravel(), gy.ravel()])
        inside = np.zeros(len(xy), dtype=bool)
        for p in polys:
            inside ^= PolyPath(p).contains_points(xy)  # even-odd: a nested contour is a hole
        xy = xy[inside]
        for k in range(nz):
            zk = z - dz / 2 + (k + 0.5) * dz / nz
            pts.append(np.column_stack([np.full(len(xy), zk), xy[:, 1], xy[:, 0]]))
    return np.vstack(pts), SAMPLE_MM * SAMPLE_MM * dz / nz / 1000.0


def _dose_at(rtdose: Path, points_zyx: np.ndarray) -> np.ndarray:
    import SimpleITK

    image = SimpleITK.ReadImage(str(rtdose))
    scale = float(pydicom.dcmread(rtdose, stop_before_pixels=True).DoseGridScaling)
    cube = SimpleITK.GetArrayFromImage(image).astype(np.float64) * scale
    origin = np.asarray(image.GetOrigin())[::-1]
    spacing = np.asarray(image.GetSpacing())[::-1]
    coords = ((points_zyx - origin) / spacing).T
    return map_coordinates(cube, coords, order=1, mode="constant", cval=0.0)


def _dx(dose: np.ndarray, pct: float) -> float:
    d = np.sort(dose)[::-1]
    return float(d[min(d.size - 1, max(0, int(np.ceil(pct / 100 * d.size)) - 1))])


@pytest.fixture(scope="module", params=sorted(PATIENTS))
def planned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    grid, write_rs = PATIENTS[request.param]
    folder = tmp_path_factory.mktemp(f"patient-{request.param}")
    patient = pelvis(grid)
    write_ct(patient, folder)
    write_rs(patient, folder)
    protocol = load_protocol_text(PROTOCOL)
    case, notes = import_dicom(folder, protocol)
    report = plan_once(case, protocol)
    out = tmp_path_factory.mktemp(f"out-{request.param}")
    report.write(out)
    rs = pydicom.dcmread(next(folder.glob("RS.*.dcm")))
    return request.param, patient, case, report, out / "dicom" / "RTDOSE.dcm", rs, notes


def test_volumes_match_the_contours_and_the_shapes(planned) -> None:
    name, patient, _, report, _, rs, notes = planned
    contours = _contours(rs)
    stats = {s.name: s for s in report.plan.stats()}
    for roi in CHECKED:
        points, cc_each = _samples(contours[roi], patient.grid.spacing[0])
        contour_cc = len(points) * cc_each
        assert stats[roi].volume_cc == pytest.approx(contour_cc, rel=0.02), (name, roi)
        assert any(n.startswith(f"{roi}:") and "WARNING" not in n for n in notes), notes
        if name == "polygons":  # exact cross-sections: the analytic solid's volume as well
            shape = next(s for s in patient.shapes if s.name == roi)
            z, y, x = (
                np.arange(-40, 40, 0.5)[:, None, None],
                np.arange(-80, 80, 0.5)[None, :, None],
                np.arange(-100, 100, 0.5)[None, None, :],
            )
            analytic_cc = float(shape.inside(z, y, x).sum()) * 0.125 / 1000.0
            assert stats[roi].volume_cc == pytest.approx(analytic_cc, rel=0.02), roi


def test_overlap_is_kept(planned) -> None:
    case = planned[2]
    ptv = set(case.structure("PTV").voxel_indices.tolist())
    rectum = set(case.structure("Rectum").voxel_indices.tolist())
    assert ptv & rectum, "PTV and rectum overlap in the patient; the import must keep it"


def test_reported_dose_matches_the_exported_rtdose_on_the_contours(planned) -> None:
    name, patient, _, report, rtdose, rs, _ = planned
    contours = _contours(rs)
    for roi in CHECKED:
        points, _ = _samples(contours[roi], patient.grid.spacing[0])
        truth = _dose_at(rtdose, points)
        ours = {m: report.plan.metric(roi, m) for m in ("D95", "D50", "D2", "mean")}
        theirs = {"D95": _dx(truth, 95), "D50": _dx(truth, 50), "D2": _dx(truth, 2)}
        theirs["mean"] = float(truth.mean())
        for m in ours:
            tol = max(0.01 * abs(theirs[m]), 0.5)
            assert abs(ours[m] - theirs[m]) <= tol, (name, roi, m, ours[m], theirs[m])

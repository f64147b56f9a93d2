"""Patients made of analytic shapes, written as DICOM by software other than RadPilot, with the
shapes kept as functions so a test can sample any dose on them independently.

- CT: pydicom, any in-plane pixel size (non-square grids allowed) and slice spacing.
- RTSTRUCT, two ways: rt-utils from voxel masks (its contour vertices sit on boundary pixel
  centres, as many tools write them), or exact polygons of the shapes' cross-sections on every
  slice, written with pydicom (holes as nested contours, DICOM's rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.path import Path as PolyPath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

Inside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (z, y, x) mm -> bool


@dataclass
class Shape:
    name: str
    kind: str  # RTROIInterpretedType: PTV, ORGAN, EXTERNAL
    inside: Inside  # the analytic solid
    # exact cross-section at height z: a list of closed (N, 2) x/y polygons (nested = holes)
    section: Callable[[float], list[np.ndarray]]


@dataclass
class Grid:
    shape: tuple[int, int, int]  # slices, rows, columns
    spacing: tuple[float, float, float]  # slice, row (y), column (x) mm
    origin: tuple[float, float, float]  # z, y, x of the first voxel centre

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(  # type: ignore[return-value]
            self.origin[k] + self.spacing[k] * np.arange(self.shape[k]) for k in range(3)
        )


@dataclass
class Patient:
    grid: Grid
    shapes: list[Shape]
    uids: dict[str, str] = field(default_factory=dict)
    sop_uids: list[str] = field(default_factory=list)


def circle(cx: float, cy: float, r: float, n: int = 180) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 180) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + rx * np.cos(t), cy + ry * np.sin(t)])


def slab_extent(grid: Grid) -> tuple[float, float]:
    z = grid.axes()[0]
    return float(z[0] - grid.spacing[0] / 2), float(z[-1] + grid.spacing[0] / 2)


def write_ct(p: Patient, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = np.meshgrid(*p.grid.axes(), indexing="ij")
    body = next(s for s in p.shapes if s.kind == "EXTERNAL")
    hu = np.where(body.inside(z, y, x), 0.0, -1000.0)
    p.uids = {k: str(generate_uid()) for k in ("study", "series", "frame")}
    p.sop_uids = []
    for k in range(p.grid.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = str(generate_uid())
        p.sop_uids.append(ds.SOPInstanceUID)
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "PHANTOM^ANALYTIC", "ANALYTIC-1"
        ds.StudyDate, ds.StudyTime, ds.SeriesDate, ds.SeriesTime = "", "", "", ""
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDescription = "", "", ""
        ds.StudyInstanceUID = p.uids["study"]
        ds.SeriesInstanceUID = p.uids["series"]
        ds.FrameOfReferenceUID = p.uids["frame"]
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.PatientPosition = "HFS"
        oz, oy, ox = p.grid.origin
        ds.ImagePositionPatient = [ox, oy, oz + p.grid.spacing[0] * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [p.grid.spacing[1], p.grid.spacing[2]]  # row spacing (y), column (x)
        ds.SliceThickness = p.grid.spacing[0]
        ds.Rows, ds.Columns = p.grid.shape[1], p.grid.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k] + 1024).astype(np.uint16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(str(folder / f"CT{k:04d}.dcm"), enforce_file_format=True)


def write_rtstruct_rt_utils(p: Patient, folder: Path) -> None:
    """Contours traced by rt-utils from voxel masks (square pixels only: rt-utils' limit)."""
    from rt_utils import RTStructBuilder

    z, y, x = np.meshgrid(*p.grid.axes(), indexing="ij")
    rt = RTStructBuilder.create_new(dicom_series_path=str(folder))
    for s in p.shapes:
        rt.add_roi(mask=np.transpose(s.inside(z, y, x), (1, 2, 0)), name=s.name)
    rt.save(str(folder / "RS.rt-utils.dcm"))


def write_rtstruct_polygons(p: Patient, folder: Path) -> None:
    """The shapes' exact cross-sections on every CT slice, written with pydicom."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = str(generate_uid())
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID = "PHANTOM^ANALYTIC", "ANALYTIC-1"
    ds.StudyInstanceUID = p.uids["study"]
    ds.SeriesInstanceUID = str(generate_uid())
    ds.FrameOfReferenceUID = p.uids["frame"]
    ds.StructureSetLabel = "analytic"
    series = Dataset()
    series.SeriesInstanceUID = p.uids["series"]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = p.uids["study"]
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = p.uids["frame"]
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, contours, observations = Sequence(), Sequence(), Sequence()
    zs = p.grid.axes()[0]
    for number, s in enumerate(p.shapes, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, s.name
        roi.ReferencedFrameOfReferenceUID = p.uids["frame"]
        rois.append(roi)
        items = Sequence()
        for k, zk in enumerate(zs):
            for poly in s.section(float(zk)):
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                pts = np.column_stack([poly, np.full(len(poly), zk)])
                c.NumberOfContourPoints = len(pts)
                c.ContourData = [round(float(v), 4) for v in pts.ravel()]
                img = Dataset()
                img.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                img.ReferencedSOPInstanceUID = p.sop_uids[k]
                c.ContourImageSequence = Sequence([img])
                items.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = items
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = number, number
        obs.RTROIInterpretedType = s.kind
        observations.append(obs)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(str(folder / "RS.polygons.dcm"), enforce_file_format=True)


def pelvis(grid: Grid) -> Patient:
    """A body, a concave 'prostate' PTV (an ellipsoid with a posterior notch), a rectum that
    overlaps it, a bladder-like ellipsoid, and a tube (ring with a hole) for nested contours."""
    z0, z1 = slab_extent(grid)

    def within(z: np.ndarray | float, lo: float, hi: float) -> np.ndarray:
        return (np.asarray(z) >= lo) & (np.asarray(z) <= hi)

    def slab(z: float) -> bool:
        return z0 <= z <= z1

    def edge(z: float) -> float:
        """The slab edge nearest to z: a solid ending there is exactly what its contours say."""
        k = round((z - z0) / grid.spacing[0])
        return z0 + k * grid.spacing[0]

    rect_z = (edge(-30.0), edge(30.0))
    tube_z = (edge(-20.0), edge(20.0))

    def body_in(z, y, x):  # type: ignore[no-untyped-def]
        return ((x / 95.0) ** 2 + (y / 75.0) ** 2 <= 1.0) & within(z, z0, z1)

    rz = 22.0  # PTV semi-axis in z
    rect_c, rect_r = (0.0, 24.0), 9.0

    def ptv_in(z, y, x):  # type: ignore[no-untyped-def]
        ell = (x / 30.0) ** 2 + (y / 22.0) ** 2 + (z / rz) ** 2 <= 1.0
        notch = (x - rect_c[0]) ** 2 + (y - rect_c[1]) ** 2 <= (rect_r - 3.0) ** 2
        return ell & ~notch

    def rect_in(z, y, x):  # type: ignore[no-untyped-def]
        return ((x - rect_c[0]) ** 2 + (y - rect_c[1]) ** 2 <= rect_r**2) & within(z, *rect_z)

    def blad_in(z, y, x):  # type: ignore[no-untyped-def]
        return (x / 26.0) ** 2 + ((y + 18.0) / 18.0) ** 2 + ((z - 16.0) / 14.0) ** 2 <= 1.0

    def tube_in(z, y, x):  # type: ignore[no-untyped-def]
        r2 = (x - 55.0) ** 2 + (y + 5.0) ** 2
        return (r2 <= 14.0**2) & (r2 > 7.0**2) & within(z, *tube_z)

    def ptv_sec(z: float) -> list[np.ndarray]:
        if abs(z) >= rz:
            return []
        f = np.sqrt(1.0 - (z / rz) ** 2)
        ell = ellipse(0.0, 0.0, 30.0 * f, 22.0 * f, 360)
        notch = PolyPath(circle(*rect_c, rect_r - 3.0, 360))
        keep = ~notch.contains_points(ell)
        if keep.all():
            return [ell]
        # the ellipse outline with the notch's arc spliced in (a concave polygon)
        t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
        arc = np.column_stack(
            [rect_c[0] + (rect_r - 3.0) * np.cos(t), rect_c[1] + (rect_r - 3.0) * np.sin(t)]
        )
        arc = arc[PolyPath(ell).contains_points(arc)]
        pts = np.vstack([ell[keep], arc])
        ang = np.arctan2(pts[:, 1], pts[:, 0])
        return [pts[np.argsort(ang)]]

    def z_ok(z: float, lo: float, hi: float) -> bool:
        return lo <= z <= hi

    def blad_sec(z: float) -> list[np.ndarray]:
        u = 1.0 - ((z - 16.0) / 14.0) ** 2
        return [ellipse(0.0, -18.0, 26.0 * np.sqrt(u), 18.0 * np.sqrt(u), 360)] if u > 0 else []

    return Patient(
        grid,
        [
            Shape(
                "BODY",
                "EXTERNAL",
                body_in,
                lambda z: [ellipse(0, 0, 95.0, 75.0, 720)] if slab(z) else [],
            ),
            Shape("PTV", "PTV", ptv_in, ptv_sec),
            Shape(
                "Rectum",
                "ORGAN",
                rect_in,
                lambda z: [circle(*rect_c, rect_r, 360)] if z_ok(z, *rect_z) else [],
            ),
            Shape("Bladder", "ORGAN", blad_in, blad_sec),
            Shape(
                "Tube",
                "ORGAN",
                tube_in,
                lambda z: (
                    [circle(55.0, -5.0, 14.0, 360), circle(55.0, -5.0, 7.0, 360)]
                    if z_ok(z, *tube_z)
                    else []
                ),
            ),
        ],
    )

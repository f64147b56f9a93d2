"""Write a case and its dose as DICOM: RTDOSE always; the CT series and RTSTRUCT for phantoms.

RTDOSE: one multi-frame file, dose in Gy as 32-bit integers times DoseGridScaling, on the case's
dose grid, in the CT's frame of reference and study (an imported case keeps the UIDs of the CT it
came from, so the hospital's TPS lines the dose up with its own images; a phantom gets UIDs made
from its case id, the same on every export). The CT series and RTSTRUCT written for phantoms use
the same grid; contours are the 50 % iso-lines of each structure's mask, slice by slice.
Nothing patient-identifying is written: patient name and id are RadPilot's case id.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radpilot.case import DERIVED, Case, StructureKind

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RTPLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
INTERPRETED = {
    StructureKind.TARGET: "PTV",
    StructureKind.OAR: "ORGAN",
    StructureKind.EXTERNAL: "EXTERNAL",
}
MANUFACTURER = "RadPilot"
# Contours are the half-volume iso-lines of each structure's voxel fractions, so a reader that
# rasterises them finely gets the structure's volume back. A whole-voxel structure is upsampled
# in-plane first: its iso-line then follows the voxels' outer edges (corners cut by at most
# 1/(2 UPSAMPLE^2) of a voxel), and a centre-in reader gets exactly the exported voxels.
CONTOUR_LEVEL = 0.5
UPSAMPLE = 4


@dataclass(frozen=True)
class PlanExport:
    """What the RT Plan needs beyond the case: the sequenced plan (``Deliverable.to_json``),
    the prescription's target and dose, and a label."""

    delivered: dict[str, Any]
    target: str
    prescription_gy: float
    label: str


@dataclass(frozen=True)
class SeriesUIDs:
    study: str
    frame_of_reference: str
    ct_series: str

    @classmethod
    def for_case(cls, case: Case) -> SeriesUIDs:
        """The imported CT's UIDs if the case has them; otherwise stable ones from the case id."""
        d = case.metadata.get("dicom", {})
        if d.get("study_uid") and d.get("frame_of_reference_uid") and d.get("series_uid"):
            return cls(d["study_uid"], d["frame_of_reference_uid"], d["series_uid"])

        def uid(part: str) -> str:
            return str(generate_uid(entropy_srcs=[case.case_id or case.name, part]))

        return cls(uid("study"), uid("frame-of-reference"), uid("ct-series"))


def _base(ds: Dataset, sop_class: str, sop_uid: str, uids: SeriesUIDs, case: Case) -> None:
    now = _dt.datetime.now(_dt.UTC)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = case.case_id or case.name
    ds.PatientID = case.case_id or case.name
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = uids.study
    ds.StudyID = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.OperatorsName = ""
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _geometry(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World x, y, z (mm) of the grid's voxel centres along each axis."""
    (nz, ny, nx), (dz, dy, dx), (oz, oy, ox) = (
        case.grid.shape,
        case.grid.spacing_mm,
        case.grid.origin_mm,
    )
    return ox + dx * np.arange(nx), oy + dy * np.arange(ny), oz + dz * np.arange(nz)


def _image_plane(ds: Dataset, case: Case, z0: float, bits: int, signed: bool) -> None:
    """Image plane and pixel modules shared by the CT slices and the RTDOSE frames."""
    xs, ys, _ = _geometry(case)
    ds.ImagePositionPatient = [float(xs[0]), float(ys[0]), float(z0)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [float(case.grid.spacing_mm[1]), float(case.grid.spacing_mm[2])]
    ds.SliceThickness = float(case.grid.spacing_mm[0])
    ds.Rows, ds.Columns = case.grid.shape[1], case.grid.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0


def write_ct_series(case: Case, folder: Path, uids: SeriesUIDs) -> list[str]:
    """One CT image per slice of the case grid; returns the SOP instance UIDs, inferior first."""
    zs = _geometry(case)[2]
    hu = np.clip(np.round(case.ct_hu.reshape(case.grid.shape)), -1024, 3071).astype(np.int16)
    sop_uids = []
    for k, z in enumerate(zs):
        ds = Dataset()
        sop = str(generate_uid(entropy_srcs=[uids.ct_series, str(k)]))
        _base(ds, CT_STORAGE, sop, uids, case)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = uids.ct_series
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.Laterality = ""
        ds.AcquisitionNumber = ""
        _image_plane(ds, case, z, 16, signed=True)
        ds.SliceLocation = float(z)
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = ""
        ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
        _save(ds, folder / f"CT.{k + 1:04d}.dcm")  # folder: the series' own folder
        sop_uids.append(sop)
    return sop_uids


def _contours(field2d: np.ndarray, whole_voxels: bool) -> list[np.ndarray]:
    """Closed iso-lines of one slice's fractions, in (column, row) voxel coordinates."""
    import contourpy

    if not (field2d > 0).any():
        return []
    f = UPSAMPLE if whole_voxels else 1
    field = np.kron(field2d, np.ones((f, f))) if f > 1 else field2d
    padded = np.pad(field.astype(np.float64), 1)  # closed lines even at the grid's edge
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    lines: Any = gen.lines(CONTOUR_LEVEL)
    # sub-pixel i (after the pad) has its centre at voxel coordinate (i - 1 + 0.5) / f - 0.5
    return [
        (np.asarray(line, dtype=np.float64) - 0.5) / f - 0.5 for line in lines if len(line) >= 3
    ]


CONTOUR_DATA = 0x30060050
MAX_SHORT_VALUE = 0xFFFE  # a DS value's length field (explicit VR) holds at most this


def _set_contour_data(item: Dataset, points: np.ndarray) -> None:
    """``item.ContourData`` from (n, 3) points in mm, to 0.001 mm, as already-encoded decimal
    strings: pydicom builds and checks a DS object per number when given floats (3 s of the 4.7
    an RTSTRUCT of a 3 mm case took); the file holds the same text either way."""
    values = np.round(np.asarray(points, dtype=np.float64).ravel(), 3) + 0.0  # no "-0"
    text = "\\".join(f"{v:.3f}".rstrip("0").rstrip(".") for v in values.tolist()).encode()
    if len(text) % 2:
        text += b" "  # DICOM values have even length
    if len(text) > MAX_SHORT_VALUE:
        item.ContourData = [round(float(v), 3) for v in points.ravel()]
        return
    item[CONTOUR_DATA] = RawDataElement(Tag(CONTOUR_DATA), "DS", len(text), text, 0, False, True)
    # the item is already in the file's encoding (explicit VR little endian, default character
    # set), so pydicom writes it as it is instead of decoding every element to check it
    item.set_original_encoding(False, True, item._character_set)


def write_rtstruct(case: Case, folder: Path, uids: SeriesUIDs, ct_sops: list[str]) -> Path:
    xs, ys, zs = _geometry(case)
    dx, dy = case.grid.spacing_mm[2], case.grid.spacing_mm[1]
    ds = Dataset()
    _base(ds, RTSTRUCT_STORAGE, rtstruct_uid(uids), uids, case)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = str(generate_uid(entropy_srcs=[uids.ct_series, "rtstruct-series"]))
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "RadPilot"
    ds.StructureSetDate = ""
    ds.StructureSetTime = ""
    images = Sequence([Dataset() for _ in ct_sops])
    for item, sop in zip(images, ct_sops, strict=True):
        item.ReferencedSOPClassUID = CT_STORAGE
        item.ReferencedSOPInstanceUID = sop
    series = Dataset()
    series.SeriesInstanceUID = uids.ct_series
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired)
    study.ReferencedSOPInstanceUID = uids.study
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = uids.frame_of_reference
    frame.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, contours, observations = Sequence(), Sequence(), Sequence()
    exported = [s for s in case.structures if s.name not in DERIVED]
    palette = [
        (255, 0, 0),
        (0, 160, 255),
        (0, 200, 0),
        (255, 200, 0),
        (200, 0, 200),
        (0, 200, 200),
        (255, 128, 0),
        (128, 128, 255),
        (128, 255, 128),
    ]
    for number, s in enumerate(exported, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = uids.frame_of_reference
        roi.ROIName = s.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        field = np.zeros(case.grid.num_voxels, dtype=np.float32)
        field[s.voxel_indices] = 1.0 if s.weights is None else s.weights
        mask = field.reshape(case.grid.shape)
        seq = Sequence()
        for k, z in enumerate(zs):
            for line in _contours(mask[k], s.weights is None):
                item = Dataset()
                item.ContourGeometricType = "CLOSED_PLANAR"
                cols, rows = line[:, 0], line[:, 1]
                pts = np.stack([xs[0] + cols * dx, ys[0] + rows * dy, np.full(len(line), z)], 1)
                item.NumberOfContourPoints = len(pts)
                _set_contour_data(item, pts)
                img = Dataset()
                img.ReferencedSOPClassUID = CT_STORAGE
                img.ReferencedSOPInstanceUID = ct_sops[k]
                item.ContourImageSequence = Sequence([img])
                seq.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = list(palette[(number - 1) % len(palette)])
        rc.ContourSequence = seq
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = INTERPRETED[s.kind]
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    return _save(ds, folder / "RTSTRUCT.dcm")


def write_rtdose(
    case: Case,
    dose_rows: np.ndarray,
    folder: Path,
    uids: SeriesUIDs,
    description: str = "",
    rtplan_uid: str = "",
) -> Path:
    """The plan dose (Gy) on the case's grid as an RTDOSE file (referencing the RT Plan whose
    delivery it is, when there is one)."""
    zs = _geometry(case)[2]
    nz = case.grid.shape[0]
    cube = case.dose_cube(np.asarray(dose_rows)).astype(np.float64)
    # 16-bit frames (a step of max/65534: under a milligray for any prescription); dciodvfy
    # cannot read 32-bit RTDOSE pixel data
    top = float(cube.max())
    scale = top / (2**16 - 2) if top > 0 else 1.0
    pixels = np.clip(np.round(cube / scale), 0, 2**16 - 1).astype(np.uint16)
    ds = Dataset()
    _base(ds, RTDOSE_STORAGE, str(generate_uid()), uids, case)
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = str(generate_uid())
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.SeriesDescription = description[:64]
    _image_plane(ds, case, zs[0], 16, signed=False)
    ds.GridFrameOffsetVector = [float(z - zs[0]) for z in zs]
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.NumberOfFrames = nz
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = f"{scale:.10g}"
    if rtplan_uid:
        ds.ReferencedRTPlanSequence = Sequence([_ref(RTPLAN_STORAGE, rtplan_uid)])
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return _save(ds, folder / "RTDOSE.dcm")


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    d = Dataset()
    d.ReferencedSOPClassUID = sop_class
    d.ReferencedSOPInstanceUID = sop_uid
    return d


def rtstruct_uid(uids: SeriesUIDs) -> str:
    """The SOP Instance UID of the RTSTRUCT RadPilot writes for a CT series."""
    return str(generate_uid(entropy_srcs=[uids.ct_series, "rtstruct"]))


def export_dicom(
    case: Case,
    dose_rows: np.ndarray,
    folder: str | Path,
    with_images: bool,
    description: str = "",
    plan: PlanExport | None = None,
) -> dict[str, Any]:
    """RTDOSE (and, with ``with_images``, the CT series in ``CT/`` and RTSTRUCT; with ``plan``,
    the sequenced plan as RTPLAN, which the RTDOSE references) into ``folder``."""
    from radpilot.dicom.rtplan import write_rtplan  # the RT Plan writer builds on this module

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    uids = SeriesUIDs.for_case(case)
    files: list[str] = []
    struct_uid = str(case.metadata.get("dicom", {}).get("rtstruct_uid", ""))
    if with_images:
        (out / "CT").mkdir(exist_ok=True)
        sops = write_ct_series(case, out / "CT", uids)
        files += [f"CT/CT.{k + 1:04d}.dcm" for k in range(len(sops))]
        files.append(write_rtstruct(case, out, uids, sops).name)
        struct_uid = rtstruct_uid(uids)
    plan_uid = ""
    if plan is not None:
        path, plan_uid = write_rtplan(
            case,
            plan.delivered,
            out,
            uids,
            target=plan.target,
            prescription_gy=plan.prescription_gy,
            label=plan.label,
            rtstruct_uid=struct_uid,
        )
        files.append(path.name)
    files.append(write_rtdose(case, dose_rows, out, uids, description, plan_uid).name)
    return {
        "files": files,
        "study_uid": uids.study,
        "frame_of_reference_uid": uids.frame_of_reference,
        "ct_series_uid": uids.ct_series,
    }

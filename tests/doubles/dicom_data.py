"""A small patient written by other software than RadPilot: the CT series with pydicom, the
RTSTRUCT with rt-utils, and identifiers everywhere a real export has them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

IDENTIFIERS = {
    "PatientName": "DOE^JANE^Q",
    "PatientID": "MRN-7731-QX",
    "PatientBirthDate": "19570304",
    "StudyDate": "20260311",
    "StudyTime": "101512",
    "StudyID": "S-4471",
    "SeriesDate": "20260311",
    "StudyDescription": "PELVIS IMRT PLANNING DR HOUSTON",
    "InstitutionName": "Saint Elsewhere Hospital",
    "ReferringPhysicianName": "HOUSTON^GREGORY",
    "AccessionNumber": "ACC-99812",
    "OperatorsName": "TECH^MARGOT",
    "ImageComments": "patient anxious, claustrophobic",
}
NEEDLES = ["DOE", "JANE", "MRN-7731", "19570304", "20260311", "HOUSTON", "Elsewhere", "S-4471",
           "ACC-99812", "MARGOT", "claustrophobic"]  # fmt: skip

SHAPE = (24, 48, 48)  # z, y, x
SPACING = 4.0
ORIGIN = (-46.0, -94.0, -94.0)  # z, y, x of the first voxel centre


def axes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = ORIGIN[0] + SPACING * np.arange(SHAPE[0])
    y = ORIGIN[1] + SPACING * np.arange(SHAPE[1])
    x = ORIGIN[2] + SPACING * np.arange(SHAPE[2])
    return np.meshgrid(z, y, x, indexing="ij")


def masks() -> dict[str, np.ndarray]:
    z, y, x = axes()
    body = (x / 85.0) ** 2 + (y / 70.0) ** 2 <= 1.0
    ptv = (x**2 + (y + 10.0) ** 2 + z**2) <= 22.0**2
    cord = ((x**2 + (y - 40.0) ** 2) <= 7.0**2) & (np.abs(z) <= 40.0)
    return {"BODY": body, "PTV": ptv, "Spinal_Cord": cord}


def write_ct(folder: Path, uid_prefix_seed: str = "ct") -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    m = masks()
    hu = np.where(m["BODY"], 20.0, -1000.0)
    _, y, x = axes()
    hu = np.where(((x**2 + (y - 40.0) ** 2) <= 12.0**2) & ~m["Spinal_Cord"] & m["BODY"], 700.0, hu)
    uids = {
        "study": str(generate_uid()),
        "series": str(generate_uid()),
        "frame": str(generate_uid()),
    }
    for k in range(SHAPE[0]):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = str(generate_uid())
        for key, value in IDENTIFIERS.items():
            setattr(ds, key, value)
        ds.Modality = "CT"
        ds.StudyInstanceUID = uids["study"]
        ds.SeriesInstanceUID = uids["series"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.SeriesNumber = 4
        ds.InstanceNumber = SHAPE[0] - k  # written superior first, as some scanners do
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [ORIGIN[2], ORIGIN[1], ORIGIN[0] + SPACING * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING, SPACING]
        ds.SliceThickness = SPACING
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = (hu[k] + 1024).astype(np.uint16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(str(folder / f"IMG{k:04d}"), enforce_file_format=True)  # no extension
    return uids


def write_patient(folder: Path) -> dict[str, str]:
    """CT (pydicom) and RTSTRUCT (rt-utils) in ``folder``; returns the CT's UIDs."""
    from rt_utils import RTStructBuilder

    uids = write_ct(folder)
    rt = RTStructBuilder.create_new(dicom_series_path=str(folder))
    for name, mask in masks().items():
        rt.add_roi(mask=np.transpose(mask, (1, 2, 0)), name=name)  # rt-utils: rows, cols, slices
    rt.save(str(folder / "structures.dcm"))
    return uids


def edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(str(path))


# a protocol for write_patient's patient: its ROI names, beams and a coarse grid
FOREIGN_PROTOCOL = """
name: foreign-test
prescription: {target: PTV, dose_gy: 60.0}
intent: Treat the PTV, spare the cord.
goals:
  - {structure: PTV, metric: D95, comparator: ">=", limit: 60}
  - {structure: Cord, metric: max, comparator: "<=", limit: 45}
objectives:
  - {structure: PTV, kind: squared_deviation, dose_gy: 60, weight: 100}
  - {structure: Cord, kind: squared_overdose, dose_gy: 30, weight: 20}
  - {structure: NormalTissue, kind: squared_overdose, dose_gy: 30, weight: 5}
structures:
  Spinal_Cord: {name: Cord}
beams: {gantry_deg: [0, 72, 144, 216, 288], bixel_mm: 8, dose_grid_mm: 8}
"""

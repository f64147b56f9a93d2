"""How the DICOM writer encodes what pydicom would otherwise build value by value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radpilot.dicom.write import CONTOUR_DATA, MAX_SHORT_VALUE, _set_contour_data


def _written(items: list[Dataset], path: Path) -> list[Dataset]:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.481.3", generate_uid()
    ds.ROIContourSequence = Sequence([Dataset()])
    ds.ROIContourSequence[0].ContourSequence = Sequence(items)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return list(pydicom.dcmread(path).ROIContourSequence[0].ContourSequence)


def test_contour_data_reads_back_to_the_micrometre(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = rng.uniform(-300, 300, (500, 3))
    points[0] = (-0.0001, 1e-9, -0.0)  # rounds to zero: written "0", never "-0"
    small = Dataset()
    small.ContourGeometricType = "CLOSED_PLANAR"
    _set_contour_data(small, points)
    assert small.get_item(CONTOUR_DATA).is_raw  # encoded once, not a DS object per number
    # a contour too long for one DS value's length field goes the ordinary (pydicom's) way
    long = Dataset()
    _set_contour_data(long, rng.uniform(-300, 300, (MAX_SHORT_VALUE // 10, 3)))
    assert not long.get_item(CONTOUR_DATA).is_raw
    (back_small,) = _written([small], tmp_path / "rs.dcm")
    values = np.asarray(back_small.ContourData, dtype=float)
    assert np.allclose(values, np.round(points.ravel(), 3), atol=5e-10)
    assert (
        str(back_small.ContourData[0]) == "0" and back_small.ContourGeometricType == "CLOSED_PLANAR"
    )

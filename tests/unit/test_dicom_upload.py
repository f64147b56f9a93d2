"""Unpacking an uploaded zip: limits checked on the declared sizes before anything is written,
and on the bytes actually inflated; members named in errors; never a path from the archive."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest

from radpilot.dicom.upload import UploadLimits, unpack_zip
from radpilot.errors import DicomImportError


def _zip(members: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    buf.seek(0)
    return buf


def test_members_are_streamed_to_numbered_files_named_after_their_base(tmp_path: Path) -> None:
    n = unpack_zip(_zip({"../../etc/CT1.dcm": b"a" * 10, "dir/RS.dcm": b"b"}), tmp_path)
    assert n == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f000000_CT1.dcm", "f000001_RS.dcm"]


def test_a_zip_declaring_more_than_the_limits_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    bomb = _zip({"CT1.dcm": bytes(3 << 20), "CT2.dcm": bytes(3 << 20)})  # ~6 KiB compressed
    with pytest.raises(DicomImportError, match=r"declares 6 MiB unpacked; at most 4 MiB"):
        unpack_zip(bomb, tmp_path, UploadLimits(total_bytes=4 << 20, file_bytes=8 << 20))
    assert not any(tmp_path.iterdir())
    bomb.seek(0)
    with pytest.raises(DicomImportError, match=r"zip member 1 \(CT1.dcm\) declares 3 MiB"):
        unpack_zip(bomb, tmp_path, UploadLimits(total_bytes=64 << 20, file_bytes=1 << 20))
    assert not any(tmp_path.iterdir())


def test_a_zip_that_lies_about_its_sizes_is_stopped_on_the_actual_bytes(tmp_path: Path) -> None:
    data = bytearray(_zip({"CT1.dcm": bytes(2 << 20)}).getvalue())
    # rewrite the declared (uncompressed) size in the central directory to 10 bytes
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = struct.pack("<I", 10)
    with pytest.raises(DicomImportError, match=r"zip member 1 \(CT1.dcm\)"):
        unpack_zip(io.BytesIO(bytes(data)), tmp_path)
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert written <= 10


def test_not_a_zip_and_too_many_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DicomImportError, match="not a zip"):
        unpack_zip(io.BytesIO(b"PK but not really"), tmp_path)
    many = _zip({f"CT{k}.dcm": b"x" for k in range(6)})
    with pytest.raises(DicomImportError, match="holds 6 files; at most 5"):
        unpack_zip(many, tmp_path, UploadLimits(files=5))


def test_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADPILOT_UPLOAD_MAX_UNPACKED_MB", "100")
    monkeypatch.setenv("RADPILOT_UPLOAD_MAX_FILE_MB", "2")
    assert UploadLimits.from_env() == UploadLimits(100 << 20, 2 << 20)
    monkeypatch.setenv("RADPILOT_UPLOAD_MAX_FILE_MB", "lots")
    with pytest.raises(ValueError, match="RADPILOT_UPLOAD_MAX_FILE_MB"):
        UploadLimits.from_env()

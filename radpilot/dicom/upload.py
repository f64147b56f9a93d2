"""Unpack an uploaded zip of DICOM files safely: declared sizes checked before anything is
written, members streamed to disk with the limits enforced on the bytes actually inflated (a zip
can lie about its sizes), a bounded file count, and no names from inside the archive used as
paths."""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from radpilot.dicom.read import MAX_FILES, DicomImportError

COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadLimits:
    total_bytes: int = 4 << 30  # everything unpacked
    file_bytes: int = 256 << 20  # one member (a CT slice is ~0.5 MiB; an RTSTRUCT tens of MiB)
    files: int = MAX_FILES

    @classmethod
    def from_env(cls) -> UploadLimits:
        """RADPILOT_UPLOAD_MAX_UNPACKED_MB / RADPILOT_UPLOAD_MAX_FILE_MB override the defaults."""
        d = cls()

        def mb(name: str, default: int) -> int:
            raw = os.environ.get(name, "")
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name} must be a whole number of MiB, got {raw!r}") from None
            if value < 1:
                raise ValueError(f"{name} must be at least 1 MiB")
            return value << 20

        return cls(
            mb("RADPILOT_UPLOAD_MAX_UNPACKED_MB", d.total_bytes),
            mb("RADPILOT_UPLOAD_MAX_FILE_MB", d.file_bytes),
        )


def _base(name: str) -> str:
    """The printable part of a member's base name (never a path)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit("/", 1)[-1])[:64].lstrip(".")


def _label(k: int, name: str) -> str:
    """How an error names a member: its number and base name."""
    base = _base(name)
    return f"zip member {k + 1} ({base})" if base else f"zip member {k + 1}"


def unpack_zip(data: IO[bytes], folder: Path, limits: UploadLimits | None = None) -> int:
    """Extract every regular file into ``folder`` (numbered, with the member's base name so
    errors can name it); returns the file count.
    Raises DicomImportError, having written at most the limits; the caller removes ``folder``."""
    limits = limits or UploadLimits.from_env()
    try:
        z = zipfile.ZipFile(data)
    except (zipfile.BadZipFile, OSError):
        raise DicomImportError(
            "the upload is not a zip file: zip the folder with the CT series and RTSTRUCT"
        ) from None
    with z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        if len(infos) > limits.files:
            raise DicomImportError(f"the zip holds {len(infos)} files; at most {limits.files}")
        for k, info in enumerate(infos):
            if info.file_size > limits.file_bytes:
                raise DicomImportError(
                    f"{_label(k, info.filename)} declares {info.file_size >> 20} MiB; one file "
                    f"may be at most {limits.file_bytes >> 20} MiB"
                )
        declared = sum(i.file_size for i in infos)
        if declared > limits.total_bytes:
            raise DicomImportError(
                f"the zip declares {declared >> 20} MiB unpacked; at most "
                f"{limits.total_bytes >> 20} MiB (RADPILOT_UPLOAD_MAX_UNPACKED_MB)"
            )
        total = 0
        for k, info in enumerate(infos):
            # the sizes were declared by the sender: count what actually comes out
            allowed = min(info.file_size, limits.file_bytes)
            written = 0
            try:
                with (
                    z.open(info) as src,
                    open(folder / f"f{k:06d}_{_base(info.filename)}", "wb") as dst,
                ):
                    while chunk := src.read(COPY_CHUNK):
                        written += len(chunk)
                        total += len(chunk)
                        if written > allowed or total > limits.total_bytes:
                            raise DicomImportError(
                                f"{_label(k, info.filename)} inflates beyond its declared "
                                f"{info.file_size} bytes or the upload limits: refused"
                            )
                        dst.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
                raise DicomImportError(
                    f"{_label(k, info.filename)} cannot be unpacked ({type(e).__name__}: {e}); "
                    "zip the files again (deflate or stored, no encryption)"
                ) from None
            except RuntimeError as e:  # an encrypted member
                raise DicomImportError(
                    f"{_label(k, info.filename)} cannot be unpacked: {e}; send it unencrypted"
                ) from None
    return len(infos)

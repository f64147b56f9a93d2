"""Unpack an uploaded zip of DICOM files safely (sizes, file count, no paths outside the folder)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

from radpilot.dicom.read import MAX_FILES, DicomImportError

MAX_UNPACKED_BYTES = 8 << 30


def unpack_zip(data: IO[bytes], folder: Path) -> int:
    """Extract every regular file into ``folder`` (flattened names); returns the file count."""
    try:
        z = zipfile.ZipFile(data)
    except zipfile.BadZipFile:
        raise DicomImportError(
            "the upload is not a zip file: zip the folder with the CT series and RTSTRUCT"
        ) from None
    with z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        if len(infos) > MAX_FILES:
            raise DicomImportError(f"the zip holds {len(infos)} files; at most {MAX_FILES}")
        total = sum(i.file_size for i in infos)
        if total > MAX_UNPACKED_BYTES:
            raise DicomImportError(
                f"the zip unpacks to {total >> 20} MiB; at most {MAX_UNPACKED_BYTES >> 20} MiB"
            )
        for k, info in enumerate(infos):
            # never trust names inside the archive: number the files instead
            with z.open(info) as src, open(folder / f"f{k:06d}.dcm", "wb") as dst:
                dst.write(src.read())
    return len(infos)

"""Storage faults as domain errors: a full or read-only case store or job database says what is
wrong and what to do, instead of an OSError or sqlite3 error surfacing as INTERNAL."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from radpilot.errors import StorageFullError, StorageReadOnlyError, UnavailableError

FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def translate(exc: BaseException, what: str) -> BaseException | None:
    """The domain error for a storage fault in ``what`` (e.g. "the case store at /data"), or
    None when ``exc`` is not one."""
    # numpy reports a short write (a full disk) as an OSError without an errno
    short_write = isinstance(exc, OSError) and exc.errno is None and "written" in str(exc)
    if isinstance(exc, OSError) and (exc.errno in FULL or short_write):
        return StorageFullError(
            f"{what} is full ({exc.strerror or exc}): free space or enlarge the volume, then "
            "retry; nothing was stored"
        )
    if isinstance(exc, OSError) and exc.errno in READ_ONLY:
        return StorageReadOnlyError(
            f"{what} cannot be written ({exc.strerror}): mount it read-write for this service's "
            "user, then retry; nothing was stored"
        )
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "full" in text:
            return StorageFullError(
                f"{what} is full ({exc}): free space or enlarge the volume, then retry; "
                "nothing was stored"
            )
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return StorageReadOnlyError(
                f"{what} cannot be written ({exc}): mount it read-write for this service's "
                "user, then retry; nothing was stored"
            )
        if "locked" in text or "busy" in text:
            return UnavailableError(f"{what} is busy ({exc}): retry in a moment")
    return None


@contextmanager
def storage_faults(what: str) -> Iterator[None]:
    """Re-raise storage faults in the block as StorageFullError / StorageReadOnlyError."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as exc:
        domain = translate(exc, what)
        if domain is None:
            raise
        raise domain from exc

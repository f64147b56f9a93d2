"""Arrays on the wire: ``radpilot.v1.NDArray`` <-> NumPy, with one shared size limit.

Large artefacts (dose influence matrices, dose grids, CT) never travel this way: they stay in the
case store and messages carry references. What does travel (fluence, small vectors) is checked
here: known dtype, shape matching the byte count, and at most ``MAX_ARRAY_BYTES``.
"""

from __future__ import annotations

import os

import numpy as np

from radpilot.errors import WireError
from radpilot.v1 import types_pb2

# One limit for every service; gRPC's own message limit is set a little above it.
MAX_ARRAY_BYTES = int(os.environ.get("RADPILOT_MAX_ARRAY_BYTES", str(16 * 1024 * 1024)))
DTYPES = ("float32", "float64", "int32", "int64", "uint8", "bool")


def to_ndarray(array: np.ndarray, limit: int = MAX_ARRAY_BYTES) -> types_pb2.NDArray:
    a = np.ascontiguousarray(array)
    if a.dtype.name not in DTYPES:
        raise WireError(f"dtype {a.dtype.name} cannot travel; use one of {', '.join(DTYPES)}")
    if a.nbytes > limit:
        raise WireError(
            f"array of {a.nbytes} bytes exceeds the {limit}-byte limit; "
            "keep it in the case store and send a reference"
        )
    return types_pb2.NDArray(
        dtype=a.dtype.name, shape=list(a.shape), data=a.astype(a.dtype.newbyteorder("<")).tobytes()
    )


def from_ndarray(msg: types_pb2.NDArray, limit: int = MAX_ARRAY_BYTES) -> np.ndarray:
    if msg.dtype not in DTYPES:
        raise WireError(f"array dtype {msg.dtype!r} is not one of {', '.join(DTYPES)}")
    if len(msg.data) > limit:
        raise WireError(f"array of {len(msg.data)} bytes exceeds the {limit}-byte limit")
    if any(d < 0 for d in msg.shape):
        raise WireError(f"array shape {list(msg.shape)} has a negative dimension")
    dtype = np.dtype(msg.dtype).newbyteorder("<")
    expected = int(np.prod(msg.shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(msg.data):
        raise WireError(
            f"array of shape {list(msg.shape)} and dtype {msg.dtype} needs {expected} bytes, "
            f"got {len(msg.data)}"
        )
    return np.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape)).astype(msg.dtype)

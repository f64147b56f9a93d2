"""The generated API imports, and arrays cross the wire intact or are refused clearly."""

from __future__ import annotations

import numpy as np
import pytest

from radpilot.v1 import optimizer_pb2, orchestrator_pb2, types_pb2
from radpilot.wire import WireError, from_ndarray, to_ndarray


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "bool"])
def test_round_trip(dtype: str) -> None:
    a = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    msg = optimizer_pb2.OptimizeRequest(case_id="c", warm_start=to_ndarray(a))
    back = from_ndarray(
        optimizer_pb2.OptimizeRequest.FromString(msg.SerializeToString()).warm_start
    )
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_limits_and_malformed_arrays() -> None:
    with pytest.raises(WireError, match="limit"):
        to_ndarray(np.zeros(100, dtype=np.float64), limit=100)
    with pytest.raises(WireError, match="cannot travel"):
        to_ndarray(np.zeros(3, dtype=np.complex64))
    with pytest.raises(WireError, match="needs 12 bytes"):
        from_ndarray(types_pb2.NDArray(dtype="float32", shape=[3], data=b"\0" * 8))
    with pytest.raises(WireError, match="not one of"):
        from_ndarray(types_pb2.NDArray(dtype="object", shape=[1], data=b"\0"))
    with pytest.raises(WireError, match="limit"):
        from_ndarray(types_pb2.NDArray(dtype="uint8", shape=[10], data=b"\0" * 10), limit=5)


def test_enums_have_unspecified_zero() -> None:
    assert orchestrator_pb2.JobState.Name(0) == "JOB_STATE_UNSPECIFIED"
    assert types_pb2.Comparator.Name(0) == "COMPARATOR_UNSPECIFIED"

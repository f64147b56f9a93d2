"""The optimizer service over real gRPC (loopback sockets): results, health, errors, shutdown."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.v1 import optimizer_pb2, optimizer_pb2_grpc, types_pb2
from radpilot.wire import from_ndarray, to_ndarray
from services.launcher import port_in
from services.optimizer.config import OptimizerConfig
from services.optimizer.server import SERVICE_NAME, serve
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
TERMS = [
    types_pb2.ObjectiveTerm(structure="PTV", kind="squared_deviation", dose_gy=50, weight=100),
    types_pb2.ObjectiveTerm(structure="Core", kind="squared_overdose", dose_gy=8, weight=60),
    types_pb2.ObjectiveTerm(
        structure="NormalTissue", kind="squared_overdose", dose_gy=25, weight=5
    ),
]


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[optimizer_pb2_grpc.OptimizerServiceStub, grpc.Channel, CaseStore, str]]:
    store = CaseStore(tmp_path_factory.mktemp("svc-store"))
    case = load_builtin("analytic-cshape", store, spacing_mm=8.0)
    running = serve(
        OptimizerConfig(address="127.0.0.1:0", case_store=str(store.root), replica="r1")
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield optimizer_pb2_grpc.OptimizerServiceStub(channel), channel, store, case.case_id
    finally:
        channel.close()
        running.stop(1.0)


def test_health_is_serving(service) -> None:
    _, channel, _, _ = service
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_prepare_and_optimize(service) -> None:
    stub, _, store, case_id = service
    prep = stub.PrepareCase(optimizer_pb2.PrepareCaseRequest(case_id=case_id), timeout=30)
    assert prep.beamlets > 0 and prep.nnz > 0 and prep.backend == "numpy"
    assert (
        stub.PrepareCase(optimizer_pb2.PrepareCaseRequest(case_id=case_id), timeout=30).case_id
        == case_id
    )
    resp = stub.Optimize(
        optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=TERMS), timeout=60
    )
    assert resp.replica == "r1" and resp.stats.iterations > 0 and resp.stats.backend == "numpy"
    assert 0 < resp.stats.working_set_rows <= prep.rows  # the CPU solve's working set, reported
    fluence = from_ndarray(resp.fluence)
    assert fluence.shape == (prep.beamlets,) and np.all(fluence >= 0)
    dose = store.get_artefact(resp.dose.path, resp.dose.sha256)
    assert dose.shape == (prep.rows,)
    # a warm start from the returned plan, with one weight doubled, needs fewer products
    changed = [
        types_pb2.ObjectiveTerm(
            structure=t.structure,
            kind=t.kind,
            dose_gy=t.dose_gy,
            weight=t.weight * (2 if t.structure == "Core" else 1),
        )
        for t in TERMS
    ]
    cold = stub.Optimize(
        optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=changed), timeout=60
    )
    warm = stub.Optimize(
        optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=changed, warm_start=resp.fluence),
        timeout=60,
    )
    assert warm.stats.objective <= cold.stats.objective * 1.002
    assert warm.stats.sparse_products < cold.stats.sparse_products
    # a kind with a parameter crosses the wire and acts: "at most 10 % of Core above 6 Gy"
    dvh = types_pb2.ObjectiveTerm(
        structure="Core", kind="max_dvh", dose_gy=6.0, weight=500.0, parameter=10.0
    )
    with_dvh = stub.Optimize(
        optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=[*TERMS, dvh]), timeout=60
    )
    case = load_builtin("analytic-cshape", store, spacing_mm=8.0)  # the stored one
    core = case.rows_of("Core")
    before = store.get_artefact(resp.dose.path, resp.dose.sha256)[core]
    after = store.get_artefact(with_dvh.dose.path, with_dvh.dose.sha256)[core]
    assert np.percentile(after, 90) < np.percentile(before, 90) - 1.0


RING = types_pb2.HelperStructure(name="PTV_ring", kind="ring", of="PTV", inner_mm=8, outer_mm=24)


def test_a_term_on_a_helper_travels_with_its_definition_and_acts(service) -> None:
    stub, _, store, case_id = service
    ring_term = types_pb2.ObjectiveTerm(
        structure="PTV_ring", kind="squared_overdose", dose_gy=20, weight=50
    )
    plain = stub.Optimize(optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=TERMS), 60)
    ringed = stub.Optimize(
        optimizer_pb2.OptimizeRequest(
            case_id=case_id, objectives=[*TERMS, ring_term], helpers=[RING]
        ),
        timeout=60,
    )
    case = load_builtin("analytic-cshape", store, spacing_mm=8.0)
    helpers = list((store.path(case_id) / "helpers").iterdir())
    assert len(helpers) == 1  # built once on the replica and kept with the case
    with np.load(helpers[0]) as z:
        rows = np.searchsorted(case.row_voxels, z["voxels"])
    before = store.get_artefact(plain.dose.path)[rows]
    after = store.get_artefact(ringed.dose.path)[rows]
    assert after.mean() < before.mean() - 2.0
    # the definition does not carry over to a request without it
    code, details = _code(
        stub.Optimize,
        optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=[*TERMS, ring_term]),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "PTV_ring" in details


def _code(fn, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=30)
    return info.value.code(), info.value.details()


def test_bad_input_gets_the_right_status(service) -> None:
    stub, _, _, case_id = service
    bad = types_pb2.ObjectiveTerm
    cases = [
        (
            optimizer_pb2.OptimizeRequest(case_id="nope", objectives=TERMS),
            grpc.StatusCode.NOT_FOUND,
            "not in the store",
        ),
        (
            optimizer_pb2.OptimizeRequest(case_id="", objectives=TERMS),
            grpc.StatusCode.INVALID_ARGUMENT,
            "case_id is empty",
        ),
        (
            optimizer_pb2.OptimizeRequest(case_id=case_id),
            grpc.StatusCode.INVALID_ARGUMENT,
            "objectives is empty",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=[bad(structure="PTV", kind="magic", dose_gy=50, weight=1)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown objective kind",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=[
                    bad(structure="PTV", kind="squared_deviation", dose_gy=50, weight=math.nan)
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "finite",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=[bad(structure="Rectum", kind="squared_overdose", dose_gy=50, weight=1)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Rectum",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=TERMS,
                warm_start=to_ndarray(np.ones(3, dtype=np.float32)),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "warm-start",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=TERMS,
                warm_start=types_pb2.NDArray(dtype="float32", shape=[4], data=b"12"),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 16 bytes",
        ),
        (
            optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=TERMS, max_iterations=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_iterations",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=[*TERMS, bad(structure="Core", kind="max_dvh", dose_gy=10, weight=1)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs a parameter: volume_pct",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=[
                    *TERMS,
                    bad(structure="Core", kind="geud", dose_gy=10, weight=1, parameter=0.5),
                ],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "a must be >= 1",
        ),
    ]
    helper = types_pb2.HelperStructure
    cases += [
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=TERMS,
                helpers=[helper(name="r", kind="ring", of="PTV", inner_mm=9, outer_mm=3)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outer_mm (3) must exceed inner_mm (9)",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=TERMS,
                helpers=[helper(name="m", kind="minus", of="Rectum", subtract="PTV")],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "built from ['Rectum']",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=TERMS,
                helpers=[helper(name="Core", kind="ring", of="PTV", outer_mm=10)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "name of a structure",
        ),
        (
            optimizer_pb2.OptimizeRequest(
                case_id=case_id,
                objectives=TERMS,
                helpers=[helper(name="far", kind="ring", of="PTV", inner_mm=95, outer_mm=100)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty on the dose grid",
        ),
    ]
    for request, code, text in cases:
        got, details = _code(stub.Optimize, request)
        assert got == code, (request, details)
        assert text in details
    got, details = _code(stub.PrepareCase, optimizer_pb2.PrepareCaseRequest(case_id="../etc"))
    assert got == grpc.StatusCode.NOT_FOUND


def test_process_serves_then_drains_on_sigterm(tmp_path) -> None:
    env = {**os.environ, "RADPILOT_CASE_STORE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.optimizer", "--address", "127.0.0.1:0", "--grace-s", "2"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            port = port_in(line)
        assert port, "the optimizer did not report its port"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(), timeout=5)
                .status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sequence_over_grpc(service) -> None:
    """Sequence: segments and MU back as JSON, the deliverable dose in the store, normalised
    like the plan; bad settings and an MLC that cannot deliver the beamlet grid are refused."""
    stub, _, store, case_id = service
    plan = stub.Optimize(
        optimizer_pb2.OptimizeRequest(case_id=case_id, objectives=TERMS), timeout=60
    )

    def sequence(**fields) -> optimizer_pb2.SequenceResponse:
        request = optimizer_pb2.SequenceRequest(
            case_id=case_id,
            fluence=plan.fluence,
            normalize_to="PTV",
            prescription_gy=50.0,
            fractions=25,
            refit=True,
            **fields,
        )
        return stub.Sequence(request, timeout=120)

    seq = sequence(levels=10, min_segment_mu=2.0)
    delivered = json.loads(seq.plan_json)
    s = delivered["summary"]
    assert s["fractions"] == 25 and s["mlc"]["name"] == "uniform-5mm"
    assert len(delivered["beams"]) == len(s["segments_per_beam"]) and s["total_mu"] > 0
    assert all(seg["mu"] > 0 for b in delivered["beams"] for seg in b["segments"])
    dose = store.get_artefact(seq.dose.path, seq.dose.sha256)
    case = load_builtin("analytic-cshape", store, spacing_mm=8.0)
    ptv = dose[case.rows_of("PTV")]
    assert abs(np.percentile(ptv, 5) - 50.0) < 0.5  # D95 = 50 Gy, as the plan
    assert from_ndarray(seq.fluence).shape == from_ndarray(plan.fluence).shape
    # the leaves are moved after the weight fit unless the request keeps them
    assert s["settings"]["apertures"] and s["apertures"]["moved_tips"] > 0
    kept = sequence(keep_leaves=True)
    fit_alone = json.loads(kept.plan_json)["summary"]
    assert not fit_alone["settings"]["apertures"] and "apertures" not in fit_alone
    bad = [
        (dict(mlc="nope"), "unknown MLC model 'nope'"),
        (dict(mlc="mlc60-5-10mm"), "no leaf boundary"),
        (dict(levels=300), "levels must be within"),
        (dict(fractions=-1), "fractions must be positive"),
    ]
    for fields, message in bad:
        request = optimizer_pb2.SequenceRequest(case_id=case_id, fluence=plan.fluence, **fields)
        with pytest.raises(grpc.RpcError) as exc:
            stub.Sequence(request, timeout=60)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert message in exc.value.details(), exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Sequence(optimizer_pb2.SequenceRequest(case_id=case_id), timeout=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fluence is missing" in exc.value.details()

"""Storage faults over real gRPC: a full case store (a small tmpfs), a full job database, and a
read-only case store (a read-only bind mount). Each answers with a clean status that says what to
do, and leaves no half-written case, artefact or job. Needs root and mount(8); skipped otherwise."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from radpilot.v1 import orchestrator_pb2 as pb
from tests.services.test_orchestrator import HARDER, Cluster, _wait

CASE = pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "8"})


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    _mount(*args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@pytest.fixture(scope="module", autouse=True)
def can_mount(tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("storage-fault tests mount a tmpfs and a read-only bind: they need root")
    probe = tmp_path_factory.mktemp("probe")
    try:
        with mounted(probe, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
            pass
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"mount is not permitted here ({exc}): storage-fault tests skipped")


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_a_full_case_store_refuses_a_case_cleanly(tmp_path: Path) -> None:
    with mounted(tmp_path / "store", "-t", "tmpfs", "-o", "size=2m", "tmpfs"):
        c = Cluster(tmp_path, job_db=str(tmp_path / "jobs.sqlite"))
        try:
            with pytest.raises(grpc.RpcError) as info:
                c.stub.CreateCase(iter([CASE]), timeout=120)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "case store" in info.value.details() and "is full" in info.value.details()
            store = tmp_path / "store"
            assert not any((store / "cases").iterdir())  # no half-written case
            assert not _files(store / "tmp")  # nor its work files
            # the services still answer
            with pytest.raises(grpc.RpcError) as info:
                c.stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id="nope"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            c.close()


def test_a_full_job_database_refuses_a_job_and_loses_nothing(tmp_path: Path) -> None:
    with mounted(tmp_path / "db", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as db:
        c = Cluster(tmp_path, job_db=str(db / "jobs.sqlite"))
        try:
            case_id = c.stub.CreateCase(iter([CASE]), timeout=120).case_id
            start = pb.StartPlanningRequest(case_id=case_id, protocol_yaml=HARDER, max_iterations=1)
            first = c.stub.StartPlanning(start, timeout=30).job_id
            assert _wait(c.stub, first).state == pb.JOB_STATE_SUCCEEDED
            filler = db / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the volume to the last byte
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            big = HARDER + "# " + "x" * 200_000 + "\n"  # a request that needs new pages
            with pytest.raises(grpc.RpcError) as info:
                c.stub.StartPlanning(
                    pb.StartPlanningRequest(case_id=case_id, protocol_yaml=big, max_iterations=1),
                    timeout=30,
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert "job database" in info.value.details()
            filler.unlink()
            # space back: the old job is intact, and new jobs run
            again = c.stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=first), timeout=10)
            assert again.state == pb.JOB_STATE_SUCCEEDED and len(again.iterations) == 1
            assert c.orch.core.jobs.job_count() == 1  # the refused job left nothing behind
            second = c.stub.StartPlanning(start, timeout=30).job_id
            assert _wait(c.stub, second).state == pb.JOB_STATE_SUCCEEDED
        finally:
            c.close()


def test_a_read_only_case_store_says_so_and_keeps_serving_reads(tmp_path: Path) -> None:
    c = Cluster(tmp_path, job_db=str(tmp_path / "jobs.sqlite"))
    store = tmp_path / "store"
    try:
        case_id = c.stub.CreateCase(iter([CASE]), timeout=120).case_id
        before = sorted(_files(store))
        with mounted(store, "--bind", "-o", "ro", str(store)):
            other = pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "10"})
            with pytest.raises(grpc.RpcError) as info:
                c.stub.CreateCase(iter([other]), timeout=120)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "cannot be written" in info.value.details()
            start = pb.StartPlanningRequest(case_id=case_id, protocol_yaml=HARDER, max_iterations=1)
            job = _wait(c.stub, c.stub.StartPlanning(start, timeout=30).job_id)
            assert job.state == pb.JOB_STATE_FAILED
            assert "cannot be written" in job.error and "read-write" in job.error
        assert sorted(_files(store)) == before  # nothing half-written
    finally:
        c.close()

"""The planning client (``radpilot plan --orchestrator`` / ``--local``): start a job, show its
progress live, and unpack its exported report."""

from __future__ import annotations

import io
import json
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import grpc

from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc, types_pb2
from services.common.auth import BearerToken
from services.common.server import MAX_MESSAGE_BYTES
from services.common.tls import TlsConfig, open_plain_or_tls


def orchestrator_channel(address: str, tls: TlsConfig | None = None) -> grpc.Channel:
    """A channel to the orchestrator's public API: TLS when RADPILOT_TLS_CA (and, for a client
    certificate, RADPILOT_TLS_CERT/KEY) are set, plaintext otherwise."""
    tls = TlsConfig.from_env(public=True) if tls is None else tls
    return open_plain_or_tls(address, tls, [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])


def orchestrator_stub(
    channel: grpc.Channel, token: str
) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(
        grpc.intercept_channel(channel, BearerToken(token))
    )


def progress_line(iteration: int, fmo: Any, replica: str, goals: list[str]) -> str:
    """One row of the live progress table: the FMO's time, iterations and whether it converged
    (a stop at its iteration limit says so, with the reason, on a line of its own)."""
    if fmo is None:
        head = f"{iteration:>3} {'-':>6} {'-':>6} {'-':>4}"
    else:
        conv = "yes" if fmo.converged else "NO"
        head = f"{iteration:>3} {fmo.seconds:6.2f} {fmo.iterations:>6} {conv:>4}"
    line = f"{head} {replica:>12}  " + "; ".join(goals)
    if fmo is not None and not fmo.converged:
        line += f"\n    FMO did not converge: {fmo.stop_reason} after {fmo.iterations} iterations"
    return line


def _goal_text(g: types_pb2.GoalResult) -> str:
    mark = "ok" if g.passed else "MISS"
    return f"{g.goal.structure} {g.goal.metric} {g.achieved:.2f} ({mark})"


CHUNK = 1 << 20


def zip_folder(folder: str | Path) -> IO[bytes]:
    """A folder of DICOM files as a zip in a temporary file (not in memory), rewound."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--dicom {folder}: not a folder (give the folder of the CT series)")
    out = tempfile.TemporaryFile(prefix="radpilot-upload-")  # noqa: SIM115 (the caller closes it)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(root).as_posix())
    out.seek(0)
    return out


def upload_messages(zipped: IO[bytes], protocol_yaml: str) -> Iterator[pb.CreateCaseRequest]:
    """A zip streamed in 1 MiB CreateCase messages (the protocol rides on the first)."""
    first = True
    with zipped:
        while True:
            chunk = zipped.read(CHUNK)
            if not chunk and not first:
                return
            yield pb.CreateCaseRequest(
                protocol_yaml=protocol_yaml if first else "", dicom_zip_chunk=chunk
            )
            first = False


def dicom_upload(folder: str | Path, protocol_yaml: str) -> Iterator[pb.CreateCaseRequest]:
    """A folder of DICOM files as a zip, streamed in 1 MiB CreateCase messages. The folder is
    zipped before the first message, so a bad folder fails here and not inside a gRPC call."""
    return upload_messages(zip_folder(folder), protocol_yaml)


# the parts of a job's loop, in the order loop_breakdown reports them (they add up to ``loop``)
LOOP_PARTS = ("fmo", "case_load", "transport", "evaluate", "propose", "sequence", "store")


def loop_breakdown(
    per_iteration: list[dict[str, Any]], loop_s: float, sequence_s: float = 0.0
) -> dict[str, float]:
    """Where a job's time went, from its records and the client's clock: ``fmo`` (the solver),
    ``case_load`` (optimizer replicas loading the case on their first call), ``transport`` (an
    Optimize call less its solve and load: the request, the warm start read and the dose and
    fluence written to the case store, the reply), ``evaluate`` and ``propose`` (each
    call, whole), ``sequence`` (leaf-sequencing: each iteration's plan where the protocol says
    ``every_iteration``, on the replica within its Optimize call, and the best plan at the end,
    every try, as the orchestrator timed it), ``store`` (the rest of the loop: job records and
    events in SQLite, the watch stream) and ``loop`` (StartPlanning to the finished event).
    With candidates optimised side by side the per-call parts are summed over concurrent calls
    and may add up to more than ``loop``."""
    keys = ("optimize", "sequence", "evaluate", "propose")
    total = dict.fromkeys(("fmo", "case_load", *keys), 0.0)
    for it in per_iteration:
        total["fmo"] += float(it.get("fmo", {}).get("seconds", 0.0))
        total["case_load"] += float(it.get("fmo", {}).get("case_load_seconds", 0.0))
        for key in keys:  # an iteration's "optimize" excludes the sequencing of its plan
            total[key] += float(it.get("seconds", {}).get(key, 0.0))
    calls = sum(total[k] for k in keys)
    return {
        "fmo": total["fmo"],
        "case_load": total["case_load"],
        "transport": max(total["optimize"] - total["fmo"] - total["case_load"], 0.0),
        "evaluate": total["evaluate"],
        "propose": total["propose"],
        "sequence": total["sequence"] + sequence_s,
        "store": max(loop_s - calls - sequence_s, 0.0),
        "loop": loop_s,
    }


def plan_remote(
    orchestrator: str,
    token: str,
    case: str,
    parameters: dict[str, str],
    protocol_yaml: str,
    agent: str,
    max_iterations: int,
    memory_length: int,
    out_dir: str | Path,
    echo: Callable[[str], None] = print,
    timeout_s: float = 3600.0,
    dicom: str | Path | None = None,
    feedback: str = "",
    candidates: int = 1,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    with orchestrator_channel(orchestrator) as raw:
        stub = orchestrator_stub(raw, token)
        if dicom:
            created = stub.CreateCase(dicom_upload(dicom, protocol_yaml), timeout=1800)
            for note in created.notes:
                echo(f"import: {note}")
        else:
            created = stub.CreateCase(
                iter([pb.CreateCaseRequest(builtin=case, parameters=parameters)]), timeout=900
            )
        t_case = time.perf_counter() - t0
        t_loop = time.perf_counter()
        job_id = stub.StartPlanning(
            pb.StartPlanningRequest(
                case_id=created.case_id,
                protocol_yaml=protocol_yaml,
                max_iterations=max_iterations,
                memory_length=memory_length,
                agent=agent,
                physician_feedback=feedback,
                candidates=candidates,
            ),
            timeout=60,
        ).job_id
        echo(f"job {job_id} on case {created.case_id}")
        echo(f"{'it':>3} {'FMO s':>6} {'FMO it':>6} {'conv':>4} {'replica':>12}  goals")
        fmo: dict[int, types_pb2.FmoStats] = {}
        replica: dict[int, str] = {}
        for e in stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=timeout_s):
            if e.kind == pb.EVENT_KIND_FMO_DONE:
                fmo[e.iteration] = e.fmo
                replica[e.iteration] = e.message.removeprefix("served by ")
            elif e.kind == pb.EVENT_KIND_EVALUATED:
                echo(
                    progress_line(
                        e.iteration,
                        fmo.get(e.iteration),
                        replica.get(e.iteration, ""),
                        [_goal_text(g) for g in e.goals],
                    )
                )
            elif e.kind == pb.EVENT_KIND_PROPOSAL and e.message:
                echo(f"    planner: {e.message[:160]}")
            elif e.kind in (
                pb.EVENT_KIND_FINISHED,
                pb.EVENT_KIND_FAILED,
                pb.EVENT_KIND_CANCELLED,
                pb.EVENT_KIND_SEQUENCED,
            ):
                echo(e.message)
        t_loop = time.perf_counter() - t_loop
        t_export = time.perf_counter()
        job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=60)
        if job.state != pb.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"job {job_id} ended {pb.JobState.Name(job.state)}: {job.error}")
        bundle = stub.ExportPlan(pb.ExportPlanRequest(job_id=job_id), timeout=600)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(bundle.bundle)) as z:
        z.extractall(out)
    summary = json.loads((out / "summary.json").read_text())
    summary["job_id"] = job_id
    summary["case_id"] = created.case_id
    summary["seconds"] = {
        **summary.get("seconds", {}),
        "case": t_case,
        **loop_breakdown(
            summary.get("per_iteration", []),
            t_loop,
            float((summary.get("deliverable") or {}).get("seconds", 0.0)),
        ),
        "export": time.perf_counter() - t_export,
        "total": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

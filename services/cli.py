"""``radpilot``: plan a built-in case against a protocol and write the report.

radpilot demo           # TG-119 C-shape, harder protocol, rules agents, over local services
radpilot serve          # the four services on loopback until Ctrl-C (prints address and token)
radpilot plan --case tg119-cshape --protocol protocols/tg119_cshape_easier.yaml --out out/easy
radpilot plan --local ...            # launch the services, plan through them, stop them
radpilot plan --orchestrator H:P ... # plan through a running orchestrator ($RADPILOT_API_TOKEN)
radpilot plan --agent llm ...        # LLM evaluator + planner ($OPENAI_BASE_URL, $OPENAI_API_KEY)
radpilot approve JOB --orchestrator H:P  # add a finished job's plan to the reference library
radpilot cases          # list built-in cases

Exit codes: 0 done; 2 bad input (a flag, file, protocol or value to fix); 3 a service is unavailable
or timed out (retry later); 4 not found or not possible now (a job id, a finished job, an agent
without its endpoint); 1 anything else (a failed job, an internal error). Errors print one line;
--debug prints the traceback too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from radpilot.agents.references import load_library, shipped_library_dir
from radpilot.case import CaseError
from radpilot.case_store import CaseStore
from radpilot.cases import BUILTIN_CASES, load_builtin
from radpilot.errors import (
    AgentNotConfiguredError,
    CaseNotFoundError,
    FailedPreconditionError,
    UnavailableError,
)
from radpilot.fmo.backend import MATRIX_LAYOUTS
from radpilot.llm.client import LLMClient, LLMSettings, count_outcomes
from radpilot.loop.inprocess import plan_loop, plan_once
from radpilot.loop.record import FmoStats
from radpilot.protocol import ProtocolError, load_protocol
from services.client import progress_line

ROOT = Path(__file__).resolve().parent.parent
DEMO_PROTOCOL = ROOT / "protocols" / "tg119_cshape_harder.yaml"


def _params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise CaseError(f"case parameter {p!r} must look like name=value")
        out[key.strip()] = value.strip()
    return out


LLM_FLAGS = {
    "llm_model": "RADPILOT_LLM_MODEL",
    "llm_temperature": "RADPILOT_LLM_TEMPERATURE",
    "llm_seed": "RADPILOT_LLM_SEED",
    "llm_max_tokens": "RADPILOT_LLM_MAX_TOKENS",
}


def _llm_flags_to_env(args: argparse.Namespace) -> None:
    """--llm-* flags become the variables the LLM client reads, here and in the services
    ``--local`` launches (checked at once, so a bad value fails before anything starts)."""
    for flag, var in LLM_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[var] = str(value)
    LLMSettings.from_env()


def cmd_plan(args: argparse.Namespace) -> int:
    _llm_flags_to_env(args)
    if getattr(args, "matrix", None):  # here and in the services --local launches
        os.environ["RADPILOT_FMO_MATRIX"] = args.matrix
    if args.local or args.orchestrator:
        return cmd_plan_remote(args)
    t0 = time.perf_counter()
    store = CaseStore(args.store) if args.store else CaseStore()
    protocol = load_protocol(args.protocol)
    if args.dicom:
        from radpilot.dicom.read import import_dicom

        case, notes = import_dicom(args.dicom, protocol, store)
        for note in notes:
            print(f"import: {note}")
        if case.case_id not in store:
            store.save(case, case.case_id, recipe={"builder": "dicom"})
    else:
        case = load_builtin(args.case, store, **_params(args.param))
    t_case = time.perf_counter() - t0
    if args.agent == "none":
        report = plan_once(case, protocol, backend=args.backend)
    else:
        llm = None
        if args.agent == "llm":
            llm = LLMClient(LLMSettings.from_env())
        print(f"{'it':>3} {'FMO s':>6} {'FMO it':>6} {'conv':>4} {'':>12}  goals")
        fmo: dict[int, Any] = {}

        def progress(e: dict[str, Any]) -> None:  # the same live table as --local
            if e["kind"] == "fmo_done":
                fmo[e["iteration"]] = FmoStats.from_json(e["fmo"])
            elif e["kind"] == "evaluated":
                goals = [
                    f"{g['structure']} {g['metric']} {g['achieved']:.2f} "
                    f"({'ok' if g['passed'] else 'MISS'})"
                    for g in e["goals"]
                ]
                print(progress_line(e["iteration"], fmo.get(e["iteration"]), "", goals))
            elif e["kind"] == "proposal" and e.get("message"):
                print(f"    planner: {e['message'][:160]}")

        report = plan_loop(
            case,
            protocol,
            args.max_iterations,
            args.memory,
            backend=args.backend,
            agent=args.agent,
            llm=llm,
            references=load_library(shipped_library_dir()) if args.agent == "llm" else None,
            physician=args.feedback,
            on_event=progress,
            candidates=args.candidates,
        )
    report.seconds["case"] = t_case
    report.seconds["total"] = time.perf_counter() - t0
    path = report.write(args.out)
    print(f"{'goal':32s} {'achieved':>9s} {'margin':>8s}  result")
    for r in report.check.results:
        margin = r.margin if abs(r.margin) >= 5e-3 else 0.0  # a met limit prints +0.00, not -0.00
        print(
            f"{r.goal.label:32s} {r.achieved:9.2f} {margin:+8.2f}  {'pass' if r.passed else 'FAIL'}"
        )
    print(
        f"best plan: iteration {report.best_iteration} of {len(report.iterations)}"
        f"{_rounds(*report.rounds)} ({report.agent})"
    )
    summary = report.summary()
    print(delivery_text(summary["deliverable"], summary["delivery_error"]))
    print(f"report: {path}")
    print(f"summary: {Path(args.out) / 'summary.json'}")
    print(json.dumps({k: round(v, 2) for k, v in report.seconds.items()}))
    if args.print_summary:
        print("SUMMARY " + json.dumps(json.loads((Path(args.out) / "summary.json").read_text())))
    return 0


def delivery_text(d: dict[str, Any] | None, error: str = "") -> str:
    """One line on the deliverable plan the goals above were judged on."""
    if not d:
        return f"not leaf-sequenced: {error}" if error else "fluence-optimal plan (delivery: off)"
    per_beam = "/".join(str(n) for n in d["segments_per_beam"])
    return (
        f"goals judged on the deliverable (leaf-sequenced) dose: {d['mlc']['name']}, "
        f"{d['segments']} segments ({per_beam} per beam), {d['total_mu']:.0f} MU per fraction, "
        f"{d['mu_per_gy']:.0f} MU/Gy, largest difference from the fluence optimum "
        f"{d['max_dose_difference_gy']:.2f} Gy"
    )


def _rounds(rounds: int, per_round: int) -> str:
    """Says ", in N rounds of up to K candidates" when a run optimised candidates side by side."""
    return f", in {rounds} rounds of up to {per_round} candidates" if per_round > 1 else ""


def cmd_plan_remote(args: argparse.Namespace) -> int:
    """Plan through the gRPC services: a running orchestrator, or ones launched here (--local)."""
    from services.client import plan_remote
    from services.launcher import launch

    protocol_yaml = Path(args.protocol).read_text() if Path(args.protocol).is_file() else ""
    load_protocol(args.protocol)  # clear errors before any service starts
    if args.dicom and not Path(args.dicom).is_dir():
        raise ValueError(f"--dicom {args.dicom}: not a folder (give the folder of the CT series)")
    if args.agent == "none":
        raise ValueError("--agent none plans in process only; drop --local/--orchestrator")
    if args.local and args.agent == "llm" and not LLMSettings.from_env().configured:
        raise AgentNotConfiguredError(
            "agent 'llm' needs an endpoint: set OPENAI_BASE_URL (a local OpenAI-compatible "
            "server) or OPENAI_API_KEY before launching the services"
        )
    cluster = None
    try:
        if args.local:
            store = args.store or str(CaseStore().root)
            # its own job database (unless RADPILOT_JOB_DB says otherwise): another run's jobs
            # are never resumed by this one, nor this one's by the next
            run_dir = Path(args.out) / "run"
            job_db: str | Path | None = os.environ.get("RADPILOT_JOB_DB")
            if not job_db:
                job_db = run_dir / "jobs.sqlite"
                for old in run_dir.glob("jobs.sqlite*"):  # an earlier run's, in the same --out
                    old.unlink()
            t_up = time.perf_counter()
            cluster = launch(store, run_dir, args.optimizer_replicas, job_db=job_db)
            address, token = cluster.orchestrator, cluster.token
            print(
                f"services up: {address}, {args.optimizer_replicas} optimizer replica(s) "
                f"in {time.perf_counter() - t_up:.1f} s"
            )
        else:
            address, token = args.orchestrator, os.environ.get("RADPILOT_API_TOKEN", "")
        summary = plan_remote(
            address,
            token,
            args.case,
            _params(args.param),
            protocol_yaml,
            args.agent,
            args.max_iterations,
            args.memory,
            args.out,
            dicom=args.dicom,
            feedback=args.feedback,
            candidates=args.candidates,
        )
    finally:
        if cluster is not None:
            cluster.stop()
    print(f"{'goal':32s} {'achieved':>9s}  result")
    for g in summary["goals"]:
        label = f"{g['structure']} {g['metric']} {g['comparator']} {g['limit']:g}"
        print(f"{label:32s} {g['achieved']:9.2f}  {'pass' if g['passed'] else 'FAIL'}")
    print(
        f"best plan: iteration {summary['best_iteration']} of {summary['iterations']}"
        f"{_rounds(summary['rounds'], summary['candidates_per_round'])}"
    )
    print(delivery_text(summary.get("deliverable"), summary.get("delivery_error", "")))
    calls = summary.get("llm_calls", [])
    if calls:
        print(f"LLM calls: {len(calls)} {summary.get('llm_outcomes') or count_outcomes(calls)}")
    print(f"job: {summary['job_id']}")
    print(f"report: {Path(args.out) / 'report.html'}")
    print(json.dumps({k: round(v, 2) for k, v in summary["seconds"].items()}))
    if args.print_summary:
        print("SUMMARY " + json.dumps(summary, separators=(",", ":")), flush=True)
    return 0


def _call_orchestrator(address: str, method: str, request: Any, timeout: float) -> Any:
    """One call to a running orchestrator (token from $RADPILOT_API_TOKEN)."""
    from services.client import orchestrator_channel, orchestrator_stub

    token = os.environ.get("RADPILOT_API_TOKEN", "")
    with orchestrator_channel(address) as raw:
        return getattr(orchestrator_stub(raw, token), method)(request, timeout=timeout)


def cmd_approve(args: argparse.Namespace) -> int:
    from radpilot.v1 import orchestrator_pb2 as pb

    request = pb.ApprovePlanRequest(
        job_id=args.job, iteration=args.iteration, description=args.description
    )
    r = _call_orchestrator(args.orchestrator, "ApprovePlan", request, 120)
    print(f"reference {r.reference_id} added to {r.protocol} ({r.references} reference plan(s))")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import io
    import zipfile

    from radpilot.v1 import orchestrator_pb2 as pb

    r = _call_orchestrator(
        args.orchestrator, "ExportPlan", pb.ExportPlanRequest(job_id=args.job), 600
    )
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(r.bundle)) as z:
        z.extractall(out)
        names = z.namelist()
    dicom = [n for n in names if n.startswith("dicom/")]
    print(f"{len(names)} files in {out}: report.html, summary.json, {len(dicom)} DICOM file(s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.launcher import launch

    store = args.store or str(CaseStore().root)
    cluster = launch(store, args.run_dir, args.optimizer_replicas)
    tls = " (TLS: clients need RADPILOT_TLS_CA)" if cluster.tls.enabled else ""
    print(f"orchestrator: {cluster.orchestrator}{tls}")
    print(f"token: {cluster.token}   (send it as 'authorization: Bearer <token>')")
    print(f"logs: {cluster.run_dir}; Ctrl-C or SIGTERM stops all services", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    cluster.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="radpilot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("plan", "demo"):
        p = sub.add_parser(
            name,
            help="optimise, evaluate and report"
            if name == "plan"
            else "plan the TG-119 C-shape (harder)",
        )
        p.add_argument("--case", default="tg119-cshape", choices=sorted(BUILTIN_CASES))
        p.add_argument(
            "--dicom",
            default=None,
            help="plan a patient instead: a folder with one CT series and its RTSTRUCT "
            "(the protocol maps ROI names and sets the beams)",
        )
        p.add_argument("--protocol", default=str(DEMO_PROTOCOL))
        p.add_argument(
            "--param",
            action="append",
            default=[],
            help="case parameter name=value, e.g. dose_grid_mm=3",
        )
        p.add_argument("--out", default="out/demo" if name == "demo" else "out/plan")
        p.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "auto"])
        p.add_argument(
            "--matrix",
            default=None,
            choices=MATRIX_LAYOUTS,
            help="matrix layout: csr (float32; SciPy or cuSPARSE), compressed (16-bit; numba "
            "on the CPU, CUDA kernels with --backend cupy) or auto (compressed where it fits, "
            "float32 CSR where numba is missing or a case has 65,536 beamlets or more; see "
            "docs/benchmarks.md); default $RADPILOT_FMO_MATRIX or auto",
        )
        p.add_argument(
            "--agent",
            default="rules",
            choices=["rules", "llm", "bo", "fixed", "none"],
            help="outer-loop agent: rules, llm (LLM evaluator + planner), bo (Optuna over "
            "weights), fixed (class solution); none = one FMO with the initial objectives",
        )
        p.add_argument("--llm-model", default=None, help="default $RADPILOT_LLM_MODEL or gpt-4o")
        p.add_argument("--llm-temperature", type=float, default=None, help="default 0")
        p.add_argument("--llm-seed", type=int, default=None, help="default none")
        p.add_argument("--llm-max-tokens", type=int, default=None, help="default 2000")
        p.add_argument(
            "--print-summary",
            action="store_true",
            help="end with one line 'SUMMARY <json>' (for scripts reading a pod's log)",
        )
        p.add_argument(
            "--feedback",
            default="",
            metavar="TEXT",
            help="the physician's comments, from the first iteration on (read by the LLM "
            "evaluator and planner; no patient identifiers)",
        )
        p.add_argument("--max-iterations", type=int, default=6)
        p.add_argument("--memory", type=int, default=4, help="iterations the planner remembers")
        p.add_argument(
            "--candidates",
            type=int,
            default=1,
            help="parameter sets per round from round 2 on, optimised side by side (across the "
            "optimizer replicas with --local); --max-iterations then counts rounds",
        )
        p.add_argument("--orchestrator", default="", help="HOST:PORT of a running orchestrator")
        p.add_argument(
            "--local",
            action="store_true",
            default=name == "demo",
            help="launch the four services here, plan through them, stop them",
        )
        p.add_argument("--in-process", dest="local", action="store_false", help="no services")
        p.add_argument("--optimizer-replicas", type=int, default=2 if name == "demo" else 1)
        p.add_argument(
            "--store",
            default=None,
            help="case store folder (default $RADPILOT_CASE_STORE or ~/.cache/radpilot/case-store)",
        )
    sub.add_parser("cases", help="list built-in cases")
    ex = sub.add_parser("export", help="a job's report and DICOM (RTDOSE, CT, RTSTRUCT) to DIR")
    ex.add_argument("job", help="the job id")
    ex.add_argument("dir", help="output folder")
    ex.add_argument("--orchestrator", required=True, help="HOST:PORT ($RADPILOT_API_TOKEN)")
    ap_ = sub.add_parser("approve", help="add a finished job's plan to the reference library")
    ap_.add_argument("job", help="the job id")
    ap_.add_argument("--orchestrator", required=True, help="HOST:PORT ($RADPILOT_API_TOKEN)")
    ap_.add_argument("--iteration", type=int, default=0, help="default: the job's best")
    ap_.add_argument("--description", default="", help="free text, no patient identifiers")
    sp = sub.add_parser("serve", help="run the four services on loopback until Ctrl-C")
    sp.add_argument("--optimizer-replicas", type=int, default=1)
    sp.add_argument("--store", default=None)
    sp.add_argument("--run-dir", default="out/run")
    return ap


EXIT_OTHER, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_STATE = 1, 2, 3, 4
_STATUS_EXIT = {
    "INVALID_ARGUMENT": EXIT_BAD_INPUT,
    "OUT_OF_RANGE": EXIT_BAD_INPUT,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
    "NOT_FOUND": EXIT_STATE,
    "FAILED_PRECONDITION": EXIT_STATE,
    "ALREADY_EXISTS": EXIT_STATE,
}


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an error that ends a command."""
    if isinstance(exc, grpc.RpcError):  # a status from a service
        name = exc.code().name
        details = (exc.details() or "").strip().splitlines()
        return _STATUS_EXIT.get(name, EXIT_OTHER), f"{name}: {details[0] if details else ''}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, AgentNotConfiguredError | FailedPreconditionError | CaseNotFoundError):
        return EXIT_STATE, first
    if isinstance(exc, UnavailableError):
        return EXIT_UNAVAILABLE, first
    if isinstance(exc, CaseError | ProtocolError | ValueError | FileNotFoundError):
        return EXIT_BAD_INPUT, first
    from services.launcher import LaunchError

    if isinstance(exc, LaunchError):
        return EXIT_UNAVAILABLE, f"{first} (see the service logs under the run folder)"
    return EXIT_OTHER, f"{type(exc).__name__}: {first}"


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "cases":
        for name, spec in BUILTIN_CASES.items():
            print(f"{name:18s} {spec.description}")
        return 0
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "approve":
        return cmd_approve(args)
    if args.command == "export":
        return cmd_export(args)
    return cmd_plan(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("radpilot: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        status, line = describe_failure(exc)
        print(f"radpilot: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())

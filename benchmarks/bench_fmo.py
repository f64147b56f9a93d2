"""FMO benchmark: RadPilot's solver against SciPy L-BFGS-B and pyRadPlan on one TG-119 matrix.

All solvers minimise the same objective (same terms, weights and structure voxels) on the same
dose influence matrix in one process. Each is timed to reach the best of the final objectives
within 0.1 % ("time to objective"); a solver that never gets there is charged its whole run.
Then a warm-start re-solve after doubling the core weight is timed against a cold solve of the
same changed problem.

    make bench-fmo                          # 3 mm grid, 5 mm bixels, writes docs + JSON
    python benchmarks/bench_fmo.py --dose-grid-mm 5 --skip-pyradplan     # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.docsection import write_section
from radpilot.case import Case
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.fmo import FluenceOptimizer, FMOSettings, ObjectiveTerm
from radpilot.fmo.backend import cpu_layout, gpu_available
from radpilot.fmo.reference import solve_lbfgsb

log = logging.getLogger("bench_fmo")
TOLERANCE = 1e-3  # "within 0.1 %"

# Terms on delineated structures only, so pyRadPlan's structure set can express them exactly.
TERMS = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("PTV", "squared_overdose", 52.5, 500.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 100.0),
    ObjectiveTerm("BODY", "squared_overdose", 30.0, 5.0),
]
PYRADPLAN_NAMES = {"PTV": "OuterTarget", "Core": "Core", "BODY": "BODY"}


def doubled_core(terms: list[ObjectiveTerm]) -> list[ObjectiveTerm]:
    return [
        ObjectiveTerm(
            t.structure, t.kind, t.dose_gy, t.weight * (2.0 if t.structure == "Core" else 1.0)
        )
        for t in terms
    ]


def time_to(target: float, times: list[float], values: list[float]) -> float | None:
    for t, f in zip(times, values, strict=True):
        if f <= target:
            return t
    return None


def uniform_start(case: Case) -> np.ndarray:
    unit = case.dose_influence @ np.ones(case.num_beamlets, dtype=np.float32)
    return np.full(
        case.num_beamlets, case.prescription_gy / float(unit[case.rows_of("PTV")].mean())
    )


# -- the three solvers ---------------------------------------------------------------------------
def run_radpilot(
    opt: FluenceOptimizer,
    terms: list[ObjectiveTerm],
    x0: np.ndarray | None = None,
    precondition: bool | None = None,
) -> dict[str, Any]:
    settings = FMOSettings(
        rel_tol=1e-6,
        patience=3,
        max_iter=3000,
        record_iterates=True,
        warm_preconditioner=precondition,
    )
    res = opt.solve(terms, x0=x0, settings=settings)
    # Inside a working set the running objective leaves out far-off voxels, so every iterate's
    # full objective is computed afterwards, outside the timed solve.
    values = [opt.objective(x, terms) for _, x in res.iterates]
    return {
        "seconds_total": res.seconds,
        "objective": res.objective,
        "iterations": res.iterations,
        "sparse_products": res.sparse_products,
        "times": [t for t, _ in res.iterates] + [res.seconds],
        "values": [*values, res.objective],
        "working_set_rows": res.working_set_rows,
        "stop_reason": res.stop_reason,
        "fluence": res.fluence,
        "preconditioner": res.preconditioner,
    }


def run_scipy(
    case: Case, terms: list[ObjectiveTerm], stop_at: float, max_seconds: float
) -> dict[str, Any]:
    times: list[float] = []
    values: list[float] = []
    t0 = time.perf_counter()

    def callback(intermediate_result: Any) -> None:
        times.append(time.perf_counter() - t0)
        values.append(float(intermediate_result.fun))
        if values[-1] <= stop_at or times[-1] > max_seconds:
            raise StopIteration

    res = solve_lbfgsb(case, terms, uniform_start(case), callback=callback)
    return {
        "seconds_total": time.perf_counter() - t0,
        "objective": float(res.fun),
        "iterations": int(res.nit),
        "function_evaluations": int(res.nfev),
        "times": times,
        "values": values,
        "stop_reason": str(res.message),
        "stopped_at_target": bool(values and values[-1] <= stop_at),
    }


def run_pyradplan(
    params: dict[str, float], terms: list[ObjectiveTerm], opt: FluenceOptimizer
) -> dict[str, Any]:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from pyRadPlan import (
        PhotonPlan,
        calc_dose_influence,
        fluence_optimization,
        generate_stf,
        load_tg119,
    )
    from pyRadPlan.optimization.objectives import SquaredDeviation, SquaredOverdosing
    from pyRadPlan.optimization.problems import _nonlin_fluence

    ct, cst = load_tg119()
    n = 9
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {
        "gantry_angles": [40.0 * k for k in range(n)],
        "couch_angles": [0.0] * n,
        "bixel_width": params["bixel_mm"],
    }
    res_mm = params["dose_grid_mm"]
    pln.prop_dose_calc = {"dose_grid": {"resolution": {"x": res_mm, "y": res_mm, "z": res_mm}}}
    # same structure voxels as RadPilot's case: no overlap priorities; L-BFGS-B (ipopt absent)
    pln.prop_opt = {"solver": "scipy", "apply_overlap": False, "max_iter": 3000}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stf = generate_stf(ct, cst, pln)
        dij = calc_dose_influence(ct, cst, stf, pln)
    kinds = {"squared_deviation": SquaredDeviation, "squared_overdose": SquaredOverdosing}
    by_voi: dict[str, list[Any]] = {}
    for t in terms:
        ref = {"d_ref": t.dose_gy} if t.kind == "squared_deviation" else {"d_max": t.dose_gy}
        by_voi.setdefault(PYRADPLAN_NAMES[t.structure], []).append(
            kinds[t.kind](priority=t.weight, **ref)
        )
    for voi in cst.vois:
        voi.objectives = by_voi.get(voi.name, [])

    # time stamps for every objective evaluation, next to pyRadPlan's own history
    stamps: list[float] = []
    original = _nonlin_fluence.NonLinearFluencePlanningProblem._objective_function

    def stamped(self: Any, x: Any) -> Any:
        f = original(self, x)
        stamps.append(time.perf_counter())
        return f

    _nonlin_fluence.NonLinearFluencePlanningProblem._objective_function = stamped  # type: ignore[method-assign]
    info: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        fluence = fluence_optimization(ct, cst, stf, dij, pln, opt_info=info)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
    finally:
        _nonlin_fluence.NonLinearFluencePlanningProblem._objective_function = original  # type: ignore[method-assign]
    history = [float(v) for v in info.get("obj_history", [])]
    ours_at_theirs = opt.objective(np.asarray(fluence, dtype=np.float32), terms)
    return {
        "seconds_total": seconds,
        "objective": ours_at_theirs,
        "objective_own": history[-1] if history else None,
        "iterations": int(info.get("num_iter", -1)),
        "function_evaluations": len(history),
        # pyRadPlan's clock starts inside fluence_optimization; set-up before the first
        # evaluation (resampling, caches) is charged to it, as a user would see it
        "times": [s - t0 for s in stamps],
        "values": history,
        "stop_reason": str(info.get("result_info", {}).get("message", "")),
    }


# -- bookkeeping ------------------------------------------------------------------------------
def spmv_profile(opt: FluenceOptimizer, case: Case, repeats: int = 10) -> dict[str, float]:
    A = case.dose_influence
    x = np.random.default_rng(0).random(A.shape[1]).astype(np.float32)
    g = np.random.default_rng(1).random(A.shape[0]).astype(np.float32)
    ops = opt.ops
    x, g = ops.asarray(x), ops.asarray(g)  # on the device for the GPU backends
    sync = getattr(ops, "synchronize", lambda: None)
    ops.matvec(x), ops.rmatvec(g)  # warm (and, for numba and NVRTC, compiled) before timing
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        ops.matvec(x)
    sync()
    mv = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        ops.rmatvec(g)
    sync()
    rmv = (time.perf_counter() - t0) / repeats
    per_nnz = float(getattr(ops, "bytes_per_nonzero", 8.0))  # float32 CSR: value + index
    bytes_per_product = A.nnz * per_nnz + A.shape[0] * 4 * 2  # matrix, vectors in and out
    return {
        "matrix": opt.matrix,
        "bytes_per_nonzero": per_nnz,
        "matvec_seconds": mv,
        "rmatvec_seconds": rmv,
        "spmv_seconds_per_iteration": mv + rmv,
        "effective_gb_per_s": 2 * bytes_per_product / (mv + rmv) / 1e9,
        "nonzeros_per_s": 2 * A.nnz / (mv + rmv),
        "backend": opt.backend,
    }


def gpu_rmatvec_schedules(opt: FluenceOptimizer, repeats: int = 20) -> list[dict[str, Any]]:
    """``A.T @ g`` of the compressed GPU kernels under each block schedule (rows per block,
    warps interleaved or on contiguous runs), the default's first: what sets the defaults in
    ``radpilot/fmo/gpu_compressed.py``."""
    ops = opt.ops
    if getattr(ops, "matrix", "") != "compressed" or not hasattr(ops, "rows_per_block"):
        return []
    g = ops.asarray(np.random.default_rng(1).random(ops.shape[0]).astype(np.float32))
    default = (ops.rows_per_block, ops.chunked)
    schedules = [default] + [
        (n, c) for n in (256, 1024, 4096) for c in (False, True) if (n, c) != default
    ]
    out = []
    for rows_per_block, chunked in schedules:
        ops.rows_per_block, ops.chunked = rows_per_block, chunked
        ops.rmatvec(g)
        ops.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            ops.rmatvec(g)
        ops.synchronize()
        seconds = (time.perf_counter() - t0) / repeats
        out.append({"rows_per_block": rows_per_block, "chunked": chunked, "seconds": seconds})
        log.info(
            "A^T g, %5d rows per block, %s: %.3f ms",
            rows_per_block,
            "chunked" if chunked else "interleaved",
            seconds * 1e3,
        )
    ops.rows_per_block, ops.chunked = default
    return out


def device_peak_gb_per_s() -> float:
    """The CUDA device's memory bandwidth from its memory clock and bus width (0 when unknown).
    CUDA 13 dropped the clock from the device properties: the attribute query serves then."""
    try:
        import cupy as cp

        dev = cp.cuda.Device().id
        props = cp.cuda.runtime.getDeviceProperties(dev)
        clock_khz = props.get("memoryClockRate") or cp.cuda.runtime.deviceGetAttribute(
            36,
            dev,  # cudaDevAttrMemoryClockRate
        )
        bus_bits = props.get("memoryBusWidth") or cp.cuda.runtime.deviceGetAttribute(37, dev)
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    except Exception as exc:
        log.warning("device memory bandwidth unknown: %s", exc)
        return 0.0


def device_copy_gb_per_s(gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes read and written per second by a device-to-device copy: what the memory bus
    delivers in practice, next to the datasheet figure."""
    try:
        import cupy as cp

        a = cp.ones(int(gib * 2**30) // 4, dtype=cp.float32)
        b = cp.empty_like(a)
        b[...] = a
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            b[...] = a
        cp.cuda.Device().synchronize()
        seconds = (time.perf_counter() - t0) / repeats
        return 2 * a.nbytes / seconds / 1e9
    except Exception as exc:
        log.warning("device copy not measured: %s", exc)
        return 0.0


def device_name() -> str:
    try:
        import cupy as cp

        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return ""


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import scipy

    return {
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
    }


def summarise(name: str, run: dict[str, Any], target: float) -> dict[str, Any]:
    ttt = time_to(target, run["times"], run["values"])
    out = {k: v for k, v in run.items() if k not in ("times", "values", "fluence")}
    out["reached_target"] = ttt is not None
    out["seconds"] = ttt if ttt is not None else run["seconds_total"]
    log.info(
        "%-18s %8.2f s to target (%s), final objective %.4f",
        name,
        out["seconds"],
        "reached" if ttt is not None else "NOT reached",
        run["objective"],
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--case",
        default="tg119-cshape",
        choices=["tg119-cshape", "analytic-cshape"],
        help="analytic-cshape needs no pyRadPlan (GPU machines); 1.5 mm gives ~1.8e8 non-zeros",
    )
    ap.add_argument("--dose-grid-mm", type=float, default=3.0)
    ap.add_argument("--bixel-mm", type=float, default=5.0)
    ap.add_argument("--skip-pyradplan", action="store_true")
    ap.add_argument("--scipy-max-seconds", type=float, default=900.0)
    ap.add_argument("--out", default="out/bench/fmo.json")
    ap.add_argument("--doc", default=None, help="markdown file whose FMO section is rewritten")
    ap.add_argument(
        "--doc-section",
        default="bench-fmo",
        choices=sorted(SECTIONS),
        help="which section of --doc: bench-fmo (TG-119, CPU) or bench-gpu (a CUDA device)",
    )
    ap.add_argument(
        "--doc-only", action="store_true", help="rewrite --doc from an existing --out JSON"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("pyRadPlan", "radpilot"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.doc_only:
        write_doc(Path(args.doc), json.loads(Path(args.out).read_text()), args.doc_section)
        return 0
    params = {"dose_grid_mm": args.dose_grid_mm, "bixel_mm": args.bixel_mm}
    t0 = time.perf_counter()
    if args.case == "analytic-cshape":
        args.skip_pyradplan = True  # pyRadPlan cannot express this phantom
        case = load_builtin(
            args.case, CaseStore(), spacing_mm=args.dose_grid_mm, bixel_mm=args.bixel_mm
        )
    else:
        case = load_builtin(args.case, CaseStore(), **params)
    case_seconds = time.perf_counter() - t0
    log.info(
        "case %s: %d rows x %d beamlets, %.3g non-zeros (%.1f s)",
        case.case_id,
        *case.dose_influence.shape,
        case.dose_influence.nnz,
        case_seconds,
    )
    t0 = time.perf_counter()
    csr = FluenceOptimizer(case, matrix="csr")
    prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    compressed = FluenceOptimizer(case, matrix="compressed")  # needs numba: a make dependency
    compressed.ops.matvec(np.zeros(case.num_beamlets, np.float32))  # numba compiles here
    prepare_compressed = time.perf_counter() - t0

    runs: dict[str, dict[str, Any]] = {}
    runs["radpilot_cpu_csr"] = run_radpilot(csr, TERMS)
    runs["radpilot_cpu_compressed"] = run_radpilot(compressed, TERMS)
    opt = compressed if cpu_layout(case.num_beamlets) == "compressed" else csr  # the default
    default_run = f"radpilot_cpu_{opt.matrix}"
    first_fluence = runs[default_run]["fluence"]
    if not args.skip_pyradplan:
        log.info("pyRadPlan: computing its own dij object and optimising ...")
        runs["pyradplan"] = run_pyradplan(params, TERMS, opt)
    stop_at = min(r["objective"] for r in runs.values()) * (1 + TOLERANCE)
    runs["scipy_lbfgsb"] = run_scipy(case, TERMS, stop_at, args.scipy_max_seconds)
    gpu_ok, gpu_why = gpu_available()
    gpu_opts: dict[str, FluenceOptimizer] = {}
    gpu_errors: dict[str, str] = {}
    for layout, name in (("csr", "radpilot_gpu"), ("compressed", "radpilot_gpu_compressed")):
        if not gpu_ok:
            break
        try:  # one layout failing on a device still leaves the other's figures
            gpu_opts[layout] = FluenceOptimizer(case, backend="cupy", matrix=layout)
            # CuPy compiles its kernels on first use (seconds, once per machine): not timed
            gpu_opts[layout].solve(TERMS, settings=FMOSettings(max_iter=3))
            runs[name] = run_radpilot(gpu_opts[layout], TERMS)
        except Exception as exc:
            log.exception("GPU %s failed", layout)
            gpu_errors[layout] = f"{type(exc).__name__}: {exc}"
            gpu_opts.pop(layout, None)

    best = min(r["objective"] for r in runs.values())
    target = best * (1 + TOLERANCE)
    results = {name: summarise(name, r, target) for name, r in runs.items()}

    # warm start after a 2x weight change, against a cold solve of the changed problem
    changed = doubled_core(TERMS)
    # the default warm start (with the curvature preconditioner, radpilot.fmo.precondition) and
    # the same without it
    warm = run_radpilot(opt, changed, x0=first_fluence)
    warm_plain = run_radpilot(opt, changed, x0=first_fluence, precondition=False)
    cold = run_radpilot(FluenceOptimizer(case, matrix=opt.matrix), changed)
    target2 = min(warm["objective"], warm_plain["objective"], cold["objective"]) * (1 + TOLERANCE)
    results["radpilot_cpu_warm"] = summarise("radpilot_cpu_warm", warm, target2)
    results["radpilot_cpu_warm_plain"] = summarise("radpilot_cpu_warm_plain", warm_plain, target2)
    results["radpilot_cpu_cold_changed"] = summarise("radpilot_cpu_cold_changed", cold, target2)

    ours = results[default_run]["seconds"]
    ratios = {"vs_scipy": results["scipy_lbfgsb"]["seconds"] / ours}
    if "pyradplan" in results:
        ratios["vs_pyradplan"] = results["pyradplan"]["seconds"] / ours
    ratios["warm_vs_cold"] = (
        results["radpilot_cpu_cold_changed"]["seconds"] / results["radpilot_cpu_warm"]["seconds"]
    )
    ratios["warm_vs_cold_full_convergence"] = cold["seconds_total"] / warm["seconds_total"]
    ratios["warm_plain_vs_cold"] = (
        results["radpilot_cpu_cold_changed"]["seconds"]
        / results["radpilot_cpu_warm_plain"]["seconds"]
    )
    ratios["compressed_vs_csr"] = (
        results["radpilot_cpu_csr"]["seconds"] / results["radpilot_cpu_compressed"]["seconds"]
    )
    if "radpilot_gpu" in results:
        ratios["gpu_vs_cpu"] = ours / results["radpilot_gpu"]["seconds"]
    if "radpilot_gpu_compressed" in results:
        ratios["gpu_compressed_vs_cpu"] = ours / results["radpilot_gpu_compressed"]["seconds"]
    if "radpilot_gpu" in results and "radpilot_gpu_compressed" in results:
        ratios["gpu_compressed_vs_gpu_csr"] = (
            results["radpilot_gpu"]["seconds"] / results["radpilot_gpu_compressed"]["seconds"]
        )

    report = {
        "case": {
            "name": case.name,
            "case_id": case.case_id,
            **params,
            "beams": len(case.beams),
            "rows": case.dose_influence.shape[0],
            "beamlets": case.num_beamlets,
            "nnz": int(case.dose_influence.nnz),
            "case_load_seconds": case_seconds,
            "backend_prepare_seconds": prepare,
            "compressed_prepare_seconds": prepare_compressed,
            "default_matrix": opt.matrix,
        },
        "objective_terms": [t.to_dict() for t in TERMS],
        "warm_start_terms": [t.to_dict() for t in changed],
        "target": {"best_objective": best, "tolerance": TOLERANCE},
        "results": results,
        "ratios": ratios,
        "spmv": spmv_profile(csr, case),
        "spmv_compressed": spmv_profile(compressed, case),
        "gpu": {
            "available": gpu_ok,
            "reason": gpu_why,
            "name": device_name() if gpu_ok else "",
            "peak_gb_per_s": device_peak_gb_per_s() if gpu_ok else 0.0,
            "copy_gb_per_s": device_copy_gb_per_s() if gpu_ok else 0.0,
            "errors": gpu_errors,
        },
        "spmv_gpu": [spmv_profile(o, case) for o in gpu_opts.values()],
        "gpu_rmatvec_schedules": (
            gpu_rmatvec_schedules(gpu_opts["compressed"]) if "compressed" in gpu_opts else []
        ),
        "machine": machine(),
        "command": f"make {args.doc_section}",
        "json": args.out,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    log.info("ratios: %s", json.dumps({k: round(v, 2) for k, v in ratios.items()}))
    log.info("wrote %s", out)
    if args.doc:
        write_doc(Path(args.doc), report, args.doc_section)
    return 0


# the docs/benchmarks.md sections this benchmark writes: markers and title
SECTIONS = {
    "bench-fmo": "FMO: RadPilot vs SciPy L-BFGS-B vs pyRadPlan (`make bench-fmo`)",
    "bench-gpu": "FMO on a CUDA GPU: CuPy (cuSPARSE and the compressed RawKernels) vs the CPU "
    "(`make bench-gpu`)",
}


def _spmv_line(p: dict[str, Any], peak_gb_per_s: float = 0.0) -> str:
    share = (
        f" ({p['effective_gb_per_s'] / peak_gb_per_s:.0%} of the device's {peak_gb_per_s:.0f} GB/s)"
        if peak_gb_per_s > 0
        else ""
    )
    rate = f", {p['nonzeros_per_s'] / 1e9:.2f}e9 non-zeros/s" if "nonzeros_per_s" in p else ""
    return (
        f"- {p.get('backend', 'numpy')} {p.get('matrix', 'csr')} "
        f"({p.get('bytes_per_nonzero', 8.0):.2f} bytes per non-zero): "
        f"A x {p['matvec_seconds'] * 1e3:.2f} ms, A^T g {p['rmatvec_seconds'] * 1e3:.2f} ms, "
        f"{p['spmv_seconds_per_iteration'] * 1e3:.2f} ms per iteration, "
        f"~{p['effective_gb_per_s']:.1f} GB/s effective{share}{rate}"
    )


def write_doc(path: Path, r: dict[str, Any], section_name: str = "bench-fmo") -> None:
    begin, end = f"<!-- {section_name}:begin -->", f"<!-- {section_name}:end -->"
    c, res, m = r["case"], r["results"], r["machine"]
    spmv_lines = [_spmv_line(p) for p in (r["spmv"], r.get("spmv_compressed")) if p]
    peak = r["gpu"].get("peak_gb_per_s", 0.0)
    spmv_lines += [_spmv_line(p, peak) for p in r.get("spmv_gpu", [])]
    schedules = r.get("gpu_rmatvec_schedules", [])
    if schedules:
        spmv_lines.append(
            "- the compressed kernels' A^T g by block schedule (rows per block, warps "
            "interleaved or on contiguous runs; the default first): "
            + ", ".join(
                f"{s['rows_per_block']} {'chunked' if s['chunked'] else 'interleaved'} "
                f"{s['seconds'] * 1e3:.2f} ms"
                for s in schedules
            )
        )
    rows = []
    for name, v in res.items():
        iters = v.get("iterations", "")
        rows.append(
            f"| {name} | {v['seconds']:.2f} | {'yes' if v['reached_target'] else 'no'} | "
            f"{v['objective']:.4f} | {iters} | {v['seconds_total']:.2f} |"
        )
    ratio_lines = "\n".join(f"- `{k}`: **{v:.2f}x**" for k, v in r["ratios"].items())
    gpu = r["gpu"]
    if gpu["available"]:
        copy = (
            f", device-to-device copy {gpu['copy_gb_per_s']:.0f} GB/s"
            if gpu.get("copy_gb_per_s")
            else ""
        )
        gpu_line = f"present: {gpu.get('name') or 'a CUDA device'} ({gpu['peak_gb_per_s']:.0f} GB/s by its memory clock and bus{copy})"
        errors = "; ".join(f"{k}: {v}" for k, v in gpu.get("errors", {}).items())
        gpu_line += f"; failed: {errors}" if errors else ""
    else:
        gpu_line = f"absent ({gpu['reason']})"
    section = f"""{begin}
## {SECTIONS[section_name]}

Case `{c["name"]}`: {c["dose_grid_mm"]:g} mm dose grid, {c["bixel_mm"]:g} mm bixels, {c["beams"]} beams,
A = {c["rows"]} rows x {c["beamlets"]} beamlets, {c["nnz"]:.3g} non-zeros (stored as float32 CSR; the compressed layout is built from it).
Objective: {", ".join(f"{t['structure']} {t['kind']} {t['dose_gy']:g} Gy w={t['weight']:g}" for t in r["objective_terms"])}.
Target = best final objective x (1 + {r["target"]["tolerance"]:g}); "seconds" = time until a solver first
reaches it (its whole run if never). RadPilot's iterates are re-evaluated on the full objective after
the solve, outside the timing (inside a working set the running objective leaves out far-off voxels);
SciPy's and pyRadPlan's values are their own. Warm start: core weight doubled, started from the first
plan, timed against a cold solve of the same changed problem on a fresh optimizer, with the curvature
preconditioner (the default; its build is inside the timing); `_plain`: the same warm start without it
(`RADPILOT_FMO_WARM_PRECONDITIONER=off`).

| run | seconds to target | reached | final objective | iterations | seconds total |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Ratios (their seconds / ours; bigger is better):
{ratio_lines}

Sparse products ({m["cores"]} CPU threads, and the GPU's rows where a device is present; the CPU's default
layout is `{c.get("default_matrix", "csr")}`, the ratios above compare its run with the others):
{chr(10).join(spmv_lines)}

Machine: {m["cpu"]}, {m["cores"]} cores, {m["memory_gib"]} GiB; Python {m["python"]}, NumPy {m["numpy"]},
SciPy {m["scipy"]}. GPU: {gpu_line}.
Full figures: `{r.get("json", "out/bench/fmo.json")}` (`{r.get("command", "make bench-fmo")}`).
{end}"""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_section(path, begin, end, section)


if __name__ == "__main__":
    raise SystemExit(main())

"""The LLM agents against a real local model: llama.cpp's OpenAI-compatible server on a GGUF file.

    make llm-local-check LLM_GGUF=/models/qwen2.5-7b-instruct-q4_k_m.gguf

builds llama-cpp-python's server in its own venv (``.venv-llama``, once), serves the model on
loopback, runs ``radpilot plan --in-process --agent llm`` for two iterations on the analytic
C-shape, and reports what matters when choosing a model for the hospital's own hardware: how many
answers were valid, how often the loop fell back to the rules, seconds and tokens per call.
Without a model file it says so and exits 0 (skipped). ``--base-url`` checks an endpoint that is
already running (vLLM, Ollama, a llama.cpp server started by hand) instead of building one.

The result goes to ``<out>/llm-check.json`` and, with ``--doc``, to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from radpilot.llm.client import count_outcomes

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PACKAGE = "llama-cpp-python[server]>=0.3.2,<0.4"
DEFAULT_VENV = ROOT / ".venv-llama"
SERVER_START_S = 600.0  # loading a large model from a slow disk takes minutes


def summarise(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Valid-answer rate, fallbacks and seconds per call from a plan's ``summary.json`` calls."""
    asked = [c for c in calls if c.get("attempts", 0) > 0]  # skipped experts were not asked
    valid = [c for c in asked if c.get("validation") == "ok"]
    outcomes = count_outcomes(calls)
    seconds = [float(c.get("seconds", 0.0)) for c in asked]
    by_role: dict[str, dict[str, Any]] = {}
    for c in asked:
        r = by_role.setdefault(c["role"], {"calls": 0, "valid": 0, "seconds": 0.0})
        r["calls"] += 1
        r["valid"] += c.get("validation") == "ok"
        r["seconds"] += float(c.get("seconds", 0.0))
    return {
        "calls": len(calls),
        "asked": len(asked),
        "valid_answers": len(valid),
        "valid_rate": round(len(valid) / len(asked), 3) if asked else 0.0,
        "fallbacks": outcomes.get("fallback", 0),
        "outcomes": outcomes,
        "seconds_per_call_mean": round(statistics.fmean(seconds), 2) if seconds else 0.0,
        "seconds_per_call_max": round(max(seconds), 2) if seconds else 0.0,
        "tokens_in": sum(int(c.get("prompt_tokens", 0)) for c in asked),
        "tokens_out": sum(int(c.get("completion_tokens", 0)) for c in asked),
        "by_role": by_role,
    }


def build_server(venv: Path) -> Path:
    """llama-cpp-python's server in its own venv (compiled from source the first time)."""
    python = venv / "bin" / "python"
    if python.exists():
        probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
        if probe.returncode == 0:
            return python
    print(f"building {LLAMA_PACKAGE} in {venv} (compiles llama.cpp: several minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", LLAMA_PACKAGE], check=True)
    return python


def wait_for(base_url: str, process: subprocess.Popen[bytes] | None, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the model server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"the model server at {base_url} did not answer within {limit_s:.0f} s")


def run_plan(base_url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": base_url,
        "RADPILOT_LLM_MODEL": model,
        "RADPILOT_LLM_TIMEOUT_S": str(args.timeout_s),
        "RADPILOT_LLM_RETRIES": "1",
        "RADPILOT_LLM_VISION": "1" if args.vision else "0",
        "RADPILOT_LLM_JSON": args.json_mode,
    }
    out = Path(args.out)
    argv = [sys.executable, "-m", "services", "plan", "--in-process", "--agent", "llm"]
    argv += ["--case", "analytic-cshape", "--param", "spacing_mm=8"]
    argv += ["--protocol", str(ROOT / "protocols" / "tg119_cshape_harder.yaml")]
    argv += ["--max-iterations", str(args.iterations), "--out", str(out / "plan")]
    if args.store:
        argv += ["--store", args.store]
    t0 = time.perf_counter()
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(
            f"the plan failed ({run.returncode}):\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
        )
    summary = json.loads((out / "plan" / "summary.json").read_text())
    result = summarise(summary.get("llm_calls", []))
    result["plan_seconds"] = round(time.perf_counter() - t0, 1)
    result["iterations"] = summary.get("iterations")
    result["all_goals_met"] = summary.get("all_goals_met")
    result["model"] = model
    return result


def report(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}: {result['asked']} calls asked, {result['valid_answers']} valid "
        f"({100 * result['valid_rate']:.0f} %), {result['fallbacks']} fallback(s), "
        f"{result['seconds_per_call_mean']:.1f} s per call (max {result['seconds_per_call_max']:.1f}), "
        f"{result['tokens_in']} tokens in / {result['tokens_out']} out; "
        f"{result['iterations']} iteration(s) in {result['plan_seconds']:.0f} s, "
        f"goals {'met' if result['all_goals_met'] else 'not all met'}",
        f"outcomes: {result['outcomes']}",
    ]
    for role, r in result["by_role"].items():
        lines.append(
            f"  {role:14s} {r['valid']}/{r['calls']} valid, {r['seconds'] / max(r['calls'], 1):.1f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=os.environ.get("LLM_GGUF", ""), help="model file ($LLM_GGUF)")
    ap.add_argument("--mmproj", default=os.environ.get("LLM_MMPROJ", ""), help="vision projector")
    ap.add_argument("--base-url", default="", help="check this running endpoint instead")
    ap.add_argument("--model", default="", help="model name to request (default: the file's)")
    ap.add_argument("--venv", default=str(DEFAULT_VENV))
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--ctx", type=int, default=8192, help="context length (prompts reach ~5k)")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per LLM call")
    ap.add_argument(
        "--json-mode", default="json_object", choices=["json_schema", "json_object", "text"]
    )
    ap.add_argument("--store", default="", help="case store (default: the user's)")
    ap.add_argument("--out", default=str(ROOT / "out" / "llm-local-check"))
    args = ap.parse_args(argv)
    args.vision = bool(args.mmproj)
    if not args.base_url and not args.gguf:
        print(
            "llm-local-check skipped: no model file given. Run it with a GGUF model, e.g. "
            "make llm-local-check LLM_GGUF=/models/qwen2.5-7b-instruct-q4_k_m.gguf"
        )
        return 0
    process = None
    try:
        if args.base_url:
            base_url = args.base_url.rstrip("/")
            model = args.model or "local"
            args.vision = args.vision or bool(args.model and "vl" in args.model.lower())
        else:
            gguf = Path(args.gguf)
            if not gguf.is_file():
                print(f"LLM_GGUF={gguf}: no such file", file=sys.stderr)
                return 2
            python = build_server(Path(args.venv))
            model = args.model or gguf.stem
            cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model]
            cmd += ["--host", "127.0.0.1", "--port", str(args.port), "--n_ctx", str(args.ctx)]
            if args.mmproj:
                cmd += ["--clip_model_path", args.mmproj, "--chat_format", "llava-1-5"]
            Path(args.out).mkdir(parents=True, exist_ok=True)
            log = open(Path(args.out) / "server.log", "wb")  # noqa: SIM115 (lives with the process)
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            base_url = f"http://127.0.0.1:{args.port}/v1"
        wait_for(base_url, process, SERVER_START_S)
        result = run_plan(base_url, model, args)
    except RuntimeError as exc:
        print(f"llm-local-check failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm-check.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"result: {out / 'llm-check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

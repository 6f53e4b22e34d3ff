#!/usr/bin/env python
"""Everything a GPU changes, checked and measured in one command (about 9 minutes on an H100/H200-class GPU).

    bash scripts/gpu_check.sh                 # on the GPU machine: sets up .venv, then runs this script
    python scripts/gpu_check.py               # in an environment that has a CUDA torch and the project
    python scripts/gpu_check.py --dry-run     # on a CPU machine: the plan, and the CPU half of every stage

Stages, each in its own process with its own time budget (a failing stage does not stop the later ones):

1. ``tests``: ``pytest -m gpu`` (``tests/test_gpu.py``: every kernel path against the float64 reference, bf16/fp16,
   the non-finite skip, state_dict round trips between device and CPU; the CUDA tests of the other files).
2. ``bench``: ``scripts/bench_optimizer.py --device cuda`` on GPT-2 124M (fp32, bf16) and the Llama-1B slice:
   ``CoupledAdam()`` against ``torch.optim.AdamW(fused=True)`` interleaved, median ratio and IQR, state bytes, the
   fraction of the memory bandwidth (an in-place ``a += b`` probe in the same run); also ``nonfinite="ignore"``,
   ``compact=False`` and ``foreach=True``.
3. ``ab``: the quickstart A/B (both recipes, 100 steps) with ``--bf16`` and without; eval loss and ``||mu||^r``
   against the CPU figures in ``scripts/gpu_check_data/quickstart_cpu_reference.json`` (same seed: close, not
   bitwise).
4. ``compile``: ``torch.compile(opt.step)``: compiled graphs run per step, and the numbers against eager.
5. ``memory``: peak device memory of the optimizer state, CoupledAdam against AdamW, on GPT-2 124M shapes.
6. ``metrics``: ``scripts/bench_metrics.py --device cuda``: ``quick_isotropy`` and ``embedding_metrics`` (without
   and with token counts) on GPT-2's ``50304 x 768`` in float64 on the GPU, as ratios to one Gram product there
   (their agreement with the CPU values is a test of the ``tests`` stage).

Writes ``<output_dir>/report.json`` and ``report.md`` (device, driver, torch and CUDA versions, every figure) and
exits 1 if a stage failed. ``--dry-run`` runs on the CPU at toy sizes with the same code paths, so that CI tests
this script; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, too

from coupled_adam_hf.cli import UsageError, run_cli  # noqa: E402

STAGES = ("tests", "bench", "ab", "compile", "memory", "metrics")
#: Seconds each stage may take on a GPU (the whole check: about 9 minutes); the dry run uses half, at least 60.
BUDGET_S = {"tests": 120, "bench": 150, "ab": 130, "compile": 45, "memory": 30, "metrics": 60}
REFERENCE = ROOT / "scripts" / "gpu_check_data" / "quickstart_cpu_reference.json"
BENCH_CONTENDERS = "adamw_fused,coupled_default,coupled_fused_nocheck,coupled_full_fused,coupled_foreach,adamw_foreach"
#: How close a GPU run of the quickstart must come to the CPU figures (same seed, different kernels and order).
AB_TOLERANCE = {"eval_loss": 0.05, "embedding_mean_norm_ratio": 0.05}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script, not a GPU")
    parser.add_argument("--output_dir", default="gpu_check", help="where report.json and report.md go")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--stage-worker", choices=["compile", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise UsageError(f"unknown --stages {unknown or stages}; choose among {', '.join(STAGES)}")
    args.stage_list = stages
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is not a directory")
    if (out / "report.json").exists() and not args.overwrite and args.stage_worker is None:
        raise UsageError(f"{out / 'report.json'} exists: pass --overwrite to replace it, or another --output_dir")
    return args


# ------------------------------------------------------------------------------------------- environment
def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": device, "host": platform.node()}
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30)
            info["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout else None
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def run_stage(name: str, command: list[str], budget: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=budget,
                              env={**os.environ, **(env or {})})
        status = "passed" if done.returncode == 0 else "failed"
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        status, code = "timeout", None
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
    return {"stage": name, "status": status, "returncode": code, "seconds": round(time.monotonic() - started, 1),
            "command": " ".join(command), "stdout_tail": out[-4000:], "stderr_tail": err[-4000:]}


# ------------------------------------------------------------------------------------------- stages
def stage_tests(args, budget: float) -> dict[str, Any]:
    env = {"COUPLED_ADAM_TEST_DEVICE": "cpu"} if args.dry_run else {}
    result = run_stage("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                 "tests/"], budget, env)
    summary = [line for line in result["stdout_tail"].splitlines() if " passed" in line or " failed" in line]
    result["summary"] = summary[-1] if summary else None
    return result


def stage_bench(args, budget: float, out: Path) -> dict[str, Any]:
    json_path = out / "bench.json"
    if args.dry_run:
        sizes = ["--device", "cpu", "--sets", "small", "--dtypes", "float32", "--steps", "2", "--warmup", "1",
                 "--contenders", "adamw_fused,coupled_default,coupled_foreach", "--protocol", "warm",
                 "--stream-mib", "16"]
    else:
        sizes = ["--device", "cuda", "--sets", "gpt2-124m,llama-1b-slice", "--dtypes", "float32,bfloat16",
                 "--steps", "15", "--contenders", BENCH_CONTENDERS, "--protocol", "warm"]
    result = run_stage("bench", [sys.executable, "scripts/bench_optimizer.py", *sizes, "--output", str(json_path)],
                       budget)
    if json_path.is_file():
        result["figures"] = json.loads(json_path.read_text())
    return result


def stage_metrics(args, budget: float, out: Path) -> dict[str, Any]:
    json_path = out / "metrics.json"
    sizes = ["--device", "cpu", "--quick"] if args.dry_run else ["--device", "cuda", "--repeats", "5"]
    result = run_stage("metrics", [sys.executable, "scripts/bench_metrics.py", *sizes, "--output", str(json_path)],
                       budget)
    if json_path.is_file():
        figures = json.loads(json_path.read_text())
        result["figures"] = figures
        ratios = {r["contender"]: r["ratio_to_gram"] for r in figures["results"] if r["contender"] != "gram"}
        result["summary"] = "x Gram: " + ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items())
    return result


def _read_results(folder: Path) -> dict[str, Any]:
    path = folder / "all_results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_ab(args, budget: float, out: Path) -> dict[str, Any]:
    reference = json.loads(REFERENCE.read_text())
    variants = [("fp32", [])] if args.dry_run else [("fp32", []), ("bf16", ["--bf16", "true"])]
    steps = "2" if args.dry_run else str(reference.get("max_steps", 100))
    device_flags = ["--use_cpu", "true"] if args.dry_run else ["--use_cpu", "false"]
    runs, started, status = {}, time.monotonic(), "passed"
    for precision, flags in variants:
        for recipe in ("adamw", "coupled"):
            left = budget - (time.monotonic() - started)
            run_dir = out / "ab" / f"{recipe}-{precision}"
            command = [sys.executable, "scripts/train.py", f"recipes/quickstart-{recipe}.yaml", "--max_steps", steps,
                       "--output_dir", str(run_dir), "--overwrite_output_dir", "true", "--disable_tqdm", "true",
                       *device_flags, *flags]
            done = run_stage(f"ab:{recipe}-{precision}", command, max(left, 1.0))
            results = _read_results(run_dir)
            entry = {"status": done["status"], "seconds": done["seconds"],
                     **{key: results.get(key) for key in AB_TOLERANCE}}
            expected = reference.get("runs", {}).get(recipe, {})
            if not args.dry_run and done["status"] == "passed":
                entry["cpu_reference"] = {key: expected.get(key) for key in AB_TOLERANCE}
                entry["close_to_cpu"] = all(
                    entry[key] is not None and expected.get(key) is not None
                    and abs(entry[key] - expected[key]) <= tolerance for key, tolerance in AB_TOLERANCE.items())
            if done["status"] != "passed" or entry.get("close_to_cpu") is False:
                status = "failed"
                entry["stderr_tail"] = done["stderr_tail"][-1500:]
            runs[f"{recipe}-{precision}"] = entry
    return {"stage": "ab", "status": status, "seconds": round(time.monotonic() - started, 1), "runs": runs}


def stage_worker_result(name: str, args, budget: float) -> dict[str, Any]:
    device = "cpu" if args.dry_run else "cuda"
    result = run_stage(name, [sys.executable, "scripts/gpu_check.py", "--stage-worker", name, "--device", device,
                              "--output_dir", args.output_dir], budget)
    lines = [line for line in result["stdout_tail"].splitlines() if line.startswith("{")]
    if lines:
        result["figures"] = json.loads(lines[-1])
        if result["status"] == "passed" and result["figures"].get("ok") is False:
            result["status"] = "failed"
    return result


# ------------------------------------------------------------------------------------------- workers
def worker_compile(device: str) -> dict[str, Any]:
    """``torch.compile(opt.step)``: graphs run per step for 1 and 3 coupled tensors, and the weights against eager."""
    import torch
    from torch._inductor.compile_fx import compile_fx

    from coupled_adam_hf import CoupledAdam

    graph_runs = [0]

    def counting_inductor(gm, example_inputs):
        compiled = compile_fx(gm, example_inputs)

        def run(*inputs):
            graph_runs[0] += 1
            return compiled(*inputs)
        return run

    def make(matrices: int):
        gen = torch.Generator().manual_seed(0)
        embeddings = [torch.randn(256, 64, generator=gen).to(device).requires_grad_() for _ in range(matrices)]
        others = [torch.randn(64, 64, generator=gen).to(device).requires_grad_() for _ in range(matrices)]
        opt = CoupledAdam([{"params": embeddings, "coupled": True, "weight_decay": 0.0},
                           {"params": others, "weight_decay": 0.1}], lr=1e-2, nonfinite="ignore")
        return [*embeddings, *others], opt

    figures: dict[str, Any] = {"graphs_per_step": {}, "max_abs_difference": {}}
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for matrices in (1, 3):
            torch._dynamo.reset()
            (eager_params, eager_opt), (params, opt) = make(matrices), make(matrices)
            step = torch.compile(opt.step, backend=counting_inductor)
            for i in range(4):
                gen = torch.Generator().manual_seed(i)
                for p, q in zip(eager_params, params):
                    p.grad = torch.randn(p.shape, generator=gen).to(device)
                    q.grad = p.grad.clone()
                eager_opt.step()
                graph_runs[0] = 0
                step() if i else opt.step()  # the first step creates the state
            figures["graphs_per_step"][matrices] = graph_runs[0]
            figures["max_abs_difference"][matrices] = max(float((a - b).abs().max())
                                                          for a, b in zip(eager_params, params))
    counts = figures["graphs_per_step"]
    figures["ok"] = counts[1] == counts[3] and max(figures["max_abs_difference"].values()) < 1e-5
    return figures


def worker_memory(device: str) -> dict[str, Any]:
    """Peak memory of optimizer state after one step: CoupledAdam (tied 50304 x 768 ``wte`` coupled) vs AdamW."""
    import torch

    from coupled_adam_hf import CoupledAdam

    shapes = [(50304, 768), (1024, 768)] + [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
    if device == "cpu":  # the dry run: the same code at a toy size
        shapes = [(512, 32), (64, 32)] + [(32, 96), (32, 32)] * 2

    def state_bytes(build) -> dict[str, float]:
        params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = build(params)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        opt.step()
        held = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        figures = {"state_bytes": float(held)}
        if device == "cuda":
            torch.cuda.synchronize()
            figures["peak_step_bytes"] = float(torch.cuda.max_memory_allocated() - before)
            figures["state_allocated_bytes"] = float(torch.cuda.memory_allocated() - before)
        del opt, params
        return figures

    adamw = state_bytes(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True))
    coupled = state_bytes(lambda ps: CoupledAdam([{"params": ps[:1], "coupled": True}, {"params": ps[1:]}], lr=1e-3))
    ratio = coupled["state_bytes"] / adamw["state_bytes"]
    return {"adamw": adamw, "coupled_adam": coupled, "state_ratio": ratio, "ok": ratio < 1.0}


# ------------------------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check{' (dry run on CPU: says nothing about a GPU)' if report['dry_run'] else ''}", "",
             f"- device: {env.get('device_name')} ({env.get('device')}), driver {env.get('driver', '-')}",
             f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}",
             f"- command: `{report['command']}`", "", "| stage | status | seconds | summary |", "|---|---|---|---|"]
    for stage in report["stages"]:
        summary = stage.get("summary") or ""
        if stage["stage"] == "memory" and "figures" in stage:
            summary = f"state x AdamW: {stage['figures']['state_ratio']:.3f}"
        if stage["stage"] == "compile" and "figures" in stage:
            summary = f"graphs per step (1 / 3 coupled tensors): {stage['figures']['graphs_per_step']}"
        lines.append(f"| {stage['stage']} | {stage['status']} | {stage.get('seconds', '-')} | {summary} |")
    ab = next((s for s in report["stages"] if s["stage"] == "ab"), None)
    if ab and ab.get("runs"):
        lines += ["", "## Quickstart A/B", "", "| run | eval loss | `||mu||^r` | close to the CPU figures |",
                  "|---|---|---|---|"]
        for name, entry in ab["runs"].items():
            lines.append(f"| {name} | {entry.get('eval_loss')} | {entry.get('embedding_mean_norm_ratio')} | "
                         f"{entry.get('close_to_cpu', '-')} |")
    metrics = next((s for s in report["stages"] if s["stage"] == "metrics"), None)
    if metrics and metrics.get("figures"):
        shape = " x ".join(str(n) for n in metrics["figures"]["shape"])
        lines += ["", f"## Embedding metrics (bench_metrics.py, {shape} float64)", "",
                  "| function | median s | x Gram (median) | range |", "|---|---|---|---|"]
        for row in metrics["figures"]["results"]:
            lines.append(f"| {row['contender']} | {row['median_s']:.4f} | {row['ratio_to_gram']:.2f} | "
                         f"{row['ratio_low']:.2f}-{row['ratio_high']:.2f} |")
    bench = next((s for s in report["stages"] if s["stage"] == "bench"), None)
    if bench and bench.get("figures"):
        lines += ["", "## Optimizer step (bench_optimizer.py, raw JSON in report.json)", "",
                  "```", json.dumps(bench["figures"], indent=1)[:6000], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.stage_worker:
        figures = (worker_compile if args.stage_worker == "compile" else worker_memory)(args.device)
        print(json.dumps(figures))
        return 0 if figures.get("ok", True) else 1

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise UsageError(f"no CUDA device visible to torch {torch.__version__}: run this on a GPU machine with a "
                         "CUDA build of torch (bash scripts/gpu_check.sh sets one up), or pass --dry-run")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    plan = ", ".join(f"{s} ({BUDGET_S[s]} s)" for s in args.stage_list)
    print(f"gpu_check: {'dry run on CPU; ' if args.dry_run else ''}stages {plan}", flush=True)
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(device),
                              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "stages": []}
    for name in args.stage_list:
        budget = max(60.0, BUDGET_S[name] / 2) if args.dry_run else float(BUDGET_S[name])
        print(f"gpu_check: {name} ...", flush=True)
        if name == "tests":
            result = stage_tests(args, budget)
        elif name == "bench":
            result = stage_bench(args, budget, out)
        elif name == "ab":
            result = stage_ab(args, budget, out)
        elif name == "metrics":
            result = stage_metrics(args, budget, out)
        else:
            result = stage_worker_result(name, args, budget)
        print(f"gpu_check: {name} {result['status']} in {result.get('seconds')} s", flush=True)
        report["stages"].append(result)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")  # whatever happens later, kept
    (out / "report.md").write_text(markdown(report))
    failed = [s["stage"] for s in report["stages"] if s["status"] != "passed"]
    print(f"gpu_check: wrote {out / 'report.json'} and {out / 'report.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else "; every stage passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    exit_code = [0]

    def entry() -> None:
        exit_code[0] = main()

    run_cli(entry, prog="gpu_check.py")
    sys.exit(exit_code[0])

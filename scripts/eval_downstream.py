#!/usr/bin/env python
"""Downstream accuracy of one or more checkpoints: ``downstream.json`` and a table on the terminal.

    python scripts/eval_downstream.py \\
        --model_name_or_path runs/adamw runs/coupled --labels AdamW "Coupled Adam" \\
        --output_dir eval/downstream                      # BLiMP, offline (the default --tasks blimp)

    python scripts/eval_downstream.py --model_name_or_path runs/coupled --output_dir eval/paper --tasks paper

``--tasks blimp`` scores the 67 BLiMP paradigms shipped with the package (Warstadt et al. 2020, CC-BY 4.0):
accuracy per paradigm, per field and overall (mean over paradigms); ``--limit N`` takes N pairs per paradigm;
``blimp.png`` draws overall and per-field accuracy, the checkpoints side by side (``--no_plots`` skips it).
It runs through lm-evaluation-harness (``pip install 'coupled_adam_hf[downstream]'``) when that is installed and
``--scorer auto``, else with the package's native scorer (the same rule: :mod:`coupled_adam_hf.downstream`).
``--tasks paper`` runs the paper's lm-eval tasks (Section 5: hellaswag, winogrande, arc_easy, arc_challenge,
truthfulqa_mc2, lambada_openai, race; metric ``acc``; the average and its standard error sqrt(sum se_i^2)/n);
their data comes from the Hugging Face Hub, so they need network access and lm-eval. Single task names from that
list work too. Arguments can also come from one ``.json``/``.yaml`` file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coupled_adam_hf import cli
from coupled_adam_hf.cli import UsageError, one_line, run_cli
from coupled_adam_hf.downstream import BLIMP_FIELDS, PAPER_TASKS, lm_eval_problem
from coupled_adam_hf.locking import OutputDirLock

logger = logging.getLogger("eval_downstream")

RESULTS_FILE = "downstream.json"
FIGURE_FILE = "blimp.png"
TASK_NAMES = ("blimp", "paper") + PAPER_TASKS
SCORERS = ("auto", "lm-eval", "native")
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass
class DownstreamArguments:
    model_name_or_path: list[str] = field(
        metadata={"help": "One or more checkpoints: local model folders (with their tokenizer) or Hub ids."}
    )
    output_dir: str = field(metadata={"help": f"Where {RESULTS_FILE} goes."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "A display name per checkpoint (default: the folder names)."}
    )
    tasks: list[str] = field(
        default_factory=lambda: ["blimp"],
        metadata={"help": f"blimp (offline), paper (the paper's Hub tasks), or names among {', '.join(PAPER_TASKS)}."},
    )
    limit: int | None = field(default=None, metadata={"help": "BLiMP: pairs per paradigm (default all 1000); "
                                                             "Hub tasks: documents per task."})
    scorer: str = field(default="auto", metadata={"help": "BLiMP scorer: auto (lm-eval when installed, else "
                                                          "native), lm-eval, native."})
    batch_size: int = field(default=64, metadata={"help": "Sentences per forward pass."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": f"Replace an existing {RESULTS_FILE} (refused otherwise)."}
    )
    plots: bool = field(default=True, metadata={"help": f"BLiMP: write {FIGURE_FILE} (--no_plots to skip)."})


def parse_arguments(argv: list[str] | None) -> DownstreamArguments:
    (args,) = cli.parse_arguments(DownstreamArguments, argv)
    return args


def offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def hub_tasks(tasks: list[str]) -> list[str]:
    expanded = []
    for task in tasks:
        for name in PAPER_TASKS if task == "paper" else [] if task == "blimp" else [task]:
            if name not in expanded:
                expanded.append(name)
    return expanded


def validate(args: DownstreamArguments) -> tuple[list[str], str]:
    """(labels, BLiMP scorer); every argument checked before any model is loaded."""
    unknown = [task for task in args.tasks if task not in TASK_NAMES]
    if unknown:
        raise UsageError(f"unknown --tasks {', '.join(unknown)}; choose among {', '.join(TASK_NAMES)}")
    if args.scorer not in SCORERS:
        raise UsageError(f"unknown --scorer {args.scorer!r}; choose among {', '.join(SCORERS)}")
    labels = cli.checkpoint_labels(args.model_name_or_path, args.labels)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    cli.check_device_name(args.device)
    hub = hub_tasks(args.tasks)
    if hub and offline():
        raise UsageError(f"the tasks {', '.join(hub)} need their data from the Hugging Face Hub, which cannot be "
                         f"reached offline ({'/'.join(OFFLINE_VARIABLES)} is set); blimp is the offline task: "
                         "--tasks blimp")
    problem = lm_eval_problem() if hub or args.scorer == "lm-eval" else None
    if problem:
        raise UsageError(problem)
    scorer = args.scorer
    if scorer == "auto":
        scorer = "lm-eval" if lm_eval_problem() is None else "native"
    results = Path(args.output_dir) / RESULTS_FILE
    if results.exists() and not args.overwrite_output_dir:
        raise UsageError(f"{results} exists: pass --overwrite_output_dir to replace it, or another --output_dir")
    return labels, scorer


def load_tokenizers(paths: list[str]) -> list[Any]:
    """Each checkpoint's tokenizer, loaded before any model: a checkpoint without one stops the run at once."""
    from coupled_adam_hf.reliability import load_checkpoint_tokenizer

    return [load_checkpoint_tokenizer(path) for path in paths]


def run_blimp(path: str, tokenizer, scorer: str, args: DownstreamArguments, device: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from coupled_adam_hf.downstream import score_blimp, score_blimp_lm_eval

    try:
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
    except Exception as error:
        raise UsageError(f"cannot load checkpoint {path!r} as a causal LM: {one_line(error)}") from error
    score = score_blimp_lm_eval if scorer == "lm-eval" else score_blimp
    return score(model, tokenizer, limit=args.limit, batch_size=args.batch_size, device=device)


def run_hub_tasks(path: str, tasks: list[str], args: DownstreamArguments, device: str) -> dict[str, Any]:
    """The paper's lm-eval tasks: ``acc`` and its standard error per task, their mean and sqrt(sum se^2)/n."""
    import lm_eval

    output = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path}", tasks=tasks,
                                     batch_size=args.batch_size, device=device, limit=args.limit)
    per_task = {}
    for task in tasks:
        values = output["results"][task]
        per_task[task] = {"acc": values["acc,none"], "acc_stderr": values.get("acc_stderr,none")}
    accuracies = [entry["acc"] for entry in per_task.values()]
    errors = [entry["acc_stderr"] for entry in per_task.values()]
    stderr = (math.sqrt(sum(e * e for e in errors)) / len(errors)
              if all(isinstance(e, (int, float)) for e in errors) else None)
    return {"tasks": per_task, "average": sum(accuracies) / len(accuracies), "average_stderr": stderr}


def format_tables(results: dict[str, Any]) -> str:
    tables = []
    blimp_rows = [[label, entry["blimp"]["scorer"], str(entry["blimp"]["pairs"]), f"{entry['blimp']['overall']:.4f}"]
                  + [f"{entry['blimp']['fields'].get(f, float('nan')):.4f}" for f in BLIMP_FIELDS]
                  + [f"{entry['blimp']['seconds']:.0f}"]
                  for label, entry in results["checkpoints"].items() if "blimp" in entry]
    if blimp_rows:
        tables.append(_table(["checkpoint", "scorer", "pairs", "BLiMP", *BLIMP_FIELDS, "seconds"], blimp_rows))
    hub_rows = []
    for label, entry in results["checkpoints"].items():
        if "hub" in entry:
            hub = entry["hub"]
            stderr = "-" if hub["average_stderr"] is None else f"{hub['average_stderr']:.4f}"
            hub_rows.append([label] + [f"{task['acc']:.4f}" for task in hub["tasks"].values()]
                            + [f"{hub['average']:.4f} ± {stderr}"])
            names = list(hub["tasks"])
    if hub_rows:
        tables.append(_table(["checkpoint", *names, "average"], hub_rows))
    return "\n\n".join(tables)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_figure(results: dict[str, Any], path: Path) -> Path:
    """BLiMP accuracy overall and per field, the checkpoints side by side (chance is 0.5)."""
    from coupled_adam_hf import plotting

    bars = {label: {"overall": entry["blimp"]["overall"], **entry["blimp"]["fields"]}
            for label, entry in results["checkpoints"].items() if "blimp" in entry}
    return plotting.plot_metric_bars(bars, path, keys=["overall", *BLIMP_FIELDS],
                                     title="BLiMP accuracy (mean over paradigms; chance 0.5)", reference=0.5)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what it writes to ``downstream.json``."""
    args = parse_arguments(argv)
    labels, scorer = validate(args)
    tokenizers = load_tokenizers(args.model_name_or_path)
    device = str(cli.resolve_device(args.device))  # lm-eval takes the device by name
    with OutputDirLock(args.output_dir, what="evaluation"):  # one evaluation per folder
        return evaluate(args, labels, scorer, tokenizers, device)


def evaluate(args: DownstreamArguments, labels: list[str], scorer: str, tokenizers: list[Any],
             device: str) -> dict[str, Any]:
    hub = hub_tasks(args.tasks)
    results: dict[str, Any] = {"arguments": asdict(args), "checkpoints": {}}
    for label, path, tokenizer in zip(labels, args.model_name_or_path, tokenizers):
        entry: dict[str, Any] = {"model_name_or_path": path}
        if "blimp" in args.tasks:
            start, load = time.perf_counter(), os.getloadavg()
            entry["blimp"] = run_blimp(path, tokenizer, scorer, args, device)
            entry["blimp"].update(seconds=time.perf_counter() - start, load_before=load[0],
                                  load_after=os.getloadavg()[0])
        if hub:
            entry["hub"] = run_hub_tasks(path, hub, args, device)
        results["checkpoints"][label] = entry
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figure = args.plots and "blimp" in args.tasks
    if figure:
        results["plots"] = [str(write_figure(results, output_dir / FIGURE_FILE))]
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print(format_tables(results))
    print(f"\nWrote {output_dir / RESULTS_FILE}" + (f" and {FIGURE_FILE}" if figure else ""))
    return results


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    run_cli(main, prog="eval_downstream.py")  # bad input: one line on stderr, exit status 2

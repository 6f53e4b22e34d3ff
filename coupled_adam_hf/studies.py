"""The paper's studies at laptop scale: definitions, aggregation over seeds, tables and figures.

``scripts/demo.py --study NAME`` trains every run of a study through ``scripts/train.py``, evaluates it with
``scripts/eval_isotropy.py`` and hands the results to this module, which is pure (no training, no subprocesses):

- ``avg_scale`` (paper §6.1, scaled Coupled Adam): the coupled second moment times s in {2^-5, ..., 2^5};
- ``embedding_sgd`` (paper §6.2): the embeddings trained with plain SGD at f x the base lr, f in {100, ..., 600},
  every other parameter AdamW (one ``CoupledAdam`` with a ``update="sgd"`` group);
- ``seeds``: AdamW vs Coupled Adam over N seeds (mean ± standard deviation);
- ``length``: AdamW vs Coupled Adam at 1x, 4x and 16x the base number of steps.

Every study includes the AdamW baseline (the reference line of its figures). ``--seeds N`` repeats every run with
seeds 1..N (the paper's small-scale runs used seeds 1, 2, 3).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "METRICS",
    "STUDIES",
    "StudyRun",
    "aggregate",
    "mean_std",
    "exceeds_two_sigma",
    "plan_study",
    "study_figure",
    "study_report",
]

ADAMW_RECIPE = "recipes/quickstart-adamw.yaml"
COUPLED_RECIPE = "recipes/quickstart-coupled.yaml"
AVG_SCALES = tuple(2.0**n for n in range(-5, 6))
SGD_FACTORS = (100, 200, 300, 400, 500, 600)
LENGTH_MULTIPLES = (1, 4, 16)
#: (key in results.json, column title, format)
METRICS = (("eval_loss", "eval loss", "{:.3f}"), ("iso", "Iso", "{:.3f}"), ("mean_norm_ratio", "‖mu‖^r", "{:.3f}"))
STUDY_TITLES = {
    "avg_scale": "Scaled Coupled Adam: the coupled second moment times avg_scale (paper §6.1)",
    "embedding_sgd": "SGD on the embeddings at f x the base learning rate, AdamW elsewhere (paper §6.2)",
    "seeds": "AdamW vs Coupled Adam over seeds",
    "length": "AdamW vs Coupled Adam at three training lengths",
}
STUDIES = tuple(STUDY_TITLES)


@dataclass
class StudyRun:
    """One training run of a study: a recipe, flags that override it, and the settings it stands for."""

    name: str
    label: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _seeded(name: str, label: str, recipe: str, overrides: list[str], settings: dict[str, Any],
            seed: int, max_steps: int) -> StudyRun:
    return StudyRun(f"{name}_seed{seed}", label, recipe,
                    [*overrides, "--seed", str(seed), "--max_steps", str(max_steps)],
                    {**settings, "seed": seed, "max_steps": max_steps})


def plan_study(study: str, *, seeds: int, max_steps: int) -> list[StudyRun]:
    """The runs of ``study``, seeds 1..``seeds`` each, ``max_steps`` the base length (warmup stays the recipe's)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    if seeds < 1 or max_steps < 1:
        raise ValueError(f"seeds and max_steps must be >= 1, got {seeds} and {max_steps}")
    runs = []
    for seed in range(1, seeds + 1):
        if study == "length":
            for multiple in LENGTH_MULTIPLES:
                steps = multiple * max_steps
                # evaluate and save once at the end, whatever the length (the recipes' 200 would cost at 16x)
                every = ["--eval_steps", str(steps), "--save_steps", str(steps)]
                runs.append(_seeded(f"adamw_steps{steps}", "AdamW", ADAMW_RECIPE, every, {}, seed, steps))
                runs.append(_seeded(f"coupled_steps{steps}", "Coupled Adam", COUPLED_RECIPE, every, {}, seed, steps))
            continue
        runs.append(_seeded("adamw", "AdamW", ADAMW_RECIPE, [], {}, seed, max_steps))
        if study == "seeds":
            runs.append(_seeded("coupled", "Coupled Adam", COUPLED_RECIPE, [], {}, seed, max_steps))
        elif study == "avg_scale":
            for scale in AVG_SCALES:
                runs.append(_seeded(f"coupled_as{scale:g}", "Coupled Adam", COUPLED_RECIPE,
                                    ["--coupled_avg_scale", repr(scale)], {"avg_scale": scale}, seed, max_steps))
        elif study == "embedding_sgd":
            for factor in SGD_FACTORS:
                runs.append(_seeded(f"sgd_f{factor}", "SGD embeddings", COUPLED_RECIPE,
                                    ["--coupled_update", "sgd", "--coupled_lr_factor", str(factor)], {"f": factor},
                                    seed, max_steps))
    return runs


# ------------------------------------------------------------------------------------------- aggregation
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def exceeds_two_sigma(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, bool]:
    """``(mean(a) - mean(b), sigma, |difference| > 2 sigma)`` with sigma the standard deviation of the
    difference of the two means, ``sqrt(s_a^2 / n_a + s_b^2 / n_b)``. Needs at least 2 values on each side
    (with fewer there is no spread to compare with: the verdict is False)."""
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    difference = mean_a - mean_b
    if len(a) < 2 or len(b) < 2:
        return difference, float("nan"), False
    sigma = math.sqrt(std_a**2 / len(a) + std_b**2 / len(b))
    return difference, sigma, abs(difference) > 2 * sigma


def _setting_key(entry: Mapping[str, Any]) -> tuple:
    settings = {k: v for k, v in entry["settings"].items() if k != "seed"}
    return entry["label"], tuple(sorted(settings.items()))


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (label, settings other than the seed): ``n`` and each metric's values, mean and std."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for entry in results:
        groups.setdefault(_setting_key(entry), []).append(entry)
    rows = []
    for (label, settings), entries in groups.items():
        row: dict[str, Any] = {"label": label, "settings": dict(settings), "n": len(entries)}
        for key, _, _ in METRICS:
            values = [e[key] for e in entries if isinstance(e.get(key), (int, float))]
            row[key] = {"values": values, "mean": mean_std(values)[0], "std": mean_std(values)[1]}
        rows.append(row)
    return rows


def _cell(stat: Mapping[str, Any], fmt: str) -> str:
    if not stat["values"]:
        return "-"
    text = fmt.format(stat["mean"])
    return text + (f" ± {fmt.format(stat['std'])}" if len(stat["values"]) > 1 else "")


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items()) or "-"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| run | settings | seeds | " + " | ".join(title for _, title, _ in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for row in rows:
        cells = [row["label"], _settings_text(row["settings"]), str(row["n"])]
        cells += [_cell(row[key], fmt) for key, _, fmt in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(rows: Sequence[Mapping[str, Any]], study: str) -> list[str]:
    """Which differences against AdamW (at the same length) exceed two standard deviations of the difference."""
    lines = []
    for row in rows:
        if row["label"] == "AdamW":
            continue
        reference = next((r for r in rows if r["label"] == "AdamW"
                          and r["settings"].get("max_steps") == row["settings"].get("max_steps")), None)
        if reference is None:
            continue
        parts = []
        for key, title, fmt in METRICS:
            a, b = row[key]["values"], reference[key]["values"]
            if not a or not b:
                continue
            difference, sigma, significant = exceeds_two_sigma(a, b)
            if math.isnan(sigma):
                parts.append(f"{title} {difference:+.3f} (one seed: no spread)")
            else:
                parts.append(f"{title} {difference:+.3f} ± {sigma:.3f}" + (" **> 2 sigma**" if significant else ""))
        lines.append(f"- {row['label']} ({_settings_text(row['settings'])}) minus AdamW: " + "; ".join(parts))
    return lines


# ------------------------------------------------------------------------------------------- figures
_X_AXIS = {"avg_scale": ("avg_scale", "avg_scale (log scale)", True), "embedding_sgd": ("f", "f (SGD lr / base lr)",
           False), "length": ("max_steps", "training steps (log scale)", True)}


def study_figure(study: str, rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Eval loss, Iso and ``||mu||^r`` (mean ± std over seeds): against the study's setting with AdamW as a
    horizontal reference (avg_scale, embedding_sgd), against the length (length), or per optimizer (seeds)."""
    figure = Figure(layout="constrained", figsize=(13, 3.8))
    axes = figure.subplots(1, len(METRICS))
    adamw = [r for r in rows if r["label"] == "AdamW"]
    others = [r for r in rows if r["label"] != "AdamW"]
    for ax, (key, title, _) in zip(axes, METRICS):
        if study in ("avg_scale", "embedding_sgd"):
            setting, xlabel, log = _X_AXIS[study]
            points = sorted((r["settings"][setting], r[key]["mean"], r[key]["std"]) for r in others
                            if r[key]["values"])
            if points:
                x, y, e = map(np.asarray, zip(*points))
                ax.errorbar(x, y, yerr=e, marker="o", color="#d62728", capsize=3, label=others[0]["label"])
            for r in adamw:
                if r[key]["values"]:
                    ax.axhline(r[key]["mean"], color="#1f77b4", linestyle="--", label="AdamW")
                    if r[key]["std"] > 0:
                        ax.axhspan(r[key]["mean"] - r[key]["std"], r[key]["mean"] + r[key]["std"],
                                   color="#1f77b4", alpha=0.15)
            if log:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
        elif study == "length":
            for color, label in (("#1f77b4", "AdamW"), ("#d62728", "Coupled Adam")):
                points = sorted((r["settings"]["max_steps"], r[key]["mean"], r[key]["std"]) for r in rows
                                if r["label"] == label and r[key]["values"])
                if points:
                    x, y, e = map(np.asarray, zip(*points))
                    ax.errorbar(x, y, yerr=e, marker="o", color=color, capsize=3, label=label)
            ax.set_xscale("log")
            ax.set_xlabel(_X_AXIS["length"][1])
        else:
            for position, (color, row) in enumerate(zip(("#1f77b4", "#d62728"), rows)):
                values = row[key]["values"]
                ax.scatter([position] * len(values), values, color=color, alpha=0.6, s=18)
                if values:
                    ax.errorbar([position + 0.15], [row[key]["mean"]], yerr=[row[key]["std"]], marker="s",
                                color=color, capsize=4)
            ax.set_xticks(range(len(rows)), [r["label"] for r in rows])
            ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.suptitle(STUDY_TITLES[study])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def study_report(study: str, results: Sequence[Mapping[str, Any]], *, header: str, footer: Sequence[str] = (),
                 figures: Sequence[str] = ()) -> str:
    """The study's report.md: header, table of mean ± std per setting, the 2-sigma verdicts, every run, figures."""
    rows = aggregate(results)
    lines = [f"# {STUDY_TITLES[study]}", "", header, "", markdown_table(rows), "",
             "Differences against AdamW (sigma: standard deviation of the difference of the means, "
             "sqrt(s_a^2/n_a + s_b^2/n_b)):", "", *headline(rows, study), "", "## Every run", "",
             "| run | settings | eval loss | Iso | ‖mu‖^r |", "|---|---|---|---|---|"]
    for entry in results:
        cells = [fmt.format(entry[key]) if isinstance(entry.get(key), (int, float)) else "-"
                 for key, _, fmt in METRICS]
        lines.append(f"| {entry['label']} | {_settings_text(entry['settings'])} | " + " | ".join(cells) + " |")
    lines += ["", *footer]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"

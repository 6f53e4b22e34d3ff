"""PNG figures of embedding geometry and training curves, for one run or several side by side.

Every function takes matrices (``{label: [V, H] tensor}``, e.g. ``{"AdamW": E_adam, "Coupled Adam": E_coupled}``),
metric dicts or Trainer logs, writes one PNG and returns its path. Figures are drawn on matplotlib's Agg canvas
without ``pyplot``, so nothing here touches a global backend or needs a display.

- :func:`plot_singular_values`: singular value spectra, raw and mean-centered (a drifted mean is the outlier at k=1)
- :func:`plot_pca_projection`: rows projected on their top-2 singular directions, coloured by log token frequency,
  with the origin and the mean embedding marked
- :func:`plot_norm_vs_frequency`: embedding norm against log token frequency (the correlation ``rho`` in the title)
- :func:`plot_metric_bars`: headline metrics of several checkpoints as grouped bars
- :func:`plot_training_curves`: loss, ``embeddings/iso`` and ``embeddings/mean_norm_ratio`` over steps from one or
  more ``trainer_state.json`` log histories
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .metrics import pca_projection, singular_values

__all__ = [
    "DEFAULT_BAR_METRICS",
    "DEFAULT_CURVE_KEYS",
    "load_log_history",
    "plot_metric_bars",
    "plot_norm_vs_frequency",
    "plot_pca_projection",
    "plot_singular_values",
    "plot_training_curves",
]

DEFAULT_CURVE_KEYS = ("loss", "eval_loss", "embeddings/iso", "embeddings/mean_norm_ratio")
DEFAULT_BAR_METRICS = ("iso", "mean_norm_ratio", "avg_cosine", "isoscore")

_LABELS = {
    "loss": "training loss",
    "eval_loss": "eval loss",
    "embeddings/iso": "Iso (higher = more isotropic)",
    "embeddings/mean_norm_ratio": "||mu|| / mean ||e_i||",
    "embeddings/avg_cosine": "average cosine",
    "iso": "Iso",
    "iso_both_signs": "Iso (both signs)",
    "mean_norm_ratio": "||mu||^r",
    "avg_cosine": "avg cosine",
    "isoscore": "IsoScore",
    "effective_rank": "effective rank",
}
_DPI = 120


def _colors(count: int) -> list[str]:
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    return [cycle[i % len(cycle)] for i in range(count)]


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def _as_numpy(values: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().to(torch.float64).cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _check_matrices(matrices: Mapping[str, Tensor]) -> None:
    if not matrices:
        raise ValueError("no matrices to plot: pass {label: [V, H] tensor}")


def _counts_for(token_counts: Tensor | Mapping[str, Tensor] | None, label: str, rows: int) -> np.ndarray | None:
    counts = token_counts.get(label) if isinstance(token_counts, Mapping) else token_counts
    if counts is None:
        return None
    counts = _as_numpy(counts).ravel()
    if counts.size > rows:
        raise ValueError(f"{label}: {counts.size} token counts for a matrix of {rows} rows")
    return np.concatenate([counts, np.zeros(rows - counts.size)])


def plot_singular_values(matrices: Mapping[str, Tensor], path: str | Path, *, title: str | None = None) -> Path:
    """Normalised singular values ``sigma_k / sigma_1`` (log scale) of each matrix, raw and mean-centered."""
    _check_matrices(matrices)
    figure = Figure(layout="constrained", figsize=(11, 4.2))
    axes = figure.subplots(1, 2, sharey=True)
    for color, (label, matrix) in zip(_colors(len(matrices)), matrices.items()):
        for ax, centered in zip(axes, (False, True)):
            sigma = singular_values(matrix, centered=centered).numpy()
            sigma = sigma[sigma > 0]
            ax.plot(np.arange(1, sigma.size + 1), sigma / sigma[0], color=color, label=label, linewidth=1.6)
    for ax, name in zip(axes, ("raw E (uncentered)", "E - mean (PCA spectrum)")):
        ax.set_yscale("log")
        ax.set_xlabel("index k")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("sigma_k / sigma_1")
    figure.suptitle(title or "Singular value spectrum of the embedding matrix")
    return _save(figure, path)


def plot_pca_projection(
    matrices: Mapping[str, Tensor],
    path: str | Path,
    *,
    token_counts: Tensor | Mapping[str, Tensor] | None = None,
    centered: bool = False,
    max_points: int = 20000,
    title: str | None = None,
) -> Path:
    """Rows of each matrix on its top-2 singular directions, one panel per matrix, on shared axes.

    Uncentered by default: the origin stays at (0, 0) (black +) and the mean embedding is marked (star), so a
    drifted mean (anisotropy) shows as a cloud away from the origin. Points are coloured by ``log10(count)``
    when ``token_counts`` are given (never-seen rows in grey); at most ``max_points`` rows are drawn (the most
    frequent first, then a fixed random sample).
    """
    _check_matrices(matrices)
    panels = []
    for label, matrix in matrices.items():
        coordinates, mean = pca_projection(matrix, 2, centered=centered)
        counts = _counts_for(token_counts, label, coordinates.shape[0])
        panels.append((label, coordinates.numpy(), mean.numpy(), counts))
    limit = max(max(np.abs(c).max() for _, c, _, _ in panels), 1e-12) * 1.05
    high = max((np.log10(c.max()) for *_, c in panels if c is not None and c.max() > 0), default=1.0)

    width = 4.6 * len(panels) + (1.0 if token_counts is not None else 0.0)
    figure = Figure(layout="constrained", figsize=(width, 4.6))
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharex=True, sharey=True))
    scatter = None
    for ax, (label, coordinates, mean, counts) in zip(axes, panels):
        order = _drawing_order(counts, coordinates.shape[0], max_points)
        if counts is None:
            ax.scatter(coordinates[order, 0], coordinates[order, 1], s=3, alpha=0.5, color="#1f77b4",
                       linewidths=0)
        else:
            unseen = order[counts[order] == 0]
            seen = order[counts[order] > 0]
            scatter = ax.scatter(coordinates[seen, 0], coordinates[seen, 1], s=3, c=np.log10(counts[seen]),
                                 cmap="viridis", vmin=0, vmax=high, linewidths=0)
            # never-seen rows on top: they only get gradient through the output layer and often sit together
            ax.scatter(coordinates[unseen, 0], coordinates[unseen, 1], s=6, marker="x", color="#888888",
                       linewidths=0.6, alpha=0.7, label=f"never seen ({unseen.size})")
        ax.scatter([0], [0], marker="+", s=160, color="black", linewidths=2, label="origin", zorder=5)
        ax.scatter([mean[0]], [mean[1]], marker="*", s=220, color="#d62728", edgecolors="white", linewidths=0.8,
                   label="mean embedding", zorder=6)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_title(label)
        ax.set_xlabel("direction 1")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("direction 2")
    if scatter is not None:
        figure.colorbar(scatter, ax=list(axes), label="log10(token count)", shrink=0.85)
    kind = "PCA (centered)" if centered else "top-2 singular directions (uncentered: origin kept)"
    figure.suptitle(title or f"Embedding rows projected on their {kind}")
    return _save(figure, path)


def _drawing_order(counts: np.ndarray | None, rows: int, max_points: int) -> np.ndarray:
    """Row indices to draw, rare first so frequent tokens lie on top; a fixed sample when there are too many."""
    if counts is None:
        order = np.arange(rows)
        if rows > max_points:
            order = np.sort(np.random.default_rng(0).choice(rows, max_points, replace=False))
        return order
    order = np.argsort(counts, kind="stable")
    if rows > max_points:
        keep_frequent = order[-max_points // 2:]
        rest = np.random.default_rng(0).choice(order[:-max_points // 2], max_points - keep_frequent.size,
                                               replace=False)
        order = np.concatenate([rest[np.argsort(counts[rest], kind="stable")], keep_frequent])
    return order


def plot_norm_vs_frequency(
    matrices: Mapping[str, Tensor],
    token_counts: Tensor | Mapping[str, Tensor],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """``||e_i||`` against ``log10(count_i)``, one panel per matrix (shared y axis), never-seen rows at the left."""
    _check_matrices(matrices)
    figure = Figure(layout="constrained", figsize=(4.6 * len(matrices), 4.2))
    axes = np.atleast_1d(figure.subplots(1, len(matrices), sharey=True))
    for ax, color, (label, matrix) in zip(axes, _colors(len(matrices)), matrices.items()):
        norms = _as_numpy(matrix.detach().to(torch.float64).norm(dim=1))
        counts = _counts_for(token_counts, label, norms.size)
        if counts is None:
            raise ValueError(f"no token counts for {label!r}")
        seen = counts > 0
        log_counts = np.log10(counts[seen])
        ax.scatter(log_counts, norms[seen], s=3, alpha=0.4, color=color, linewidths=0, label="seen tokens")
        if (~seen).any():
            jitter = np.random.default_rng(0).uniform(-0.15, 0.15, int((~seen).sum()))
            ax.scatter(-0.8 + jitter, norms[~seen], s=3, alpha=0.4, color="#999999", linewidths=0,
                       label=f"never seen ({int((~seen).sum())})")
            ax.text(-0.8, 0.01, "never\nseen", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=8, color="#555555")
        rho = np.corrcoef(norms[seen], np.log(counts[seen]))[0, 1] if seen.sum() > 1 else float("nan")
        ax.set_title(f"{label}   rho = {rho:.2f}")
        ax.set_xlabel("log10(token count in training data)")
        ax.set_xticks(np.arange(0, math.ceil(log_counts.max() if log_counts.size else 0) + 1))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8, markerscale=3)
    axes[0].set_ylabel("embedding norm ||e_i||")
    figure.suptitle(title or "Embedding norm vs token frequency")
    return _save(figure, path)


def plot_metric_bars(
    metrics: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    keys: Sequence[str] = DEFAULT_BAR_METRICS,
    title: str | None = None,
    reference: float | None = None,
    reference_label: str = "chance",
) -> Path:
    """Grouped bars: one group per metric key, one bar per checkpoint (``{label: embedding_metrics(...)}``).

    ``reference``: a dashed horizontal line at that value (e.g. an accuracy's chance level), named in the legend.
    """
    if not metrics:
        raise ValueError("no metrics to plot: pass {label: metrics dict}")
    keys = [key for key in keys if any(key in m for m in metrics.values())]
    if not keys:
        raise ValueError("none of the requested metric keys is in the metrics")
    figure = Figure(layout="constrained", figsize=(max(6.0, 0.8 * len(keys) * len(metrics) + 2), 4.2))
    ax = figure.subplots()
    width = 0.8 / len(metrics)
    positions = np.arange(len(keys))
    for index, (color, (label, values)) in enumerate(zip(_colors(len(metrics)), metrics.items())):
        heights = [float(values.get(key, float("nan"))) for key in keys]
        bars = ax.bar(positions + (index - (len(metrics) - 1) / 2) * width, heights, width, color=color,
                      label=label)
        ax.bar_label(bars, labels=[f"{h:.3g}" if math.isfinite(h) else "n/a" for h in heights], fontsize=8,
                     padding=2)
    ax.set_xticks(positions, [_LABELS.get(key, key) for key in keys])
    ax.axhline(0, color="black", linewidth=0.8)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1.0, label=reference_label)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    ax.margins(y=0.15)
    figure.suptitle(title or "Embedding metrics")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------- training curves
def load_log_history(source: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """``log_history`` from a ``trainer_state.json``, a Trainer output folder (its own ``trainer_state.json`` or
    that of its latest ``checkpoint-*``), a loaded state dict, or a log-history list."""
    if isinstance(source, Mapping):
        return list(source["log_history"])
    if not isinstance(source, (str, Path)):
        return list(source)
    path = Path(source)
    if path.is_dir():
        candidates = [path / "trainer_state.json"] + sorted(
            path.glob("checkpoint-*/trainer_state.json"),
            key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1,
            reverse=True,
        )
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            raise FileNotFoundError(f"no trainer_state.json in {str(path)!r} or its checkpoint-* folders")
        path = existing[0]
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (expected a trainer_state.json or a run folder)")
    return list(json.loads(path.read_text())["log_history"])


def plot_training_curves(
    runs: Mapping[str, str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    keys: Sequence[str] = DEFAULT_CURVE_KEYS,
    title: str | None = None,
) -> Path:
    """One panel per key (those present in some run), one line per run, against the optimizer step.

    ``runs`` maps a label to anything :func:`load_log_history` reads. ``loss`` and ``eval_loss`` share a panel.
    """
    if not runs:
        raise ValueError("no runs to plot: pass {label: trainer_state.json path, run folder or log history}")
    histories = {label: load_log_history(source) for label, source in runs.items()}
    present = [key for key in keys if any(key in entry for h in histories.values() for entry in h)]
    panels: list[list[str]] = []
    for key in present:
        if key == "eval_loss" and "loss" in present:
            next(panel for panel in panels if "loss" in panel).append(key)
        else:
            panels.append([key])
    if not panels:
        raise ValueError(f"none of {list(keys)} is in the log histories")
    figure = Figure(layout="constrained", figsize=(4.8 * len(panels), 4.0))
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    for ax, panel in zip(axes, panels):
        for color, (label, history) in zip(_colors(len(histories)), histories.items()):
            for key in panel:
                points = sorted((entry["step"], entry[key]) for entry in history if key in entry)
                if not points:
                    continue
                steps, values = zip(*points)
                is_eval = key.startswith("eval_")
                ax.plot(steps, values, color=color, linestyle="--" if is_eval else "-",
                        marker="o" if is_eval or len(points) < 30 else None, markersize=3, linewidth=1.5,
                        label=f"{label} ({_LABELS.get(key, key)})" if len(panel) > 1 else label)
        ax.set_title(" / ".join(_LABELS.get(key, key) for key in panel))
        ax.set_xlabel("optimizer step")
        if any(key.endswith("iso") for key in panel):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title or "Training curves")
    return _save(figure, path)

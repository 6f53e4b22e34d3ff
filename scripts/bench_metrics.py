#!/usr/bin/env python
"""Embedding-metric cost as a ratio to one float64 Gram product ``E^T E`` of the same matrix.

Every metric here is a few Gram matrices of row sets plus passes over the rows (the projections onto the
eigenvectors for Iso are one ``[V, H] x [H, H]`` product each), so the natural unit of their cost is one Gram product
on the same machine at the same moment. Contenders:

- ``quick_isotropy``: what the training callback logs (Iso, relative mean norm, average cosine);
- ``embedding_metrics``: the full set over all rows;
- ``embedding_metrics_counts``: the full set with token counts (adds the seen, top-k and frequency-weighted row
  sets and the frequency correlations).

Each timed call of a contender sits right beside a timed Gram product (G X, then X G on the next repeat; the
contender order rotates every repeat), and the reported ratio is the median of those adjacent-pair ratios (with the
smallest and largest), robust to the load of a shared machine drifting. "x (min)" is the ratio of the fastest calls,
the estimate least disturbed by other work. The load average is recorded with every repeat.

The matrix is GPT-2's padded ``50304 x 768`` by default, Gaussian rows with a common drift (as an AdamW-trained
embedding has) in float64; counts are Zipf-distributed over the tokenizer's 50257 ids, with the padding rows and
``--unseen`` of the others never seen.

Usage::

    OMP_NUM_THREADS=2 python scripts/bench_metrics.py --output bench_metrics.json     # GPT-2 shape, 3 repeats
    python scripts/bench_metrics.py --quick                                            # small shape, seconds

Never read absolute seconds from a shared machine: compare the ratios, and note the load printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable

import torch

from coupled_adam_hf.metrics import embedding_metrics, quick_isotropy
from coupled_adam_hf.benchmarking import quantile, timed

REFERENCE = "gram"
CONTENDERS = ("quick_isotropy", "embedding_metrics", "embedding_metrics_counts")


def build_inputs(rows: int, dim: int, vocabulary: int, unseen: float, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A drifted Gaussian ``[rows, dim]`` matrix and Zipf counts over the first ``vocabulary`` rows."""
    generator = torch.Generator().manual_seed(seed)
    drift = torch.randn(dim, generator=generator, dtype=torch.float64)
    # rows of norm about 0.02 sqrt(H), shifted by a common mean of about their size (relative mean norm ~0.7)
    weight = 0.02 * (torch.randn(rows, dim, generator=generator, dtype=torch.float64) + drift)
    ranks = torch.randperm(vocabulary, generator=generator).to(torch.float64) + 1
    counts = torch.floor(1e8 * ranks ** -1.1) + 1
    counts[torch.rand(vocabulary, generator=generator) < unseen] = 0
    return weight.to(device=device, dtype=dtype), counts.to(device=device, dtype=torch.int64)


def run(weight: torch.Tensor, counts: torch.Tensor, contenders: list[str], repeats: int, top_k: int
        ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[list[float]]]:
    device = weight.device
    reference_matrix = weight.to(torch.float64)
    calls: dict[str, Callable[[], object]] = {
        REFERENCE: lambda: reference_matrix.T @ reference_matrix,
        "quick_isotropy": lambda: quick_isotropy(weight),
        "embedding_metrics": lambda: embedding_metrics(weight),
        "embedding_metrics_counts": lambda: embedding_metrics(weight, counts, top_k=top_k),
    }
    for name in [REFERENCE, *contenders]:  # warm-up: allocator, thread pools, first-call setup
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in [REFERENCE, *contenders]}
    ratios: dict[str, list[float]] = {name: [] for name in contenders}
    loads = []
    for repeat in range(repeats):
        shift = repeat % len(contenders)
        for name in contenders[shift:] + contenders[:shift]:
            pair = (REFERENCE, name) if repeat % 2 == 0 else (name, REFERENCE)
            measured = {n: timed(calls[n], device) for n in pair}
            times[name].append(measured[name])
            times[REFERENCE].append(measured[REFERENCE])
            ratios[name].append(measured[name] / measured[REFERENCE])
        loads.append(list(os.getloadavg()))
        print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {ratios[n][-1]:.2f}x" for n in contenders)
              + f"; load {loads[-1][0]:.2f}", flush=True)
    return times, ratios, loads


def summarize(times: dict[str, list[float]], ratios: dict[str, list[float]]) -> list[dict]:
    reference = times[REFERENCE]
    rows = [dict(contender=REFERENCE, median_s=statistics.median(reference), min_s=min(reference),
                 ratio_to_gram=1.0, ratio_low=1.0, ratio_high=1.0, ratio_q1=1.0, ratio_q3=1.0, ratio_of_minimums=1.0,
                 calls=len(reference), times_s=reference, ratios=[1.0] * len(reference))]
    for name, values in ratios.items():
        rows.append(dict(contender=name, median_s=statistics.median(times[name]), min_s=min(times[name]),
                         ratio_to_gram=statistics.median(values), ratio_low=min(values), ratio_high=max(values),
                         ratio_q1=quantile(values, 0.25), ratio_q3=quantile(values, 0.75),
                         ratio_of_minimums=min(times[name]) / min(reference), calls=len(values),
                         times_s=times[name], ratios=values))
    return rows


def print_table(results: list[dict]) -> None:
    header = f"{'contender':26s} {'median s':>9s} {'x gram':>7s} {'(range)':>13s} {'min s':>8s} {'x (min)':>8s}"
    print(header)
    print("-" * len(header))
    for r in results:
        spread = f"({r['ratio_low']:.2f}-{r['ratio_high']:.2f})"
        print(f"{r['contender']:26s} {r['median_s']:9.3f} {r['ratio_to_gram']:7.2f} {spread:>13s} "
              f"{r['min_s']:8.3f} {r['ratio_of_minimums']:8.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50304, help="V, rows of the matrix (GPT-2's padded vocabulary)")
    parser.add_argument("--dim", type=int, default=768, help="H, columns of the matrix")
    parser.add_argument("--vocabulary", type=int, default=None,
                        help="rows a tokenizer reaches (default: 50257 for the GPT-2 shape, else all rows); the rest "
                        "are padding rows, never seen")
    parser.add_argument("--unseen", type=float, default=0.01, help="share of the tokenizer's rows never seen")
    parser.add_argument("--top-k", type=int, default=1000, help="size of the most-frequent row set")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32", "bfloat16"),
                        help="dtype of the matrix handed to the metrics (they compute in float64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per contender (each beside a Gram)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated subset of: " + ", ".join(CONTENDERS))
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--quick", action="store_true", help="a 4096 x 64 matrix, 2 repeats: a smoke run")
    parser.add_argument("--output", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)

    if args.quick:
        args.rows, args.dim, args.repeats = 4096, 64, min(args.repeats, 2)
        args.top_k = min(args.top_k, 256)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        parser.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    if args.rows < 2 or args.dim < 1 or args.repeats < 1 or not 0 <= args.unseen < 1:
        parser.error("need --rows >= 2, --dim >= 1, --repeats >= 1 and 0 <= --unseen < 1")
    vocabulary = args.vocabulary or (50257 if (args.rows, args.dim) == (50304, 768) else args.rows)
    if not 2 <= vocabulary <= args.rows:
        parser.error(f"--vocabulary must be in [2, --rows = {args.rows}], got {vocabulary}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        weight, counts = build_inputs(args.rows, args.dim, vocabulary, args.unseen, getattr(torch, args.dtype),
                                      device)
        machine = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                       else platform.processor() or platform.machine(), torch=torch.__version__,
                       threads=torch.get_num_threads(), cpus=os.cpu_count(), python=sys.version.split()[0],
                       loadavg_start=list(os.getloadavg()))
        print(f"{args.rows} x {args.dim} {args.dtype} on {machine['device_name']} ({device}), torch "
              f"{torch.__version__}, {machine['threads']} threads, {int((counts > 0).sum())} rows seen, load "
              f"{machine['loadavg_start']}", flush=True)
        times, ratios, loads = run(weight, counts, contenders, args.repeats, args.top_k)
        machine["loadavg_end"] = list(os.getloadavg())
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests do)
    results = summarize(times, ratios)
    print_table(results)
    print(f"ratios to one float64 Gram product E^T E of the same matrix (median of adjacent pairs); load "
          f"{machine['loadavg_end']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(machine=machine, args=vars(args), shape=[args.rows, args.dim], vocabulary=vocabulary,
                           rows_seen=int((counts > 0).sum()), loadavg_per_repeat=loads, results=results), f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

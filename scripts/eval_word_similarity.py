#!/usr/bin/env python
"""Word similarity of one or more checkpoints' input embeddings: ``word_similarity.json``, a table, a figure.

    python scripts/eval_word_similarity.py \\
        --model_name_or_path runs/adamw runs/coupled --labels AdamW "Coupled Adam" \\
        --output_dir eval/word_similarity

The paper's embedding-quality evaluation (Stollenwerk & Stollenwerk 2025, Section 5, after Biś et al. 2021) on the
five benchmarks shipped with the package: SimLex-999 (``simlex999``), MEN (``men``), the WordSim-353 similarity
and relatedness splits (``ws353_sim``, ``ws353_rel``) and Stanford Rare Words (``rw``); ``--benchmarks`` picks
some. A pair counts when both words are single tokens of the checkpoint's tokenizer (looked up with a leading
space when the tokenizer folds the space into the word's token, as byte-level BPE does; decided from its
behaviour); see :mod:`coupled_adam_hf.wordsim` for the rules and every key.

Outputs in ``--output_dir``: ``word_similarity.json`` (per checkpoint label, per benchmark: ``pairs``,
``covered``, ``coverage``, ``pearson`` and ``spearman`` x 100 of raw cosine, and
``{cosine,dot}/{raw,centered,abtt}/{pearson,spearman}``; their ``mean`` over the benchmarks) and
``word_similarity.png`` (Pearson per benchmark, the checkpoints side by side). Arguments can also come from one
``.json``/``.yaml`` file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from coupled_adam_hf import cli
from coupled_adam_hf.cli import UsageError, one_line, run_cli
from coupled_adam_hf.locking import OutputDirLock
from coupled_adam_hf.partition import model_embeddings
from coupled_adam_hf.reliability import check_results_file, load_checkpoint_model, load_checkpoint_tokenizer
from coupled_adam_hf.wordsim import BENCHMARK_NAMES, BENCHMARKS, MIN_PAIRS, benchmark_file, word_similarity

logger = logging.getLogger("eval_word_similarity")

RESULTS_FILE = "word_similarity.json"
FIGURE_FILE = "word_similarity.png"


@dataclass
class WordSimilarityArguments:
    model_name_or_path: list[str] = field(
        metadata={"help": "One or more checkpoints: local model folders (with their tokenizer) or Hub ids."}
    )
    output_dir: str = field(metadata={"help": f"Where {RESULTS_FILE} and {FIGURE_FILE} go."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "A display name per checkpoint (default: the folder names)."}
    )
    benchmarks: list[str] = field(
        default_factory=lambda: list(BENCHMARK_NAMES),
        metadata={"help": f"Which benchmarks, among {', '.join(BENCHMARK_NAMES)} (default: all five)."},
    )
    abtt_components: int | None = field(
        default=None, metadata={"help": "D of all-but-the-top: top principal directions removed (default ceil(H/100))."}
    )
    plots: bool = field(default=True, metadata={"help": f"Write {FIGURE_FILE} (--no_plots to skip)."})
    device: str = field(default="auto", metadata={"help": "Where to compute: auto (cuda if available), cpu, cuda."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the checkpoints."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": f"Replace an existing {RESULTS_FILE} (refused otherwise)."}
    )


def parse_arguments(argv: list[str] | None) -> WordSimilarityArguments:
    (args,) = cli.parse_arguments(WordSimilarityArguments, argv)
    return args


def validate(args: WordSimilarityArguments) -> list[str]:
    """Labels per checkpoint; every argument checked before any model is loaded (UsageError: exit status 2)."""
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        raise UsageError(f"unknown --benchmarks {', '.join(unknown)}; choose among {', '.join(BENCHMARK_NAMES)}")
    if not args.benchmarks:
        raise UsageError(f"--benchmarks is empty; choose among {', '.join(BENCHMARK_NAMES)}")
    labels = cli.checkpoint_labels(args.model_name_or_path, args.labels)
    if args.abtt_components is not None and args.abtt_components < 0:
        raise UsageError(f"--abtt_components must be >= 0, got {args.abtt_components}")
    cli.check_device_name(args.device)
    check_results_file(args.output_dir, RESULTS_FILE, overwrite=args.overwrite_output_dir)
    return labels


def _cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


TABLE_COLUMNS = (("Pearson", "pearson"), ("Spearman", "spearman"), ("centered", "cosine/centered/pearson"),
                 ("abtt", "cosine/abtt/pearson"), ("dot", "dot/raw/pearson"))


def format_table(results: dict[str, Any]) -> str:
    """One row per checkpoint and benchmark (and their mean): coverage and the scores x 100."""
    header = ["checkpoint", "benchmark", "covered"] + [name for name, _ in TABLE_COLUMNS]
    rows = []
    for label, checkpoint in results["checkpoints"].items():
        entries = list(checkpoint["benchmarks"].items())
        mean = checkpoint["mean"]
        averaged = len(mean["benchmarks"])
        name = "mean" if averaged == len(entries) else f"mean ({averaged} of {len(entries)})"
        for benchmark, entry in entries + [(name, mean)]:
            rows.append([label, benchmark, f"{entry['covered']}/{entry['pairs']}"]
                        + [_cell(entry.get(key)) for _, key in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_figure(results: dict[str, Any], path: Path) -> Path:
    """Pearson x 100 of raw cosine per benchmark and the mean, the checkpoints side by side."""
    from coupled_adam_hf import plotting

    bars = {}
    for label, checkpoint in results["checkpoints"].items():
        values = {name: entry["pearson"] for name, entry in checkpoint["benchmarks"].items()}
        values["mean"] = checkpoint["mean"]["pearson"]
        bars[label] = {key: math.nan if value is None else value for key, value in values.items()}
    keys = [*next(iter(results["checkpoints"].values()))["benchmarks"], "mean"]
    return plotting.plot_metric_bars(bars, path, keys=keys,
                                     title="Word similarity: Pearson x 100 of the cosine of input embeddings")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what it writes to ``word_similarity.json``."""
    args = parse_arguments(argv)
    labels = validate(args)
    device = cli.resolve_device(args.device)
    kwargs = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
    tokenizers = [load_checkpoint_tokenizer(path, **kwargs) for path in args.model_name_or_path]  # before any model
    with OutputDirLock(args.output_dir, what="evaluation"):  # one evaluation per folder
        return evaluate(args, labels, tokenizers, device)


def evaluate(args: WordSimilarityArguments, labels: list[str], tokenizers: list[Any],
             device: torch.device) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    results: dict[str, Any] = {
        "arguments": asdict(args),
        "benchmarks": {name: {"title": BENCHMARKS[name].title, "file": benchmark_file(name).name}
                       for name in args.benchmarks},
        "min_pairs": MIN_PAIRS,
        "checkpoints": {},
    }
    for label, path, tokenizer in tqdm(list(zip(labels, args.model_name_or_path, tokenizers)), desc="checkpoints",
                                       unit="ckpt"):
        model = load_checkpoint_model(path, revision=args.revision, trust_remote_code=args.trust_remote_code)
        found = model_embeddings(model, ["token"])
        if not found:
            raise UsageError(f"checkpoint {path!r} ({type(model).__name__}) has no input embeddings "
                             "(get_input_embeddings() returns none): word similarity needs them")
        weight = found[0].weight.detach().to(device)
        try:
            scores = word_similarity(weight, tokenizer, args.benchmarks, abtt_components=args.abtt_components)
        except ValueError as error:  # a tokenizer of another vocabulary, D >= H
            raise UsageError(f"checkpoint {path!r}: {one_line(error)}") from error
        results["checkpoints"][label] = {"model_name_or_path": path, "model_class": type(model).__name__,
                                         "parameter": found[0].name, **scores}
        del model, weight

    output_dir.mkdir(parents=True, exist_ok=True)
    if args.plots:
        results["plots"] = [str(write_figure(results, output_dir / FIGURE_FILE))]
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print("\nScores x 100 (Pearson/Spearman of the cosine against the gold ratings; centered, abtt: Pearson after "
          "post-processing; dot: Pearson of the dot product). covered: pairs whose two words are single tokens.")
    print(f"Wrote {output_dir / RESULTS_FILE}" + (f" and {FIGURE_FILE}" if args.plots else ""))
    return results


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    run_cli(main, prog="eval_word_similarity.py")  # bad input: one line on stderr, exit status 2

#!/usr/bin/env python
"""Embedding isotropy of one or more checkpoints: ``isotropy.json``, a table on the terminal, PNG figures.

    python scripts/eval_isotropy.py \\
        --model_name_or_path runs/adamw runs/coupled --labels AdamW "Coupled Adam" \\
        --count_tokens_in coupled_adam_hf/data/shakespeare/train.txt.gz \\
        --output_dir eval/isotropy

Checkpoints are local model folders or Hub ids (anything ``from_pretrained`` loads). For each one the script
measures every embedding matrix it has -- ``token`` (input embedding), ``output`` (the LM head, when untied),
``position`` (learned absolute positions), ``token_type`` -- with :func:`coupled_adam_hf.metrics.embedding_metrics`.
Token counts of the training data (a file, or text files tokenized with each checkpoint's own tokenizer) add the
``seen/``, ``top{k}/`` and ``freq/`` variants, ``rho`` and the frequency-coloured figures.

Outputs in ``--output_dir``: ``isotropy.json`` (all metrics per checkpoint and matrix, the Iso sign convention),
and for the token (and untied output) embeddings ``spectrum_*.png``, ``projection_*.png``,
``norm_vs_frequency_*.png`` (with counts) and ``metrics_*.png``, each with all checkpoints side by side.
Arguments can also come from one ``.json``/``.yaml`` file: ``python scripts/eval_isotropy.py args.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from coupled_adam_hf import cli
from coupled_adam_hf.cli import MissingInputError, UsageError, run_cli
from coupled_adam_hf.locking import OutputDirLock
from coupled_adam_hf.metrics import DEFAULT_TOP_K, ISO_SIGN_CONVENTION, embedding_metrics, read_token_counts
from coupled_adam_hf.partition import TARGET_KINDS, model_embeddings
from coupled_adam_hf.reliability import check_results_file, load_checkpoint_model

logger = logging.getLogger("eval_isotropy")

MATRIX_KINDS = TARGET_KINDS  # token, output, position, token_type
VOCABULARY_KINDS = ("token", "output")  # rows are tokens: counts apply, figures are drawn
RESULTS_FILE = "isotropy.json"


@dataclass
class IsotropyArguments:
    model_name_or_path: list[str] = field(
        metadata={"help": "One or more checkpoints: local model folders or Hub ids (from_pretrained)."}
    )
    output_dir: str = field(metadata={"help": f"Where {RESULTS_FILE} and the PNG figures go."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "A display name per checkpoint (default: the folder names)."}
    )
    token_counts_file: str | None = field(
        default=None,
        metadata={"help": "Token counts of the training data: .json (list, {'counts': [...]} or {id: count}), "
                          ".npy or .pt. Used for every checkpoint (same tokenizer)."},
    )
    count_tokens_in: list[str] | None = field(
        default=None,
        metadata={"help": "Training text files (.txt, .json/.jsonl, .csv; .gz works) to count tokens in, with each "
                          "checkpoint's own tokenizer (as scripts/train.py tokenizes: line by line, no special "
                          "tokens)."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of .json/.csv files."})
    matrices: list[str] = field(
        default_factory=lambda: list(MATRIX_KINDS),
        metadata={"help": f"Which embeddings to measure, among {', '.join(MATRIX_KINDS)} (those the model has)."},
    )
    top_k: int = field(default=DEFAULT_TOP_K, metadata={"help": "Size of the most-frequent subset (top{k}/...)."})
    plots: bool = field(default=True, metadata={"help": "Write PNG figures (--no_plots to skip)."})
    device: str = field(default="auto", metadata={"help": "Where to compute: auto (cuda if available), cpu, cuda."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the checkpoints."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": f"Replace an existing {RESULTS_FILE} (refused otherwise)."}
    )


def parse_arguments(argv: list[str] | None) -> IsotropyArguments:
    (args,) = cli.parse_arguments(IsotropyArguments, argv)
    return args


def validate(args: IsotropyArguments) -> list[str]:
    """Labels per checkpoint; every argument checked before any model is loaded (UsageError: exit status 2)."""
    labels = cli.checkpoint_labels(args.model_name_or_path, args.labels)
    cli.check_device_name(args.device)
    unknown = sorted(set(args.matrices) - set(MATRIX_KINDS))
    if unknown:
        raise UsageError(f"unknown --matrices {unknown}; choose among {', '.join(MATRIX_KINDS)}")
    if args.token_counts_file and args.count_tokens_in:
        raise UsageError("give --token_counts_file or --count_tokens_in, not both")
    for flag, paths in (("--token_counts_file", [args.token_counts_file] if args.token_counts_file else []),
                        ("--count_tokens_in", args.count_tokens_in or [])):
        for path in paths:
            if not Path(path).is_file():
                raise MissingInputError(f"{flag}: {path!r} does not exist")
    if args.top_k < 2:
        raise UsageError(f"--top_k must be >= 2, got {args.top_k}")
    check_results_file(args.output_dir, RESULTS_FILE, overwrite=args.overwrite_output_dir)
    return labels


def check_token_counts(counts: torch.Tensor, source: str, path: str, rows: int, tokenizer) -> None:
    """Counts must cover the tokenizer and fit the embedding; only rows no tokenizer id reaches are padded."""
    vocabulary = len(tokenizer) if tokenizer is not None else None
    if counts.numel() > rows:
        raise UsageError(f"{source} holds {counts.numel()} token counts, but the embedding of {path} has {rows} "
                         "rows: count with this checkpoint's tokenizer")
    if counts.numel() < (vocabulary if vocabulary is not None else rows):
        what = f"its tokenizer has {vocabulary} tokens" if vocabulary is not None else f"its embedding has {rows} rows"
        raise UsageError(f"{source} holds {counts.numel()} token counts, but {path}: {what}: count with this "
                         "checkpoint's tokenizer (--count_tokens_in)")


def load_checkpoint(path: str, args: IsotropyArguments):
    """(model, tokenizer or None). A causal LM when the checkpoint is one (for an untied head), else AutoModel."""
    from transformers import AutoTokenizer

    model = load_checkpoint_model(path, revision=args.revision, trust_remote_code=args.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision,
                                                  trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def embedding_matrices(model, wanted: list[str]) -> dict[str, dict[str, Any]]:
    """``{kind: {"parameter": name, "roles": [...], "weight": tensor}}``; a tied head is reported under token."""
    found: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}  # matrices per kind so far: a second position matrix is "position_1"
    for entry in model_embeddings(model, [kind for kind in MATRIX_KINDS if kind in wanted]):
        index = seen[entry.kind] = seen.get(entry.kind, -1) + 1
        key = entry.kind if index == 0 else f"{entry.kind}_{index}"
        found[key] = {"parameter": entry.name, "roles": list(entry.roles), "weight": entry.weight}
    return found


def count_tokens(tokenizer, files: list[str], rows: int, text_column: str) -> torch.Tensor:
    """Unigram counts of ``files`` tokenized as ``scripts/train.py`` does (rows of text, no special tokens)."""
    import datasets

    from coupled_adam_hf.data import builder_for

    builders = {builder_for(path) for path in files}
    if len(builders) != 1:
        raise ValueError(f"--count_tokens_in files must share one format, got {files}")
    builder = builders.pop()
    extra = {"keep_linebreaks": True} if builder == "text" else {}
    raw = datasets.load_dataset(builder, data_files=files, split="train", **extra)
    column = "text" if builder == "text" else text_column
    if column not in raw.column_names:
        raise ValueError(f"text column {column!r} is not in {files} (columns: {raw.column_names}); pass --text_column")

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[column], add_special_tokens=False)["input_ids"]}

    def count(batch):
        ids = np.concatenate([np.asarray(row, dtype=np.int64) for row in batch["input_ids"]] or [np.zeros(0, int)])
        return {"counts": [np.bincount(ids, minlength=rows).tolist()]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="Tokenizing")
    # one count vector per batch of rows, summed below: the token stream itself is never held in memory
    per_batch = tokenized.map(count, batched=True, batch_size=20_000, remove_columns=["input_ids"],
                              desc="Counting tokens")
    counts = torch.as_tensor(np.asarray(per_batch["counts"]).sum(axis=0), dtype=torch.int64)
    if counts.numel() > rows:
        raise ValueError(f"the tokenizer produces ids up to {int(counts.nonzero().max())}, but the embedding has "
                         f"{rows} rows: this tokenizer does not belong to this checkpoint")
    return counts


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(description.encode()).hexdigest()


def format_table(results: dict[str, Any]) -> str:
    columns = [("Iso", "iso"), ("Iso±", "iso_both_signs"), ("||mu||^r", "mean_norm_ratio"),
               ("avg cos", "avg_cosine"), ("IsoScore", "isoscore"), ("eff.rank", "effective_rank"),
               ("kappa", "kappa"), ("seen Iso", "seen/iso"), ("seen ||mu||^r", "seen/mean_norm_ratio"),
               ("rho", "rho")]
    header = ["checkpoint", "matrix", "shape"] + [name for name, _ in columns]
    rows = []
    for label, checkpoint in results["checkpoints"].items():
        for kind, matrix in checkpoint["matrices"].items():
            name = kind + ("+output (tied)" if "output" in matrix["roles"] and kind == "token" else "")
            cells = [label, name, "x".join(str(s) for s in matrix["shape"])]
            for _, key in columns:
                value = matrix.get(key)
                cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value))
                             else f"{value:.4g}")
            rows.append(cells)
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_plots(output_dir: Path, weights: dict[str, dict[str, torch.Tensor]], counts: dict[str, torch.Tensor],
                metrics: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    from coupled_adam_hf import plotting

    written = []
    for kind in VOCABULARY_KINDS:
        matrices = {label: per_kind[kind] for label, per_kind in weights.items() if kind in per_kind}
        if not matrices:
            continue
        kind_counts = {label: counts[label] for label in matrices if label in counts}
        title = f"{kind} embedding"
        written.append(plotting.plot_singular_values(matrices, output_dir / f"spectrum_{kind}.png",
                                                     title=f"Singular value spectrum, {title}"))
        written.append(plotting.plot_pca_projection(matrices, output_dir / f"projection_{kind}.png",
                                                    token_counts=kind_counts or None,
                                                    title=f"{title}: rows on their top-2 singular directions "
                                                          "(uncentered, origin kept)"))
        if len(kind_counts) == len(matrices):
            written.append(plotting.plot_norm_vs_frequency(matrices, kind_counts,
                                                           output_dir / f"norm_vs_frequency_{kind}.png",
                                                           title=f"{title}: norm vs token frequency"))
        bar_metrics = {label: metrics[label][kind] for label in matrices}
        written.append(plotting.plot_metric_bars(bar_metrics, output_dir / f"metrics_{kind}.png",
                                                 title=f"{title}: isotropy metrics (all rows)"))
    return [str(path) for path in written]


def _finite_or_null(value: Any) -> Any:
    """NaN (a metric undefined for a matrix, e.g. IsoScore with H = 1) as JSON null: strict JSON readers choke on NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what it writes to ``isotropy.json``."""
    args = parse_arguments(argv)
    labels = validate(args)
    device = cli.resolve_device(args.device)  # before any model loads
    with OutputDirLock(args.output_dir, what="evaluation"):  # one evaluation per folder
        return evaluate(args, labels, device)


def evaluate(args: IsotropyArguments, labels: list[str], device: torch.device) -> dict[str, Any]:
    output_dir = Path(args.output_dir)

    shared_counts = read_token_counts(args.token_counts_file) if args.token_counts_file else None
    counts_by_tokenizer: dict[str, torch.Tensor] = {}
    results: dict[str, Any] = {
        "iso_sign_convention": ISO_SIGN_CONVENTION,
        "arguments": asdict(args),
        "checkpoints": {},
    }
    weights: dict[str, dict[str, torch.Tensor]] = {}
    counts_for_plots: dict[str, torch.Tensor] = {}
    metrics_for_plots: dict[str, dict[str, dict[str, float]]] = {}

    for label, path in tqdm(list(zip(labels, args.model_name_or_path)), desc="checkpoints", unit="ckpt"):
        model, tokenizer = load_checkpoint(path, args)
        matrices = embedding_matrices(model, args.matrices)
        if not matrices:
            raise UsageError(f"{path!r} ({type(model).__name__}) has none of the embeddings {args.matrices}")
        vocabulary_rows = next((m["weight"].shape[0] for k, m in matrices.items() if k in VOCABULARY_KINDS), None)
        counts, counts_source = shared_counts, args.token_counts_file
        if shared_counts is not None and vocabulary_rows is not None:
            check_token_counts(shared_counts, f"--token_counts_file {args.token_counts_file}", path, vocabulary_rows,
                               tokenizer)
        if args.count_tokens_in and vocabulary_rows is not None:
            if tokenizer is None:
                raise UsageError(f"{path!r} has no tokenizer to count tokens with: pass --token_counts_file")
            fingerprint = tokenizer_fingerprint(tokenizer)
            if fingerprint not in counts_by_tokenizer:
                counts_by_tokenizer[fingerprint] = count_tokens(tokenizer, args.count_tokens_in, vocabulary_rows,
                                                                args.text_column)
            counts, counts_source = counts_by_tokenizer[fingerprint], args.count_tokens_in

        entry: dict[str, Any] = {"model_name_or_path": path, "model_class": type(model).__name__, "matrices": {}}
        if counts is not None:
            entry["token_counts"] = {"source": counts_source, "tokens": int(counts.sum()),
                                     "rows_seen": int((counts > 0).sum())}
        weights[label], metrics_for_plots[label] = {}, {}
        for kind, matrix in matrices.items():
            weight = matrix["weight"].detach()
            use_counts = counts if kind in VOCABULARY_KINDS else None
            values = embedding_metrics(weight.to(device), None if use_counts is None else use_counts.to(device),
                                       top_k=args.top_k)
            entry["matrices"][kind] = {"parameter": matrix["parameter"], "roles": matrix["roles"],
                                       "shape": list(weight.shape), **values}
            if kind in VOCABULARY_KINDS:
                weights[label][kind] = weight.float().cpu()
                metrics_for_plots[label][kind] = values
        if counts is not None:
            counts_for_plots[label] = counts
        results["checkpoints"][label] = entry
        del model

    output_dir.mkdir(parents=True, exist_ok=True)
    if args.plots:
        results["plots"] = write_plots(output_dir, weights, counts_for_plots, metrics_for_plots)
    (output_dir / RESULTS_FILE).write_text(json.dumps(_finite_or_null(results), indent=2) + "\n")
    print(format_table(results))
    print(f"\nIso sign convention: {ISO_SIGN_CONVENTION}.")
    print(f"Wrote {output_dir / RESULTS_FILE}" + (f" and {len(results['plots'])} figures" if args.plots else ""))
    return results


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    run_cli(main, prog="eval_isotropy.py")  # bad input: one line on stderr, exit status 2

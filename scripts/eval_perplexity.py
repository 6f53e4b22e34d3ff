#!/usr/bin/env python
"""Sliding-window, token-weighted perplexity of a checkpoint on local text or a Hub dataset split.

    python scripts/eval_perplexity.py --model_name_or_path runs/coupled \\
        --validation_file coupled_adam_hf/data/shakespeare/validation.txt.gz --output_dir eval/coupled
    python scripts/eval_perplexity.py --model_name_or_path gpt2 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --dataset_split test --context_length 1024 --stride 512 \\
        --output_dir eval/gpt2

A text file is read whole (line breaks kept); rows of a JSON/CSV file or of a dataset split are joined with
``"\\n\\n"``. The text is tokenized once with the checkpoint's tokenizer and scored with
:func:`coupled_adam_hf.perplexity.evaluate_perplexity`: ``exp(sum NLL / tokens scored)`` with windows of
``--context_length`` tokens every ``--stride`` tokens; float32 log-softmax. Writes ``DIR/perplexity.json`` (NLL in
nats, perplexity, bits per byte, tokens and bytes scored, context, stride, dtype, data) and prints a table.
Arguments can also come from one ``.json``/``.yaml`` file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from coupled_adam_hf import cli
from coupled_adam_hf.cli import OutputExistsError, UsageError, one_line, run_cli
from coupled_adam_hf.data import check_data_file
from coupled_adam_hf.locking import OutputDirLock
from coupled_adam_hf.perplexity import DEFAULT_TEXT_SEPARATOR, config_context_length, evaluate_perplexity, tokenize_text

logger = logging.getLogger("eval_perplexity")

RESULTS_FILE = "perplexity.json"
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A local model folder or a Hub id (from_pretrained)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the checkpoint's own."})
    dtype: str = field(default="auto", metadata={"help": f"Weights dtype: {', '.join(_DTYPES)}.",
                                                 "choices": list(_DTYPES)})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})


@dataclass
class DataArguments:
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation text: .txt (read whole), .json/.jsonl/.csv (rows joined); .gz works."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub (or local) dataset, e.g. wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    dataset_split: str = field(default="validation", metadata={"help": "The split to score."})
    text_column: str = field(default="text", metadata={"help": "Text column of JSON/CSV files and datasets."})
    max_eval_tokens: int | None = field(
        default=None, metadata={"help": "Score only the first N tokens of the text (quick checks)."}
    )


@dataclass
class PerplexityArguments:
    output_dir: str = field(metadata={"help": f"Where {RESULTS_FILE} goes."})
    context_length: int | None = field(
        default=None, metadata={"help": "Tokens per window (default: the model's maximum positions)."}
    )
    stride: int | None = field(
        default=None,
        metadata={"help": "Tokens between window starts, <= context_length (default: context_length, disjoint "
                          "blocks like Trainer's eval loss; smaller strides give every token more context)."},
    )
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": f"Replace an existing {RESULTS_FILE} (refused otherwise)."}
    )


def parse_arguments(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, PerplexityArguments]:
    return cli.parse_arguments((ModelArguments, DataArguments, PerplexityArguments), argv)


def validate(model_args: ModelArguments, data_args: DataArguments, run_args: PerplexityArguments) -> None:
    """Every argument checked before the text or a model is loaded (UsageError: exit status 2)."""
    cli.check_device_name(model_args.device)
    if (data_args.validation_file is None) == (data_args.dataset_name is None):
        raise UsageError("give exactly one of --validation_file or --dataset_name")
    if data_args.validation_file is not None:
        check_data_file("--validation_file", data_args.validation_file)
    if run_args.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {run_args.batch_size}")
    if data_args.max_eval_tokens is not None and data_args.max_eval_tokens < 2:
        raise UsageError(f"--max_eval_tokens must be >= 2, got {data_args.max_eval_tokens}")
    if run_args.context_length is not None and run_args.context_length < 2:
        raise UsageError(f"--context_length must be >= 2, got {run_args.context_length}")
    if run_args.stride is not None and run_args.stride < 1:
        raise UsageError(f"--stride must be >= 1, got {run_args.stride}")
    if None not in (run_args.stride, run_args.context_length) and run_args.stride > run_args.context_length:
        raise UsageError(f"--stride {run_args.stride} is larger than --context_length {run_args.context_length}: "
                         "windows would skip tokens")
    output_dir = Path(run_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is not a directory")
    results = output_dir / RESULTS_FILE
    if results.exists() and not run_args.overwrite_output_dir:
        raise OutputExistsError(f"{results} exists: pass --overwrite_output_dir to replace it, or another --output_dir")


def check_against_model_config(model_args: ModelArguments, run_args: PerplexityArguments) -> None:
    """Context and stride against the checkpoint's config, read before its weights are."""
    from transformers import AutoConfig

    from coupled_adam_hf.reliability import model_folder_problem

    path = model_args.model_name_or_path
    problem = model_folder_problem(path) if Path(path).is_dir() or path.startswith((".", "/", "~")) else None
    if problem:
        raise UsageError(f"cannot load {path!r}: {problem}")
    try:
        config = AutoConfig.from_pretrained(path, revision=model_args.revision,
                                            trust_remote_code=model_args.trust_remote_code)
    except Exception as error:
        raise UsageError(f"cannot load {path!r}: {one_line(error)}") from error
    limit = config_context_length(config)
    if run_args.context_length is not None and limit is not None and run_args.context_length > limit:
        raise UsageError(f"--context_length {run_args.context_length} exceeds the model's maximum of {limit} "
                         "positions")
    if run_args.context_length is None and run_args.stride is not None and limit is not None and run_args.stride > limit:
        raise UsageError(f"--stride {run_args.stride} is larger than the model's context of {limit} tokens")


def load_texts(data_args: DataArguments) -> tuple[list[str], str]:
    """The documents to score and a description of where they came from."""
    import datasets

    if data_args.validation_file is not None:
        from coupled_adam_hf.data import builder_for

        builder = builder_for(data_args.validation_file)
        extra = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files=[data_args.validation_file], split="train", **extra)
        description = data_args.validation_file
    else:
        dataset = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                        split=data_args.dataset_split)
        description = ":".join(filter(None, [data_args.dataset_name, data_args.dataset_config_name,
                                             data_args.dataset_split]))
    column = "text" if data_args.validation_file and builder == "text" else data_args.text_column
    if column not in dataset.column_names:
        raise ValueError(f"text column {column!r} is not in {description} (columns: {dataset.column_names}); "
                         "pass --text_column")
    texts = [text for text in dataset[column] if text]
    if not texts:
        raise UsageError(f"{description} holds no text")
    return texts, description


def load_model_and_tokenizer(model_args: ModelArguments, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coupled_adam_hf.reliability import model_folder_problem

    kwargs = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
    path = model_args.model_name_or_path
    problem = model_folder_problem(path) if Path(path).is_dir() or path.startswith((".", "/", "~")) else None
    if problem:
        raise UsageError(f"cannot load {path!r}: {problem}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[model_args.dtype], **kwargs)
    except Exception as error:  # missing files, unreadable weights, a folder that is not a causal LM
        raise UsageError(f"cannot load {path!r}: {one_line(error)}") from error
    return model.to(device), tokenizer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what it writes to ``perplexity.json``."""
    model_args, data_args, run_args = parse_arguments(argv)
    validate(model_args, data_args, run_args)
    check_against_model_config(model_args, run_args)
    device = cli.resolve_device(model_args.device)  # before the text or a model is loaded
    with OutputDirLock(run_args.output_dir, what="evaluation"):  # one evaluation per folder
        return evaluate(model_args, data_args, run_args, device)


def evaluate(model_args: ModelArguments, data_args: DataArguments, run_args: PerplexityArguments,
             device: torch.device) -> dict[str, Any]:
    texts, description = load_texts(data_args)
    model, tokenizer = load_model_and_tokenizer(model_args, device)

    input_ids, token_bytes = tokenize_text(tokenizer, texts, separator=DEFAULT_TEXT_SEPARATOR)
    truncated = data_args.max_eval_tokens is not None and input_ids.numel() > data_args.max_eval_tokens
    if truncated:
        input_ids = input_ids[:data_args.max_eval_tokens]
        token_bytes = None if token_bytes is None else token_bytes[:data_args.max_eval_tokens]
    result = evaluate_perplexity(model, input_ids, context_length=run_args.context_length, stride=run_args.stride,
                                 batch_size=run_args.batch_size, token_bytes=token_bytes)
    result.update({
        "model_name_or_path": model_args.model_name_or_path,
        "data": description + (f" (first {data_args.max_eval_tokens} tokens)" if truncated else ""),
        "documents": len(texts),
        "device": str(next(model.parameters()).device),
        "arguments": {**asdict(model_args), **asdict(data_args), **asdict(run_args)},
    })

    output_dir = Path(run_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"\nWrote {output_dir / RESULTS_FILE}")
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("model", result["model_name_or_path"]),
        ("data", result["data"]),
        ("perplexity", f"{result['perplexity']:.4f}"),
        ("NLL (nats/token)", f"{result['nll']:.5f}"),
        ("bits per byte", "-" if result["bits_per_byte"] is None else f"{result['bits_per_byte']:.5f}"),
        ("tokens scored", f"{result['tokens_scored']:,} of {result['tokens_total']:,}"),
        ("bytes scored", "-" if result["bytes_scored"] is None else f"{result['bytes_scored']:,}"),
        ("context / stride", f"{result['context_length']} / {result['stride']} ({result['windows']} windows)"),
        ("weights / logits", f"{result['dtype']} / {result['logits_dtype']} on {result['device']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    run_cli(main, prog="eval_perplexity.py")  # bad input: one line on stderr, exit status 2

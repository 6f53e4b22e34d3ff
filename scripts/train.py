#!/usr/bin/env python
"""Train a causal language model with Coupled Adam (or any Trainer optimizer), in the shape of HF's run_clm.py.

    python scripts/train.py recipes/quickstart-coupled.yaml                  # offline, shipped Shakespeare
    python scripts/train.py recipes/quickstart-coupled.yaml --max_steps 50   # CLI flags override the recipe
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml scripts/train.py recipes/gpt2-124m-coupled.yaml
    torchrun --nproc_per_node 8 scripts/train.py recipes/gpt2-124m-adamw.yaml

Arguments: ``ModelArguments``, ``DataTrainingArguments`` (below) and
:class:`coupled_adam_hf.CoupledAdamTrainingArguments` (every ``TrainingArguments`` flag plus ``--optim coupled_adam``
and the coupling options), from a YAML/JSON recipe given as the first argument and/or command-line flags.
``python scripts/train.py --help`` lists them all.

Writes to ``--output_dir``: checkpoints, the final model and tokenizer, ``train_results.json``,
``eval_results.json`` (eval loss, perplexity), ``embedding_results.json`` (isotropy and friends of the final
embeddings) and ``all_results.json`` (all of them).

Interruptions and bad input (see the README's "Reliability"): SIGINT/SIGTERM save a checkpoint at the end of the
current step and exit with 130/143; running the same command again resumes from the newest complete checkpoint
in ``--output_dir`` (``--overwrite_output_dir`` starts over; a finished run is refused). Bad arguments, recipes,
data, tokenizers, checkpoints and output folders end with one line ``train.py: error: <reason>`` on stderr and exit
status 2, before anything is written; a loss that becomes NaN stops the run (status 1) naming the step and the
last good checkpoint.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import os
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import transformers
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

from coupled_adam_hf import data as lm_data
from coupled_adam_hf.checkpointing import CheckpointWriteError, format_bytes, free_bytes, write_error_reason
from coupled_adam_hf.cli import CLIError, UsageError, one_line, run_cli
from coupled_adam_hf.locking import OutputDirLock
from coupled_adam_hf.partition import find_coupled_parameters, parse_targets
from coupled_adam_hf.reliability import (
    NonFiniteTrainingError,
    SaveOnSignalCallback,
    checkpoint_problem,
    checkpoint_shape_mismatches,
    find_resumable_checkpoint,
    list_checkpoints,
    model_folder_problem,
)
from coupled_adam_hf.trainer import CoupledAdamTrainer
from coupled_adam_hf.training_args import COUPLED_ADAM, CoupledAdamTrainingArguments

logger = logging.getLogger("coupled_adam_hf.train")

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelArguments:
    """Which model to train: a pretrained one, or a fresh one from a config."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local path or Hub name of a pretrained model. Leave unset to train from scratch."}
    )
    model_type: str = field(
        default="gpt2", metadata={"help": "Model type of a model trained from scratch (a transformers model_type)."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config (local path or Hub name) of a model trained from scratch."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config values for a model trained from scratch, e.g. 'n_layer=4,n_head=4,n_embd=128' (in a "
            "recipe also a mapping). Without a 'vocab_size' override the vocabulary is the tokenizer's."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Local path or Hub name of a tokenizer. Default: the pretrained model's, or else a byte-level "
            "BPE trained on the training text (saved with the model)."
        },
    )
    tokenizer_vocab_size: int = field(
        default=8192, metadata={"help": "Vocabulary size of a tokenizer trained on the training text."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load a pretrained model in (auto, float32, bfloat16, float16). Mixed-precision "
            "training is --bf16/--fp16.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub models with their own code."})

    def __post_init__(self):
        if self.model_name_or_path is not None and (self.config_overrides or self.config_name):
            raise ValueError("--config_overrides/--config_name build a fresh model; drop them with --model_name_or_path")
        if isinstance(self.config_overrides, dict):  # a YAML mapping
            self.config_overrides = ",".join(f"{k}={v}" for k, v in self.config_overrides.items())


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on, and how to cut it into blocks."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub (or local folder) dataset, e.g. Skylion007/openwebtext."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local training text (.txt, .json/.jsonl, .csv, .parquet; .gz works). Default without "
            "--dataset_name: the shipped Shakespeare corpus."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation text, same format."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: 'text', else the first column)."}
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Percent of the training rows held out for validation when the data has no validation split."},
    )
    validation_split_seed: int = field(default=2357, metadata={"help": "Seed of that held-out split (nanoGPT's)."})
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence. Default: the model's context length, at most 1024."},
    )
    add_eos_token: bool = field(
        default=False,
        metadata={"help": "Append EOS to every row (for document datasets such as OpenWebText, not for line-by-line text)."},
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks of .txt files."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training blocks (quick runs, tests)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation blocks."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing and grouping (datasets.map num_proc)."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute tokenized data instead of using the cache."})
    embedding_metrics: bool = field(
        default=True,
        metadata={"help": "After training, write isotropy and related metrics of the embeddings to all_results.json."},
    )


def parser() -> HfArgumentParser:
    arg_parser = HfArgumentParser((ModelArguments, DataTrainingArguments, CoupledAdamTrainingArguments))
    # A training script trains and evaluates unless told otherwise (TrainingArguments' defaults are False).
    arg_parser.set_defaults(do_train=True, do_eval=True)
    return arg_parser


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A flat mapping of argument names to values, from a YAML or JSON file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        recipe = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except FileNotFoundError:
        raise UsageError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"recipe {path}: cannot read it ({one_line(error)})") from error
    except (ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError is a ValueError
        kind = "JSON" if str(path).endswith(".json") else "YAML"
        raise UsageError(f"recipe {path} is not valid {kind}: {one_line(error)}") from error
    if recipe is None or recipe == {}:
        raise UsageError(f"recipe {path} is empty: give the arguments of a run in it (see recipes/ for examples), "
                         "or leave the recipe out and pass flags")
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {path} must be a mapping of argument names to values, got {type(recipe).__name__}")
    not_names = [key for key in recipe if not isinstance(key, str)]
    if not_names:
        raise UsageError(f"recipe {path}: keys must be argument names, got {not_names[:3]!r}")
    return recipe


# Fields whose __post_init__ also takes a YAML list (coupled_targets) or mapping (config_overrides).
_ALSO_LIST = {"coupled_targets"}
_ALSO_MAPPING = {"config_overrides"}


def _accepted_kinds(name: str, annotation: Any) -> set[str]:
    """What a recipe value of a field may be: null, bool, int, float, str, list, mapping."""
    kinds = {"list"} if name in _ALSO_LIST else set()
    kinds |= {"mapping"} if name in _ALSO_MAPPING else set()
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            kinds |= _accepted_kinds(name, member)
        return kinds
    base = origin or annotation
    if annotation is type(None):
        kinds.add("null")
    elif base is typing.Literal or (isinstance(base, type) and issubclass(base, (str, enum.Enum))):
        kinds.add("str")
    elif base in (bool, int, float, list, dict):
        kinds.add({bool: "bool", int: "int", float: "float", list: "list", dict: "mapping"}[base])
    return kinds


def _recipe_value(name: str, value: Any, annotation: Any, action) -> Any:
    """``value`` ready to be a parser default, or UsageError saying what the field takes.

    Strings go on as they are: argparse converts a string default with the flag's type (and reports a bad one
    itself), as if it had been typed on the command line.
    """
    kinds = _accepted_kinds(name, annotation)
    takes = " or ".join(sorted(kinds)) or "a value the command line can give"

    def wrong(detail: str = "") -> UsageError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return UsageError(f"recipe key {name!r} takes {takes}, got {type(value).__name__} {shown}{detail}")

    if value is None:
        if "null" not in kinds:
            raise wrong()
        return None
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
        # YAML 1.1 reads unquoted yes/no/on/off as booleans (save_strategy: no -> False).
        raise wrong(" (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value)" if "str" in kinds
                    else "")
    if isinstance(value, str):
        if action.choices is not None and value not in {str(getattr(c, "value", c)) for c in action.choices}:
            choices = ", ".join(str(getattr(c, "value", c)) for c in action.choices)
            raise UsageError(f"recipe key {name!r}: {value!r} is not one of {choices}")
        return value
    if isinstance(value, int):
        if kinds & {"int", "float"}:
            return value
        if "str" in kinds:
            return str(value)
        raise wrong()
    if isinstance(value, float):
        if "float" in kinds:
            return value
        if "int" in kinds and value.is_integer():
            return int(value)
        if "str" in kinds and math.isfinite(value):
            return str(value)
        raise wrong()
    if isinstance(value, list):
        scalars = all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value)
        if "list" not in kinds or not scalars:
            raise wrong("" if scalars else " (a list of strings or numbers)")
        return [str(item) for item in value]
    if isinstance(value, dict):
        if "mapping" not in kinds or not all(isinstance(key, str) for key in value):
            raise wrong()
        return value
    raise wrong()  # dates, binary, sets and other YAML types


def check_recipe(recipe: dict[str, Any], path: str, arg_parser: HfArgumentParser) -> dict[str, Any]:
    """The recipe's values as parser defaults; unknown keys and values of the wrong type raise UsageError."""
    actions = {action.dest: action for action in arg_parser._actions}
    unknown = sorted(set(recipe) - set(actions))
    if unknown:
        raise UsageError(f"unknown argument(s) in the recipe {path}: {unknown}; `scripts/train.py --help` lists them")
    annotations: dict[str, Any] = {}
    for dataclass_type in arg_parser.dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        annotations.update({f.name: hints[f.name] for f in fields(dataclass_type) if f.init})
    return {name: _recipe_value(name, value, annotations.get(name, str), actions[name])
            for name, value in recipe.items()}


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, training_args)`` from ``[recipe.yaml] [--flag value ...]``; flags win.

    Bad input raises :class:`UsageError` (argparse's own errors -- unknown flag, a value of the wrong type --
    exit with status 2 as usual); nothing is read but the recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    arg_parser = parser()
    if argv and not argv[0].startswith("-") and argv[0].endswith(RECIPE_SUFFIXES):
        path = argv.pop(0)
        # Recipe values become the parser's defaults, so explicit flags override them (argparse converts string
        # defaults with the flag's type, so YAML strings such as "6e-4" work).
        arg_parser.set_defaults(**check_recipe(load_recipe(path), path, arg_parser))
    try:
        *arguments, remaining = arg_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UsageError:
        raise
    except Exception as error:  # the argument dataclasses' own checks (TrainingArguments.__post_init__ & co.)
        raise UsageError(f"invalid arguments: {one_line(error)}") from error
    if remaining:
        hint = "" if argv and argv[0] not in remaining else (
            f"; a recipe is a {'/'.join(RECIPE_SUFFIXES)} file given first")
        raise UsageError(f"unknown argument(s) {remaining}{hint}; `scripts/train.py --help` lists them")
    return tuple(arguments)




def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (``runs/x`` and ``org/model`` look alike: only these prefixes tell)."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep))


def validate_arguments(model_args, data_args, training_args) -> None:
    """Checks that need neither data nor model weights; UsageError on the first problem.

    Local files exist and are not empty, local model/tokenizer folders are readable, numbers are in range, a
    fresh model's config and ``--config_overrides`` apply.
    """
    packaged_builders = {"text", "json", "csv", "parquet", "arrow"}
    if data_args.dataset_name is None or data_args.dataset_name in packaged_builders:
        for flag, path in (("--train_file", data_args.train_file), ("--validation_file", data_args.validation_file)):
            if path is not None:
                lm_data.check_data_file(flag, path)
    elif _looks_local(data_args.dataset_name) and not os.path.exists(data_args.dataset_name):
        raise UsageError(f"--dataset_name {data_args.dataset_name!r}: no such folder")

    for flag, name in (("--model_name_or_path", model_args.model_name_or_path),
                       ("--config_name", model_args.config_name)):
        if name is None:
            continue
        if os.path.isdir(name):
            problem = model_folder_problem(name, weights=flag == "--model_name_or_path")
            if problem:
                raise UsageError(f"{flag} {name!r} is not a usable model folder: {problem}")
        elif _looks_local(name):
            raise UsageError(f"{flag} {name!r}: no such folder")
    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        raise UsageError(f"--output_dir {training_args.output_dir} is not a directory")
    tokenizer_name = model_args.tokenizer_name
    if tokenizer_name is not None and not os.path.exists(tokenizer_name) and _looks_local(tokenizer_name):
        raise UsageError(f"--tokenizer_name {tokenizer_name!r}: no such folder or file")

    def at_least(flag: str, value, minimum, allow_none: bool = True) -> None:
        if value is None and allow_none:
            return
        if value is None or not value >= minimum:  # also rejects NaN
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")

    at_least("--block_size", data_args.block_size, 2)
    at_least("--max_train_samples", data_args.max_train_samples, 1)
    at_least("--max_eval_samples", data_args.max_eval_samples, 1)
    at_least("--preprocessing_num_workers", data_args.preprocessing_num_workers, 1)
    if model_args.model_name_or_path is None and model_args.tokenizer_name is None:
        at_least("--tokenizer_vocab_size", model_args.tokenizer_vocab_size, 257)
    if not 0.0 <= data_args.validation_split_percentage < 100.0:
        raise UsageError(
            f"--validation_split_percentage must be in [0, 100), got {data_args.validation_split_percentage}")

    args = training_args
    for flag, value, minimum in (
        ("--per_device_train_batch_size", args.per_device_train_batch_size, 1),
        ("--per_device_eval_batch_size", args.per_device_eval_batch_size, 1),
        ("--gradient_accumulation_steps", args.gradient_accumulation_steps, 1),
        ("--learning_rate", args.learning_rate, 0.0),
        ("--weight_decay", args.weight_decay, 0.0),
        ("--adam_epsilon", args.adam_epsilon, 0.0),
        ("--warmup_steps", args.warmup_steps, 0),
        ("--dataloader_num_workers", args.dataloader_num_workers, 0),
    ):
        at_least(flag, value, minimum, allow_none=False)
    for flag, value in (("--learning_rate", args.learning_rate), ("--weight_decay", args.weight_decay),
                        ("--adam_epsilon", args.adam_epsilon), ("--max_grad_norm", args.max_grad_norm),
                        ("--num_train_epochs", args.num_train_epochs)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    for flag, value in (("--adam_beta1", args.adam_beta1), ("--adam_beta2", args.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise UsageError(f"{flag} must be in [0, 1), got {value}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UsageError(f"--max_steps must be > 0 (or -1: train for --num_train_epochs), got {args.max_steps}")
    if args.max_steps == -1 and args.do_train and not args.num_train_epochs > 0:
        raise UsageError(f"--num_train_epochs must be > 0 without --max_steps, got {args.num_train_epochs}")
    for flag, value in (("--seed", args.seed), ("--data_seed", args.data_seed)):
        if value is not None and not 0 <= value < 2**32:  # numpy's seed range
            raise UsageError(f"{flag} must be in [0, 2**32), got {value}")

    if model_args.model_name_or_path is None and model_args.config_name is None:
        try:
            config = AutoConfig.for_model(model_args.model_type)
        except Exception as error:
            raise UsageError(f"--model_type {model_args.model_type!r}: {one_line(error)}") from error
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except Exception as error:
                raise UsageError(f"--config_overrides {model_args.config_overrides!r}: {one_line(error)} (write "
                                 "key=value pairs separated by commas, with keys of the model's config)") from error


def check_arguments(argv: list[str] | None = None):
    """Parse and validate without reading data, loading a model or writing anything: ``parse_args`` plus
    ``validate_arguments``. Raises UsageError (or SystemExit from argparse) for bad input."""
    model_args, data_args, training_args = parse_args(argv)
    validate_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def setup_logging(training_args: CoupledAdamTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()  # the main process logs at INFO unless --log_level says less
    log_level = training_args.get_process_log_level()
    for name in ("coupled_adam_hf",):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def resolve_checkpoint(training_args: CoupledAdamTrainingArguments, *, log: bool = True) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true``/``last`` for the newest complete one in
    output_dir (newer ones that a crash left incomplete are skipped with a warning). UsageError if there is none or
    the folder is not a complete checkpoint."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        last, skipped = find_resumable_checkpoint(training_args.output_dir)
        for path, problem in skipped if log else ():
            logger.warning(f"Skipping {path}: {problem}")
        if last is None:
            found = f" (incomplete: {', '.join(Path(p).name for p, _ in skipped)})" if skipped else ""
            raise UsageError(f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in "
                             f"{training_args.output_dir}{found}")
        return last
    problem = checkpoint_problem(value)
    if problem == "no such folder":
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if problem is not None:
        raise UsageError(f"--resume_from_checkpoint {value} is not a complete checkpoint: {problem}")
    return value


#: Files a run of this script leaves at the top of its output_dir (checkpoint-* folders aside).
RUN_FILES = ("trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
             "embedding_results.json", "training_args.bin", "model.safetensors", "pytorch_model.bin", "config.json")
#: Of those, what --overwrite_output_dir removes besides the checkpoints: files that would make a new run that is
#: interrupted look finished, or mix the old run's numbers with the new one's.
STALE_RESULT_FILES = ("trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
                      "embedding_results.json")


def prepare_output_dir(training_args: CoupledAdamTrainingArguments, *, delete_stale: bool = True) -> str | None:
    """The checkpoint to resume from (None: train from scratch), deciding what to do with ``--output_dir``.

    With ``delete_stale=False`` nothing is deleted and nothing logged: the decision alone, to check it before
    anything is written (``main`` decides again, logging, once it holds the folder's lock).

    - ``--resume_from_checkpoint PATH|last``: that checkpoint (checked).
    - ``--overwrite_output_dir``: from scratch; the old run's checkpoints and result files are deleted.
    - a folder with an unfinished run (``checkpoint-*``, no ``train_results.json``): resume from its newest
      complete checkpoint, and say so -- re-running an interrupted command continues it, like run_clm.py.
    - a folder with a finished run, or with run files but no checkpoint: UsageError (nothing is touched).
    - anything else (absent, empty, or only a tokenizer saved by a run that never reached a checkpoint): scratch.
    """
    value = training_args.resume_from_checkpoint
    resume_asked = value is not None and str(value).lower() not in ("", "false", "none")
    if training_args.do_train and resume_asked and training_args.overwrite_output_dir:
        raise UsageError("--overwrite_output_dir starts over, --resume_from_checkpoint continues: give one of them")
    explicit = resolve_checkpoint(training_args, log=delete_stale)
    if not training_args.do_train or explicit is not None:
        return explicit
    output_dir = Path(training_args.output_dir)
    checkpoints = list_checkpoints(output_dir)
    held = [name for name in RUN_FILES if (output_dir / name).exists()] + [c.name for c in checkpoints]
    if not held:
        return None
    if training_args.overwrite_output_dir:
        if training_args.should_save and delete_stale:  # the process that saves; the others don't delete
            stale = checkpoints + [output_dir / n for n in STALE_RESULT_FILES if (output_dir / n).exists()]
            logger.warning(f"--overwrite_output_dir: deleting {', '.join(p.name for p in stale) or 'nothing'} in "
                           f"{output_dir} and training from scratch")
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    if (output_dir / "train_results.json").exists():
        raise UsageError(
            f"{output_dir} holds a finished run (train_results.json): pass --overwrite_output_dir to train again "
            "from scratch, --resume_from_checkpoint last to continue it (e.g. with a larger --max_steps), or "
            "another --output_dir"
        )
    checkpoint, skipped = find_resumable_checkpoint(output_dir)
    for path, problem in skipped if delete_stale else ():
        logger.warning(f"Skipping {path}: {problem}")
    if checkpoint is None:
        raise UsageError(
            f"{output_dir} already holds a run ({', '.join(held[:4])}) but no complete checkpoint to resume from: "
            "pass --overwrite_output_dir to start over, or another --output_dir"
        )
    if delete_stale:
        logger.warning(
            f"{output_dir} holds an unfinished run: resuming from {checkpoint}. Pass --overwrite_output_dir to "
            "start over instead."
        )
    return checkpoint


def _load(what: str, name: str, load, *args, **kwargs):
    """``load(*args, **kwargs)``; whatever a broken or missing file makes it raise becomes one UsageError line."""
    try:
        return load(*args, **kwargs)
    except Exception as error:
        raise UsageError(f"cannot load the {what} {name!r}: {one_line(error)}") from error


def build_tokenizer(model_args, data_args, training_args, raw_datasets, checkpoint: str | None):
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision,
               trust_remote_code=model_args.trust_remote_code)
    for source in (model_args.tokenizer_name, model_args.model_name_or_path):
        if source:
            return _load("tokenizer", source, AutoTokenizer.from_pretrained, source, **hub)
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        # the tokenizer this run was trained with
        return _load("tokenizer of checkpoint", checkpoint, AutoTokenizer.from_pretrained, checkpoint)
    # Train one on the training text. Each node's main process trains it (main() saves it once every check has
    # passed); the other processes, which main() lets in only after that, load what it saved.
    if training_args.local_process_index != 0:
        return AutoTokenizer.from_pretrained(training_args.output_dir)
    train_split = raw_datasets["train"]
    logger.info(f"Training a byte-level BPE tokenizer ({model_args.tokenizer_vocab_size} tokens) on the "
                f"training text ({len(train_split)} rows)")
    tokenizer = lm_data.train_tokenizer(
        lm_data.iter_texts(train_split, data_args.text_column_name),
        model_args.tokenizer_vocab_size,
        model_max_length=data_args.block_size or 1024,
    )
    tokenizer.trained_by_this_run = True
    return tokenizer


def check_coupled_targets(model, training_args) -> None:
    """Resolve --coupled_targets on the built model before anything is written (UsageError lists its embeddings)."""
    uses_groups = training_args.optim == COUPLED_ADAM or training_args.baseline_grouping
    targets = parse_targets(training_args.coupled_targets)
    if not uses_groups or not targets:
        return
    try:
        find_coupled_parameters(model, targets)
    except ValueError as error:
        raise UsageError(f"--coupled_targets {training_args.coupled_targets!r}: {one_line(error)}") from error


def build_model(model_args, tokenizer):
    if model_args.model_name_or_path:
        model = _load(
            "model", model_args.model_name_or_path, AutoModelForCausalLM.from_pretrained,
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code, dtype=model_args.dtype,
        )
    else:
        if model_args.config_name:
            config = _load("config", model_args.config_name, AutoConfig.from_pretrained, model_args.config_name,
                           cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code)
        else:
            config = AutoConfig.for_model(model_args.model_type)
        overrides = model_args.config_overrides or ""
        if overrides:
            logger.info(f"Overriding config: {overrides}")
            config.update_from_string(overrides)
        vocab_set = "vocab_size=" in overrides.replace(" ", "") or model_args.config_name is not None
        if not vocab_set:
            config.vocab_size = len(tokenizer)
        elif config.vocab_size < len(tokenizer):
            raise UsageError(
                f"the model's vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens: "
                "raise vocab_size in --config_overrides (or leave it out: the default is the tokenizer's size), or "
                "use a smaller tokenizer (--tokenizer_vocab_size)"
            )
        for name in ("bos_token_id", "eos_token_id"):
            setattr(config, name, getattr(tokenizer, name))
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"Training a new {config.model_type} model from scratch: {n_params / 1e6:.2f}M parameters")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # run_clm.py's behaviour for a pretrained model given a larger tokenizer: new, randomly initialised rows.
        logger.warning(f"The tokenizer has {len(tokenizer)} tokens, the model's embedding {rows} rows: resizing the "
                       "embeddings (the new rows start random)")
        model.resize_token_embeddings(len(tokenizer))
    return model


def default_block_size(model, tokenizer, requested: int | None) -> int:
    context = None
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        context = context or getattr(model.config, name, None)
    limit = min(x for x in (context, tokenizer.model_max_length, 1024) if x)
    if requested is None:
        return limit
    if context is not None and requested > context:
        raise UsageError(f"--block_size {requested} exceeds the model's context length {context}")
    return requested


def embedding_results(model, train_dataset) -> dict[str, float]:
    """Metrics of the final embeddings (input, and the LM head when untied), weighted by training token counts."""
    import importlib.util

    if importlib.util.find_spec("coupled_adam_hf.metrics") is None:
        logger.warning("coupled_adam_hf.metrics is not installed: no embedding metrics")
        return {}
    from coupled_adam_hf.metrics import embedding_metrics

    input_weight = model.get_input_embeddings().weight
    counts = lm_data.token_counts(train_dataset, input_weight.shape[0])
    results = {f"embedding_{k}": v for k, v in embedding_metrics(input_weight.detach().float().cpu(), counts).items()}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not input_weight and output.weight.shape[0] == counts.shape[0]:
        output_metrics = embedding_metrics(output.weight.detach().float().cpu(), counts)
        results.update({f"output_embedding_{k}": v for k, v in output_metrics.items()})
    return results


def load_data(model_args, data_args):
    """The raw train/validation splits; unreadable or empty data raises UsageError."""
    source = data_args.dataset_name or ", ".join(filter(None, (data_args.train_file, data_args.validation_file)))
    try:
        raw_datasets = lm_data.load_raw_datasets(
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            train_file=data_args.train_file, validation_file=data_args.validation_file,
            validation_split_percentage=data_args.validation_split_percentage,
            validation_split_seed=data_args.validation_split_seed, keep_linebreaks=data_args.keep_linebreaks,
            cache_dir=model_args.cache_dir,
        )
    except Exception as error:  # datasets' errors for unreadable files, missing splits, offline Hub, ...
        reason, cause = one_line(error), error.__cause__ or error.__context__
        while cause is not None and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not None:  # datasets wraps the reader's error in "An error occurred while generating ..."
            reason += f" ({type(cause).__name__}: {one_line(cause)})"
        raise UsageError(f"cannot load the data ({source or 'the shipped Shakespeare text'}): {reason}") from error
    for split, dataset in raw_datasets.items():
        if len(dataset) == 0:
            raise UsageError(f"the {split!r} split of {source or 'the data'} is empty: no text to train on")
    return raw_datasets


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate; returns the metrics written to all_results.json.

    Raises :class:`UsageError` for bad input (before anything is written), :class:`CLIError` when the loss
    became NaN (``exit_code`` 1) or a signal stopped training after saving a checkpoint (``exit_code`` 128 + the
    signal number). ``python scripts/train.py`` turns them into one line on stderr (:func:`run_cli`).
    """
    model_args, data_args, training_args = check_arguments(argv)
    setup_logging(training_args)
    logger.warning(
        f"Process rank {training_args.process_index} of {training_args.world_size}, device {training_args.device}, "
        f"optim {getattr(training_args.optim, 'value', training_args.optim)}"
    )
    logger.info(f"Training arguments: {training_args}")
    # Decide what to do with --output_dir (refusals come here, before anything is read or written).
    checkpoint = prepare_output_dir(training_args, delete_stale=False)
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading the data"):
        raw_datasets = load_data(model_args, data_args)

    # Tokenizer and model, and every check that needs them. Each node's main process goes first and, once all
    # checks passed, takes the folder (one run per output folder), applies --overwrite_output_dir and saves the
    # tokenizer it trained; the other processes then load that tokenizer.
    run_lock = OutputDirLock(training_args.output_dir, what="training run")
    with training_args.main_process_first(local=True, desc="building the tokenizer and the model"):
        tokenizer = build_tokenizer(model_args, data_args, training_args, raw_datasets, checkpoint)
        model = build_model(model_args, tokenizer)
        if checkpoint is not None:
            mismatches = checkpoint_shape_mismatches(checkpoint, model)
            if mismatches:
                raise UsageError(
                    f"{checkpoint} does not fit the model built from these arguments ({'; '.join(mismatches[:2])}): "
                    "the model or tokenizer arguments changed since that run. Use that run's arguments, or "
                    "--overwrite_output_dir / another --output_dir to start a new one"
                )
        block_size = default_block_size(model, tokenizer, data_args.block_size)
        check_coupled_targets(model, training_args)
        try:
            lm_datasets = lm_data.tokenize_and_group(
                raw_datasets, tokenizer, block_size, text_column=data_args.text_column_name,
                add_eos_token=data_args.add_eos_token, num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
            )
        except ValueError as error:  # too little text for one block, a missing text column
            raise UsageError(one_line(error)) from error
        if training_args.should_save:
            run_lock.acquire()  # exit 2 at once if another run holds the folder
            checkpoint = prepare_output_dir(training_args)  # again, now that no other run can change the folder
        if getattr(tokenizer, "trained_by_this_run", False):
            os.makedirs(training_args.output_dir, exist_ok=True)
            tokenizer.save_pretrained(training_args.output_dir)
    try:
        return _train_and_evaluate(data_args, training_args, tokenizer, model, lm_datasets, block_size, checkpoint)
    finally:
        run_lock.release()


@contextlib.contextmanager
def final_writes(output_dir: str):
    """A write error after training (full disk, quota, read-only) as one line naming the intact checkpoint."""
    try:
        yield
    except Exception as error:
        reason = write_error_reason(error)
        if reason is None:
            raise
        last, _ = find_resumable_checkpoint(output_dir)
        free = free_bytes(Path(output_dir))
        kept = (f"the last checkpoint {last} is intact: free some space and run the same command again to resume "
                "from it") if last else "no checkpoint was saved"
        space = f" ({format_bytes(free)} free)" if free is not None else ""
        raise CheckpointWriteError(f"could not write the trained model and results to {output_dir}{space}: "
                                   f"{reason}; {kept}") from error


def _train_and_evaluate(data_args, training_args, tokenizer, model, lm_datasets, block_size,
                        checkpoint) -> dict[str, float]:
    train_dataset, eval_dataset = lm_datasets["train"], lm_datasets["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
    logger.info(f"{len(train_dataset)} training and {len(eval_dataset)} validation blocks of {block_size} tokens")

    on_signal = SaveOnSignalCallback()
    trainer = CoupledAdamTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=lm_data.CausalLMBlockCollator(),
        callbacks=[on_signal],
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        try:
            train_result = trainer.train(resume_from_checkpoint=checkpoint)
        except NonFiniteTrainingError as error:
            last_good, _ = find_resumable_checkpoint(training_args.output_dir)
            advice = (f"the last good checkpoint is {last_good}: resume from it (--resume_from_checkpoint "
                      f"{last_good}) with a lower --learning_rate, more --warmup_steps or --max_grad_norm"
                      if last_good else "no checkpoint was saved before it")
            raise CLIError(f"training diverged: {error}; {advice}") from error
        finally:
            on_signal.restore_handlers()  # train() skips on_train_end when it raises
        if on_signal.stopped_at_step is not None:
            saved = os.path.join(training_args.output_dir, f"checkpoint-{on_signal.stopped_at_step}")
            raise CLIError(
                f"interrupted by {on_signal.signal_name} at step {on_signal.stopped_at_step} of "
                f"{trainer.state.max_steps}: saved {saved}; run the same command again to resume from it",
                exit_code=128 + on_signal.received,
            )
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        metrics["train_world_size"] = training_args.world_size
        trainer.log_metrics("train", metrics)
        with final_writes(training_args.output_dir):
            trainer.save_model()  # also saves the tokenizer
            trainer.save_metrics("train", metrics)  # written after the model: its presence means "finished"
            trainer.save_state()
        results.update(metrics)
        if data_args.embedding_metrics and trainer.is_world_process_zero():
            embedding = embedding_results(trainer.model, train_dataset)
            if embedding:
                trainer.log_metrics("embedding", embedding)
                trainer.save_metrics("embedding", embedding)
                results.update(embedding)

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    run_cli(main, prog="train.py")

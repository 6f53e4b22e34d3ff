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

Interruptions and bad input (see docs/reliability.md): SIGINT/SIGTERM save a checkpoint at the end of the
current step and exit with 130/143; running the same command again resumes from the newest complete checkpoint
in ``--output_dir`` (``--overwrite_output_dir`` starts over; a finished run is refused). Bad arguments, recipes,
data, tokenizers, checkpoints and output folders end with one line ``train.py: error: <reason>`` on stderr and exit
status 2, before anything is written; a loss that becomes NaN stops the run (status 1) naming the step and the
last good checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

from coupled_adam_hf import data as lm_data
from coupled_adam_hf.callbacks import SaveOnSignalCallback
from coupled_adam_hf.checkpointing import final_writes
from coupled_adam_hf.cli import CLIError, UsageError, one_line, run_cli
from coupled_adam_hf.locking import OutputDirLock
from coupled_adam_hf.metrics import embedding_metrics
from coupled_adam_hf.partition import find_coupled_parameters, model_embeddings
from coupled_adam_hf.perplexity import model_context_length
from coupled_adam_hf.recipes import parse_args_with_recipe
from coupled_adam_hf.reliability import (
    NonFiniteTrainingError,
    check_output_dir,
    checkpoint_shape_mismatches,
    find_resumable_checkpoint,
    model_folder_problem,
    prepare_output_dir,
)
from coupled_adam_hf.trainer import CoupledAdamTrainer
from coupled_adam_hf.training_args import COUPLED_ADAM, CoupledAdamTrainingArguments

logger = logging.getLogger("coupled_adam_hf.train")


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (``runs/x`` and ``org/model`` look alike: only these prefixes tell)."""
    return name.startswith((".", "/", "~")) or name.endswith(("/", os.sep))


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
        if self.model_name_or_path is None and self.tokenizer_name is None and not self.tokenizer_vocab_size >= 257:
            raise ValueError(f"--tokenizer_vocab_size must be >= 257, got {self.tokenizer_vocab_size}")
        # What the arguments name, checked before anything is read or written: local folders exist and are readable,
        # a fresh model's config and --config_overrides apply.
        for flag, name in (("--model_name_or_path", self.model_name_or_path), ("--config_name", self.config_name)):
            if name is not None and os.path.isdir(name):
                problem = model_folder_problem(name, weights=flag == "--model_name_or_path")
                if problem:
                    raise UsageError(f"{flag} {name!r} is not a usable model folder: {problem}")
            elif name is not None and _looks_local(name):
                raise UsageError(f"{flag} {name!r}: no such folder")
        name = self.tokenizer_name
        if name is not None and not os.path.exists(name) and _looks_local(name):
            raise UsageError(f"--tokenizer_name {name!r}: no such folder or file")
        if self.model_name_or_path is None and self.config_name is None:
            try:
                config = AutoConfig.for_model(self.model_type)
            except Exception as error:
                raise UsageError(f"--model_type {self.model_type!r}: {one_line(error)}") from error
            try:
                if self.config_overrides:
                    config.update_from_string(self.config_overrides)
            except Exception as error:
                raise UsageError(f"--config_overrides {self.config_overrides!r}: {one_line(error)} (write key=value "
                                 "pairs separated by commas, with keys of the model's config)") from error


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

    def __post_init__(self):
        if self.dataset_name is None or self.dataset_name in ("text", "json", "csv", "parquet", "arrow"):
            for flag, path in (("--train_file", self.train_file), ("--validation_file", self.validation_file)):
                if path is not None:
                    lm_data.check_data_file(flag, path)  # exists, not empty
        elif _looks_local(self.dataset_name) and not os.path.exists(self.dataset_name):
            raise UsageError(f"--dataset_name {self.dataset_name!r}: no such folder")
        for flag, value, minimum in (("--block_size", self.block_size, 2),
                                     ("--max_train_samples", self.max_train_samples, 1),
                                     ("--max_eval_samples", self.max_eval_samples, 1),
                                     ("--preprocessing_num_workers", self.preprocessing_num_workers, 1)):
            if value is not None and not value >= minimum:
                raise ValueError(f"{flag} must be >= {minimum}, got {value}")
        if not 0.0 <= self.validation_split_percentage < 100.0:  # (also NaN)
            raise ValueError(f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}")


def parser() -> HfArgumentParser:
    arg_parser = HfArgumentParser((ModelArguments, DataTrainingArguments, CoupledAdamTrainingArguments))
    # A training script trains and evaluates unless told otherwise (TrainingArguments' defaults are False).
    arg_parser.set_defaults(do_train=True, do_eval=True)
    return arg_parser


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, training_args)`` from ``[recipe.yaml] [--flag value ...]``; flags win."""
    return parse_args_with_recipe(parser(), argv, script="scripts/train.py")


def check_arguments(argv: list[str] | None = None):
    """:func:`parse_args`, and ``--output_dir`` is a folder if it exists: every check that needs neither data nor
    a model (each argument dataclass checks what it holds), without writing anything. Raises UsageError (or
    SystemExit from argparse) for bad input."""
    model_args, data_args, training_args = parse_args(argv)
    check_output_dir(training_args.output_dir)
    return model_args, data_args, training_args


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
    rows = model_embeddings(model, ("token",))[0].weight.shape[0]
    if len(tokenizer) > rows:
        # run_clm.py's behaviour for a pretrained model given a larger tokenizer: new, randomly initialised rows.
        logger.warning(f"The tokenizer has {len(tokenizer)} tokens, the model's embedding {rows} rows: resizing the "
                       "embeddings (the new rows start random)")
        model.resize_token_embeddings(len(tokenizer))
    return model


def default_block_size(model, tokenizer, requested: int | None) -> int:
    context = model_context_length(model)
    limit = min(x for x in (context, tokenizer.model_max_length, 1024) if x)
    if requested is None:
        return limit
    if context is not None and requested > context:
        raise UsageError(f"--block_size {requested} exceeds the model's context length {context}")
    return requested


def embedding_results(model, train_dataset) -> dict[str, float]:
    """Metrics of the final embeddings (input, and the LM head when untied), weighted by training token counts."""
    results: dict[str, float] = {}
    counts = None
    for entry in model_embeddings(model, ("token", "output")):
        if counts is None:
            counts = lm_data.token_counts(train_dataset, entry.weight.shape[0])
        if entry.weight.shape[0] != counts.shape[0]:
            continue
        prefix = "embedding_" if entry.kind == "token" else "output_embedding_"
        metrics = embedding_metrics(entry.weight.detach().float().cpu(), counts)
        results.update({prefix + key: value for key, value in metrics.items()})
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate; returns the metrics written to all_results.json.

    Raises :class:`UsageError` for bad input (before anything is written), :class:`CLIError` when the loss
    became NaN (``exit_code`` 1) or a signal stopped training after saving a checkpoint (``exit_code`` 128 + the
    signal number). ``python scripts/train.py`` turns them into one line on stderr (:func:`run_cli`).
    """
    # 1. Arguments: recipe + flags, each checked by the dataclass that owns it.
    model_args, data_args, training_args = check_arguments(argv)

    # 2. Logging, as run_clm.py sets it up: the main process at INFO, the others at WARNING.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()  # the main process logs at INFO unless --log_level says less
    log_level = training_args.get_process_log_level()
    logging.getLogger("coupled_adam_hf").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank {training_args.process_index} of {training_args.world_size}, device {training_args.device}, "
        f"optim {getattr(training_args.optim, 'value', training_args.optim)}"
    )
    logger.info(f"Training arguments: {training_args}")

    # 3. What to do with --output_dir: the decision alone (refusals come here, before anything is read or written).
    checkpoint = prepare_output_dir(training_args, delete_stale=False)
    set_seed(training_args.seed)

    # 4. Raw text.
    with training_args.main_process_first(desc="loading the data"):
        raw_datasets = lm_data.load_checked_datasets(  # unreadable or empty data: UsageError
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            train_file=data_args.train_file, validation_file=data_args.validation_file,
            validation_split_percentage=data_args.validation_split_percentage,
            validation_split_seed=data_args.validation_split_seed, keep_linebreaks=data_args.keep_linebreaks,
            cache_dir=model_args.cache_dir,
        )

    # 5. Tokenizer and model, and every check that needs them. Each node's main process goes first and, once all
    # checks passed, takes the folder (one run per output folder), applies --overwrite_output_dir and saves the
    # tokenizer it trained; the other processes then load that tokenizer.
    run_lock = OutputDirLock(training_args.output_dir, what="training run")
    with training_args.main_process_first(local=True, desc="building the tokenizer and the model"):
        tokenizer = build_tokenizer(model_args, data_args, training_args, raw_datasets, checkpoint)
        model = build_model(model_args, tokenizer)
        mismatches = checkpoint_shape_mismatches(checkpoint, model) if checkpoint is not None else []
        if mismatches:
            raise UsageError(
                f"{checkpoint} does not fit the model built from these arguments ({'; '.join(mismatches[:2])}): "
                "the model or tokenizer arguments changed since that run. Use that run's arguments, or "
                "--overwrite_output_dir / another --output_dir to start a new one"
            )
        block_size = default_block_size(model, tokenizer, data_args.block_size)
        # --coupled_targets resolved on the built model now, not when the trainer builds the optimizer
        if (training_args.optim == COUPLED_ADAM or training_args.baseline_grouping) \
                and training_args.coupled_target_list:
            try:
                find_coupled_parameters(model, training_args.coupled_target_list)
            except ValueError as error:
                raise UsageError(f"--coupled_targets {training_args.coupled_targets!r}: {one_line(error)}") from error
        try:
            lm_datasets = lm_data.tokenize_and_group(
                raw_datasets, tokenizer, block_size, text_column=data_args.text_column_name,
                add_eos_token=data_args.add_eos_token, num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
            )
        except ValueError as error:  # too little text for one block, a missing text column
            raise UsageError(one_line(error)) from error

        # 6. Every check passed: the first writes.
        if training_args.should_save:
            run_lock.acquire()  # exit 2 at once if another run holds the folder
            checkpoint = prepare_output_dir(training_args)  # again, now that no other run can change the folder
        if getattr(tokenizer, "trained_by_this_run", False):
            os.makedirs(training_args.output_dir, exist_ok=True)
            tokenizer.save_pretrained(training_args.output_dir)

    try:
        # 7. Datasets and trainer.
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

        # 8. Training.
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

        # 9. Evaluation.
        if training_args.do_eval:
            metrics = trainer.evaluate()
            metrics["eval_samples"] = len(eval_dataset)
            metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
            results.update(metrics)
        return results
    finally:
        run_lock.release()


if __name__ == "__main__":
    run_cli(main, prog="train.py")

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import transformers
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from coupled_adam_hf import data as lm_data
from coupled_adam_hf.trainer import CoupledAdamTrainer
from coupled_adam_hf.training_args import CoupledAdamTrainingArguments

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
    text = Path(path).read_text()
    recipe = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of argument names to values, got {type(recipe).__name__}")
    return recipe


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, training_args)`` from ``[recipe.yaml] [--flag value ...]``; flags win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arg_parser = parser()
    if argv and not argv[0].startswith("-") and argv[0].endswith(RECIPE_SUFFIXES):
        recipe = load_recipe(argv.pop(0))
        known = {action.dest for action in arg_parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"unknown argument(s) in the recipe: {unknown}; `scripts/train.py --help` lists them")
        # Recipe values become the parser's defaults, so explicit flags override them (argparse converts string
        # defaults with the flag's type, so YAML strings such as "6e-4" work).
        arg_parser.set_defaults(**recipe)
    return arg_parser.parse_args_into_dataclasses(args=argv)


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


def resolve_checkpoint(training_args: CoupledAdamTrainingArguments) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true``/``last`` for the newest one in output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {training_args.output_dir}")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


def build_tokenizer(model_args, data_args, training_args, raw_datasets, checkpoint: str | None):
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision,
               trust_remote_code=model_args.trust_remote_code)
    if model_args.tokenizer_name:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name, **hub)
    if model_args.model_name_or_path:
        return AutoTokenizer.from_pretrained(model_args.model_name_or_path, **hub)
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(checkpoint)  # the tokenizer this run was trained with
    # Train one on the training text: each node's main process trains (deterministic) and saves it, the other
    # processes load what it saved.
    with training_args.main_process_first(local=True, desc="training the tokenizer"):
        if training_args.local_process_index == 0:
            train_split = raw_datasets["train"]
            logger.info(f"Training a byte-level BPE tokenizer ({model_args.tokenizer_vocab_size} tokens) on the "
                        f"training text ({len(train_split)} rows)")
            tokenizer = lm_data.train_tokenizer(
                lm_data.iter_texts(train_split, data_args.text_column_name),
                model_args.tokenizer_vocab_size,
                model_max_length=data_args.block_size or 1024,
            )
            tokenizer.save_pretrained(training_args.output_dir)
            return tokenizer
        return AutoTokenizer.from_pretrained(training_args.output_dir)


def build_model(model_args, tokenizer):
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code, dtype=model_args.dtype,
        )
    else:
        if model_args.config_name:
            config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir,
                                                trust_remote_code=model_args.trust_remote_code)
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
            raise ValueError(f"config vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
        for name in ("bos_token_id", "eos_token_id"):
            setattr(config, name, getattr(tokenizer, name))
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"Training a new {config.model_type} model from scratch: {n_params / 1e6:.2f}M parameters")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
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
        raise ValueError(f"--block_size {requested} exceeds the model's context length {context}")
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    logger.warning(
        f"Process rank {training_args.process_index} of {training_args.world_size}, device {training_args.device}, "
        f"optim {getattr(training_args.optim, 'value', training_args.optim)}"
    )
    logger.info(f"Training arguments: {training_args}")
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)
    os.makedirs(training_args.output_dir, exist_ok=True)

    with training_args.main_process_first(desc="loading the data"):
        raw_datasets = lm_data.load_raw_datasets(
            dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
            train_file=data_args.train_file, validation_file=data_args.validation_file,
            validation_split_percentage=data_args.validation_split_percentage,
            validation_split_seed=data_args.validation_split_seed, keep_linebreaks=data_args.keep_linebreaks,
            cache_dir=model_args.cache_dir,
        )
    tokenizer = build_tokenizer(model_args, data_args, training_args, raw_datasets, checkpoint)
    model = build_model(model_args, tokenizer)
    block_size = default_block_size(model, tokenizer, data_args.block_size)

    with training_args.main_process_first(desc="tokenizing and grouping"):
        lm_datasets = lm_data.tokenize_and_group(
            raw_datasets, tokenizer, block_size, text_column=data_args.text_column_name,
            add_eos_token=data_args.add_eos_token, num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
        )
    train_dataset, eval_dataset = lm_datasets["train"], lm_datasets["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
    logger.info(f"{len(train_dataset)} training and {len(eval_dataset)} validation blocks of {block_size} tokens")

    trainer = CoupledAdamTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=lm_data.CausalLMBlockCollator(),
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # also saves the tokenizer
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        metrics["train_world_size"] = training_args.world_size
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
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
    main()

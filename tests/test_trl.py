"""TRL: SFTTrainer through coupled_adam_optimizer, and TRL's own command line through the launcher (offline).

The model is a tiny *untied* Llama built from a config: its LM head is a matrix of its own, whose gradient sums to
zero over the vocabulary (softmax cross-entropy: sum_i (p_i - y_i) = 0 at every position; Stollenwerk &
Stollenwerk, ACL 2025, arXiv:2502.08441, §3). Coupled Adam divides every row's first moment by the same second
moment, so the update keeps that zero sum and the mean LM-head vector stays where it was (no weight decay on the
coupled group); AdamW's per-element second moment breaks it, and the mean moves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import load_dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from coupled_adam_hf import CoupledAdam, coupled_adam_optimizer  # noqa: E402
from coupled_adam_hf.data import train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [f"the {a} sees the {b}, and the {b} sees the {a}." for a in ("cat", "dog", "bird", "fish", "cow")
             for b in ("sun", "moon", "tree", "hill")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A local tokenizer, a dataset folder with one JSONL file, and an untied tiny Llama saved with its tokenizer."""
    root = tmp_path_factory.mktemp("trl")
    tokenizer = train_tokenizer([SENTENCES], vocab_size=300, model_max_length=64)
    tokenizer.pad_token = tokenizer.eos_token
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    tiny_llama(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root, tokenizer


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def sft(workspace, tmp_path, *, coupled: bool) -> tuple[SFTTrainer, torch.Tensor]:
    """Train 5 steps with SFTTrainer; return it and the LM head's mean row at initialisation."""
    root, tokenizer = workspace
    args = SFTConfig(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                     max_length=32, optim="adamw_torch", bf16=False, use_cpu=True, report_to="none",
                     save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    model = tiny_llama(tokenizer)
    initial_mean = model.lm_head.weight.detach().mean(0).clone()
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=str(root / "data" / "train.jsonl"))["train"],
                         optimizer_cls_and_kwargs=coupled_adam_optimizer(args, coupled_targets="token,output")
                         if coupled else None)
    trainer.train()
    return trainer, initial_mean


def test_sft_trainer_couples_exactly_the_embeddings_and_keeps_the_lm_head_mean(workspace, tmp_path):
    trainer, initial = sft(workspace, tmp_path / "coupled", coupled=True)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, CoupledAdam)
    model = trainer.model
    coupled = [p for group in optimizer.param_groups if group["coupled"] for p in group["params"]]
    embeddings = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    assert len(coupled) == 2 and all(p is q for p, q in zip(coupled, embeddings))
    coupled_drift = (model.lm_head.weight.detach().mean(0) - initial).abs().max().item()

    baseline, initial = sft(workspace, tmp_path / "adamw", coupled=False)
    assert type(getattr(baseline.optimizer, "optimizer", baseline.optimizer)) is torch.optim.AdamW
    adamw_drift = (baseline.model.lm_head.weight.detach().mean(0) - initial).abs().max().item()
    assert coupled_drift < 1e-6  # fp32 rounding of 5 updates of ~lr per element
    assert adamw_drift > 1e3 * max(coupled_drift, 1e-9), (coupled_drift, adamw_drift)


def test_trl_command_line_trains_with_coupled_adam_through_the_launcher(workspace, tmp_path):
    """`trl sft` parses its SFTConfig in the launcher's process, then re-launches trl/scripts/sft.py through
    `accelerate launch` in a child process: both need the registration."""
    root, _ = workspace
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("COUPLED_ADAM_HF_REGISTER", None)
    command = [sys.executable, "-m", "coupled_adam_hf.run", "-m", "trl.cli.main", "sft",
               "--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "data"),
               "--optim", "coupled_adam", "--optim_args", "coupled_targets=token+output",
               "--max_steps", "3", "--save_steps", "3", "--output_dir", str(tmp_path / "out"),
               "--per_device_train_batch_size", "4", "--max_length", "32", "--bf16", "false", "--use_cpu",
               "--report_to", "none", "--log_level", "info", "--disable_tqdm", "true"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "CoupledAdam couples 2 embedding tensor(s)" in log
    assert "model.embed_tokens.weight: token, shape [" in log and "lm_head.weight: output, shape [" in log

    saved = torch.load(tmp_path / "out" / "checkpoint-3" / "optimizer.pt", weights_only=False)
    (group,) = [g for g in saved["param_groups"] if g.get("coupled")]
    assert group["param_names"] == ["model.embed_tokens.weight", "lm_head.weight"]
    for index in group["params"]:
        state = saved["state"][index]
        vocab, hidden = state["exp_avg"].shape
        assert tuple(state["exp_avg_sq"].shape) == (1, hidden) and vocab > hidden  # compact: one value per column

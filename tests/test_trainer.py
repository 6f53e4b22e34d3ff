"""CoupledAdamTrainer: groups, AdamW equivalence, logging, refusals, clipping by value, callbacks (tiny GPT-2)."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from coupled_adam_hf import CoupledAdam, CoupledAdamTrainer, CoupledAdamTrainingArguments
from coupled_adam_hf.callbacks import GradientValueClippingCallback

transformers.logging.set_verbosity_error()
VOCAB, CONTEXT = 128, 16


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def counting_dataset(rows: int = 64) -> Dataset:
    """Sequences that count up from a random start (mod VOCAB): learnable in a few steps."""
    starts = torch.randint(0, VOCAB, (rows, 1), generator=torch.Generator().manual_seed(1))
    ids = ((starts + torch.arange(CONTEXT)) % VOCAB).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def train_args(tmp_path, **overrides) -> dict:
    args = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                weight_decay=0.1, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
                disable_tqdm=True, seed=0)
    args.update(overrides)
    return args


def coupled_trainer(tmp_path, model=None, dataset=None, **overrides) -> CoupledAdamTrainer:
    overrides.setdefault("optim", "coupled_adam")
    overrides.setdefault("isotropy_logging_steps", 0)
    args = CoupledAdamTrainingArguments(**train_args(tmp_path, **overrides))
    return CoupledAdamTrainer(model=model or tiny_gpt2(), args=args, train_dataset=dataset or counting_dataset())


def named_groups(optimizer) -> list[tuple[frozenset, float, bool]]:
    return [(frozenset(g["param_names"]), g["weight_decay"], g.get("coupled", False)) for g in optimizer.param_groups]


@pytest.mark.slow
def test_coupled_adam_trainer_lowers_the_loss(tmp_path):
    trainer = coupled_trainer(tmp_path, max_steps=12)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      CoupledAdam)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # nats


def test_coupled_adam_builds_coupled_decayed_and_undecayed_groups(tmp_path):
    trainer = coupled_trainer(tmp_path, coupled_weight_decay=0.01, coupled_avg_scale=4.0,
                              coupled_compact_state=False, optim_args="amsgrad=true")
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, CoupledAdam)
    coupled, decayed, undecayed = optimizer.param_groups
    assert coupled["param_names"] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert (coupled["coupled"], coupled["weight_decay"], coupled["avg_scale"], coupled["compact"]) == (
        True, 0.01, 4.0, False)
    decay_names = set(trainer.get_decay_parameter_names(trainer.model))
    assert (decayed["coupled"], decayed["weight_decay"]) == (False, 0.1)
    assert set(decayed["param_names"]) == decay_names - {"transformer.wte.weight", "transformer.wpe.weight",
                                                          "lm_head.weight"}
    assert (undecayed["coupled"], undecayed["weight_decay"]) == (False, 0.0)
    assert not set(undecayed["param_names"]) & decay_names
    assert all(g["amsgrad"] for g in optimizer.param_groups)
    assert [e.name for e in trainer.coupled_parameters] == coupled["param_names"]


def test_other_optimizers_get_exactly_trainers_optimizer(tmp_path):
    ours = coupled_trainer(tmp_path, optim="adamw_torch").create_optimizer()
    theirs = Trainer(model=tiny_gpt2(), args=TrainingArguments(**train_args(tmp_path, optim="adamw_torch")),
                     train_dataset=counting_dataset()).create_optimizer()
    assert type(ours) is type(theirs) is torch.optim.AdamW
    assert [(len(g["params"]), g["weight_decay"]) for g in ours.param_groups] == [
        (len(g["params"]), g["weight_decay"]) for g in theirs.param_groups]
    assert ours.defaults == theirs.defaults


@pytest.mark.slow
def test_targets_none_is_bitwise_adamw_with_trainers_grouping(tmp_path):
    """The A/B baseline property: nothing coupled == Trainer's fused AdamW (same kernel, same groups)."""
    ours = coupled_trainer(tmp_path / "a", coupled_targets="none")
    theirs = Trainer(model=tiny_gpt2(), args=TrainingArguments(**train_args(tmp_path / "b", optim="adamw_torch_fused")),
                     train_dataset=counting_dataset())
    ours.train()
    theirs.train()
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
        assert torch.equal(p, q), name
    trained = tiny_gpt2()
    assert not torch.equal(trained.transformer.wte.weight, ours.model.transformer.wte.weight)


def test_baseline_grouping_gives_the_coupled_groups_uncoupled(tmp_path):
    coupled = coupled_trainer(tmp_path, coupled_targets="token").create_optimizer()
    baseline_trainer = coupled_trainer(tmp_path, optim="adamw_torch_fused", baseline_grouping=True,
                                       coupled_targets="token")
    baseline = baseline_trainer.create_optimizer()
    assert type(baseline) is torch.optim.AdamW and baseline.defaults["fused"] is True
    assert [(names, wd) for names, wd, _ in named_groups(baseline)] == [
        (names, wd) for names, wd, _ in named_groups(coupled)]
    assert named_groups(coupled)[0][2] is True
    assert all("coupled" not in g for g in baseline.param_groups)


def test_logs_the_coupled_parameters_once_on_the_main_process(tmp_path, caplog):
    trainer = coupled_trainer(tmp_path, max_steps=1)
    with caplog.at_level(logging.INFO, logger="coupled_adam_hf"):
        trainer.train()
        trainer.create_optimizer()
    messages = [r.getMessage() for r in caplog.records if r.name == "coupled_adam_hf.trainer"]
    assert len(messages) == 1
    assert "transformer.wte.weight (also lm_head.weight): token+output, shape [128, 32], 4,096 params" in messages[0]
    assert "transformer.wpe.weight: position, shape [16, 32], 512 params" in messages[0]


def test_targets_that_resolve_to_nothing_fail_naming_the_embedding_modules(tmp_path):
    trainer = coupled_trainer(tmp_path, coupled_targets="token_type")
    with pytest.raises(ValueError, match=r"transformer\.wte.*transformer\.wpe"):
        trainer.create_optimizer()


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_sharded_setups_are_refused_before_an_optimizer_exists_saying_what_is_supported(tmp_path, flag):
    trainer = coupled_trainer(tmp_path, max_steps=1)
    setattr(trainer, flag, True)  # as Trainer sets it from the accelerate state
    supported = r"does not support (FSDP1|DeepSpeed).*Supported: one device, DDP .*FSDP2"
    with pytest.raises(ValueError, match=supported):
        trainer.check_sharding_supported()  # also called by __init__ for optim=coupled_adam
    with pytest.raises(ValueError, match=supported):
        trainer.create_optimizer()  # the Trainer creates the optimizer before step 1
    assert trainer.optimizer is None


def test_sharded_check_ignores_other_optimizers(tmp_path):
    trainer = coupled_trainer(tmp_path, optim="adamw_torch")
    trainer.is_fsdp_enabled = True
    assert not trainer.uses_coupled_adam
    assert type(trainer.create_optimizer()) is torch.optim.AdamW


def test_gradient_value_clipping_callback_clamps_every_element():
    model = tiny_gpt2()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    GradientValueClippingCallback(0.25).on_pre_optimizer_step(None, None, None, model=model)
    assert max(p.grad.abs().max().item() for p in model.parameters()) == 0.25


class _GradientProbe(TrainerCallback):
    def __init__(self):
        self.max_abs_grad = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.max_abs_grad.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))


def test_max_grad_value_clips_before_each_optimizer_step(tmp_path):
    trainer = coupled_trainer(tmp_path, max_steps=2, max_grad_value=2**-10, max_grad_norm=0.0)
    probe = _GradientProbe()
    trainer.add_callback(probe)  # runs after the clipping callback
    trainer.train()
    assert probe.max_abs_grad and max(probe.max_abs_grad) == 2**-10  # exactly representable bound


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = coupled_trainer(tmp_path / "a", max_steps=2, per_device_train_batch_size=8)
    accumulated = coupled_trainer(tmp_path / "b", max_steps=2, per_device_train_batch_size=4,
                                  gradient_accumulation_steps=2)
    big.train()
    accumulated.train()
    for (name, p), q in zip(big.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_isotropy_callback_is_added_when_enabled(tmp_path):
    if importlib.util.find_spec("coupled_adam_hf.callbacks") is None:
        pytest.skip("coupled_adam_hf.callbacks is not there yet")
    from coupled_adam_hf.callbacks import EmbeddingIsotropyCallback

    def isotropy_callbacks(trainer):
        return [c for c in trainer.callback_handler.callbacks if isinstance(c, EmbeddingIsotropyCallback)]

    assert len(isotropy_callbacks(coupled_trainer(tmp_path, isotropy_logging_steps=7))) == 1
    assert isotropy_callbacks(coupled_trainer(tmp_path, isotropy_logging_steps=0)) == []
    assert len(isotropy_callbacks(coupled_trainer(tmp_path, optim="adamw_torch", isotropy_logging_steps=7))) == 1

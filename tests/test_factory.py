"""CoupledAdamFactory: Coupled Adam from a plain transformers.Trainer through optimizer_cls_and_kwargs."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_optimizer import is_optimizer_factory

from coupled_adam_hf import CoupledAdam, CoupledAdamFactory, CoupledAdamTrainer, coupled_adam_optimizer
from test_trainer import counting_dataset, coupled_trainer, named_groups, tiny_gpt2, train_args


def plain_trainer(tmp_path, **coupling) -> Trainer:
    args = TrainingArguments(**train_args(tmp_path, optim="adamw_torch"))
    return Trainer(model=tiny_gpt2(), args=args, train_dataset=counting_dataset(),
                   optimizer_cls_and_kwargs=coupled_adam_optimizer(args, **coupling))


def unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def test_the_factory_is_what_transformers_calls_a_factory():
    assert is_optimizer_factory(CoupledAdamFactory)
    assert not is_optimizer_factory(CoupledAdam)


def test_a_plain_trainer_builds_coupled_adam_with_the_embeddings_coupled(tmp_path):
    trainer = plain_trainer(tmp_path, coupled_targets="token,output")
    optimizer = unwrap(trainer.create_optimizer())
    assert isinstance(optimizer, CoupledAdam)
    coupled = [g for g in optimizer.param_groups if g["coupled"]]
    assert [g["param_names"] for g in coupled] == [["transformer.wte.weight"]]  # tied head: the same tensor, once
    model = trainer.model
    assert coupled[0]["params"][0] is model.get_input_embeddings().weight
    assert all(g["lr"] == 1e-2 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)
    decayed = {n for g in optimizer.param_groups if g["weight_decay"] == 0.1 for n in g["param_names"]}
    assert "transformer.h.0.attn.c_attn.weight" in decayed and "transformer.h.0.attn.c_attn.bias" not in decayed


def test_the_factory_gives_the_same_groups_and_options_as_coupled_adam_trainer(tmp_path):
    ours = unwrap(coupled_trainer(tmp_path / "a", coupled_targets="token,output,position").create_optimizer())
    theirs = unwrap(plain_trainer(tmp_path / "b", coupled_targets="token,output,position").create_optimizer())
    assert named_groups(theirs) == named_groups(ours)
    keys = ("lr", "betas", "eps", "weight_decay", "coupled", "avg_scale", "compact", "amsgrad")
    assert [{k: g[k] for k in keys} for g in theirs.param_groups] == [{k: g[k] for k in keys}
                                                                        for g in ours.param_groups]


@pytest.mark.slow
def test_training_through_the_factory_steps_bitwise_as_coupled_adam_trainer(tmp_path):
    theirs = plain_trainer(tmp_path / "b", coupled_targets="token,output,position", avg_scale=2.0)
    theirs.train()
    ours = coupled_trainer(tmp_path / "a", coupled_targets="token,output,position", coupled_avg_scale=2.0,
                           stop_on_nonfinite_loss=False)
    assert isinstance(ours, CoupledAdamTrainer)
    ours.train()
    for (name, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
        assert torch.equal(p, q), name


def test_unknown_coupling_options_are_refused_listing_the_valid_ones(tmp_path):
    args = TrainingArguments(**train_args(tmp_path))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['coupled_target'\].*coupled_targets.*avg_scale"):
        coupled_adam_optimizer(args, coupled_target="token")

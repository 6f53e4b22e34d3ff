"""The paper's studies (scripts/demo.py --study): plans, aggregation, the SGD update rule, and the plumbing."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coupled_adam_hf import CoupledAdam, studies

ROOT = Path(__file__).resolve().parent.parent


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- aggregation
def test_mean_std_is_the_sample_standard_deviation():
    assert studies.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert studies.mean_std([5.0]) == (5.0, 0.0)


def test_two_sigma_rule_uses_the_standard_deviation_of_the_difference_of_means():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    difference, sigma, significant = studies.exceeds_two_sigma(a, b)
    assert difference == -3.0 and sigma == pytest.approx(math.sqrt(1 / 3 + 1 / 3)) and significant
    assert not studies.exceeds_two_sigma([1.0, 3.0], [1.5, 2.5])[2]
    assert not studies.exceeds_two_sigma([1.0], [2.0])[2]  # one seed: no spread, no verdict


def test_aggregate_groups_runs_over_seeds_only():
    entry = lambda label, seed, f, loss: {"label": label, "settings": {"f": f, "seed": seed, "max_steps": 3},  # noqa: E731
                                          "eval_loss": loss, "iso": 0.5, "mean_norm_ratio": 0.1}
    rows = studies.aggregate([entry("SGD", 1, 100, 1.0), entry("SGD", 2, 100, 3.0), entry("SGD", 1, 200, 5.0)])
    assert [(r["settings"]["f"], r["n"], r["eval_loss"]["mean"]) for r in rows] == [(100, 2, 2.0), (200, 1, 5.0)]


def test_plans_cover_the_papers_grids_with_an_adamw_reference():
    avg = studies.plan_study("avg_scale", seeds=1, max_steps=10)
    assert [r.settings.get("avg_scale") for r in avg[1:]] == [2.0**n for n in range(-5, 6)]
    assert avg[0].label == "AdamW"
    sgd = studies.plan_study("embedding_sgd", seeds=2, max_steps=10)
    assert sorted({r.settings["f"] for r in sgd if "f" in r.settings}) == [100, 200, 300, 400, 500, 600]
    assert {r.settings["seed"] for r in sgd} == {1, 2}
    assert sorted({r.settings["max_steps"] for r in studies.plan_study("length", seeds=1, max_steps=5)}) == [5, 20, 80]


# ------------------------------------------------------------------------------------------- SGD update rule
def _model_and_groups(factor: float, lr: float = 0.01):
    torch.manual_seed(0)
    embedding, matrix, bias = (torch.nn.Parameter(torch.randn(*s)) for s in ((7, 4), (4, 3), (3,)))
    return [embedding, matrix, bias]


def _grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def test_sgd_group_steps_exactly_like_sgd_and_the_rest_exactly_like_adamw():
    lr, factor = 0.01, 300.0
    params = _model_and_groups(factor)
    reference = [p.detach().clone().requires_grad_(True) for p in params]
    optimizer = CoupledAdam([{"params": [params[0]], "update": "sgd", "lr": factor * lr, "weight_decay": 0.0},
                             {"params": params[1:], "weight_decay": 0.1}], lr=lr, betas=(0.9, 0.95))
    adamw = torch.optim.AdamW(reference[1:], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    expected_embedding = reference[0].detach().clone()
    for step in range(3):
        _grads(params, step)
        _grads(reference, step)
        expected_embedding.add_(reference[0].grad, alpha=-(factor * lr))  # hand-written SGD, momentum 0
        optimizer.step()
        adamw.step()
        assert torch.equal(params[0], expected_embedding)
        for p, q in zip(params[1:], reference[1:]):
            assert torch.equal(p, q)
    assert params[0] not in optimizer.state  # SGD without momentum keeps no state


def test_sgd_group_survives_a_state_dict_round_trip():
    params = _model_and_groups(100.0)
    make = lambda ps: CoupledAdam([{"params": [ps[0]], "update": "sgd", "lr": 1.0},  # noqa: E731
                                   {"params": ps[1:]}], lr=0.01)
    optimizer = make(params)
    _grads(params, 0)
    optimizer.step()
    clone = [p.detach().clone().requires_grad_(True) for p in params]
    restored = make(clone)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.param_groups[0]["update"] == "sgd"
    for ps, opt in ((params, optimizer), (clone, restored)):
        _grads(ps, 1)
        opt.step()
    for p, q in zip(params, clone):
        assert torch.equal(p, q)


def test_scheduler_scales_the_sgd_group_like_every_group():
    params = _model_and_groups(200.0)
    optimizer = CoupledAdam([{"params": [params[0]], "update": "sgd", "lr": 2.0}, {"params": params[1:]}], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 0.005]
    del scheduler


def test_sgd_group_cannot_be_coupled():
    with pytest.raises(ValueError, match="coupled=False"):
        CoupledAdam([{"params": [torch.nn.Parameter(torch.zeros(3, 2))], "update": "sgd", "coupled": True}])
    with pytest.raises(ValueError, match="update rule"):
        CoupledAdam([torch.nn.Parameter(torch.zeros(3, 2))], update="lion")


def test_training_arguments_validate_the_update_rule(tmp_path):
    from coupled_adam_hf import CoupledAdamTrainingArguments

    with pytest.raises(ValueError, match="coupled_lr_factor"):
        CoupledAdamTrainingArguments(output_dir=str(tmp_path), optim="coupled_adam", coupled_lr_factor=-1.0)
    with pytest.raises(ValueError, match="need --optim coupled_adam"):
        CoupledAdamTrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", coupled_update="sgd")


# ------------------------------------------------------------------------------------------- plumbing
def test_unknown_study_is_refused_in_one_line_with_exit_status_2(tmp_path):
    completed = subprocess.run([sys.executable, "scripts/demo.py", "--study", "nope", "--output_dir",
                                str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 2
    assert "avg_scale, embedding_sgd, seeds, length" in completed.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_study_refuses_a_folder_holding_a_previous_study(tmp_path):
    demo = load_demo()
    keep = tmp_path / "seeds" / "results.json"
    keep.parent.mkdir(parents=True)
    keep.write_text("[]")
    with pytest.raises(demo.DemoError, match="--reuse.*--overwrite"):
        demo.main(["--study", "seeds", "--output_dir", str(tmp_path)])
    assert keep.read_text() == "[]"


@pytest.mark.slow
def test_embedding_sgd_study_trains_writes_results_report_and_figure(tmp_path, monkeypatch):
    demo = load_demo()
    monkeypatch.setattr(studies, "SGD_FACTORS", (100,))
    results = demo.main(["--study", "embedding_sgd", "--max_steps", "2", "--output_dir", str(tmp_path)])
    out = tmp_path / "embedding_sgd"
    assert json.loads((out / "results.json").read_text()) == results
    assert [(r["label"], r["settings"]) for r in results] == [
        ("AdamW", {"seed": 1, "max_steps": 2}), ("SGD embeddings", {"f": 100, "seed": 1, "max_steps": 2})]
    for entry in results:
        assert all(isinstance(entry[k], float) for k in ("eval_loss", "iso", "mean_norm_ratio"))
        state = json.loads((Path(entry["run_dir"]) / "trainer_state.json").read_text())
        assert state["global_step"] == entry["settings"]["max_steps"]
    text = (out / "report.md").read_text()
    assert "base length 2 steps" in text and "| SGD embeddings | f 100, max_steps 2 | 1 |" in text
    assert (out / "embedding_sgd.png").stat().st_size > 1000

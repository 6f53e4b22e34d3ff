"""register_with_transformers() and the launcher: optim="coupled_adam" for plain TrainingArguments and Trainer."""

from __future__ import annotations

import enum
import importlib
import logging
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import transformers.trainer_optimizer
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from coupled_adam_hf import CoupledAdam, coupled_adam_optimizer, register_with_transformers
from coupled_adam_hf.factory import parse_optim_args
from coupled_adam_hf.registration import COUPLED_ADAM, RegistrationError, register_optimizer_name
from test_trainer import counting_dataset, named_groups, tiny_gpt2, train_args

ROOT = Path(__file__).resolve().parents[1]
PLAIN_SCRIPT = Path(__file__).with_name("plain_training_args_script.py")
bootstrap = importlib.import_module("coupled_adam_hf._bootstrap.sitecustomize")


def unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def test_training_arguments_its_parser_and_help_accept_coupled_adam():
    register_with_transformers()
    args = TrainingArguments(output_dir="unused", optim="coupled_adam", report_to="none")
    assert args.optim is OptimizerNames.COUPLED_ADAM and args.optim == COUPLED_ADAM
    assert args.to_dict()["optim"] == "coupled_adam"
    parser = HfArgumentParser(TrainingArguments)
    assert "coupled_adam" in parser.format_help()
    (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", "unused", "--optim", "coupled_adam",
                                                    "--optim_args", "coupled_targets=token+output"])
    assert parsed.optim is OptimizerNames.COUPLED_ADAM


def test_a_plain_trainer_builds_coupled_adam_with_the_automatic_partition(tmp_path, caplog):
    register_with_transformers()
    options = "coupled_targets=token+position,avg_scale=2,compact=false"
    args = TrainingArguments(**train_args(tmp_path, optim="coupled_adam", optim_args=options))
    with caplog.at_level(logging.INFO, logger="coupled_adam_hf"):
        optimizer = unwrap(Trainer(model=tiny_gpt2(), args=args, train_dataset=counting_dataset()).create_optimizer())
    assert isinstance(optimizer, CoupledAdam)
    coupled = [g for g in optimizer.param_groups if g["coupled"]]
    assert [g["param_names"] for g in coupled] == [["transformer.wte.weight", "transformer.wpe.weight"]]
    assert (coupled[0]["avg_scale"], coupled[0]["compact"]) == (2.0, False)
    factory, kwargs = coupled_adam_optimizer(TrainingArguments(**train_args(tmp_path)),
                                             coupled_targets="token,position")
    assert named_groups(optimizer) == named_groups(factory()(tiny_gpt2(), **kwargs))  # the factory's groups
    logged = [r.getMessage() for r in caplog.records if r.name == "coupled_adam_hf.factory"]
    assert len(logged) == 1 and "transformer.wte.weight (also lm_head.weight): token, shape [128, 32]" in logged[0]


def test_registering_twice_changes_nothing():
    register_with_transformers()
    post_init = TrainingArguments.__post_init__
    register_with_transformers()
    assert [m.value for m in OptimizerNames].count(COUPLED_ADAM) == 1
    assert OptimizerNames._member_names_.count("COUPLED_ADAM") == 1
    assert TrainingArguments.__post_init__ is post_init  # wrapped once
    handler = transformers.trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames.COUPLED_ADAM]
    register_with_transformers()
    assert transformers.trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames.COUPLED_ADAM] is handler


def test_a_pickled_name_loads_through_the_registration():
    register_with_transformers()
    data = pickle.dumps(OptimizerNames.COUPLED_ADAM)
    assert b"coupled_adam_hf.registration" in data and b"register_optimizer_name" in data
    assert pickle.loads(data) is OptimizerNames.COUPLED_ADAM


def test_optim_args_become_factory_keywords():
    assert parse_optim_args("coupled_targets=token+*.wpe, avg_scale=2,compact=False,state_dtype=float32,"
                            "coupled_update=sgd,coupled_lr_factor=300,nonfinite=raise") == dict(
        coupled_targets="token,*.wpe", avg_scale=2.0, compact=False, state_dtype="float32", coupled_update="sgd",
        coupled_lr_factor=300.0, nonfinite="raise")
    assert parse_optim_args("state_dtype=none") == {"state_dtype": None}


@pytest.mark.parametrize("optim_args", ["coupled_target=token", "avg_scale=0", "compact=maybe", "amsgrad",
                                        "coupled_targets=none+token"])
def test_bad_optim_args_fail_when_the_arguments_are_made_in_one_line_listing_the_keys(optim_args):
    register_with_transformers()
    with pytest.raises(ValueError) as error:
        TrainingArguments(output_dir="unused", optim="coupled_adam", optim_args=optim_args, report_to="none")
    message = str(error.value)
    assert "\n" not in message and repr(optim_args) in message
    assert "coupled_targets=KIND+KIND" in message and "avg_scale=NUMBER>0" in message and "amsgrad=true|false" in message


def test_other_optimizers_ignore_optim_args_as_before():
    register_with_transformers()
    args = TrainingArguments(output_dir="unused", optim="adamw_torch", optim_args="anything=1", report_to="none")
    assert args.optim is OptimizerNames.ADAMW_TORCH


def test_internals_that_differ_fail_naming_the_supported_versions(monkeypatch):
    monkeypatch.delattr(transformers.trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(RegistrationError, match=r"_OPTIMIZER_HANDLERS.*supports transformers >= 5\.2, < 6"):
        register_with_transformers()
    closed = types.ModuleType("fake_training_args")
    closed.OptimizerNames = enum.Enum("OptimizerNames", {"ADAMW_TORCH": 1})  # not a str enum
    closed.TrainingArguments = TrainingArguments
    with pytest.raises(RegistrationError, match=r"not a str enum.*coupled_adam_optimizer"):
        register_optimizer_name(closed)
    assert "COUPLED_ADAM" not in closed.OptimizerNames.__members__


# ---------------------------------------------------------------------------------------------- the startup hook
def test_the_startup_hook_registers_after_the_module_is_imported_and_restores_its_loader(tmp_path, monkeypatch):
    (tmp_path / "caf_probe_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    finder = bootstrap.AfterImportHooks({"caf_probe_module": lambda module: seen.append(module.VALUE)})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    module = importlib.import_module("caf_probe_module")
    try:
        assert seen == [1]
        assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__
        importlib.reload(module)
        assert seen == [1]  # once
    finally:
        sys.modules.pop("caf_probe_module", None)


@pytest.mark.parametrize("value", ["0", None])
def test_the_startup_hook_is_off_unless_the_variable_is_1(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(bootstrap.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(bootstrap.ENV_VAR, value)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    bootstrap.install()
    assert not any(isinstance(f, bootstrap.AfterImportHooks) for f in sys.meta_path)


def test_the_startup_hook_runs_the_sitecustomize_it_shadows(tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.setattr(sys, "path", [os.path.dirname(bootstrap.__file__), str(tmp_path), *sys.path])
    bootstrap._run_shadowed_sitecustomize()
    assert (tmp_path / "ran").exists()


def test_the_launcher_puts_the_hook_first_on_pythonpath_once():
    from coupled_adam_hf.run import BOOTSTRAP_DIR, enable_in_children

    environ = {"PYTHONPATH": os.pathsep.join(["/somewhere", BOOTSTRAP_DIR])}
    enable_in_children(environ)
    enable_in_children(environ)
    assert environ == {"COUPLED_ADAM_HF_REGISTER": "1", "PYTHONPATH": os.pathsep.join([BOOTSTRAP_DIR, "/somewhere"])}
    assert Path(BOOTSTRAP_DIR, "sitecustomize.py").is_file()


# ---------------------------------------------------------------------------------------------- real processes
def run_python(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("COUPLED_ADAM_HF_REGISTER", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_unmodified_script_gets_coupled_adam_through_the_launcher_and_refuses_it_without(tmp_path):
    argv = [str(PLAIN_SCRIPT), "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--optim",
            "coupled_adam", "--optim_args", "coupled_targets=token+position"]
    plain = run_python(*argv, cwd=tmp_path)
    assert plain.returncode == 2 and "invalid choice: 'coupled_adam'" in plain.stderr, plain.stderr[-3000:]
    assert not (tmp_path / "out").exists()

    launched = run_python("-m", "coupled_adam_hf.run", *argv, cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "optimizer=CoupledAdam coupled=transformer.wte.weight,transformer.wpe.weight" in launched.stdout


def test_the_launcher_explains_its_usage_in_one_line():
    from coupled_adam_hf import run

    with pytest.raises(SystemExit, match="no such script 'missing.py'"):
        run.main(["missing.py"])
    with pytest.raises(SystemExit, match="-m needs a module name"):
        run.main(["-m"])

"""CoupledAdamTrainingArguments: `optim=coupled_adam` from Python and the CLI, validation, serialization."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from coupled_adam_hf.training_args import COUPLED_ADAM, CoupledAdamOptimizerNames, CoupledAdamTrainingArguments


def make(**kwargs) -> CoupledAdamTrainingArguments:
    return CoupledAdamTrainingArguments(output_dir="unused", report_to="none", **kwargs)


def parse(*argv: str) -> CoupledAdamTrainingArguments:
    (args,) = HfArgumentParser(CoupledAdamTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--report_to", "none", *argv]
    )
    return args


def test_cli_accepts_coupled_adam_with_coupling_options():
    args = parse("--optim", "coupled_adam", "--coupled_targets", "token,position", "--coupled_weight_decay", "0.01",
                 "--coupled_avg_scale", "4", "--no_coupled_compact_state", "--isotropy_logging_steps", "0",
                 "--max_grad_value", "0.5")
    assert args.optim == COUPLED_ADAM and args.uses_coupled_adam
    assert args.coupled_target_list == ("token", "position")
    assert (args.coupled_weight_decay, args.coupled_avg_scale, args.coupled_compact_state) == (0.01, 4.0, False)
    assert (args.isotropy_logging_steps, args.max_grad_value) == (0, 0.5)


def test_defaults_follow_the_spec():
    args = make(optim="coupled_adam")
    assert args.coupled_target_list == ("token", "output", "position")
    assert (args.coupled_weight_decay, args.coupled_avg_scale, args.coupled_compact_state) == (0.0, 1.0, True)
    assert (args.isotropy_logging_steps, args.max_grad_value, args.baseline_grouping) == (100, None, False)
    assert make().optim == TrainingArguments(output_dir="unused").optim  # same default optimizer as transformers


def test_help_lists_coupled_adam_and_the_coupling_options():
    help_text = HfArgumentParser(CoupledAdamTrainingArguments).format_help()
    assert "coupled_adam" in help_text and "adamw_torch_fused" in help_text
    for flag in ("--coupled_targets", "--coupled_weight_decay", "--coupled_avg_scale", "--coupled_compact_state",
                 "--isotropy_logging_steps", "--max_grad_value", "--baseline_grouping"):
        assert flag in help_text


def test_cli_typo_fails_at_parse_time_listing_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse("--optim", "coupled_adamw")
    err = capsys.readouterr().err
    assert "invalid choice: 'coupled_adamw'" in err and "'coupled_adam'" in err and "'adamw_torch'" in err


def test_python_typo_raises_listing_the_choices():
    with pytest.raises(ValueError, match=r"coupld_adam is not a valid .*coupled_adam"):
        make(optim="coupld_adam")


@pytest.mark.parametrize("name", [m.value for m in OptimizerNames])
def test_every_builtin_optimizer_name_still_parses_to_transformers_enum(name):
    args = parse("--optim", name)
    assert type(args.optim) is OptimizerNames and args.optim.value == name


def test_enum_holds_every_builtin_name_plus_coupled_adam():
    assert {m.value for m in CoupledAdamOptimizerNames} == {m.value for m in OptimizerNames} | {COUPLED_ADAM}


def test_to_dict_and_json_round_trip():
    args = make(optim="coupled_adam", coupled_targets="token,*.wpe", coupled_weight_decay=0.05, max_grad_value=1.0,
                optim_args="amsgrad=true")
    as_dict = args.to_dict()
    assert as_dict["optim"] == "coupled_adam"
    assert json.loads(args.to_json_string()) == json.loads(json.dumps(as_dict))
    again = CoupledAdamTrainingArguments(**as_dict)
    assert again.to_dict() == as_dict and again.optim == COUPLED_ADAM


def test_training_args_bin_round_trip(tmp_path):
    args = make(optim="coupled_adam", coupled_targets="token", coupled_avg_scale=2.0)
    torch.save(args, tmp_path / "training_args.bin")  # what Trainer writes next to every checkpoint
    loaded = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert isinstance(loaded, CoupledAdamTrainingArguments)
    assert loaded.optim is CoupledAdamOptimizerNames.COUPLED_ADAM
    assert loaded.to_dict() == args.to_dict()


def test_yaml_list_of_targets_is_stored_as_a_string():
    args = make(optim="coupled_adam", coupled_targets=["token", "output"])
    assert args.coupled_targets == "token,output" and args.coupled_target_list == ("token", "output")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coupled_weight_decay=-0.1), "coupled_weight_decay"),
        (dict(coupled_avg_scale=0.0), "coupled_avg_scale"),
        (dict(isotropy_logging_steps=-1), "isotropy_logging_steps"),
        (dict(max_grad_value=0.0), "max_grad_value"),
        (dict(coupled_targets="none,token"), "coupled_targets"),
        (dict(coupled_nonfinite="drop"), "coupled_nonfinite"),
        (dict(optim_args="betas=0.9"), "optim_args"),
        (dict(optim_args="state_dtype=bfloat16"), "state_dtype=none|float32|float64"),
    ],
)
def test_bad_coupling_options_fail_with_the_flag_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(optim="coupled_adam", **kwargs)


def test_optim_args_become_coupled_adam_keywords():
    args = make(optim="coupled_adam", optim_args="amsgrad=true, fused=False")
    assert args.coupled_adam_optim_kwargs() == {"amsgrad": True, "fused": False}
    args = make(optim="coupled_adam", optim_args="state_dtype=float32,fused=true")
    assert args.coupled_adam_optim_kwargs() == {"state_dtype": "float32", "fused": True}


def test_set_optimizer_accepts_coupled_adam():
    args = make().set_optimizer(name="coupled_adam", learning_rate=3e-4, beta2=0.95)
    assert args.optim == COUPLED_ADAM and (args.learning_rate, args.adam_beta2) == (3e-4, 0.95)
    assert make().set_optimizer(name="sgd").optim is OptimizerNames.SGD

"""Property: whatever recipe file or command line scripts/train.py is given, bad input ends in a clean error.

"Clean" means a :class:`coupled_adam_hf.cli.UsageError` (which ``run_cli`` prints as one ``train.py: error: ...``
line, exit status 2) or argparse's own exit (status 2, ``error:`` on stderr) -- never an exception from deep inside
a library. Only the parsing and validation layer runs (``check_arguments``): nothing is trained or written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coupled_adam_hf.cli import UsageError

import _scripts  # tests/ is on sys.path (pytest's rootdir-relative import)
from _scripts import ROOT
for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(name, "1")  # a fuzzed Hub name must never wait on the network


def load_script(name: str):
    return _scripts.load_script(name, f"fuzz_{name}")


train_script = load_script("train")
eval_perplexity = load_script("eval_perplexity")

ARGUMENT_NAMES = sorted(action.dest for action in train_script.parser()._actions if action.dest != "help")
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(string.printable, max_size=20) | st.sampled_from(["", "true", "no", "1e-3", "-1", "nan", "[]"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(string.ascii_letters, max_size=8), inner, max_size=3), max_leaves=6)
keys = st.sampled_from(ARGUMENT_NAMES) | st.text(string.ascii_letters + "_", min_size=1, max_size=12)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Run from an empty folder, so that any relative path a fuzzed argument names is harmless."""
    folder = tmp_path_factory.mktemp("fuzz")
    previous = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(previous)


def outcome(argv: list[str]) -> str:
    """"ok", "usage" or "argparse"; anything else the function raises fails the test with that example."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            train_script.check_arguments(argv)
        except UsageError as error:
            assert str(error).strip(), "an error needs a reason"
            return "usage"
        except SystemExit as exited:  # argparse: bad flag or value
            assert exited.code == 2 and "error:" in stderr.getvalue(), stderr.getvalue()
            assert "Traceback" not in stderr.getvalue()
            return "argparse"
    return "ok"


def write_recipe(folder: Path, name: str, content: str | bytes) -> str:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return str(path)


@FUZZ
@given(content=st.text(max_size=200) | st.binary(max_size=200), suffix=st.sampled_from([".yaml", ".yml", ".json"]))
def test_garbage_recipe_files_end_in_a_clean_error(workdir, content, suffix):
    recipe = write_recipe(workdir, f"garbage{suffix}", content)
    outcome([recipe, "--output_dir", str(workdir / "out")])


@FUZZ
@given(recipe=st.dictionaries(keys, values, max_size=6), as_json=st.booleans())
def test_recipes_with_wrong_types_unknown_keys_and_bad_values_end_in_a_clean_error(workdir, recipe, as_json):
    recipe = {"output_dir": str(workdir / "out"), **recipe}
    try:
        text = json.dumps(recipe) if as_json else yaml.safe_dump(recipe)
    except (ValueError, yaml.YAMLError):
        return  # not representable in that format
    outcome([write_recipe(workdir, "recipe.json" if as_json else "recipe.yaml", text)])


flag_tokens = st.sampled_from([f"--{name}" for name in ARGUMENT_NAMES])
value_tokens = (st.text(string.printable.strip(), max_size=12).filter(lambda t: not t.startswith("-h"))
                | st.sampled_from(["true", "false", "0", "-1", "1e9", "nan", "inf", "coupled_adam", "none", "x=1"]))


@FUZZ
@given(tokens=st.lists(flag_tokens | value_tokens, max_size=8))
def test_random_command_lines_end_in_a_clean_error(workdir, tokens):
    outcome(["--output_dir", str(workdir / "out"), *tokens])


@FUZZ
@given(tokens=st.lists(st.sampled_from(["--model_name_or_path", "--validation_file", "--dataset_name", "--stride",
                                        "--batch_size", "--max_eval_tokens", "--context_length", "--dtype"])
                       | value_tokens, max_size=8))
def test_random_eval_perplexity_command_lines_end_in_a_clean_error(workdir, tokens):
    # Its checks raise ValueError/OSError with a reason, which run_cli prints as one line.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            eval_perplexity.validate(*eval_perplexity.parse_arguments(["--output_dir", str(workdir / "ppl"), *tokens]))
        except (UsageError, ValueError, OSError) as error:
            assert str(error).strip()
        except SystemExit as exited:
            assert exited.code == 2 and "error:" in stderr.getvalue()


def test_the_fuzzed_layer_accepts_a_good_recipe(workdir):
    recipe = ROOT / "recipes" / "quickstart-coupled.yaml"
    assert outcome([str(recipe), "--output_dir", str(workdir / "out")]) == "ok"
    assert outcome([str(recipe), "--learning_rate", "[1]"]) == "argparse"
    assert outcome([str(recipe), "--max_steps", "0"]) == "usage"

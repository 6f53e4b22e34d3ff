"""Two processes (real DDP over gloo, started by `accelerate launch`) train the same weights as one process.

Parameters are replicated under DDP and the gradients are averaged before the optimizer step, so every rank's
coupled column mean is the global one: 2 processes x batch 4 must match 1 process x batch 8 up to float rounding
(the all-reduce sums in a different order).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_script import ROOT, small_text, tiny_recipe, train_script  # noqa: F401 - small_text is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, small_text):  # noqa: F811
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed next to this Python")
    common = ["--max_steps", "4", "--do_eval", "false", "--save_strategy", "no", "--embedding_metrics", "false",
              "--isotropy_logging_steps", "0", "--coupled_targets", "token,position"]

    two = tmp_path / "two"
    recipe = tiny_recipe(two, small_text)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    launched = subprocess.run(
        [accelerate, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
         "--main_process_port", str(free_port()), str(ROOT / "scripts" / "train.py"), str(recipe), *common,
         "--per_device_train_batch_size", "4"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "Process rank 1 of 2" in launched.stdout + launched.stderr
    results = json.loads((two / "run" / "all_results.json").read_text())
    assert results["train_world_size"] == 2  # real DDP, not two processes training alone

    one = tmp_path / "one"
    train_script.main([str(tiny_recipe(one, small_text)), *common, "--per_device_train_batch_size", "8"])
    assert json.loads((one / "run" / "all_results.json").read_text())["train_world_size"] == 1

    distributed = load_file(two / "run" / "model.safetensors")
    single = load_file(one / "run" / "model.safetensors")
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-5, msg=name)

    # The comparison can tell: one process with the per-rank batch (what each rank would train if the
    # gradients were not averaged) ends elsewhere.
    half = tmp_path / "half"
    train_script.main([str(tiny_recipe(half, small_text)), *common, "--per_device_train_batch_size", "4"])
    half_batch = load_file(half / "run" / "model.safetensors")
    assert (half_batch["transformer.wte.weight"] - single["transformer.wte.weight"]).abs().max() > 1e-3

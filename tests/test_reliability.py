"""Interruptions (SIGINT, SIGTERM, kill -9), bad input, and divergence: what scripts/train.py and the evaluation
scripts do, and that nothing already written is lost.

One tiny uninterrupted run (2 layers, width 32, BPE 300, blocks of 32, 8 steps, checkpoints every 3) is the
reference: interrupted runs, resumed by re-running the same command, must end with bit-identical weights on CPU.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from coupled_adam_hf import reliability
from coupled_adam_hf.cli import CLIError, UsageError, run_cli
from coupled_adam_hf.data import SHAKESPEARE_TRAIN, SHAKESPEARE_VALIDATION
from coupled_adam_hf.callbacks import SaveOnSignalCallback
from coupled_adam_hf.reliability import (
    checkpoint_problem,
    find_resumable_checkpoint,
    nonfinite_parameters,
)

import _scripts  # tests/ is on sys.path (pytest's rootdir-relative import)
from _scripts import OFFLINE, ROOT
MAX_STEPS, SAVE_STEPS, PAUSE_AT = 8, 3, 4


def load_script(name: str):
    return _scripts.load_script(name, f"reliability_{name}")


train_script = load_script("train")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Small text files and a recipe for a tiny run (the output folder is given per run)."""
    root = tmp_path_factory.mktemp("reliability")
    for split, source, size in (("train", SHAKESPEARE_TRAIN, 20_000), ("validation", SHAKESPEARE_VALIDATION, 4_000)):
        (root / f"{split}.txt").write_text(gzip.open(source, "rt").read()[:size])
    recipe = {
        "model_type": "gpt2",
        "config_overrides": "n_layer=2,n_head=2,n_embd=32,n_positions=32,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
        "tokenizer_vocab_size": 300,
        "block_size": 32,
        "train_file": str(root / "train.txt"),
        "validation_file": str(root / "validation.txt"),
        "cache_dir": str(root / "cache"),
        "optim": "coupled_adam",
        "learning_rate": 3e-3,
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "save_strategy": "steps",
        "save_steps": SAVE_STEPS,
        "logging_steps": 1,
        "isotropy_logging_steps": 0,
        "embedding_metrics": False,
        "do_eval": False,
        "seed": 7,
        "report_to": "none",
        "disable_tqdm": True,
        "log_level": "warning",
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {"root": root, "recipe": root / "recipe.yaml"}


def argv(workspace, output_dir: Path, *extra: str) -> list[str]:
    return [str(workspace["recipe"]), "--output_dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def reference(workspace) -> Path:
    """The uninterrupted run's output folder."""
    output_dir = workspace["root"] / "reference"
    train_script.main(argv(workspace, output_dir))
    return output_dir


def assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    expected = load_file(expected_dir / "model.safetensors")
    actual = load_file(actual_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name  # bitwise


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- interruptions
def start_paused_child(workspace, output_dir: Path, ready: Path) -> subprocess.Popen:
    """scripts/train.py in a child process, held at the end of step PAUSE_AT until `ready` is deleted."""
    command = [sys.executable, str(ROOT / "tests" / "pausing_train.py"), str(PAUSE_AT), str(ready),
               *argv(workspace, output_dir)]
    # SIGINT back to its default, so Python installs KeyboardInterrupt even when pytest runs as a background job
    # (which starts with SIGINT ignored; the callback leaves ignored signals ignored, as nohup users expect).
    child = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **OFFLINE}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"the child never reached step {PAUSE_AT}:\n{err[-3000:]}")
        time.sleep(0.05)
    return child


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_rerunning_the_command_resumes_to_identical_weights(
        workspace, reference, tmp_path, caplog, signum):
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    child = start_paused_child(workspace, output_dir, ready)
    child.send_signal(signum)
    ready.unlink()  # let it go on: it finishes step PAUSE_AT + 1, saves, stops
    _, stderr = child.communicate(timeout=300)

    assert child.returncode == 128 + signum, stderr[-3000:]
    stopped = PAUSE_AT + 1
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == (f"train.py: error: interrupted by {signal.Signals(signum).name} at step {stopped} of "
                         f"{MAX_STEPS}: saved {output_dir}/checkpoint-{stopped}; run the same command again to "
                         "resume from it")
    assert "Traceback" not in stderr
    assert checkpoint_problem(output_dir / f"checkpoint-{stopped}") is None
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "train_results.json").exists()

    with caplog.at_level(logging.WARNING, logger="coupled_adam_hf"):
        train_script.main(argv(workspace, output_dir))  # the same command again
    assert f"holds an unfinished run: resuming from {output_dir}/checkpoint-{stopped}" in caplog.text
    assert_same_weights(reference, output_dir)


@pytest.mark.slow
def test_kill_9_loses_only_the_steps_since_the_last_checkpoint_and_resumes_to_identical_weights(
        workspace, reference, tmp_path, caplog):
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    child = start_paused_child(workspace, output_dir, ready)
    child.kill()
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert [p.name for p in sorted(output_dir.glob("checkpoint-*"))] == [f"checkpoint-{SAVE_STEPS}"]

    with caplog.at_level(logging.WARNING, logger="coupled_adam_hf"):
        train_script.main(argv(workspace, output_dir))
    assert f"resuming from {output_dir}/checkpoint-{SAVE_STEPS}" in caplog.text
    assert_same_weights(reference, output_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_under_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(workspace, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed next to this Python")
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    command = [accelerate, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"),
               "--main_process_port", str(port), str(ROOT / "tests" / "pausing_train.py"), str(PAUSE_AT), str(ready),
               *argv(workspace, output_dir)]
    launcher = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def kill_all() -> None:  # the launcher and its workers: they share the new session's process group
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    rank_files = [Path(f"{ready}.rank{rank}") for rank in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(f.exists() and f.read_text() for f in rank_files):
        if launcher.poll() is not None or time.monotonic() > deadline:
            kill_all()
            pytest.fail(f"the ranks never reached step {PAUSE_AT}:\n" + launcher.communicate()[1][-3000:])
        time.sleep(0.05)
    os.kill(int(rank_files[1].read_text()), signal.SIGTERM)  # rank 1 only
    for f in rank_files:
        f.unlink()
    try:
        _, stderr = launcher.communicate(timeout=120)  # without agreement, rank 0 would wait in the next all-reduce
    except subprocess.TimeoutExpired:
        kill_all()
        pytest.fail("the ranks did not stop together")
    stopped = PAUSE_AT + 1
    assert stderr.count(f"interrupted by SIGTERM at step {stopped} of {MAX_STEPS}") == 2, stderr[-3000:]
    assert [p.name for p in sorted(output_dir.glob("checkpoint-*"))] == ["checkpoint-3", f"checkpoint-{stopped}"]
    assert checkpoint_problem(output_dir / f"checkpoint-{stopped}") is None


def test_a_checkpoint_cut_short_by_a_crash_is_skipped_and_the_previous_one_resumed(reference, tmp_path, caplog):
    output_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-3", output_dir / "checkpoint-3")
    shutil.copytree(reference / "checkpoint-6", output_dir / "checkpoint-6")
    (output_dir / "checkpoint-6" / "trainer_state.json").unlink()  # killed while saving: Trainer writes it last
    shutil.copytree(reference / "checkpoint-6", output_dir / "checkpoint-9")
    weights = output_dir / "checkpoint-9" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated weights

    args = train_script.CoupledAdamTrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True)
    args.do_train = True
    with caplog.at_level(logging.WARNING, logger="coupled_adam_hf"):
        assert reliability.prepare_output_dir(args) == str(output_dir / "checkpoint-3")
    assert "checkpoint-9: model.safetensors is unreadable" in caplog.text
    assert "checkpoint-6: no trainer_state.json" in caplog.text
    assert find_resumable_checkpoint(output_dir)[0] == str(output_dir / "checkpoint-3")


def test_a_second_signal_restores_the_previous_handler_and_delivers_the_signal_to_it(monkeypatch):
    delivered = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: delivered.append(signum))
    try:
        callback = SaveOnSignalCallback(signals=(signal.SIGUSR1,))
        callback.on_train_begin(args=None, state=None, control=None)
        signal.raise_signal(signal.SIGUSR1)
        assert callback.received == signal.SIGUSR1 and delivered == []  # recorded, not acted on yet
        signal.raise_signal(signal.SIGUSR1)  # at once: the launcher's copy of the same Ctrl-C
        assert delivered == [] and signal.getsignal(signal.SIGUSR1) == callback._handle
        monkeypatch.setattr(callback, "repeat_window_s", 0.0)  # as if a second had passed
        signal.raise_signal(signal.SIGUSR1)
        assert delivered == [signal.SIGUSR1]  # the second one reached the previous handler
        assert signal.getsignal(signal.SIGUSR1) is not callback._handle
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        callback = SaveOnSignalCallback(signals=(signal.SIGUSR2,))
        callback.on_train_begin(args=None, state=None, control=None)
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
        callback.restore_handlers()
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ------------------------------------------------------------------------------------- output folders
def test_a_finished_run_is_refused_and_left_untouched(reference, workspace, tmp_path):
    output_dir = tmp_path / "finished"
    shutil.copytree(reference, output_dir)
    before = snapshot(output_dir)
    with pytest.raises(UsageError, match=r"holds a finished run.*--overwrite_output_dir.*--resume_from_checkpoint"):
        train_script.main(argv(workspace, output_dir))
    assert snapshot(output_dir) == before


def test_run_files_without_a_checkpoint_are_refused(workspace, tmp_path):
    output_dir = tmp_path / "other"
    output_dir.mkdir()
    (output_dir / "trainer_state.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a run .*no complete checkpoint"):
        train_script.main(argv(workspace, output_dir))
    assert (output_dir / "trainer_state.json").read_text() == "{}"


def test_overwrite_output_dir_deletes_the_old_checkpoints_and_results_and_starts_over(reference, tmp_path):
    output_dir = tmp_path / "again"
    shutil.copytree(reference, output_dir)
    args = train_script.CoupledAdamTrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True,
                                                     overwrite_output_dir=True)
    args.do_train = True
    assert reliability.prepare_output_dir(args) is None
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "train_results.json").exists()
    with pytest.raises(UsageError, match="give one of them"):
        args.resume_from_checkpoint = "last"
        reliability.prepare_output_dir(args)


# ------------------------------------------------------------------------------------- bad input
def test_missing_and_empty_data_files_are_refused_before_anything_is_written(workspace, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(UsageError, match=r"--train_file '.*nope.txt' does not exist"):
        train_script.main(argv(workspace, output_dir, "--train_file", str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match=r"--validation_file '.*empty.txt' is empty"):
        train_script.main(argv(workspace, output_dir, "--validation_file", str(tmp_path / "empty.txt")))
    with gzip.open(tmp_path / "empty.txt.gz", "wt") as handle:  # not empty on disk, no text inside
        handle.write("")
    with pytest.raises(UsageError, match=r"--train_file '.*empty.txt.gz' is empty"):
        train_script.main(argv(workspace, output_dir, "--train_file", str(tmp_path / "empty.txt.gz"),
                               "--validation_file", str(tmp_path / "empty.txt.gz")))
    assert not output_dir.exists()


def test_text_shorter_than_one_block_is_refused(workspace, tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be.\n")  # at most 21 tokens
    with pytest.raises(UsageError, match="fewer than block_size=32 tokens: lower --block_size or give more text"):
        train_script.main(argv(workspace, tmp_path / "out", "--validation_file", str(tmp_path / "short.txt")))


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(workspace, tmp_path):
    overrides = "n_layer=2,n_head=2,n_embd=32,n_positions=32,vocab_size=280"
    with pytest.raises(UsageError, match="vocab_size=280 is smaller than the tokenizer's 300 tokens"):
        train_script.main(argv(workspace, tmp_path / "out", "--config_overrides", overrides))


def test_unknown_recipe_keys_and_flags_are_refused(workspace, tmp_path):
    recipe = yaml.safe_load(workspace["recipe"].read_text()) | {"learning_rat": 1e-3}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UsageError, match=r"unknown argument\(s\) in the recipe .*\['learning_rat'\]"):
        train_script.main([str(tmp_path / "typo.yaml"), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(UsageError, match=r"unknown argument\(s\) \['--learnin_rate', '1'\]"):
        train_script.main(argv(workspace, tmp_path / "out", "--learnin_rate", "1"))


def corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return target


def test_missing_or_corrupt_checkpoints_are_refused(reference, workspace, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(UsageError, match="no such checkpoint folder"):
        train_script.main(argv(workspace, output_dir, "--resume_from_checkpoint", str(tmp_path / "checkpoint-5")))
    broken = corrupt_copy(reference / "checkpoint-3", tmp_path / "checkpoint-3")
    with pytest.raises(UsageError, match="is not a complete checkpoint: model.safetensors is unreadable"):
        train_script.main(argv(workspace, output_dir, "--resume_from_checkpoint", str(broken)))
    with pytest.raises(UsageError, match="no complete checkpoint-\\* folder"):
        train_script.main(argv(workspace, output_dir, "--resume_from_checkpoint", "last"))
    with pytest.raises(UsageError, match="--model_name_or_path '.*nothing': no such folder"):
        train_script.main(argv(workspace, output_dir, "--model_name_or_path", str(tmp_path / "nothing"),
                               "--config_overrides", ""))
    with pytest.raises(UsageError, match="not a usable model folder: model.safetensors is unreadable"):
        train_script.main(argv(workspace, output_dir, "--model_name_or_path", str(broken), "--config_overrides", ""))
    assert not output_dir.exists()


def test_a_checkpoint_of_another_model_shape_is_refused(reference, workspace, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(reference / "checkpoint-3", output_dir / "checkpoint-3")
    overrides = "n_layer=2,n_head=2,n_embd=64,n_positions=32"
    with pytest.raises(UsageError, match=r"does not fit the model .*: \[32, 96\] in the checkpoint, \[64, 192\] in the "
                                        r"model.*arguments changed since that run"):
        train_script.main(argv(workspace, output_dir, "--config_overrides", overrides))


def test_eval_scripts_refuse_missing_or_corrupt_checkpoints_in_one_line(reference, workspace, tmp_path):
    eval_isotropy, eval_perplexity = load_script("eval_isotropy"), load_script("eval_perplexity")
    broken = corrupt_copy(reference, tmp_path / "broken")
    for path, reason in ((tmp_path / "nothing", "no such folder"), (broken, "model.safetensors is unreadable")):
        with pytest.raises(UsageError, match=f"cannot load checkpoint .*{reason}"):
            eval_isotropy.main(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "iso")])
        with pytest.raises(UsageError, match=f"cannot load .*{reason}"):
            eval_perplexity.main(["--model_name_or_path", str(path), "--validation_file",
                                  str(workspace["root"] / "validation.txt"), "--output_dir", str(tmp_path / "ppl")])
    assert not (tmp_path / "iso").exists() and not (tmp_path / "ppl").exists()


# ------------------------------------------------------------------------------------- divergence
class NaNLossAt:
    """A CoupledAdamTrainer whose training loss is NaN at optimizer step `step` (as if the data or lr blew up)."""

    def __init__(self, step: int):
        outer = self

        class Trainer(train_script.CoupledAdamTrainer):
            def compute_loss(self, *args, **kwargs):
                result = super().compute_loss(*args, **kwargs)
                if self.state.global_step + 1 == outer.step:
                    return result * float("nan") if torch.is_tensor(result) else (result[0] * float("nan"),
                                                                                   *result[1:])
                return result

        self.step = step
        self.trainer_class = Trainer


def test_a_nan_loss_stops_before_its_update_names_the_step_and_keeps_the_good_checkpoints(
        workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(train_script, "CoupledAdamTrainer", NaNLossAt(5).trainer_class)
    output_dir = tmp_path / "out"
    with pytest.raises(CLIError, match=r"training diverged: the training loss became nan at optimizer step 5 of 8; "
                                       r"training stopped before that step's update, so nothing was saved after step "
                                       rf"4; the last good checkpoint is {output_dir}/checkpoint-3"):
        train_script.main(argv(workspace, output_dir))
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    assert checkpoint_problem(output_dir / "checkpoint-3") is None
    assert not nonfinite_parameters(load_file(output_dir / "checkpoint-3" / "model.safetensors").items())
    assert not (output_dir / "model.safetensors").exists()


def test_non_finite_weights_are_never_saved_so_rotation_keeps_the_last_good_checkpoint(
        workspace, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class PoisonWeightsAtStep6(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step + 1 == 6:  # the update of step 6 leaves NaN weights; step 6 is a save step
                with torch.no_grad():
                    model.get_input_embeddings().weight[0, 0] = float("nan")

    class Trainer(train_script.CoupledAdamTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(PoisonWeightsAtStep6())

    monkeypatch.setattr(train_script, "CoupledAdamTrainer", Trainer)
    output_dir = tmp_path / "out"
    with pytest.raises(CLIError, match=r"weights transformer.wte.weight hold NaN/inf at optimizer step 6; not saving "
                                       rf"them to .*checkpoint-6.*last good checkpoint is {output_dir}/checkpoint-3"):
        train_script.main(argv(workspace, output_dir, "--save_total_limit", "1"))
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    assert checkpoint_problem(output_dir / "checkpoint-3") is None


# ------------------------------------------------------------------------------------- one-line errors
def test_run_cli_prints_one_line_and_exits_with_the_errors_status(capsys, monkeypatch):
    monkeypatch.delenv("COUPLED_ADAM_HF_TRACEBACK", raising=False)

    def failing(error):
        def main():
            raise error
        return main

    cases = [(UsageError("--train_file 'x' does not exist"), 2, "t.py: error: --train_file 'x' does not exist"),
             (CLIError("interrupted by SIGTERM", exit_code=143), 143, "t.py: error: interrupted by SIGTERM"),
             (ValueError("deep\n  inside"), 1, "t.py: error: deep inside (COUPLED_ADAM_HF_TRACEBACK=1 shows where)"),
             (KeyboardInterrupt(), 130, "t.py: interrupted")]
    for error, status, line in cases:
        with pytest.raises(SystemExit) as exited:
            run_cli(failing(error), prog="t.py")
        assert exited.value.code == status
        assert capsys.readouterr().err.strip().splitlines() == [line]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(failing(ZeroDivisionError()), prog="t.py")


def test_train_script_bad_input_exits_2_with_one_line_on_stderr(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: train_script.main(argv(workspace, tmp_path / "out", "--train_file", "missing.txt")),
                prog="train.py")
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["train.py: error: --train_file 'missing.txt' does not exist"]


@pytest.mark.slow
def test_train_script_command_line_reports_a_bad_recipe_in_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rate: [1, 2]\n")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(tmp_path / "bad.yaml"),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **OFFLINE}, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("train.py: error: recipe key 'learning_rate' takes float, got "
                                                    "list [1, 2]")
    assert not (tmp_path / "out").exists()

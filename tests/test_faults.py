"""Fault injection: full disks, crashes inside a save, a concurrent run, a second signal, read-only and corrupted
output. Each test checks the exit status, the one-line message, and that nothing of value was lost: the previous
checkpoint is intact and re-running the same command ends with bitwise the weights of an uninterrupted run.

Faults are real where the test runs as root (a tiny tmpfs, a read-only bind mount) and injected otherwise
(``tests/faulty_train.py`` raises the ``OSError`` the kernel would give, or SIGKILLs the process mid-save).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coupled_adam_hf.checkpointing import PARTIAL_DIR, CheckpointWriteError, write_error_reason
from coupled_adam_hf.locking import LOCK_FILE
from coupled_adam_hf.reliability import checkpoint_problem
from test_reliability import (  # noqa: F401  (fixtures)
    MAX_STEPS,
    OFFLINE,
    PAUSE_AT,
    ROOT,
    SAVE_STEPS,
    argv,
    assert_same_weights,
    reference,
    start_paused_child,
    train_script,
    workspace,
)

SECOND_SAVE = 2 * SAVE_STEPS
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs or a read-only bind mount needs root")


def run_train(workspace, output_dir: Path, *extra: str, fault: str | None = None, timeout: int = 300):
    script = ["tests/faulty_train.py", fault] if fault else ["scripts/train.py"]
    return subprocess.run([sys.executable, *script, *argv(workspace, output_dir), *extra], cwd=ROOT,
                          env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=timeout)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*"))


def assert_resumes_to_the_uninterrupted_weights(workspace, reference, output_dir: Path, from_step: int) -> None:
    rerun = run_train(workspace, output_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {output_dir}/checkpoint-{from_step}" in rerun.stdout + rerun.stderr
    assert_same_weights(reference, output_dir)


# --------------------------------------------------------------------------------------------- full disks
@pytest.mark.slow
@pytest.mark.parametrize("kind, reason", [("enospc", "No space left on device"), ("eio", "Input/output error"),
                                          ("erofs", "Read-only file system")])
def test_a_write_error_during_a_checkpoint_ends_in_one_line_and_keeps_the_previous_checkpoint(
        workspace, reference, tmp_path, kind, reason):
    output_dir = tmp_path / "run"
    result = run_train(workspace, output_dir, fault=f"{kind}:{SECOND_SAVE}:optimizer.pt")

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"train.py: error: could not write {output_dir}/{PARTIAL_DIR}/checkpoint-{SECOND_SAVE}"
                           f"/optimizer.pt: {reason}; a checkpoint needs about "), line
    assert "are free there" in line
    assert line.endswith(f"the previous checkpoint {output_dir}/checkpoint-{SAVE_STEPS} is intact: free some space "
                         "and run the same command again to resume from it"), line
    assert checkpoints(output_dir) == [f"checkpoint-{SAVE_STEPS}"]  # nothing that looks like checkpoint-6
    assert not (output_dir / PARTIAL_DIR / f"checkpoint-{SECOND_SAVE}").exists()
    assert checkpoint_problem(output_dir / f"checkpoint-{SAVE_STEPS}") is None
    assert_resumes_to_the_uninterrupted_weights(workspace, reference, output_dir, SAVE_STEPS)


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk, and a function that shrinks it to what it holds now (or frees it)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount_point)], check=True)

    def resize(size: str | None = None) -> None:
        if size is None:  # full: what is there now plus two pages
            size = str(shutil.disk_usage(mount_point).used + 8192)
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    yield mount_point, resize
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
@needs_root
def test_a_real_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resumes_bitwise(
        workspace, reference, tiny_disk, tmp_path):
    mount_point, resize = tiny_disk
    output_dir, ready = mount_point / "run", tmp_path / "ready"
    child = start_paused_child(workspace, output_dir, ready)  # holds at step 4: checkpoint-3 is on the disk
    resize()  # the disk is now full
    ready.unlink()
    _, stderr = child.communicate(timeout=300)

    assert child.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    line = last_line(stderr)
    assert line.startswith("train.py: error: could not write "), line
    assert "No space left on device" in line and f"checkpoint-{SAVE_STEPS} is intact" in line, line
    assert checkpoints(output_dir) == [f"checkpoint-{SAVE_STEPS}"]
    assert checkpoint_problem(output_dir / f"checkpoint-{SAVE_STEPS}") is None

    resize("200m")
    assert_resumes_to_the_uninterrupted_weights(workspace, reference, output_dir, SAVE_STEPS)


def test_write_errors_are_recognised_through_the_libraries_that_wrap_them():
    assert write_error_reason(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert write_error_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded"
    wrapped = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    assert write_error_reason(wrapped) is not None
    assert write_error_reason(RuntimeError("Error while serializing: IoError(No space left on device)")) == \
        "No space left on device"
    assert write_error_reason(ValueError("not a write error")) is None
    assert issubclass(CheckpointWriteError, Exception) and CheckpointWriteError("x").exit_code == 1


# --------------------------------------------------------------------------------------------- crashes
@pytest.mark.slow
def test_a_crash_between_the_files_of_a_checkpoint_leaves_no_checkpoint_folder(workspace, reference, tmp_path):
    output_dir = tmp_path / "run"
    result = run_train(workspace, output_dir, fault=f"kill:{SECOND_SAVE}:optimizer.pt")
    assert result.returncode == -signal.SIGKILL
    assert checkpoints(output_dir) == [f"checkpoint-{SAVE_STEPS}"]  # weights of step 6 were written, but hidden
    assert (output_dir / PARTIAL_DIR / f"checkpoint-{SECOND_SAVE}" / "model.safetensors").is_file()
    assert_resumes_to_the_uninterrupted_weights(workspace, reference, output_dir, SAVE_STEPS)
    assert not (output_dir / PARTIAL_DIR).exists()  # the resumed run cleared the leftovers


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated optimizer.pt", "garbled trainer_state.json"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_bitwise(workspace, reference, tmp_path, damage):
    output_dir = tmp_path / "run"
    for step in (SAVE_STEPS, SECOND_SAVE):
        shutil.copytree(reference / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    shutil.copy(reference / "tokenizer.json", output_dir / "tokenizer.json")
    newest = output_dir / f"checkpoint-{SECOND_SAVE}"
    if damage.startswith("truncated"):
        optimizer = newest / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    else:
        (newest / "trainer_state.json").write_text('{"global_step": ')
    rerun = run_train(workspace, output_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Skipping {newest}" in rerun.stdout + rerun.stderr
    assert f"resuming from {output_dir}/checkpoint-{SAVE_STEPS}" in rerun.stdout + rerun.stderr
    assert_same_weights(reference, output_dir)


# --------------------------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_a_second_run_on_the_same_folder_exits_2_naming_the_first_and_changes_nothing(
        workspace, reference, tmp_path):
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    first = start_paused_child(workspace, output_dir, ready)
    try:
        second = run_train(workspace, output_dir, "--seed", "8", timeout=120)
    finally:
        ready.unlink()
    _, first_stderr = first.communicate(timeout=300)

    assert second.returncode == 2, second.stderr[-3000:]
    line = last_line(second.stderr)
    assert line.startswith(f"train.py: error: {output_dir} is in use by another training run (pid {first.pid} on "), line
    assert "tests/pausing_train.py" in line and "wait for it to finish" in line
    assert first.returncode == 0, first_stderr[-3000:]
    assert_same_weights(reference, output_dir)  # the first run's results, untouched by the second
    assert json.loads((output_dir / "train_results.json").read_text())["train_loss"] == pytest.approx(
        json.loads((reference / "train_results.json").read_text())["train_loss"], rel=1e-6)


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from coupled_adam_hf.locking import OutputDirLock; "
        f"lock = OutputDirLock({str(folder)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    probe = [sys.executable, "-c", f"from coupled_adam_hf.locking import OutputDirLock; OutputDirLock({str(folder)!r}).acquire()"]
    busy = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True)
    assert busy.returncode != 0 and "OutputDirBusyError" in busy.stderr and f"pid {holder.pid}" in busy.stderr
    holder.kill()
    holder.wait()
    assert subprocess.run(probe, cwd=ROOT, capture_output=True, text=True).returncode == 0  # no stale lock
    assert (folder / LOCK_FILE).exists()


# --------------------------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_a_second_signal_stops_at_once_without_saving(workspace, tmp_path):
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    child = start_paused_child(workspace, output_dir, ready)
    child.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # a repeat within a second is the same request (a launcher forwarding the terminal's signal)
    child.send_signal(signal.SIGTERM)
    try:
        child.communicate(timeout=120)
    finally:
        ready.unlink(missing_ok=True)
    assert child.returncode == -signal.SIGTERM
    assert checkpoints(output_dir) == [f"checkpoint-{SAVE_STEPS}"]  # no checkpoint for the step it stopped in
    assert not (output_dir / PARTIAL_DIR).exists()
    assert checkpoint_problem(output_dir / f"checkpoint-{SAVE_STEPS}") is None


# --------------------------------------------------------------------------------------------- read-only output
@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@needs_root
def test_a_read_only_output_folder_is_refused_in_one_line_before_training(workspace, read_only_folder):
    result = run_train(workspace, read_only_folder / "run", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith(f"train.py: error: cannot write to {read_only_folder / 'run'}: Read-only file system"), line
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------- train_loss
@pytest.mark.slow
def test_train_loss_after_a_resume_is_the_mean_over_the_whole_run(workspace, reference, tmp_path):
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    child = start_paused_child(workspace, output_dir, ready)
    child.kill()
    child.communicate(timeout=60)
    rerun = run_train(workspace, output_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((output_dir / "train_results.json").read_text())["train_loss"]
    uninterrupted = json.loads((reference / "train_results.json").read_text())["train_loss"]
    assert resumed == pytest.approx(uninterrupted, rel=1e-6)
    assert torch.isfinite(torch.tensor(resumed))


# --------------------------------------------------------------------------------------------- checks first
@pytest.mark.parametrize("extra, message", [
    (["--block_size", "100000"], "--block_size 100000 exceeds the model's context length 32"),
    (["--coupled_targets", "bogus"], "--coupled_targets 'bogus': .*Embedding modules in this model"),
])
def test_checks_that_need_the_built_model_come_before_the_first_write(workspace, tmp_path, extra, message):
    from coupled_adam_hf.cli import UsageError

    output_dir = tmp_path / "run"
    with pytest.raises(UsageError, match=message):
        train_script.main(argv(workspace, output_dir, *extra))
    assert not output_dir.exists()  # not even the trained tokenizer


def test_an_empty_recipe_and_an_output_dir_that_is_a_file_are_refused(tmp_path):
    from coupled_adam_hf.cli import UsageError

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UsageError, match="recipe .*empty.yaml is empty"):
        train_script.check_arguments([str(empty)])
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UsageError, match=f"--output_dir {afile} is not a directory"):
        train_script.check_arguments(["--output_dir", str(afile)])
    assert afile.read_text() == "x"

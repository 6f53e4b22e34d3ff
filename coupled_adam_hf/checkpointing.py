"""Checkpoints that are either complete or absent, and a full disk that ends a run with one line, not a traceback.

:class:`AtomicCheckpointMixin` goes before ``transformers.Trainer`` in a subclass's bases. Every checkpoint is
written into ``<output_dir>/.partial/checkpoint-N`` (a name that ``Trainer``, ``get_last_checkpoint`` and the
``checkpoint-*`` rotation never see) and renamed to ``<output_dir>/checkpoint-N`` only when every process has
written its files. A crash, ``kill -9`` or a full disk therefore never leaves a folder that looks like a
checkpoint, and ``--save_total_limit`` rotates only after the new checkpoint is in place, so the last complete
checkpoint is never deleted before its successor is complete.

An ``OSError`` while saving (``ENOSPC``, ``EDQUOT``, ``EIO``, ``EROFS``, ...; also safetensors' and torch's
wrapped write errors) removes the partial folder and raises :class:`CheckpointWriteError`: what could not be
written, the OS reason, how much space a checkpoint needs and how much is free, and which previous checkpoint is
intact. ``scripts/train.py`` turns it into one line and exit status 1.

The mixin also carries the sum of the training losses in each checkpoint (``train_loss_state.json``), so that
``train_loss`` of a resumed run is the mean over all of its steps, as in an uninterrupted run, instead of
``Trainer``'s mean over the steps since the resume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .cli import CLIError
from .reliability import find_resumable_checkpoint

__all__ = ["AtomicCheckpointMixin", "CheckpointWriteError", "LOSS_STATE_FILE", "PARTIAL_DIR", "final_writes",
           "format_bytes", "free_bytes", "write_error_reason"]

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
LOSS_STATE_FILE = "train_loss_state.json"
#: Messages of write errors that libraries raise as something other than OSError (safetensors' SafetensorError,
#: torch.save's RuntimeError from its zip writer).
_WRAPPED_WRITE_ERRORS = ("No space left", "Disk quota", "Read-only file system", "Input/output error",
                         "basic_ios::clear", "inline_container.cc", "PytorchStreamWriter", "file write failed")
#: How many checkpoints' worth of free space a run should start with before it warns.
LOW_SPACE_CHECKPOINTS = 3


class CheckpointWriteError(CLIError):
    """A checkpoint could not be written (disk full, quota, I/O error, read-only file system). Exit status 1."""


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def write_error_reason(error: BaseException) -> str | None:
    """The OS reason of a write failure, or None when ``error`` is not one (then it propagates unchanged)."""
    if isinstance(error, OSError):
        return error.strerror or errno.errorcode.get(error.errno or 0) or str(error)
    text = str(error)
    if any(marker in text for marker in _WRAPPED_WRITE_ERRORS):
        cause = error.__cause__ or error.__context__
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        return "No space left on device" if "No space left" in text else " ".join(text.split())[:200]
    return None


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)


class AtomicCheckpointMixin:
    """Write ``checkpoint-N`` atomically, turn write errors into :class:`CheckpointWriteError`, carry train loss.

    For a ``transformers.Trainer`` subclass: ``class MyTrainer(AtomicCheckpointMixin, Trainer)``.
    """

    _carried_loss: tuple[float, int] | None = None  # (sum of step losses, step the sum starts after)

    # ------------------------------------------------------------------ start-up
    def estimated_checkpoint_bytes(self) -> int:
        """Bytes of one checkpoint: the newest existing one's size, else weights plus two moments per weight."""
        run_dir = Path(self.args.output_dir)
        newest = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        if newest is not None:
            return _folder_bytes(Path(newest))
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights if self.args.save_only_model else 3 * weights

    def warn_if_low_disk_space(self) -> None:
        if not self.args.should_save or self.args.save_strategy == "no":
            return
        run_dir = Path(self.args.output_dir)
        free = free_bytes(run_dir)
        needed = self.estimated_checkpoint_bytes()
        if free is not None and free < LOW_SPACE_CHECKPOINTS * needed:
            logger.warning(
                f"only {format_bytes(free)} free for {run_dir}, and one checkpoint needs about "
                f"{format_bytes(needed)}: a save may fail (the run then stops with the previous checkpoint intact)"
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        self._carried_loss = self._read_carried_loss(resume_from_checkpoint)
        if self.args.should_save:  # a save cut short by a crash; nothing reads it
            shutil.rmtree(Path(self.args.output_dir) / PARTIAL_DIR, ignore_errors=True)
        self.warn_if_low_disk_space()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        return output._replace(training_loss=output.metrics.get("train_loss", output.training_loss))

    def _read_carried_loss(self, resume_from_checkpoint: str | bool | None) -> tuple[float, int] | None:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if not isinstance(resume_from_checkpoint, (str, os.PathLike)):
            return None
        try:
            saved = json.loads((Path(resume_from_checkpoint) / LOSS_STATE_FILE).read_text())
            return float(saved["loss_sum"]), int(saved["first_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a checkpoint of another trainer: train_loss is then Trainer's mean since the resume

    # ------------------------------------------------------------------ train_loss over the whole run
    def _loss_sum_so_far(self) -> float:
        pending = getattr(self, "_tr_loss", None)
        pending_value = 0.0
        if pending is not None:
            pending_value = float(nested_gather(pending, self.args.parallel_mode).mean().item())  # as Trainer drains it at a log
        return float(getattr(self, "_total_loss_scalar", 0.0)) + pending_value

    def _first_step(self) -> int:
        if self._carried_loss is not None:
            return self._carried_loss[1]
        return int(getattr(self, "_initial_global_step", 0))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "train_loss" in logs and self._carried_loss is not None:
            # Trainer divides this session's loss sum by this session's steps; continue the interrupted run's mean.
            steps = self.state.global_step - self._carried_loss[1]
            if steps > 0:
                logs["train_loss"] = (self._carried_loss[0] + self._total_loss_scalar) / steps
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ atomic checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / PARTIAL_DIR
        staged, final = staging_root / name, run_dir / name
        loss_state = {"loss_sum": self._loss_sum_so_far(), "first_step": self._first_step(),
                      "step": self.state.global_step}
        if self._carried_loss is not None:
            loss_state["loss_sum"] += self._carried_loss[0]
        try:
            if self.args.should_save and staged.exists():
                shutil.rmtree(staged)  # left by a run that died while saving
            self.accelerator.wait_for_everyone()
            self._get_output_dir = lambda trial=None: str(staging_root)  # Trainer saves below this folder
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            self.accelerator.wait_for_everyone()  # every rank has written its files (RNG state, FSDP shards)
            if self.args.should_save:
                self._publish(staged, final, run_dir, loss_state)
        except BaseException as error:
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)  # never leave half a checkpoint, not even hidden
            reason = write_error_reason(error)
            if reason is None:
                raise
            raise self._write_error(error, reason, staged, run_dir) from error
        self.accelerator.wait_for_everyone()

    def _publish(self, staged: Path, final: Path, run_dir: Path, loss_state: dict[str, Any]) -> None:
        _write_json_atomically(staged / LOSS_STATE_FILE, loss_state)
        best_step = self.state.best_global_step
        if best_step:  # Trainer looked for the best checkpoint below the staging folder: point it at the real one
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best_step}"
            if best_step == self.state.global_step or best.exists():
                self.state.best_model_checkpoint = str(best)
                self.state.save_to_json(str(staged / "trainer_state.json"))
        if final.exists():  # the same step saved again (e.g. a signal right after a scheduled save): replace it
            retired = staged.with_name(staged.name + ".replaced")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staged, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staged, final)
        try:
            staging_root = staged.parent
            staging_root.rmdir()
        except OSError:
            pass  # not empty (another run's leftovers) or already gone
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _write_error(self, error: BaseException, reason: str, staged: Path, run_dir: Path) -> CheckpointWriteError:
        needed = self.estimated_checkpoint_bytes()
        free = free_bytes(run_dir)
        target = getattr(error, "filename", None) or (error.__cause__ and getattr(error.__cause__, "filename", None))
        what = f"{target}" if target else f"checkpoint-{self.state.global_step} in {run_dir}"
        previous = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        kept = (f"the previous checkpoint {previous} is intact: free some space and run the same command again to "
                "resume from it") if previous else "no earlier checkpoint exists: free some space and start again"
        space = f"a checkpoint needs about {format_bytes(needed)}"
        space += f", {format_bytes(free)} are free there" if free is not None else ""
        return CheckpointWriteError(f"could not write {what}: {reason}; {space}; {kept}")


@contextlib.contextmanager
def final_writes(output_dir: str):
    """A write error after training (full disk, quota, read-only) as one line naming the intact checkpoint."""
    try:
        yield
    except Exception as error:
        reason = write_error_reason(error)
        if reason is None:
            raise
        last, _ = find_resumable_checkpoint(output_dir)
        free = free_bytes(Path(output_dir))
        kept = (f"the last checkpoint {last} is intact: free some space and run the same command again to resume "
                "from it") if last else "no checkpoint was saved"
        space = f" ({format_bytes(free)} free)" if free is not None else ""
        raise CheckpointWriteError(f"could not write the trained model and results to {output_dir}{space}: "
                                   f"{reason}; {kept}") from error

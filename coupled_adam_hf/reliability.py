"""Surviving interruptions and bad runs: checkpoint checks, a clean stop on SIGINT/SIGTERM, non-finite guards.

- :func:`checkpoint_problem` / :func:`find_resumable_checkpoint`: is a ``checkpoint-N`` folder complete and
  readable? ``Trainer`` writes ``trainer_state.json`` last, so a folder without it is a save that a crash or
  ``kill -9`` cut short; such folders (and ones with truncated weights) are skipped when resuming.
- :class:`SaveOnSignalCallback`: on SIGINT (Ctrl-C) or SIGTERM (``kill``, schedulers' preemption) training
  finishes its current optimizer step, saves a checkpoint and stops; a second signal stops at once.
- :class:`NonFiniteTrainingError` and :func:`nonfinite_parameters`: what
  :class:`coupled_adam_hf.CoupledAdamTrainer` raises when the loss becomes NaN/inf (before that step's update) or
  when weights about to be saved are not finite, so that no checkpoint written after the divergence replaces
  good ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import TrainerCallback

__all__ = [
    "NonFiniteTrainingError",
    "SaveOnSignalCallback",
    "checkpoint_problem",
    "checkpoint_shape_mismatches",
    "checkpoint_step",
    "find_resumable_checkpoint",
    "list_checkpoints",
    "model_folder_problem",
    "nonfinite_parameters",
]

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# torch.save archives in a checkpoint; a zip's directory sits at its end, so a truncated file fails to open.
_TORCH_ARCHIVES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "pytorch_model.bin", "training_args.bin")


# ------------------------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # reads and checks the header only
            handle.keys()
    except Exception as error:  # SafetensorError derives from Exception only
        return f"{path.name} is unreadable ({' '.join(str(error).split())})"
    return None


def _weights_problem(folder: Path) -> str | None:
    if any(p.is_dir() and p.name.startswith("pytorch_model_fsdp") for p in folder.iterdir()):
        return None  # FSDP sharded state: accelerate's own layout, checked when it is loaded
    files = [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()]
    for index_name in _WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                return f"{index_name} is unreadable"
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                return f"{index_name} names missing shard(s) {missing[:3]}"
            files += [folder / s for s in shards]
    if not files:
        return f"no model weights ({' or '.join(_WEIGHT_FILES[:2])})"
    for path in files:
        problem = _safetensors_problem(path) if path.suffix == ".safetensors" else None
        if problem:
            return problem
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete, readable ``Trainer`` checkpoint; None if it is.

    Cheap: reads ``trainer_state.json``, the safetensors headers and the zip directories of the ``torch.save``
    files (which sit at their ends, so truncated files are caught), not the tensors.
    """
    folder = Path(path)
    if not folder.exists():
        return "no such folder"
    if not folder.is_dir():
        return "not a folder"
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        return f"no {TRAINER_STATE} (Trainer writes it last: the save was cut short)"
    try:
        state = json.loads(state_file.read_text())
        int(state["global_step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is unreadable"
    problem = _weights_problem(folder)
    if problem:
        return problem
    for name in _TORCH_ARCHIVES:
        archive = folder / name
        if archive.is_file() and not zipfile.is_zipfile(archive):
            return f"{name} is truncated or not a torch.save file"
    return None


def find_resumable_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """``(newest complete checkpoint or None, [(skipped newer checkpoint, why), ...])``."""
    skipped: list[tuple[str, str]] = []
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder), skipped
        skipped.append((str(folder), problem))
    return None, skipped


def model_folder_problem(path: str | os.PathLike, *, weights: bool = True) -> str | None:
    """Why a local ``save_pretrained`` folder cannot be loaded (no/corrupt ``config.json``, unreadable
    weights); None if it looks loadable. Cheap: headers only."""
    folder = Path(path)
    if not folder.is_dir():
        return "no such folder"
    config = folder / "config.json"
    if not config.is_file():
        return "no config.json"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            return "config.json is not a JSON object"
    except (ValueError, UnicodeDecodeError):
        return "config.json is not valid JSON"
    if weights:
        problem = _weights_problem(folder)
        if problem:
            return problem
        for name in ("pytorch_model.bin",):
            if (folder / name).is_file() and not zipfile.is_zipfile(folder / name):
                return f"{name} is truncated or not a torch.save file"
    return None


def checkpoint_shape_mismatches(path: str | os.PathLike, model: torch.nn.Module) -> list[str]:
    """``["name: [a, b] in the checkpoint, [c, d] in the model", ...]`` for the safetensors weights of a
    checkpoint (single file or index) whose shapes differ from ``model``'s; empty when they fit or cannot be read
    this way (``.bin``, FSDP shards)."""
    from safetensors import safe_open

    folder = Path(path)
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files += [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    mismatches = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = list(handle.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    mismatches.append(f"{name}: {shape} in the checkpoint, {expected[name]} in the model")
    return mismatches


# ------------------------------------------------------------------------------------------- non-finite
class NonFiniteTrainingError(RuntimeError):
    """Training diverged: the loss (or the weights) stopped being finite at optimizer step ``step``."""

    def __init__(self, message: str, *, step: int, what: str):
        super().__init__(message)
        self.step = step
        self.what = what


def nonfinite_parameters(parameters: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) parameters holding NaN or inf; sharded DTensors are checked shard by shard."""
    named = [(name, getattr(p, "_local_tensor", p)) for name, p in parameters]
    flags = [torch.isfinite(t.detach()).all() for _, t in named if t.numel()]
    if not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):  # one sync in the common case
        return []
    return [name for name, t in named if t.numel() and not bool(torch.isfinite(t.detach()).all())][:limit]


# ------------------------------------------------------------------------------------------- signals
class SaveOnSignalCallback(TrainerCallback):
    """Turn SIGINT/SIGTERM during ``Trainer.train()`` into "save a checkpoint at the end of this step, stop".

    The handlers are installed at ``on_train_begin`` and the previous ones restored at ``on_train_end``; a signal
    whose disposition was "ignore" (``nohup``, background jobs) stays ignored. The handler only records the
    signal; at the next ``on_step_end`` the callback sets ``control.should_save`` and
    ``control.should_training_stop``, so ``Trainer`` writes ``checkpoint-N`` with optimizer, scheduler and RNG
    state, exactly as a scheduled save, and ``train()`` returns. A checkpoint being written when the signal
    arrives is finished first. A second signal, a second or more after the first, restores the previous handler
    and re-delivers the signal (so Ctrl-C twice raises ``KeyboardInterrupt``; SIGTERM twice terminates); one that
    follows within ``repeat_window_s`` is the same request (under ``torchrun``/``accelerate launch`` a Ctrl-C
    reaches each worker twice: from the terminal and forwarded by the launcher, which then waits
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds, 30 by default, before SIGKILL).

    After ``train()``, ``received`` is the signal number (None if none came) and ``stopped_at_step`` the step at
    which the checkpoint was saved. With several processes (DDP) the ranks agree through an all-reduce every step,
    so that all of them stop at the same step even if only one received the signal.
    """

    #: A second signal within this many seconds of the first is the same request, not "stop at once".
    repeat_window_s = 1.0

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._received_at = 0.0
        self.stopped_at_step: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        self.stopped_at_step = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("SaveOnSignalCallback: training runs outside the main thread; signals are not handled")
            return
        for signum in self.signals:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is not None:
            if now - self._received_at < self.repeat_window_s:
                return  # the same request again: launchers (torchrun) forward the Ctrl-C the terminal already sent
            self.restore_handlers()  # asked twice: stop now
            signal.raise_signal(signum)
            return
        self.received, self._received_at = signum, now
        logger.warning(
            f"Received {signal.Signals(signum).name}: saving a checkpoint at the end of the current step, then "
            "stopping (send it again to stop at once, without saving)"
        )

    def restore_handlers(self) -> None:
        """Put back the handlers found at ``on_train_begin`` (idempotent; ``train()`` skips ``on_train_end`` when
        it raises, so callers restore them in a ``finally``)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _any_rank_received(self, args) -> bool:
        received = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                backend = torch.distributed.get_backend()
                device = args.device if backend != "gloo" else torch.device("cpu")
                flag = torch.tensor([int(received)], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                received = bool(flag.item())
                if received and self.received is None:
                    self.received = signal.SIGTERM  # another rank's signal: stop the same way
        return received

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at_step is None and self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()

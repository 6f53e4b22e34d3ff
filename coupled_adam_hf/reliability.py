"""Surviving interruptions and bad runs: checkpoint checks, a clean stop on SIGINT/SIGTERM, non-finite guards.

- :func:`checkpoint_problem` / :func:`find_resumable_checkpoint`: is a ``checkpoint-N`` folder complete and
  readable? ``Trainer`` writes ``trainer_state.json`` last, so a folder without it is a save that a crash or
  ``kill -9`` cut short; such folders (and ones with truncated weights) are skipped when resuming.
- the output-folder policy of ``scripts/train.py`` (start, resume or refuse, decided before anything is written);
  the signal handling lives in :class:`coupled_adam_hf.callbacks.SaveOnSignalCallback`.
- the eval scripts' loading of a checkpoint's model and tokenizer (:func:`load_checkpoint_model`,
  :func:`load_checkpoint_tokenizer`) and their refusal to overwrite results (:func:`check_results_file`): a bad
  folder, a missing tokenizer or existing results are one line, before anything is written.
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
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import TrainingArguments

from .cli import OutputExistsError, UsageError
from .cli import one_line as _one_line

__all__ = [
    "RUN_FILES",
    "STALE_RESULT_FILES",
    "TOKENIZER_FILES",
    "NonFiniteTrainingError",
    "check_output_dir",
    "check_results_file",
    "checkpoint_problem",
    "checkpoint_shape_mismatches",
    "checkpoint_step",
    "find_resumable_checkpoint",
    "is_local_path",
    "list_checkpoints",
    "load_checkpoint_model",
    "load_checkpoint_tokenizer",
    "model_folder_problem",
    "nonfinite_parameters",
    "prepare_output_dir",
    "resolve_checkpoint",
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


# ---------------------------------------------------------------------------- loading for evaluation
#: Files of which a local checkpoint's tokenizer needs at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def is_local_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local folder (one that exists, or a path spelled as one) rather than a Hub id."""
    return Path(path).is_dir() or str(path).startswith((".", "/", "~"))


def load_checkpoint_model(path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A checkpoint's model for the eval scripts: a causal LM when it is one (an untied head is kept), else the
    base ``AutoModel`` (BERT, a T5 encoder, ...: the same embeddings). Bad folders: one-line UsageError."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    problem = model_folder_problem(path) if is_local_path(path) else None
    if problem:
        raise UsageError(f"cannot load checkpoint {path!r}: {problem}")
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as error:
        raise UsageError(f"cannot load checkpoint {path!r}: {_one_line(error)}") from error
    try:
        try:
            return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        except ValueError:  # not a causal LM
            return AutoModel.from_pretrained(path, config=config, **kwargs)
    except Exception as error:  # unreadable weights
        raise UsageError(f"cannot load checkpoint {path!r}: {_one_line(error)}") from error


def load_checkpoint_tokenizer(path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A checkpoint's tokenizer; a checkpoint without one is a one-line UsageError that says so. Cheap enough to
    run for every checkpoint before any model loads."""
    from transformers import AutoTokenizer

    local = is_local_path(path)
    problem = model_folder_problem(path) if local else None
    if problem:
        raise UsageError(f"cannot load checkpoint {path!r}: {problem}")
    if local and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        # transformers 5 builds an empty tokenizer of the config's class from a folder without one
        raise UsageError(f"checkpoint {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save one "
                         "beside the model with tokenizer.save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise UsageError(f"checkpoint {path!r} has no tokenizer (save one beside the model with "
                         f"tokenizer.save_pretrained): {_one_line(error)}") from error


# ------------------------------------------------------------------------------------------- output folder
def check_output_dir(output_dir: str | os.PathLike) -> None:
    """UsageError if ``output_dir`` exists but is not a folder (nothing is created)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} is not a directory")


def check_results_file(output_dir: str | os.PathLike, name: str, *, overwrite: bool) -> Path:
    """``output_dir / name`` for an evaluation to write; refused (OutputExistsError) when it exists and
    ``overwrite`` is false, and when ``output_dir`` is not a folder. Nothing is created."""
    check_output_dir(output_dir)
    results = Path(output_dir) / name
    if results.exists() and not overwrite:
        raise OutputExistsError(f"{results} exists: pass --overwrite_output_dir to replace it, or another --output_dir")
    return results


def resolve_checkpoint(training_args: TrainingArguments, *, log: bool = True) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true``/``last`` for the newest complete one in
    output_dir (newer ones that a crash left incomplete are skipped with a warning). UsageError if there is none or
    the folder is not a complete checkpoint."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "last"):
        last, skipped = find_resumable_checkpoint(training_args.output_dir)
        for path, problem in skipped if log else ():
            logger.warning(f"Skipping {path}: {problem}")
        if last is None:
            found = f" (incomplete: {', '.join(Path(p).name for p, _ in skipped)})" if skipped else ""
            raise UsageError(f"--resume_from_checkpoint {value}: no complete checkpoint-* folder in "
                             f"{training_args.output_dir}{found}")
        return last
    problem = checkpoint_problem(value)
    if problem == "no such folder":
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    if problem is not None:
        raise UsageError(f"--resume_from_checkpoint {value} is not a complete checkpoint: {problem}")
    return value


#: Files a run of this script leaves at the top of its output_dir (checkpoint-* folders aside).
RUN_FILES = ("trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
             "embedding_results.json", "training_args.bin", "model.safetensors", "pytorch_model.bin", "config.json")
#: Of those, what --overwrite_output_dir removes besides the checkpoints: files that would make a new run that is
#: interrupted look finished, or mix the old run's numbers with the new one's.
STALE_RESULT_FILES = ("trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
                      "embedding_results.json")


def prepare_output_dir(training_args: TrainingArguments, *, delete_stale: bool = True) -> str | None:
    """The checkpoint to resume from (None: train from scratch), deciding what to do with ``--output_dir``.

    With ``delete_stale=False`` nothing is deleted and nothing logged: the decision alone, to check it before
    anything is written (``main`` decides again, logging, once it holds the folder's lock).

    - ``--resume_from_checkpoint PATH|last``: that checkpoint (checked).
    - ``--overwrite_output_dir``: from scratch; the old run's checkpoints and result files are deleted.
    - a folder with an unfinished run (``checkpoint-*``, no ``train_results.json``): resume from its newest
      complete checkpoint, and say so -- re-running an interrupted command continues it, like run_clm.py.
    - a folder with a finished run, or with run files but no checkpoint: UsageError (nothing is touched).
    - anything else (absent, empty, or only a tokenizer saved by a run that never reached a checkpoint): scratch.
    """
    value = training_args.resume_from_checkpoint
    resume_asked = value is not None and str(value).lower() not in ("", "false", "none")
    check_output_dir(training_args.output_dir)
    if training_args.do_train and resume_asked and training_args.overwrite_output_dir:
        raise UsageError("--overwrite_output_dir starts over, --resume_from_checkpoint continues: give one of them")
    explicit = resolve_checkpoint(training_args, log=delete_stale)
    if not training_args.do_train or explicit is not None:
        return explicit
    output_dir = Path(training_args.output_dir)
    checkpoints = list_checkpoints(output_dir)
    held = [name for name in RUN_FILES if (output_dir / name).exists()] + [c.name for c in checkpoints]
    if not held:
        return None
    if training_args.overwrite_output_dir:
        if training_args.should_save and delete_stale:  # the process that saves; the others don't delete
            stale = checkpoints + [output_dir / n for n in STALE_RESULT_FILES if (output_dir / n).exists()]
            logger.warning(f"--overwrite_output_dir: deleting {', '.join(p.name for p in stale) or 'nothing'} in "
                           f"{output_dir} and training from scratch")
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    if (output_dir / "train_results.json").exists():
        raise UsageError(
            f"{output_dir} holds a finished run (train_results.json): pass --overwrite_output_dir to train again "
            "from scratch, --resume_from_checkpoint last to continue it (e.g. with a larger --max_steps), or "
            "another --output_dir"
        )
    checkpoint, skipped = find_resumable_checkpoint(output_dir)
    for path, problem in skipped if delete_stale else ():
        logger.warning(f"Skipping {path}: {problem}")
    if checkpoint is None:
        raise UsageError(
            f"{output_dir} already holds a run ({', '.join(held[:4])}) but no complete checkpoint to resume from: "
            "pass --overwrite_output_dir to start over, or another --output_dir"
        )
    if delete_stale:
        logger.warning(
            f"{output_dir} holds an unfinished run: resuming from {checkpoint}. Pass --overwrite_output_dir to "
            "start over instead."
        )
    return checkpoint


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

"""``scripts/train.py`` with one injected fault while it writes a checkpoint file.

    python tests/faulty_train.py KIND:STEP:FILE [scripts/train.py arguments ...]

When the run writes FILE (``optimizer.pt``, ``model.safetensors``, ...) of ``checkpoint-STEP``, KIND happens:
``enospc`` / ``edquot`` / ``eio`` / ``erofs`` raise that ``OSError`` (what a full disk, a quota, a failing disk or a
file system remounted read-only give), ``kill`` sends SIGKILL to the process (a crash between two files of a
checkpoint). Everything else is the real script, under ``run_cli`` as ``python scripts/train.py`` runs it.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import sys
from pathlib import Path

import torch
import transformers.modeling_utils

from coupled_adam_hf.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
ERRORS = {"enospc": errno.ENOSPC, "edquot": errno.EDQUOT, "eio": errno.EIO, "erofs": errno.EROFS}


def inject(kind: str, step: int, file_name: str) -> None:
    def fault_if_targeted(path: object) -> None:
        path = Path(str(path))
        if path.name == file_name and path.parent.name == f"checkpoint-{step}":
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            code = ERRORS[kind]
            raise OSError(code, os.strerror(code), str(path))

    real_torch_save, real_safe_save = torch.save, transformers.modeling_utils.safe_save_file

    def torch_save(obj, f, *args, **kwargs):
        fault_if_targeted(f)
        return real_torch_save(obj, f, *args, **kwargs)

    def safe_save(tensors, filename, *args, **kwargs):
        fault_if_targeted(filename)
        return real_safe_save(tensors, filename, *args, **kwargs)

    torch.save = torch_save
    transformers.modeling_utils.safe_save_file = safe_save


def main() -> None:
    fault, *train_argv = sys.argv[1:]
    kind, step, file_name = fault.split(":")
    inject(kind, int(step), file_name)
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_script
    spec.loader.exec_module(train_script)
    run_cli(lambda: train_script.main(train_argv), prog="train.py")


if __name__ == "__main__":
    main()

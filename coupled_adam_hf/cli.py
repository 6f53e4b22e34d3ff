"""Command-line plumbing shared by the scripts: one-line errors and exit codes instead of tracebacks.

A script's ``main(argv)`` raises; its ``if __name__ == "__main__"`` block hands ``main`` to :func:`run_cli`::

    from coupled_adam_hf.cli import UsageError, run_cli

    def main(argv=None):
        if not Path(args.train_file).is_file():
            raise UsageError(f"--train_file {args.train_file!r} does not exist")
        ...

    if __name__ == "__main__":
        run_cli(main, prog="train.py")

What reaches the terminal (stderr) and the exit status, by what ``main`` raised:

- :class:`UsageError` (bad input): ``train.py: error: <reason>``, status 2 (argparse's own status for bad flags).
- :class:`CLIError` (a run that cannot go on, e.g. the loss became NaN): ``train.py: error: <reason>``, status
  ``exit_code`` (1; ``128 + N`` for a run stopped by signal N, as a shell reports a process killed by it).
- ``ValueError`` or ``OSError`` that nobody converted: the same line plus a hint to set the variable below, status 1.
- ``KeyboardInterrupt``: ``train.py: interrupted``, status 130.
- Anything else is a bug: the traceback, status 1.

argparse's own errors (unknown flag, a value of the wrong type) already print ``prog: error: ...`` and exit 2.
``COUPLED_ADAM_HF_TRACEBACK=1`` prints the full traceback (with the chained cause) before the one-line reason.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["CLIError", "UsageError", "MissingInputError", "OutputExistsError", "one_line", "parse_arguments", "run_cli",
           "checkpoint_labels", "TRACEBACK_ENV"]

#: Set to 1 to see where an error came from (the one-line message hides the traceback).
TRACEBACK_ENV = "COUPLED_ADAM_HF_TRACEBACK"


class CLIError(Exception):
    """A failure the user should read as one line; ``exit_code`` is the process exit status (default 1)."""

    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CLIError, ValueError):
    """Bad input: an argument, a recipe, a data file, a checkpoint or an output folder. Exit status 2.

    Also a ``ValueError``, so code that called a script's ``main`` and caught ``ValueError`` keeps working.
    """

    exit_code = 2


class MissingInputError(UsageError, FileNotFoundError):
    """An input file or folder that does not exist (also a ``FileNotFoundError``). Exit status 2."""


class OutputExistsError(UsageError, FileExistsError):
    """Results that a run would overwrite without being asked to (also a ``FileExistsError``). Exit status 2."""


def one_line(error: BaseException | str) -> str:
    """The message of ``error`` on one line (library messages often span several)."""
    text = str(error) if not isinstance(error, BaseException) else (str(error) or type(error).__name__)
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text.strip("'\"")  # str(KeyError("x")) is "'x'"
    return " ".join(text.split())


def parse_arguments(dataclass_types: Any, argv: list[str] | None = None) -> tuple[Any, ...]:
    """An evaluation script's argument dataclasses from flags, or from one ``.json``/``.yaml`` file.

    Bad input (unreadable file, unknown key, a value of the wrong type) raises :class:`UsageError`.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return tuple(parser.parse_json_file(argv[0]))
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return tuple(parser.parse_yaml_file(argv[0]))
        return tuple(parser.parse_args_into_dataclasses(argv))
    except Exception as error:  # unreadable argument files, unknown keys, values of the wrong type
        raise UsageError(f"invalid arguments: {one_line(error)}") from error


def checkpoint_labels(paths: list[str], labels: list[str] | None) -> list[str]:
    """The display name of each checkpoint of an eval script: ``--labels``, else the folder names; unique."""
    from pathlib import Path

    labels = labels or [Path(path.rstrip("/")).name or path for path in paths]
    if len(labels) != len(paths):
        raise UsageError(f"--labels gives {len(labels)} names for {len(paths)} checkpoints")
    if len(set(labels)) != len(labels):
        raise UsageError(f"checkpoint labels must be unique, got {labels}: pass --labels")
    return labels


def check_device_name(name: str) -> None:
    """``--device`` of an eval script: auto, cpu or cuda[:N], checked before anything loads."""
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {name!r}")


def resolve_device(name: str):
    """The ``torch.device`` of an eval script's ``--device`` (auto: cuda when available, else cpu)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    return device


def run_cli(main: Callable[[], Any], *, prog: str | None = None) -> None:
    """Call ``main()`` and exit: 0 on success, a one-line ``prog: error: reason`` and a status on failure."""
    prog = prog or os.path.basename(sys.argv[0]) or "coupled_adam_hf"
    show_traceback = os.environ.get(TRACEBACK_ENV, "").lower() not in ("", "0", "false", "no")
    try:
        main()
    except CLIError as error:
        if show_traceback:
            traceback.print_exc()
        _fail(prog, one_line(error), error.exit_code)
    except (ValueError, OSError) as error:
        # Raised by our own checks or by a library about something it was given; either way one line says it.
        if show_traceback:
            traceback.print_exc()
            _fail(prog, one_line(error), 1)
        _fail(prog, f"{one_line(error)} ({TRACEBACK_ENV}=1 shows where)", 1)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        sys.exit(130)


def _fail(prog: str, message: str, exit_code: int) -> None:
    sys.stdout.flush()  # so that the error is the last line, after any buffered output
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(exit_code)

"""One run per output folder: an exclusive lock that the operating system releases when its process dies.

:class:`OutputDirLock` takes ``<folder>/.coupled_adam_hf.lock`` with :mod:`filelock` (``fcntl.flock`` on POSIX,
``msvcrt.locking`` on Windows). The lock belongs to the open file, not to the file's existence, so a run killed
with ``kill -9`` or by the out-of-memory killer leaves nothing to clear by hand: the kernel drops the lock with
the process, and the next run takes it. Beside the lock, the holder writes who it is (pid, host, start time,
command line) into ``.coupled_adam_hf.lock.json``, so that a second run can say which run it collided with. That
note is only read while the lock is held by someone else; a stale note after a crash is simply overwritten.

Why a library and not a pid file: a pid file outlives a crash and then needs a liveness check that cannot work
across hosts (a shared folder of a multi-node job) or survive pid reuse. Why :mod:`filelock` rather than calling
``fcntl`` directly: it is already installed with ``huggingface_hub`` and ``torch``, it is portable, and it is
what the Hugging Face libraries use to guard their caches.

Under several processes (DDP, FSDP) only the process that writes takes the lock: ``Trainer``'s
``args.should_save`` process, rank 0. The lock files stay in the folder after the run (removing a lock file on
release races with a run that is opening it); both names start with a dot and nothing else reads them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .cli import UsageError

__all__ = ["LOCK_FILE", "OutputDirLock", "OutputDirBusyError"]

LOCK_FILE = ".coupled_adam_hf.lock"
HOLDER_FILE = LOCK_FILE + ".json"


class OutputDirBusyError(UsageError):
    """Another live process holds the folder's lock. Exit status 2, like other refusals of an output folder."""


def _describe_holder(folder: Path) -> str:
    try:
        holder = json.loads((folder / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return "another process (it has not said which yet)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = " ".join(holder.get("command") or []) or "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}: {command}"


class OutputDirLock:
    """Hold ``folder`` for one run: ``acquire()`` or ``with OutputDirLock(folder):``.

    ``acquire`` never waits: if another process holds the folder it raises :class:`OutputDirBusyError` naming that
    process. It creates the folder (and only then the lock file) when needed. ``what`` names the kind of run in
    the message ("training run", "evaluation").
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self._lock: FileLock | None = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> OutputDirLock:
        if self.held:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"{self.folder} is not a directory: pass a folder as --output_dir")
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.folder / LOCK_FILE), timeout=0)
            lock.acquire()
        except Timeout:
            raise OutputDirBusyError(
                f"{self.folder} is in use by another {self.what} ({_describe_holder(self.folder)}): wait for it to "
                "finish or stop it, or pass another --output_dir"
            ) from None
        except OSError as error:
            raise UsageError(f"cannot write to {self.folder}: {error.strerror or error}: pass a writable "
                             "--output_dir") from error
        self._lock = lock
        self._write_holder()
        return self

    def _write_holder(self) -> None:
        holder: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": [sys.executable, *sys.argv],
        }
        note = self.folder / HOLDER_FILE
        partial = note.with_name(note.name + f".{os.getpid()}.partial")
        try:
            partial.write_text(json.dumps(holder) + "\n")
            os.replace(partial, note)
        except OSError:
            partial.unlink(missing_ok=True)  # the note is a courtesy; a full disk must not stop the lock working

    def release(self) -> None:
        if not self.held:
            return
        try:
                (self.folder / HOLDER_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        self._lock.release()
        self._lock = None
        if self._created and {p.name for p in self.folder.iterdir()} <= {LOCK_FILE}:
            # a folder this run made and then wrote nothing into (it stopped at a check): leave no trace
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
            self.folder.rmdir()

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

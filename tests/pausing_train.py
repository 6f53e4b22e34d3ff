"""``scripts/train.py`` that holds still at one optimizer step, so that a test can signal or kill it there.

    python tests/pausing_train.py PAUSE_AT_STEP READY_FILE [scripts/train.py arguments ...]

At the end of optimizer step ``PAUSE_AT_STEP`` it writes its process id to ``READY_FILE`` (``READY_FILE.rank{N}``
under a launcher with several processes) and waits until the test deletes that file (at most 120 s), then trains
on. Everything else -- argument handling, signal handling, checkpoints, exit status --
is the real script's: its ``main`` runs under ``run_cli`` exactly as ``python scripts/train.py`` does.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from coupled_adam_hf.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


class PauseAtStep(TrainerCallback):
    def __init__(self, step: int, ready_file: Path):
        self.step = step
        self.ready_file = ready_file

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.ready_file.write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while self.ready_file.exists() and time.monotonic() < deadline:
                time.sleep(0.02)  # a signal's Python handler runs here, in the main thread


def main() -> None:
    pause_at, ready_file, *train_argv = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_script
    spec.loader.exec_module(train_script)

    class PausingTrainer(train_script.CoupledAdamTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            several = int(os.environ.get("WORLD_SIZE", "1")) > 1
            ready = Path(f"{ready_file}.rank{os.environ['RANK']}" if several else ready_file)
            self.add_callback(PauseAtStep(int(pause_at), ready))

    train_script.CoupledAdamTrainer = PausingTrainer
    run_cli(lambda: train_script.main(train_argv), prog="train.py")


if __name__ == "__main__":
    main()

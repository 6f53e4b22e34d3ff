"""Every ``TrainerCallback`` of the project, usable with any ``transformers.Trainer`` (and TRL's trainers).

- :class:`EmbeddingIsotropyCallback`: Iso, ``||mu||^r`` and the average cosine of the embeddings, logged through
  ``Trainer.log`` every N optimizer steps;
- :class:`SaveOnSignalCallback`: SIGINT/SIGTERM save a checkpoint at the end of the step and stop;
- :class:`GradientValueClippingCallback`: clip every gradient element before the optimizer step.

How the isotropy values reach the logs: a callback's ``on_log`` sees Trainer's log dict only after the
``report_to`` integrations have already written it (they come first in the callback list), and
``state.log_history`` holds a copy made before any ``on_log``. So the callback calls ``Trainer.log`` itself -- the
one entry point that appends to ``state.log_history`` (hence ``trainer_state.json``) and dispatches ``on_log`` to
every integration (TensorBoard, W&B, MLflow, ... under ``train/embeddings/iso``). Callbacks are not handed their
trainer by ``transformers``, so the trainer is handed over: :class:`coupled_adam_hf.CoupledAdamTrainer` binds
every ``EmbeddingIsotropyCallback`` it holds; with another trainer, :func:`add_isotropy_logging` (or
``callback.bind(trainer)``) does. Trainer's ``on_log`` dispatch resets ``control.should_log``; the callback restores
it, so Trainer's own loss logging at the same step is unaffected.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .metrics import quick_isotropy
from .partition import model_embeddings

__all__ = ["EmbeddingIsotropyCallback", "GradientValueClippingCallback", "SaveOnSignalCallback",
           "add_isotropy_logging"]

logger = logging.getLogger(__name__)


def _embedding_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{"embeddings": input weight, "output_embeddings": output weight if it is another tensor}``."""
    prefixes = {"token": "embeddings", "output": "output_embeddings"}
    return {prefixes[e.kind]: e.weight for e in model_embeddings(model, ("token", "output"))}


class EmbeddingIsotropyCallback(TrainerCallback):
    """Log Iso, ``||mu||^r`` and the average cosine of the embeddings every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: measurement interval in optimizer steps (``state.global_step``).
        log_first_and_last: also measure before the first step of a fresh run and after the last step, so curves
            start at the initialisation and end at the final weights.

    Keys: ``embeddings/iso``, ``embeddings/mean_norm_ratio``, ``embeddings/avg_cosine`` for the input embedding;
    ``output_embeddings/...`` for an untied LM head. They appear in ``state.log_history`` as their own entries
    (with ``step`` and ``epoch``), in every ``report_to`` integration and in the progress-bar printout.

    Cost: one ``[H, H]`` float64 Gram matrix, one ``eigh`` and one ``[V, H] x [H, H]`` product per measured matrix,
    on the weight's own device: ``O(V H^2)``, small next to a training step's ``O(tokens x params)`` at the default
    interval. ``seconds_spent`` and ``calls`` record what it cost in this process. Measured on the main process only; a row-sharded (DTensor)
    weight is gathered on every rank first, as that is a collective.
    """

    def __init__(self, every_n_steps: int = 100, *, log_first_and_last: bool = True, trainer: Trainer | None = None):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.log_first_and_last = log_first_and_last
        self.seconds_spent = 0.0
        self.calls = 0
        self._trainer: weakref.ReferenceType[Trainer] | None = None
        self._last_logged_step: int | None = None
        self._warned = False
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer: Trainer) -> EmbeddingIsotropyCallback:
        """Log through ``trainer.log`` (held weakly). ``CoupledAdamTrainer`` binds its callbacks itself."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"EmbeddingIsotropyCallback.bind needs a transformers.Trainer, got {type(trainer).__name__}")
        self._trainer = weakref.ref(trainer)
        return self

    # ------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any):
        self._last_logged_step = None
        if self.log_first_and_last and state.global_step == 0:
            self._measure_and_log(state, control, model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any):
        due = state.global_step % self.every_n_steps == 0
        last = self.log_first_and_last and state.max_steps > 0 and state.global_step >= state.max_steps
        if due or last:
            self._measure_and_log(state, control, model)

    # ------------------------------------------------------------------------------------------- work
    def measure(self, model: nn.Module) -> dict[str, float]:
        """The logged values for ``model`` now, ``{"embeddings/iso": ..., ...}`` (gathers DTensor weights)."""
        values: dict[str, float] = {}
        for prefix, weight in _embedding_weights(model).items():
            for key, value in quick_isotropy(weight).items():
                values[f"{prefix}/{key}"] = value
        return values

    def _measure_and_log(self, state: TrainerState, control: TrainerControl, model: nn.Module | None) -> None:
        if model is None or self._last_logged_step == state.global_step:
            return
        weights = _embedding_weights(model)
        if not weights:
            self._warn_once(f"{type(model).__name__} has no get_input_embeddings(): nothing to measure")
            return
        if any(hasattr(w, "full_tensor") for w in weights.values()) or state.is_world_process_zero:
            start = time.perf_counter()
            values = self.measure(model)  # every rank joins the gather of sharded weights
            self.seconds_spent += time.perf_counter() - start
            self.calls += 1
        if not state.is_world_process_zero:
            return
        self._last_logged_step = state.global_step
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            self._warn_once("EmbeddingIsotropyCallback was not called from a transformers.Trainer bound to it: its "
                            "values go to state.log_history only, not to the report_to integrations; hand the "
                            "trainer over with callback.bind(trainer) or add_isotropy_logging(trainer)")
            state.log_history.append({**values, "step": state.global_step})
            return
        should_log = control.should_log
        trainer.log(values)
        control.should_log = should_log  # Trainer's on_log dispatch cleared it; its own loss log may be due

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            logger.warning(message)
            self._warned = True


def add_isotropy_logging(trainer: Trainer, every_n_steps: int = 100, **kwargs: Any) -> EmbeddingIsotropyCallback:
    """Add an :class:`EmbeddingIsotropyCallback` bound to ``trainer`` (any ``transformers.Trainer``) and return it;
    one that the trainer already holds is bound and returned instead of adding a second."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, EmbeddingIsotropyCallback):
            return callback.bind(trainer)
    callback = EmbeddingIsotropyCallback(every_n_steps, trainer=trainer, **kwargs)
    trainer.add_callback(callback)
    return callback


class GradientValueClippingCallback(TrainerCallback):
    """Clip every gradient element to ``[-max_value, max_value]`` right before the optimizer step.

    ``Trainer`` calls ``on_pre_optimizer_step`` after its clipping by norm, when the gradients are accumulated,
    reduced over data-parallel ranks and unscaled (the norm computation unscales fp16 gradients).
    """

    def __init__(self, max_value: float):
        if not max_value > 0:
            raise ValueError(f"max_value must be > 0, got {max_value}")
        self.max_value = float(max_value)

    def on_pre_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            return
        torch.nn.utils.clip_grad_value_(model.parameters(), self.max_value)


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

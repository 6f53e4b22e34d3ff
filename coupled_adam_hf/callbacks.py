"""Training-time monitoring of embedding isotropy, through ``Trainer``'s own log stream.

:class:`EmbeddingIsotropyCallback` works with any ``transformers.Trainer`` (and subclasses such as
:class:`coupled_adam_hf.CoupledAdamTrainer` or TRL's trainers)::

    trainer = Trainer(model, args, train_dataset=..., callbacks=[EmbeddingIsotropyCallback(every_n_steps=100)])

Every ``every_n_steps`` optimizer steps (and before the first and after the last step) it measures
:func:`coupled_adam_hf.metrics.quick_isotropy` of ``model.get_input_embeddings().weight`` -- and of the output
embedding when it is a different tensor -- and logs ``embeddings/iso``, ``embeddings/mean_norm_ratio``,
``embeddings/avg_cosine`` (``output_embeddings/...`` for an untied head).

How the values reach the logs: a callback's ``on_log`` sees Trainer's log dict only after the ``report_to``
integrations have already written it (they come first in the callback list), and ``state.log_history`` holds a
copy made before any ``on_log``. So the callback calls ``Trainer.log`` itself -- the one entry point that appends to
``state.log_history`` (hence ``trainer_state.json``) and dispatches ``on_log`` to every integration (TensorBoard,
W&B, MLflow, ... under ``train/embeddings/iso``). Callbacks are not handed the trainer, so the callback finds it
once per ``train()`` call on the call stack of ``on_train_begin`` (``Trainer`` calls its callback handler from its
own methods). Trainer's ``on_log`` dispatch resets ``control.should_log``; the callback restores it, so Trainer's
own loss logging at the same step is unaffected.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from typing import Any

from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .metrics import quick_isotropy

__all__ = ["EmbeddingIsotropyCallback"]

logger = logging.getLogger(__name__)


def _find_calling_trainer(max_depth: int = 30) -> Trainer | None:
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    while not hasattr(model, "get_input_embeddings") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DDP / DataParallel / other wrappers
    return model


def _embedding_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{"embeddings": input weight, "output_embeddings": output weight if it is another tensor}``."""
    weights: dict[str, Tensor] = {}
    model = _unwrap(model)
    for prefix, getter in (("embeddings", "get_input_embeddings"), ("output_embeddings", "get_output_embeddings")):
        get = getattr(model, getter, None)
        try:
            module = get() if get is not None else None
        except (NotImplementedError, AttributeError):
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 2 and not any(weight is w for w in weights.values()):
            weights[prefix] = weight
    return weights


class EmbeddingIsotropyCallback(TrainerCallback):
    """Log Iso, ``||mu||^r`` and the average cosine of the embeddings every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: measurement interval in optimizer steps (``state.global_step``).
        log_first_and_last: also measure before the first step of a fresh run and after the last step, so curves
            start at the initialisation and end at the final weights.

    Keys: ``embeddings/iso``, ``embeddings/mean_norm_ratio``, ``embeddings/avg_cosine`` for the input embedding;
    ``output_embeddings/...`` for an untied LM head. They appear in ``state.log_history`` as their own entries
    (with ``step`` and ``epoch``), in every ``report_to`` integration and in the progress-bar printout.

    Cost: one ``[H, H]`` float64 Gram matrix, one ``eigh`` and one ``[V, H] x [H, H]`` product per measured matrix
    (for GPT-2's ``50304 x 768``: about a second on 2 CPU cores, milliseconds on a GPU). ``seconds_spent`` and
    ``calls`` record what it cost in this process. Measured on the main process only; a row-sharded (DTensor)
    weight is gathered on every rank first, as that is a collective.
    """

    def __init__(self, every_n_steps: int = 100, *, log_first_and_last: bool = True):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.log_first_and_last = log_first_and_last
        self.seconds_spent = 0.0
        self.calls = 0
        self._trainer: weakref.ReferenceType[Trainer] | None = None
        self._last_logged_step: int | None = None
        self._warned = False

    # ------------------------------------------------------------------------------------------- events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any):
        trainer = _find_calling_trainer()
        self._trainer = weakref.ref(trainer) if trainer is not None else None
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
            self._warn_once("EmbeddingIsotropyCallback was not called from a transformers.Trainer: its values go to "
                            "state.log_history only, not to the report_to integrations")
            state.log_history.append({**values, "step": state.global_step})
            return
        should_log = control.should_log
        trainer.log(values)
        control.should_log = should_log  # Trainer's on_log dispatch cleared it; its own loss log may be due

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            logger.warning(message)
            self._warned = True

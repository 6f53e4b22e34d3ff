"""``Trainer`` with ``optim="coupled_adam"``: wires :func:`partition_parameters` to :class:`CoupledAdam`.

With ``optim="coupled_adam"`` the optimizer gets three param groups: the coupled embeddings (``coupled=True``,
weight decay ``coupled_weight_decay``), the decayed matrices (``weight_decay``) and the biases and norms (no
decay), split by ``Trainer.get_decay_parameter_names``. With any other ``optim`` the trainer is ``Trainer``, unless
``baseline_grouping=True`` asks for the same three groups, uncoupled (the paper's AdamW baseline).

The optimizer is built by :meth:`coupled_adam_hf.CoupledAdamFactory.build` with the keywords
:func:`coupled_adam_hf.factory.coupled_adam_kwargs` reads from the arguments: the code path of the factory protocol
and of a plain ``Trainer`` with ``optim="coupled_adam"``. This class adds the decay rule of
``self.get_decay_parameter_names`` (a subclass may override it), the parallelism refusal at construction, the
coupling log and the callbacks below.

Everything else (gradient accumulation, clipping by norm, mixed precision, DDP, checkpoints, schedulers, logging)
is ``Trainer``'s own. With :class:`~coupled_adam_hf.CoupledAdamTrainingArguments` the trainer adds two callbacks of
``coupled_adam_hf.callbacks``: clipping by value (``max_grad_value``) and, when ``isotropy_logging_steps > 0``,
``EmbeddingIsotropyCallback`` (bound to this trainer); and, with ``stop_on_nonfinite_loss`` (the default), a stop
with :class:`coupled_adam_hf.reliability.NonFiniteTrainingError` when a training loss is NaN/inf (before that
step's update) or when weights about to be saved are not finite. With plain ``TrainingArguments`` it is ``Trainer``
(with ``optim="coupled_adam"``, registered, the coupling options come from ``--optim_args``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_optimizer import is_optimizer_factory

from .callbacks import EmbeddingIsotropyCallback, GradientValueClippingCallback
from .checkpointing import AtomicCheckpointMixin
from .distributed import check_supported_parallelism
from .factory import CoupledAdamFactory, coupled_adam_kwargs, describe_coupling, log_info
from .optimizer import CoupledAdam
from .partition import (DEFAULT_TARGETS, EmbeddingParameter, find_coupled_parameters, parse_targets,
                        partition_parameters)
from .reliability import NonFiniteTrainingError, nonfinite_parameters
from .training_args import COUPLED_ADAM, CoupledAdamTrainingArguments

__all__ = ["CoupledAdamTrainer"]

logger = logging.getLogger(__name__)


class CoupledAdamTrainer(AtomicCheckpointMixin, Trainer):
    """A ``Trainer`` that builds :class:`CoupledAdam` for ``args.optim == "coupled_adam"``.

    Args are those of ``Trainer``; the coupling options are read from
    :class:`coupled_adam_hf.CoupledAdamTrainingArguments` (with plain ``TrainingArguments`` it is ``Trainer``:
    ``self.coupling`` is then None).

    After ``create_optimizer()``, ``self.coupled_parameters`` lists what is coupled (name, shape, role); the list is
    logged once, on the main process, at INFO level (like ``Trainer``'s own start-of-training lines).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: the typed coupling options, or None for plain TrainingArguments (then nothing of this class applies)
        self.coupling: CoupledAdamTrainingArguments | None = (
            self.args if isinstance(self.args, CoupledAdamTrainingArguments) else None)
        self.coupled_parameters: list[EmbeddingParameter] = []
        self._coupling_logged = False
        for callback in self._coupling_callbacks():
            self.add_callback(callback)
        if self.uses_coupled_adam:
            self.check_sharding_supported()

    # ------------------------------------------------------------------ options
    @property
    def uses_coupled_adam(self) -> bool:
        return self.args.optim == COUPLED_ADAM and self.optimizer_cls_and_kwargs is None

    @property
    def coupled_targets(self) -> tuple[str, ...]:
        if self.coupling is not None:
            return self.coupling.coupled_target_list
        if self.uses_coupled_adam:  # plain TrainingArguments with coupled_adam registered: --optim_args
            return parse_targets(coupled_adam_kwargs(self.args).get("coupled_targets", ",".join(DEFAULT_TARGETS)))
        return ()

    def _coupling_callbacks(self) -> list[TrainerCallback]:
        for callback in self.callback_handler.callbacks:  # a user's own: hand this trainer over
            if isinstance(callback, EmbeddingIsotropyCallback):
                callback.bind(self)
        if self.coupling is None:
            return []
        callbacks: list[TrainerCallback] = []
        if self.coupling.max_grad_value is not None:
            callbacks.append(GradientValueClippingCallback(self.coupling.max_grad_value))
        every = self.coupling.isotropy_logging_steps
        present = self.callback_handler.callbacks
        if every > 0 and not any(isinstance(c, EmbeddingIsotropyCallback) for c in present):
            callbacks.append(EmbeddingIsotropyCallback(every_n_steps=every, trainer=self))
        return callbacks

    # ------------------------------------------------------------------ distributed support
    def check_sharding_supported(self) -> None:
        """Refuse setups in which the coupled mean over an embedding's rows cannot be taken, before step 1 (see
        :func:`coupled_adam_hf.distributed.check_supported_parallelism`)."""
        check_supported_parallelism(self.accelerator, self.args, model=self.model,
                                    deepspeed_enabled=self.is_deepspeed_enabled, fsdp_enabled=self.is_fsdp_enabled)

    # ------------------------------------------------------------------ divergence
    @property
    def _stops_on_nonfinite(self) -> bool:
        return self.coupling is not None and self.coupling.stop_on_nonfinite_loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One host sync per micro-batch, as Trainer's own logging_nan_inf_filter check costs. Raising here keeps
        # the NaN step's update out of the weights; Trainer would otherwise step on NaN gradients and save them.
        if self._stops_on_nonfinite and not bool(torch.isfinite(loss.detach()).all()):
            step = self.state.global_step + 1
            raise NonFiniteTrainingError(
                f"the training loss became {loss.detach().float().mean().item()} at optimizer step {step} of "
                f"{self.state.max_steps}; training stopped before that step's update, so nothing was saved after "
                f"step {step - 1}",
                step=step,
                what="loss",
            )
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Checkpoints go through here first (Trainer._save_checkpoint), so non-finite weights never reach disk and
        # checkpoint rotation never deletes a good checkpoint to make room for a diverged one.
        if self._stops_on_nonfinite and self.model is not None:
            broken = nonfinite_parameters(self.model.named_parameters())
            if broken:
                raise NonFiniteTrainingError(
                    f"weights {', '.join(broken)} hold NaN/inf at optimizer step {self.state.global_step}; not "
                    f"saving them to {output_dir or self.args.output_dir}",
                    step=self.state.global_step,
                    what="weights",
                )
        super().save_model(output_dir, _internal_call)

    # ------------------------------------------------------------------ optimizer
    def coupled_param_groups(self, model: nn.Module, coupled: bool = True) -> list[dict[str, Any]]:
        """The three param groups (see :func:`coupled_adam_hf.partition_parameters`) with this run's options."""
        return partition_parameters(
            model,
            self.coupled_targets,
            weight_decay=self.args.weight_decay,
            coupled_weight_decay=self.coupling.coupled_weight_decay if self.coupling is not None else 0.0,
            decay_parameter_names=self.get_decay_parameter_names(model),
            coupled=coupled,
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.uses_coupled_adam:
            self.check_sharding_supported()
            self.optimizer = self._create_coupled_adam(opt_model)
        elif self.coupling is not None and self.coupling.baseline_grouping:
            self.optimizer = self._create_baseline_optimizer(opt_model)
        else:
            return super().create_optimizer(model)
        self.coupled_parameters = find_coupled_parameters(opt_model, self.coupled_targets)
        self._log_coupling(opt_model)
        return self.optimizer

    def _create_coupled_adam(self, model: nn.Module) -> CoupledAdam:
        kwargs = coupled_adam_kwargs(self.args)
        return CoupledAdamFactory().build(model, decay_parameter_names=self.get_decay_parameter_names(model), **kwargs)

    def _create_baseline_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        builds_own_groups = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if is_optimizer_factory(optimizer_cls) or builds_own_groups:
            raise ValueError(
                f"--baseline_grouping needs an optimizer that takes param groups; optim={self.args.optim!r} builds "
                "its own. Use it with adamw_torch, adamw_torch_fused, sgd, adafactor and the like."
            )
        groups = [{k: v for k, v in g.items() if k != "coupled"} for g in self.coupled_param_groups(model, False)]
        return optimizer_cls(groups, **optimizer_kwargs)

    def _log_coupling(self, model: nn.Module) -> None:
        if self._coupling_logged or not self.is_world_process_zero():
            return
        self._coupling_logged = True
        coupled_weight_decay = (self.coupling.coupled_weight_decay if self.coupling is not None else
                                coupled_adam_kwargs(self.args).get("coupled_weight_decay", 0.0))
        log_info(logger, describe_coupling(self.optimizer, model, self.coupled_parameters,
                                           coupled_weight_decay=coupled_weight_decay,
                                           baseline=not self.uses_coupled_adam))

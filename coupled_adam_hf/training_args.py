"""``TrainingArguments`` that know ``--optim coupled_adam`` and the coupling options.

``TrainingArguments.optim`` is typed with the enum ``OptimizerNames``: ``HfArgumentParser`` turns an enum field
into an argparse ``choices`` list, and ``__post_init__`` converts the value with ``OptimizerNames(...)``. Importing
this module registers ``coupled_adam`` with transformers (:mod:`coupled_adam_hf.registration`, the same registration
as :func:`coupled_adam_hf.register_with_transformers`): ``OptimizerNames.COUPLED_ADAM`` becomes a member, so
``--help`` lists ``coupled_adam``, a typo fails at parse time with the choices, and ``coupled_adam`` ends up as an
``OptimizerNames`` member like every built-in name (a ``str`` enum: ``args.optim == "coupled_adam"``; ``to_dict()``
writes ``"coupled_adam"``). This class adds typed ``--coupled_*`` flags for the coupling options that plain
``TrainingArguments`` take in ``--optim_args``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from .factory import OPTIM_ARGS, parse_optim_args
from .partition import DEFAULT_TARGETS, TARGET_KINDS, parse_targets
from .registration import COUPLED_ADAM, register_with_transformers

__all__ = ["COUPLED_ADAM", "CoupledAdamOptimizerNames", "CoupledAdamTrainingArguments", "COUPLED_ADAM_OPTIM_ARGS"]

register_with_transformers()  # (so a plain Trainer given these arguments builds CoupledAdam too)

#: ``OptimizerNames`` with ``coupled_adam`` registered (the name this module used for its own enum before).
CoupledAdamOptimizerNames = OptimizerNames

#: Keys ``--optim_args`` accepts with ``coupled_adam`` here, each with the values it takes (the other coupling
#: options are flags of their own).
COUPLED_ADAM_OPTIM_ARGS: dict[str, tuple[str, ...]] = {
    key: tuple(OPTIM_ARGS[key][0].split("|")) for key in ("amsgrad", "maximize", "foreach", "fused", "state_dtype")
}

_TARGETS_HELP = (
    "Which embeddings Coupled Adam couples (comma-separated): "
    f"{', '.join(TARGET_KINDS)} (keywords: input embeddings, LM head - coupled once when tied -, learned "
    "absolute position embeddings, BERT segment embeddings), 'all', 'none', or fnmatch patterns on module or "
    "parameter names such as '*.embed_positions'. Rotary models simply have no position embeddings. The paper "
    "couples only the tied token embedding: 'token'."
)


@dataclass
class CoupledAdamTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``optim="coupled_adam"`` and the options of the coupled parameter group.

    Use with :class:`coupled_adam_hf.CoupledAdamTrainer`. With ``optim="coupled_adam"`` the optimizer is
    :class:`coupled_adam_hf.CoupledAdam` with the groups of :func:`coupled_adam_hf.partition_parameters`; with any
    other ``optim`` training is plain ``Trainer`` (unless ``baseline_grouping``).
    """

    optim: OptimizerNames | str = field(
        default=TrainingArguments.default_optim,
        metadata={
            "help": "The optimizer to use: 'coupled_adam' (Coupled Adam on the embeddings named by "
            "--coupled_targets, AdamW elsewhere) or any optimizer of transformers' OptimizerNames."
        },
    )
    coupled_targets: str = field(default=",".join(DEFAULT_TARGETS), metadata={"help": _TARGETS_HELP})
    coupled_weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "Decoupled weight decay of the coupled embedding group (the paper: 0.0 for the embeddings; "
            "--weight_decay applies to the other matrices)."
        },
    )
    coupled_avg_scale: float = field(
        default=1.0,
        metadata={
            "help": "The paper's scaled variant: the coupled second moment is multiplied by this factor, so the "
            "embedding step shrinks by 1/sqrt(factor). 1.0 is plain Coupled Adam."
        },
    )
    coupled_update: Literal["adam", "sgd"] = field(
        default="adam",
        metadata={
            "help": "Update rule of the --coupled_targets group with optim=coupled_adam: 'adam' (Coupled Adam) or "
            "'sgd' (plain SGD, momentum 0, at --coupled_lr_factor x --learning_rate; every other parameter AdamW, "
            "in one optimizer: the paper's §6.2 ablation)."
        },
    )
    coupled_lr_factor: float = field(
        default=1.0,
        metadata={
            "help": "The --coupled_targets group's learning rate is this factor x --learning_rate (scheduled like "
            "every group). The paper's SGD ablation uses 100 ... 600 with --coupled_update sgd."
        },
    )
    coupled_compact_state: bool = field(
        default=True,
        metadata={
            "help": "Store the coupled second moment as one value per hidden dim ([1, H], saves V*H floats per "
            "coupled matrix) instead of per element ([V, H], as the paper's code). Same updates up to rounding."
        },
    )
    coupled_nonfinite: Literal["skip", "raise", "ignore"] = field(
        default="skip",
        metadata={
            "help": "What Coupled Adam does when a coupled gradient holds inf/NaN (which the shared mean would "
            "spread to every row): skip the step with a warning, raise, or ignore (no check)."
        },
    )
    baseline_grouping: bool = field(
        default=False,
        metadata={
            "help": "With an optim other than coupled_adam: give the --coupled_targets embeddings a group of their "
            "own with --coupled_weight_decay, exactly the groups coupled_adam uses but uncoupled. That is the "
            "paper's AdamW baseline (embedding decay 0). Default: Trainer's own grouping."
        },
    )
    max_grad_value: float | None = field(
        default=None,
        metadata={
            "help": "Clip every gradient element to [-v, v] before each optimizer step (after the clipping by "
            "norm of --max_grad_norm, on unscaled gradients). Default: no clipping by value."
        },
    )
    isotropy_logging_steps: int = field(
        default=100,
        metadata={
            "help": "Log the isotropy of the embeddings every N optimizer steps (EmbeddingIsotropyCallback); "
            "0 disables it."
        },
    )
    stop_on_nonfinite_loss: bool = field(
        default=True,
        metadata={
            "help": "Stop training with an error naming the step when a training loss is NaN/inf (before that "
            "step's update), and refuse to save non-finite weights, so no checkpoint written after a divergence "
            "replaces good ones (CoupledAdamTrainer)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "scripts/train.py: train from scratch into an --output_dir that already holds a run (its "
            "checkpoint-* folders are deleted first). Without it, a folder with an unfinished run is resumed from "
            "its last checkpoint and a folder with a finished run is refused."
        },
    )

    def __post_init__(self):
        if isinstance(self.coupled_targets, (list, tuple)):  # a YAML/JSON list
            self.coupled_targets = ",".join(str(t) for t in self.coupled_targets)
        # Unknown names fail in the base class with the full list of choices (ExplicitEnum's message).
        super().__post_init__()
        self._validate_numbers()
        self._validate_coupling()

    @property
    def uses_coupled_adam(self) -> bool:
        return self.optim == COUPLED_ADAM

    @property
    def coupled_target_list(self) -> tuple[str, ...]:
        """``coupled_targets`` parsed: keywords and patterns, ``()`` for none."""
        return parse_targets(self.coupled_targets)

    def _validate_numbers(self) -> None:
        """Ranges ``TrainingArguments`` leaves to the optimizer or the first step, checked before anything runs
        (so that a script fails in one line before it writes anything)."""
        for flag, value, minimum in (
            ("--per_device_train_batch_size", self.per_device_train_batch_size, 1),
            ("--per_device_eval_batch_size", self.per_device_eval_batch_size, 1),
            ("--gradient_accumulation_steps", self.gradient_accumulation_steps, 1),
            ("--learning_rate", self.learning_rate, 0.0),
            ("--weight_decay", self.weight_decay, 0.0),
            ("--adam_epsilon", self.adam_epsilon, 0.0),
            ("--warmup_steps", self.warmup_steps, 0),
            ("--dataloader_num_workers", self.dataloader_num_workers, 0),
        ):
            if value is None or not value >= minimum:  # (also NaN)
                raise ValueError(f"{flag} must be >= {minimum}, got {value}")
        for flag, value in (("--learning_rate", self.learning_rate), ("--weight_decay", self.weight_decay),
                            ("--adam_epsilon", self.adam_epsilon), ("--max_grad_norm", self.max_grad_norm),
                            ("--num_train_epochs", self.num_train_epochs)):
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
        for flag, value in (("--adam_beta1", self.adam_beta1), ("--adam_beta2", self.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be > 0 (or -1: train for --num_train_epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.do_train and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs must be > 0 without --max_steps, got {self.num_train_epochs}")
        for flag, value in (("--seed", self.seed), ("--data_seed", self.data_seed)):
            if value is not None and not 0 <= value < 2**32:  # numpy's seed range
                raise ValueError(f"{flag} must be in [0, 2**32), got {value}")

    def _validate_coupling(self) -> None:
        try:
            self.coupled_target_list  # noqa: B018 - parse for its errors
        except (TypeError, ValueError) as error:
            raise ValueError(f"--coupled_targets {self.coupled_targets!r}: {error}") from None
        if not self.coupled_weight_decay >= 0.0:
            raise ValueError(f"--coupled_weight_decay must be >= 0, got {self.coupled_weight_decay}")
        if not self.coupled_avg_scale > 0.0:
            raise ValueError(f"--coupled_avg_scale must be > 0, got {self.coupled_avg_scale}")
        if self.coupled_update not in ("adam", "sgd"):
            raise ValueError(f"--coupled_update must be adam or sgd, got {self.coupled_update!r}")
        if not (self.coupled_lr_factor > 0.0 and self.coupled_lr_factor < float("inf")):
            raise ValueError(f"--coupled_lr_factor must be a finite number > 0, got {self.coupled_lr_factor}")
        if (self.coupled_update != "adam" or self.coupled_lr_factor != 1.0) and not self.uses_coupled_adam:
            raise ValueError("--coupled_update and --coupled_lr_factor need --optim coupled_adam (the update rule is "
                             f"a param group of CoupledAdam); got --optim {getattr(self.optim, 'value', self.optim)}")
        if self.coupled_nonfinite not in ("skip", "raise", "ignore"):
            raise ValueError(f"--coupled_nonfinite must be skip, raise or ignore, got {self.coupled_nonfinite!r}")
        if self.max_grad_value is not None and not self.max_grad_value > 0.0:
            raise ValueError(f"--max_grad_value must be > 0 (or left unset), got {self.max_grad_value}")
        if self.isotropy_logging_steps < 0:
            raise ValueError(f"--isotropy_logging_steps must be >= 0 (0 disables), got {self.isotropy_logging_steps}")
        if self.uses_coupled_adam:
            self.coupled_adam_optim_kwargs()  # parse --optim_args for its errors

    def coupled_adam_optim_kwargs(self) -> dict[str, Any]:
        """``--optim_args`` for coupled_adam, e.g. ``"amsgrad=true,state_dtype=float32"``, as constructor kwargs."""
        return parse_optim_args(self.optim_args, tuple(COUPLED_ADAM_OPTIM_ARGS),
                                note="; the coupling has flags of its own: --coupled_targets, "
                                "--coupled_weight_decay, --coupled_avg_scale, ...")

    def coupled_adam_options(self) -> dict[str, Any]:
        """The keywords of :class:`coupled_adam_hf.CoupledAdamFactory` these arguments choose (besides lr, betas,
        eps and weight decay)."""
        return dict(
            coupled_targets=self.coupled_target_list,
            coupled_weight_decay=self.coupled_weight_decay,
            avg_scale=self.coupled_avg_scale,
            compact=self.coupled_compact_state,
            nonfinite=self.coupled_nonfinite,
            coupled_update=self.coupled_update,
            coupled_lr_factor=self.coupled_lr_factor,
            **self.coupled_adam_optim_kwargs(),
        )

    def set_optimizer(self, name: str = "adamw_torch", *args, **kwargs):
        """``TrainingArguments.set_optimizer``, which takes ``name="coupled_adam"`` (registered), plus the checks of
        the coupling options."""
        super().set_optimizer(name, *args, **kwargs)
        if self.uses_coupled_adam:
            self._validate_coupling()
        return self

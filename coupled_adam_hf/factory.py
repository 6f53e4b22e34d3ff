"""Coupled Adam for any ``transformers.Trainer`` (plain, a subclass, TRL's), through the optimizer-factory protocol.

transformers (5.2 and later) lets a trainer build its optimizer from ``Trainer(...,
optimizer_cls_and_kwargs=(factory, kwargs))``: when ``factory`` is not a ``torch.optim.Optimizer`` subclass,
``Trainer.create_optimizer`` calls ``factory()(model, **kwargs)`` (``transformers.trainer_optimizer.
is_optimizer_factory``). :class:`CoupledAdamFactory` follows that protocol and returns a
:class:`~coupled_adam_hf.CoupledAdam` with the automatic partition of :func:`~coupled_adam_hf.partition_parameters`
(coupled embeddings / decayed matrices / biases and norms, by Trainer's own decay rule)::

    from coupled_adam_hf import coupled_adam_optimizer
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      optimizer_cls_and_kwargs=coupled_adam_optimizer(args, coupled_targets="token,output"))

:func:`coupled_adam_optimizer` takes the learning rate, betas, eps and weight decay from the ``TrainingArguments``
(so Trainer's scheduler and logging see the same numbers) and the coupling options as keywords.

This module is the one place that turns options into a ``CoupledAdam``: ``CoupledAdamTrainer``, the
``optim="coupled_adam"`` handler of :mod:`coupled_adam_hf.registration` and the factory protocol all end in
:meth:`CoupledAdamFactory.build`. The same options also travel as text in ``--optim_args``
(:func:`parse_optim_args`), where values cannot hold commas: targets are joined with ``+``
(``coupled_targets=token+output``).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .optimizer import CoupledAdam
from .partition import DEFAULT_TARGETS, EmbeddingParameter, find_coupled_parameters, parse_targets, partition_parameters

__all__ = ["CoupledAdamFactory", "OPTIM_ARGS", "coupled_adam_kwargs", "coupled_adam_optimizer", "coupling_options",
           "describe_coupling", "parse_optim_args"]

logger = logging.getLogger(__name__)


class CoupledAdamFactory:
    """``CoupledAdamFactory()(model, **kwargs)``: a :class:`CoupledAdam` over ``model``'s trainable parameters.

    Keywords: the optimizer's ``lr``, ``betas``, ``eps``, ``weight_decay`` (of the decayed matrices), ``amsgrad``,
    ``maximize``, ``foreach``, ``fused``, ``state_dtype``, ``nonfinite``, and the coupling: ``coupled_targets``
    (default ``token,output,position``; see :func:`~coupled_adam_hf.partition.parse_targets`),
    ``coupled_weight_decay`` (default 0, as the paper), ``avg_scale``, ``compact``; the paper's §6.2 ablation:
    ``coupled_update="sgd"`` with ``coupled_lr_factor``; ``decay_parameter_names`` (default: Trainer's rule).

    Calling the factory also logs what it couples once, at INFO level, on the main process (as ``Trainer`` logs its
    own start of training); :meth:`build` builds without logging.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> CoupledAdam:
        optimizer = self.build(model, **kwargs)
        if _is_main_process():
            coupled = find_coupled_parameters(model, kwargs.get("coupled_targets", DEFAULT_TARGETS))
            log_info(logger, describe_coupling(optimizer, model, coupled,
                                               coupled_weight_decay=kwargs.get("coupled_weight_decay", 0.0)))
        return optimizer

    def build(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        coupled_targets: str | Sequence[str] | None = DEFAULT_TARGETS,
        coupled_weight_decay: float = 0.0,
        avg_scale: float = 1.0,
        compact: bool = True,
        nonfinite: str = "skip",
        state_dtype: torch.dtype | str | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        coupled_update: str = "adam",
        coupled_lr_factor: float = 1.0,
        decay_parameter_names: Iterable[str] | None = None,
    ) -> CoupledAdam:
        from .distributed import check_supported_parallelism

        # Refuse FSDP1 / DeepSpeed / Megatron before any state exists: they hand the optimizer flattened shards,
        # on which the mean over an embedding's rows is not the coupled mean.
        check_supported_parallelism(_accelerate_state(), model=model)
        groups = partition_parameters(model, coupled_targets, weight_decay=weight_decay,
                                      coupled_weight_decay=coupled_weight_decay,
                                      decay_parameter_names=decay_parameter_names)
        for group in groups:
            if group["coupled"]:
                # the paper's §6.2 ablation: SGD on the embeddings at factor x lr; Trainer's scheduler scales every
                # group's initial_lr, so this group is warmed up and decayed like the others
                group["lr"] = coupled_lr_factor * lr
                if coupled_update == "sgd":
                    group.update(coupled=False, update="sgd")
        return CoupledAdam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                           avg_scale=avg_scale, compact=compact, nonfinite=nonfinite, state_dtype=state_dtype,
                           amsgrad=amsgrad, maximize=maximize, foreach=foreach, fused=fused)


#: Keywords the factory takes beyond what the TrainingArguments give.
_COUPLING_KEYS = tuple(name for name in inspect.signature(CoupledAdamFactory.build).parameters
                       if name not in ("self", "model", "lr", "betas", "eps", "weight_decay"))


def coupled_adam_optimizer(args: Any, **coupling: Any) -> tuple[type[CoupledAdamFactory], dict[str, Any]]:
    """``(CoupledAdamFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` from a ``TrainingArguments``
    (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``) and the coupling options.

    Raises:
        TypeError: for a keyword the factory does not take, listing the ones it does (before any training).
        ValueError: for a parallel setup in ``args`` that Coupled Adam cannot serve (FSDP1, DeepSpeed).
        RuntimeError: for a transformers without the optimizer-factory protocol (before 5.2).
    """
    unknown = sorted(set(coupling) - set(_COUPLING_KEYS))
    if unknown:
        raise TypeError(f"coupled_adam_optimizer: unknown option(s) {unknown}; the coupling options are "
                        f"{', '.join(_COUPLING_KEYS)} (lr, betas, eps and weight decay come from the "
                        "TrainingArguments)")
    _check_factory_protocol()
    from .distributed import check_supported_parallelism

    check_supported_parallelism(None, args)
    return CoupledAdamFactory, _factory_kwargs(args, coupling)


def coupled_adam_kwargs(args: Any) -> dict[str, Any]:
    """The factory's keywords for ``TrainingArguments`` with ``optim="coupled_adam"``: the optimizer numbers of
    ``args`` and :func:`coupling_options`."""
    return _factory_kwargs(args, coupling_options(args))


def coupling_options(args: Any) -> dict[str, Any]:
    """The coupling options of ``TrainingArguments`` with ``optim="coupled_adam"``: ``--optim_args`` parsed -- or,
    for a :class:`~coupled_adam_hf.CoupledAdamTrainingArguments`, its ``--coupled_*`` flags (plus the few keys its
    ``--optim_args`` takes).

    Raises:
        ValueError: for a bad ``--optim_args`` (one line listing the accepted keys).
    """
    typed = getattr(args, "coupled_adam_options", None)  # CoupledAdamTrainingArguments
    return typed() if typed is not None else parse_optim_args(args.optim_args)


def _factory_kwargs(args: Any, coupling: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.weight_decay)
    kwargs.update(coupling)
    return kwargs


# ---------------------------------------------------------------------------------------------- --optim_args
def _boolean(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError
    return text == "true"


def _number(minimum: float, *, above: bool) -> Callable[[str], float]:
    def convert(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise ValueError
        return value
    return convert


def _choice(*choices: str) -> Callable[[str], str | None]:
    def convert(text: str) -> str | None:
        if text not in choices:
            raise ValueError
        return None if text == "none" else text
    return convert


def _targets(text: str) -> str:
    targets = ",".join(text.split("+"))
    parse_targets(targets)  # its errors: 'none' mixed with others
    return targets


#: ``--optim_args`` keys for ``optim="coupled_adam"``: each key's accepted text (for the error message) and its
#: parser. Values cannot hold commas (transformers splits the string on them), so targets are joined with "+".
OPTIM_ARGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "coupled_targets": ("KIND+KIND+... (token, output, position, token_type, all, none, or fnmatch patterns)",
                        _targets),
    "coupled_weight_decay": ("NUMBER>=0", _number(0.0, above=False)),
    "avg_scale": ("NUMBER>0", _number(0.0, above=True)),
    "compact": ("true|false", _boolean),
    "nonfinite": ("skip|raise|ignore", _choice("skip", "raise", "ignore")),
    "coupled_update": ("adam|sgd", _choice("adam", "sgd")),
    "coupled_lr_factor": ("NUMBER>0", _number(0.0, above=True)),
    "amsgrad": ("true|false", _boolean),
    "maximize": ("true|false", _boolean),
    "foreach": ("true|false", _boolean),
    "fused": ("true|false", _boolean),
    "state_dtype": ("none|float32|float64", _choice("none", "float32", "float64")),
}


def parse_optim_args(text: str | None, keys: Sequence[str] = tuple(OPTIM_ARGS), *, note: str = "") -> dict[str, Any]:
    """``--optim_args`` text such as ``"coupled_targets=token+output,avg_scale=2"`` as factory keywords.

    Only ``keys`` are accepted (default: every key of :data:`OPTIM_ARGS`); keys and keyword values are
    case-insensitive, target patterns are kept verbatim.

    Raises:
        ValueError: one line naming the bad item and listing every accepted ``key=value`` (and ``note``).
    """
    if not text:
        return {}
    kwargs: dict[str, Any] = {}
    for item in text.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        key = key.lower()
        try:
            if not sep or key not in keys:
                raise ValueError
            kwargs[key] = OPTIM_ARGS[key][1](value if key == "coupled_targets" else value.lower())
        except (TypeError, ValueError):
            accepted = "; ".join(f"{k}={OPTIM_ARGS[k][0]}" for k in keys)
            raise ValueError(
                f"--optim_args {text!r}: {item!r} is not an option of coupled_adam, which accepts comma-separated "
                f"key=value pairs: {accepted} (betas, eps and lr have their own flags: --adam_beta1, --adam_beta2, "
                f"--adam_epsilon, --learning_rate{note})."
            ) from None
    return kwargs


# ---------------------------------------------------------------------------------------------- logging
def describe_coupling(optimizer: torch.optim.Optimizer, model: nn.Module, coupled: Sequence[EmbeddingParameter], *,
                      coupled_weight_decay: float, baseline: bool = False) -> str:
    """What the optimizer couples: how many tensors and parameters, then one line per tensor (name, tied names,
    role, shape). ``baseline``: the same groups, uncoupled (the paper's AdamW baseline)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    count = sum(e.numel for e in coupled)
    what = "groups (uncoupled baseline, same groups as coupled_adam)" if baseline else "couples"
    lines = [
        f"{type(optimizer).__name__} {what} {len(coupled)} embedding tensor(s), "
        f"{count:,} of {trainable:,} trainable parameters ({100.0 * count / max(trainable, 1):.1f}%), "
        f"weight decay {coupled_weight_decay}:"
    ]
    lines += [f"  {e.describe()}" for e in coupled]
    return "\n".join(lines)


def log_info(log: logging.Logger, message: str) -> None:
    """``log.info(message)``; where the program configured no logging at all (the records would reach no handler,
    as in most scripts that only use ``Trainer``), the message goes through transformers' own logger instead, so
    it shows exactly when ``Trainer``'s own INFO lines do (``--log_level info``)."""
    if log.hasHandlers():
        log.info(message)
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger(f"transformers.{log.name}").info(message)


# ---------------------------------------------------------------------------------------------- environment
def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def _accelerate_state() -> Any:
    """accelerate's process-wide ``AcceleratorState`` once an ``Accelerator`` (a ``Trainer``) made one, else None."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return None
    return AcceleratorState() if AcceleratorState._shared_state else None


def _check_factory_protocol() -> None:
    try:
        from transformers.trainer_optimizer import is_optimizer_factory  # noqa: F401
    except ImportError:
        import transformers

        raise RuntimeError(
            "Trainer(optimizer_cls_and_kwargs=(factory, kwargs)) calls an optimizer factory only from transformers "
            f"5.2 on; the installed transformers is {transformers.__version__}. Upgrade transformers, or use "
            "coupled_adam_hf.CoupledAdamTrainer."
        ) from None

"""Coupled Adam for any ``transformers.Trainer`` (plain, a subclass, TRL's), through the optimizer-factory protocol.

transformers 5 lets a trainer build its optimizer from ``Trainer(..., optimizer_cls_and_kwargs=(factory, kwargs))``:
when ``factory`` is not a ``torch.optim.Optimizer`` subclass, ``Trainer.create_optimizer`` calls
``factory()(model, **kwargs)`` (``transformers.trainer_optimizer.is_optimizer_factory``). :class:`CoupledAdamFactory`
follows that protocol and returns a :class:`~coupled_adam_hf.CoupledAdam` with the automatic partition of
:func:`~coupled_adam_hf.partition_parameters` (coupled embeddings / decayed matrices / biases and norms, by
Trainer's own decay rule)::

    from coupled_adam_hf import coupled_adam_optimizer
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      optimizer_cls_and_kwargs=coupled_adam_optimizer(args, coupled_targets="token,output"))

:func:`coupled_adam_optimizer` takes the learning rate, betas, eps and weight decay from the ``TrainingArguments``
(so Trainer's scheduler and logging see the same numbers) and the coupling options as keywords.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .optimizer import CoupledAdam
from .partition import DEFAULT_TARGETS, partition_parameters

__all__ = ["CoupledAdamFactory", "coupled_adam_optimizer"]


class CoupledAdamFactory:
    """``CoupledAdamFactory()(model, **kwargs)``: a :class:`CoupledAdam` over ``model``'s trainable parameters.

    Keywords: the optimizer's ``lr``, ``betas``, ``eps``, ``weight_decay`` (of the decayed matrices), ``amsgrad``,
    ``maximize``, ``foreach``, ``fused``, ``state_dtype``, ``nonfinite``, and the coupling: ``coupled_targets``
    (default ``token,output,position``; see :func:`~coupled_adam_hf.partition.parse_targets`),
    ``coupled_weight_decay`` (default 0, as the paper), ``avg_scale``, ``compact``.
    """

    def __call__(
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
    ) -> CoupledAdam:
        groups = partition_parameters(model, coupled_targets, weight_decay=weight_decay,
                                      coupled_weight_decay=coupled_weight_decay)
        return CoupledAdam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                           avg_scale=avg_scale, compact=compact, nonfinite=nonfinite, state_dtype=state_dtype,
                           amsgrad=amsgrad, maximize=maximize, foreach=foreach, fused=fused)


#: Keywords the factory takes beyond what the TrainingArguments give.
_COUPLING_KEYS = tuple(name for name in inspect.signature(CoupledAdamFactory.__call__).parameters
                       if name not in ("self", "model", "lr", "betas", "eps", "weight_decay"))


def coupled_adam_optimizer(args: Any, **coupling: Any) -> tuple[type[CoupledAdamFactory], dict[str, Any]]:
    """``(CoupledAdamFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` from a ``TrainingArguments``
    (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``) and the coupling options.

    Raises:
        TypeError: for a keyword the factory does not take, listing the ones it does (before any training).
    """
    unknown = sorted(set(coupling) - set(_COUPLING_KEYS))
    if unknown:
        raise TypeError(f"coupled_adam_optimizer: unknown option(s) {unknown}; the coupling options are "
                        f"{', '.join(_COUPLING_KEYS)} (lr, betas, eps and weight decay come from the "
                        "TrainingArguments)")
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                  weight_decay=args.weight_decay)
    kwargs.update(coupling)
    return CoupledAdamFactory, kwargs

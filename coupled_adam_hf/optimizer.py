"""Coupled Adam: AdamW whose second moment is shared across the rows of an embedding matrix.

Stollenwerk & Stollenwerk, "Better Embeddings with Coupled Adam", ACL 2025 (arXiv:2502.08441).

The module knows nothing about transformers: it is a ``torch.optim.Optimizer`` with one extra param-group key,
``coupled``. Everything that is not coupled is plain AdamW (decoupled weight decay), and goes through torch's own
fused AdamW kernel where that kernel applies.

The house, as in ``torch.optim.adam``: this class validates, creates state lazily (layouts in ``_state``), collects
each group into a :class:`_GroupPlan` whose tensors each carry one route (chosen by ``_fused.choose_routes``), and
runs a step in three stages: per-column gradient statistics of the coupled tensors, the non-finite verdict, the
update through the functional :func:`coupled_adam` (``_functional``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _fused, _state
from ._functional import coupled_adam, grad_sq_column_mean, sgd_step
from ._fused import Route
from ._state import Reducer, is_dtensor, param_label

__all__ = ["CoupledAdam", "coupled_adam"]

_CPU = torch.device("cpu")
_NONFINITE_POLICIES = ("skip", "raise", "ignore")
# Per-group update rules: "adam" (AdamW, coupled or not) and "sgd" (plain SGD, momentum 0: the paper's §6.2
# ablation trains the embeddings with SGD at f x the base learning rate, every other parameter with AdamW).
_UPDATE_RULES = ("adam", "sgd")

# Group keys this optimizer owns, with their defaults. ``coupled``/``update``/``avg_scale``/``compact``/
# ``state_dtype`` are the coupling; the rest mirror torch.optim.AdamW.
_GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "coupled": False,
    "update": "adam",
    "avg_scale": 1.0,
    "compact": True,
    "state_dtype": None,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "fused": None,
}


@dataclass(slots=True)
class _GroupPlan:
    """The tensors of one param group that step now (those with a gradient), with their state and routes.

    Parallel lists, one entry per tensor (``max_exp_avg_sqs`` is empty without AMSGrad). ``reducers[i]``: for a
    coupled tensor whose rows are sharded over ranks, the map from a local column sum to the global column mean.
    ``kernels[i]``: the C++ kernel of a ``Route.CPP`` tensor. ``grad_sq_means``: the coupled tensors' per-column
    means of ``g*g``, filled by the first stage of a step.
    """

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    reducers: list[Reducer | None] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    kernels: list[Callable[..., Any] | None] = field(default_factory=list)
    grad_sq_means: list[Tensor] = field(default_factory=list)
    sharded: bool = False  # the group holds DTensors

    def drop(self, i: int) -> None:
        """Remove tensor ``i`` from every per-tensor list."""
        for values in (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                       self.steps, self.reducers, self.routes, self.kernels, self.grad_sq_means):
            if values:
                del values[i]


def _parse_state_dtype(value: Any, index: int) -> torch.dtype | None:
    """``None``, a torch dtype, or its name (``"float32"``, ``"torch.float32"``, ``"fp32"``), from YAML or a CLI."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        name = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise TypeError(
        f"Invalid state_dtype: {value!r} (group {index}); use None (the param's own dtype, as torch.optim.AdamW) or "
        "a floating dtype such as torch.float32"
    )


class CoupledAdam(Optimizer):
    r"""AdamW with a second moment coupled across the rows of embedding matrices.

    For a parameter group with ``coupled=True`` (embedding matrices ``E`` of shape ``[V, H]``: rows are
    vocabulary items), step ``t``:

    .. math::
        E &\leftarrow E\,(1 - \eta\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1)\, g \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\, g^2 \\
        \bar v &\leftarrow s \cdot \tfrac{1}{V}\textstyle\sum_{i} v_{i,:}
            \qquad \text{(one value per hidden dimension)} \\
        E &\leftarrow E - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\bar v}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`\bar v` broadcast over the rows. Every other group is exactly ``torch.optim.AdamW``.

    Because the mean is linear, :math:`\bar v` is itself an exponential moving average of the column means of
    :math:`g^2`. With ``compact=True`` (the default) only that ``[1, H]`` vector is stored as ``exp_avg_sq``,
    saving ``V*H`` floats per coupled matrix; ``compact=False`` keeps the per-element ``[V, H]`` second moment (as
    the paper's reference code does) for analysis or for exchanging state with plain AdamW. Both give the same
    updates up to float rounding.

    Args:
        params: parameters or param groups (dicts). Group keys: every argument below.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator, outside the square root, after bias correction.
        weight_decay: decoupled (AdamW) weight decay coefficient.
        coupled: couple the second moment over dim 0. Coupled tensors need at least 2 dims.
        update: the group's update rule: ``"adam"`` (default; AdamW, coupled when ``coupled``) or ``"sgd"``:
            plain SGD without momentum, ``p <- p - lr * (g + weight_decay * p)`` exactly as ``torch.optim.SGD``
            with ``momentum=0`` (no state; the paper's §6.2 ablation, with the group's ``lr`` = f x the base
            lr, so a scheduler that scales every group's ``initial_lr`` schedules it too). Not with ``coupled``.
        avg_scale: the paper's scaled variant: :math:`\bar v` is multiplied by ``s``, so the step of a coupled
            tensor shrinks by :math:`1/\sqrt{s}` when ``eps`` is negligible.
        compact: store the coupled second moment as one value per column (default) instead of per element.
        state_dtype: dtype of ``exp_avg`` (and of per-element ``exp_avg_sq``). ``None`` (default): the param's own
            dtype, as in ``torch.optim.AdamW`` (so a bf16 model gets bf16 moments, and uncoupled params stay
            bit-identical to torch's fused AdamW). ``torch.float32``: float32 moments for half-precision params
            (updated in float32, rounded once into the param): more accurate, 2x the state bytes. It may not be
            narrower than a param's dtype. Compact ``[1, H]`` column statistics are always at least float32.
        amsgrad: AMSGrad. For coupled tensors the running maximum is taken of :math:`\bar v` (shape ``[1, H]``)
            in both storage modes.
        maximize: maximize the objective instead of minimizing it.
        foreach, fused: kernel choice as in torch. ``fused=True``: torch's fused AdamW kernel for uncoupled
            tensors; for coupled ones a read of ``g`` for the column statistics and one update pass (on CPU one
            C++ call per tensor, see docs/performance.md). ``foreach=True``: multi-tensor ops.
            ``foreach=False, fused=False``: the single-tensor reference. Default: fused where supported.
        nonfinite: what to do when a coupled tensor's gradient holds inf/NaN, which the shared mean would
            spread to every row of the affected columns. ``"skip"`` (default): leave all weights and state as
            they are, count it in ``skipped_steps`` and warn (like ``torch.amp.GradScaler``); ``"raise"``: raise
            ``FloatingPointError``; ``"ignore"``: no check (no host synchronisation).

    Example::

        >>> opt = CoupledAdam(
        ...     [{"params": [model.transformer.wte.weight], "coupled": True, "weight_decay": 0.0},
        ...      {"params": matrices, "weight_decay": 0.1},
        ...      {"params": biases_and_norms, "weight_decay": 0.0}],
        ...     lr=6e-4, betas=(0.9, 0.95), eps=1e-8)

    State per parameter: ``step``, ``exp_avg`` (shape of the param), ``exp_avg_sq`` (shape of the param, or
    ``[1, *shape[1:]]`` for compact coupled tensors), ``max_exp_avg_sq`` with amsgrad; created lazily on the first
    ``step()``, in ``state_dtype``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        coupled: bool = False,
        update: str = "adam",
        avg_scale: float = 1.0,
        compact: bool = True,
        state_dtype: torch.dtype | str | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str = "skip",
    ):
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite policy: {nonfinite!r}; choose one of {_NONFINITE_POLICIES}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, coupled=coupled, update=update,
            avg_scale=avg_scale, compact=compact, state_dtype=state_dtype, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, fused=fused,
        )
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        # Hook for sharded coupled tensors (see coupled_adam_hf.distributed): maps a param to a function that
        # turns a local per-column *sum* over rows into the global per-column mean. None: local mean.
        self._column_reducers: dict[Tensor, Reducer | None] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        group["state_dtype"] = _parse_state_dtype(group["state_dtype"], index)
        _validate_group(group, index)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_column_reducers", {})

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plans = [self._plan(group, index) if group["update"] == "adam" else _GroupPlan()
                 for index, group in enumerate(self.param_groups)]

        # Stage 1 (before anything is written): per-column gradient statistics of the coupled tensors. They feed
        # the compact second moment and the non-finite check.
        native = self._native_items(plans)
        if native is not None:
            # every coupled tensor takes the C++ kernel, which also takes the statistics and passes the verdict
            finite = _fused.native_coupled_step(native, check_finite=self.nonfinite != "ignore")
        else:
            for group, plan in zip(self.param_groups, plans):
                if group["coupled"]:
                    plan.grad_sq_means = [
                        grad_sq_column_mean(g, reducer, route, _state.column_state_dtype(p, group["state_dtype"]))
                        for p, g, reducer, route in zip(plan.params, plan.grads, plan.reducers, plan.routes)
                    ]
                    if plan.sharded:
                        self._drop_stand_ins_nobody_needs(plan)
            finite = self.nonfinite == "ignore" or self._coupled_grads_finite(plans)

        # Stage 2: the verdict. A non-finite coupled gradient would spread through the shared mean to every row.
        if not finite:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    "CoupledAdam: non-finite gradient (inf/NaN) in a coupled tensor; the shared second moment "
                    "would spread it to every row. Lower the learning rate, clip gradients, or use "
                    "nonfinite='skip' to skip such steps."
                )
            self.skipped_steps += 1
            warnings.warn(
                f"CoupledAdam: skipped a step because a coupled tensor has a non-finite gradient "
                f"({self.skipped_steps} skipped so far); weights and optimizer state are unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss

        # Stage 3: the update, per group, each tensor by its route.
        for group, plan in zip(self.param_groups, plans):
            if group["update"] == "sgd":  # after the verdict, so a skipped step skips it too
                sgd_step(group["params"], lr=_as_float(group["lr"]), weight_decay=group["weight_decay"],
                         maximize=group["maximize"])
                continue
            if not plan.params or (native is not None and group["coupled"]):
                continue
            coupled_adam(
                plan.params, plan.grads, plan.exp_avgs, plan.exp_avg_sqs, plan.max_exp_avg_sqs, plan.steps,
                grad_sq_means=plan.grad_sq_means if group["coupled"] else None, column_reducers=plan.reducers,
                coupled=group["coupled"], routes=plan.routes, **_hyperparameters(group),
            )
        return loss

    def _plan(self, group: dict[str, Any], index: int) -> _GroupPlan:
        """The tensors of one group that step now, with their state (created on first use) and routes.

        Runs for every param on every step, so the common case (plain tensors, state already made) is a few list
        comprehensions; row-sharded DTensors and first steps take the longer road.
        """
        coupled, state_dtype = group["coupled"], group["state_dtype"]
        implementation = _fused.implementation_of(group)
        group_params = group["params"]
        sharded = _state.any_dtensor(group_params)
        if sharded:
            params, grads, reducers = self._dtensor_params_and_grads(group, group_params)
        else:
            params = [p for p in group_params if p.grad is not None]
            grads = [p.grad for p in params]
            reducers = [None] * len(params)
        if any(g.is_sparse for g in grads):
            p = next(p for p, g in zip(params, grads) if g.is_sparse)
            raise ValueError(
                f"CoupledAdam does not support sparse gradients ({param_label(group, p, index)}); "
                "use nn.Embedding(sparse=False) or torch.optim.SparseAdam for that parameter"
            )
        if coupled and any(p.dim() < 2 for p in params):
            p = next(p for p in params if p.dim() < 2)
            raise ValueError(
                f"CoupledAdam: coupled {param_label(group, p, index)} is {p.dim()}-D at step time: something "
                "flattened it after the optimizer was built (DeepSpeed ZeRO, FSDP1 and XLA FSDP do). The rows "
                "the coupled mean runs over are lost; use DDP or FSDP2 (fsdp_version: 2) instead."
            )
        eligible = _fused.torch_fused_eligible(params, coupled=coupled, implementation=implementation,
                                               state_dtype=state_dtype)
        all_state = self.state
        states = [all_state[p] for p in params]
        for p, state, on_device in zip(params, states, eligible):
            if not state:
                _state.init_state(state, group, p, on_device)
                continue
            # the step counter lives on p's device for torch's fused kernel, on the CPU otherwise; the route may
            # have changed since the state was made (or it was loaded)
            step = state["step"]
            if on_device and not p.is_cpu:
                if step.device != p.device:
                    state["step"] = step.to(p.device)
            elif not step.is_cpu:
                state["step"] = step.to(_CPU)
        tensors = _fused.GroupTensors(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], [s["step"] for s in states])
        routes, kernels = _fused.choose_routes(implementation, tensors, coupled=coupled, compact=group["compact"],
                                               amsgrad=group["amsgrad"], maximize=group["maximize"],
                                               eligible=eligible)
        return _GroupPlan(*tensors, reducers, routes, kernels, [], sharded)

    def _native_items(self, plans: list[_GroupPlan]) -> list[_fused.NativeItem] | None:
        """The coupled tensors of this step for ``_fused.native_coupled_step``, when every one of them takes
        ``Route.CPP`` and none is sharded; None otherwise, and then all take the general path."""
        items = []
        for group, plan in zip(self.param_groups, plans):
            if not group["coupled"] or not plan.params:
                continue
            if plan.sharded or any(route is not Route.CPP for route in plan.routes):
                return None
            hyper = _hyperparameters(group)
            v_maxes = plan.max_exp_avg_sqs or [None] * len(plan.params)
            items.extend(map(_fused.NativeItem, plan.kernels, plan.params, plan.grads, plan.exp_avgs,
                             plan.exp_avg_sqs, v_maxes, plan.steps, [hyper] * len(plan.params)))
        return items

    def _dtensor_params_and_grads(self, group: dict[str, Any], group_params: list[Tensor]
                                  ) -> tuple[list[Tensor], list[Tensor], list[Reducer | None]]:
        """``_plan``'s params, grads and column reducers for a group that holds DTensors (FSDP2)."""
        params, grads, reducers = [], [], []
        for p in group_params:
            grad = p.grad
            dtensor = is_dtensor(p)
            if grad is None:
                # (a frozen tensor is frozen on every rank: no collective needed to agree on skipping it)
                if not dtensor or not p.requires_grad or not hasattr(self._column_reducer(group, p),
                                                                     "any_rank_has_grad"):
                    continue
                # rows split over ranks: this rank still joins the column all-reduce, with zero rows
                # (dropped again after it if no rank had a gradient; see _drop_stand_ins_nobody_needs)
                grad = torch.zeros_like(p)
            elif dtensor:
                from .distributed import grad_with_param_layout

                grad = grad_with_param_layout(p, grad)
            params.append(p)
            grads.append(grad)
            reducers.append(self._column_reducer(group, p) if dtensor else None)
        return params, grads, reducers

    def _column_reducer(self, group: dict[str, Any], p: Tensor) -> Reducer | None:
        """Reducer of a coupled tensor whose rows are split over ranks, else None.

        Derived on first use from the DTensor's own placements, because accelerate swaps the optimizer's
        parameters for DTensors after the optimizer is built.
        """
        if group["coupled"] and is_dtensor(p) and p not in self._column_reducers:
            from .distributed import row_sharded_column_mean

            self._column_reducers[p] = row_sharded_column_mean(p)
        return self._column_reducers.get(p)

    def _drop_stand_ins_nobody_needs(self, plan: _GroupPlan) -> None:
        """Undo the zero stand-in of a row-sharded coupled tensor when no rank had a gradient for it.

        Then every rank skips it, as a single process skips a tensor without gradient; if some rank had one,
        this rank steps with zero gradient rows, as the unsharded tensor would.
        """
        unused = [i for i, p in enumerate(plan.params)
                  if p.grad is None and not plan.reducers[i].any_rank_has_grad()]
        for i in reversed(unused):
            if int(self.state[plan.params[i]]["step"]) == 0:
                del self.state[plan.params[i]]  # created by this step's _plan only
            plan.drop(i)

    def _coupled_grads_finite(self, plans: list[_GroupPlan]) -> bool:
        """Whether every coupled gradient is finite: its column sums of g*g are inf/NaN exactly when some entry is
        (or when they overflow, which would wreck the second moment as surely). One host sync on one scalar."""
        stats = [s.sum() for plan in plans for s in plan.grad_sq_means]
        sharded = [p for g in self.param_groups if g["coupled"] for p in g["params"] if is_dtensor(p)]
        if not stats and not sharded:
            return True
        total = stats[0] if len(stats) == 1 else (
            torch.stack([s.to(stats[0].device) for s in stats]).sum() if stats else torch.tensor(0.0))
        if sharded:
            # ranks holding different columns of a coupled tensor must all skip, or none
            from .distributed import all_ranks_finite

            return bool(all_ranks_finite(torch.isfinite(total), sharded))
        return math.isfinite(total.item())

    # ------------------------------------------------------------------ checkpoints
    def _check_state_fits(self, state_dict: dict[str, Any]) -> None:
        """Group count, parameters per group and every saved tensor's shape against this optimizer's params."""
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("CoupledAdam.load_state_dict: not an optimizer state dict (needs 'state' and "
                             "'param_groups'); nothing was loaded")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"CoupledAdam.load_state_dict: the state has {len(saved_groups)} param groups, this "
                             f"optimizer {len(self.param_groups)}; nothing was loaded")
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"CoupledAdam.load_state_dict: group {index} of the state holds "
                                 f"{len(saved['params'])} parameters, this optimizer's {len(group['params'])}; "
                                 "nothing was loaded")
            for pid, p in zip(saved["params"], group["params"]):
                if pid in saved_state:
                    _state.check_state_layout(group, index, p, saved_state[pid])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, converting second-moment layouts where that is exact.

        - per-element ``exp_avg_sq`` (plain AdamW, or ``compact=False``) into a compact coupled group: averaged
          over dim 0 (what the coupled update reads anyway);
        - compact into a full-state coupled group: broadcast over rows (gives the same column mean, so the
          same updates);
        - compact into an uncoupled (plain AdamW) group: refused, since per-element second moments cannot be
          recovered from their column means.

        Loaded state takes this optimizer's ``state_dtype`` (torch's loader would cast it to the param dtype).
        The whole state is checked before anything changes: on error the optimizer is as it was.
        """
        self._check_state_fits(state_dict)
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        current_groups = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, current, saved in zip(self.param_groups, current_groups, state_dict["param_groups"]):
            saved_keys = set(saved)
            for key, value in current.items():
                # torch restores the saved hyperparameters; keys the checkpoint lacks (a plain AdamW state has no
                # `coupled`) keep this optimizer's value, and the storage layout is always this optimizer's own
                if key not in saved_keys or key in _state.STRUCTURAL_KEYS:
                    group[key] = value
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {p: (i, g) for i, g in enumerate(self.param_groups) for p in g["params"]}
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            index, group = group_of[p]
            state = self.state[p]
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in saved_state[pid]:
                    state[key] = _state.to_like(saved_state[pid][key], p)
            [on_device] = _fused.torch_fused_eligible([p], coupled=group["coupled"],
                                                      implementation=_fused.implementation_of(group),
                                                      state_dtype=group["state_dtype"])
            _state.settle_loaded_state(state, group, p, index, step_on_param_device=on_device)


# ---------------------------------------------------------------------- group helpers
def _as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A group's keyword arguments of ``coupled_adam``, other than the tensors and the routes."""
    beta1, beta2 = group["betas"]
    return dict(compact=group["compact"], amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                lr=_as_float(group["lr"]), weight_decay=group["weight_decay"], eps=group["eps"],
                avg_scale=group["avg_scale"], maximize=group["maximize"])


def _validate_group(group: dict[str, Any], index: int) -> None:
    if group["update"] not in _UPDATE_RULES:
        raise ValueError(f"Invalid update rule: {group['update']!r} (group {index}); choose one of {_UPDATE_RULES}")
    if group["update"] == "sgd" and group["coupled"]:
        raise ValueError(f"update='sgd' has no second moment to couple (group {index}): set coupled=False")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be a scalar (group {index}), got shape {list(lr.shape)}")
        lr = float(lr)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {group['lr']!r} (group {index}); it must be a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (group {index}); expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (group {index}); it must be in [0, 1)")
    eps = group["eps"]
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r} (group {index}); it must be a finite number >= 0")
    wd = group["weight_decay"]
    if not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0.0:
        raise ValueError(f"Invalid weight_decay value: {wd!r} (group {index}); it must be a finite number >= 0")
    scale = group["avg_scale"]
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"Invalid avg_scale value: {scale!r} (group {index}); it must be a finite number > 0")
    for key in ("coupled", "compact", "amsgrad", "maximize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"Param-group key {key!r} must be a bool (group {index}), got {group[key]!r}")
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            raise TypeError(f"Param-group key {key!r} must be a bool or None (group {index}), got {group[key]!r}")
    if group["foreach"] and group["fused"]:
        raise RuntimeError(f"`foreach` and `fused` cannot both be True (group {index})")
    for p in group["params"]:
        if torch.is_complex(p):
            raise TypeError(
                f"CoupledAdam does not support complex tensors: {param_label(group, p, index)}; "
                "view them as real with torch.view_as_real"
            )
        if not p.is_floating_point():
            raise TypeError(f"CoupledAdam can only optimize floating-point tensors: {param_label(group, p, index)}"
                            f" has dtype {p.dtype}")
        if group["coupled"] and p.dim() < 2:
            raise ValueError(
                f"Coupled tensors need at least 2 dims (rows = vocabulary items): {param_label(group, p, index)}. "
                "Put biases, norms and other vectors in an uncoupled group."
            )
        state_dtype = group["state_dtype"]
        if state_dtype is not None and (
            not state_dtype.is_floating_point or torch.promote_types(p.dtype, state_dtype) != state_dtype
        ):
            raise ValueError(
                f"Invalid state_dtype {state_dtype} for {param_label(group, p, index)} of dtype {p.dtype}: optimizer "
                "state may not be narrower than the param (the update would be rounded into it). Use None (the "
                "param's dtype) or a wider floating dtype such as torch.float32."
            )

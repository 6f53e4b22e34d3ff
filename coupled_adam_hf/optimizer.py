"""Coupled Adam: AdamW whose second moment is shared across the rows of an embedding matrix.

Stollenwerk & Stollenwerk, "Better Embeddings with Coupled Adam", ACL 2025 (arXiv:2502.08441).

The module knows nothing about transformers: it is a ``torch.optim.Optimizer`` with one extra param-group key,
``coupled``. Everything that is not coupled is plain AdamW (decoupled weight decay), and goes through torch's own
fused AdamW kernel where that kernel applies.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _cpu_kernels, _kernels

__all__ = ["CoupledAdam", "coupled_adam"]

_TORCH_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU = torch.device("cpu")
_NONFINITE_POLICIES = ("skip", "raise", "ignore")
_IMPLEMENTATIONS = ("single_tensor", "foreach", "fused")
# Per-group update rules: "adam" (AdamW, coupled or not) and "sgd" (plain SGD, momentum 0: the paper's §6.2
# ablation trains the embeddings with SGD at f x the base learning rate, every other parameter with AdamW).
_UPDATE_RULES = ("adam", "sgd")
# Param-group keys that describe how state is laid out, not hyperparameters: load_state_dict keeps the values this
# optimizer was built with and converts the loaded state to them.
_STRUCTURAL_KEYS = ("coupled", "update", "compact", "state_dtype")

# Group keys this optimizer owns, with their defaults. ``coupled``/``avg_scale``/``compact`` are the coupling;
# the rest mirror torch.optim.AdamW.
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


def _state_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """dtype of ``exp_avg`` and of per-element second moments: the group's ``state_dtype``, else the param's own
    (as in ``torch.optim.AdamW``)."""
    return param.dtype if state_dtype is None else state_dtype


def _column_state_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """dtype of compact ``[1, H]`` column statistics: at least float32 (they are a mean over the whole vocabulary,
    and tiny)."""
    return torch.promote_types(_state_dtype(param, state_dtype), torch.float32)


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


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (kernels work on plain tensors)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _column_mean(x: Tensor) -> Tensor:
    """Mean over the vocabulary axis (dim 0), one value per hidden column, kept 2-D for broadcasting."""
    return x.mean(dim=0, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))


def _bias_corrections(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


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
            C++ call per tensor, see the README's Performance section). ``foreach=True``: multi-tensor ops.
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
        self._column_reducers: dict[Tensor, Callable[[Tensor], Tensor]] = {}
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

    # ------------------------------------------------------------------ state
    def _implementation(self, group: dict[str, Any]) -> str:
        if group["fused"] and group["foreach"]:
            raise RuntimeError("CoupledAdam: `foreach` and `fused` cannot both be True")
        if group["fused"] is True:
            return "fused"
        if group["foreach"] is True:
            return "foreach"
        if group["fused"] is False and group["foreach"] is False:
            return "single_tensor"
        if group["foreach"] is False:
            return "single_tensor"
        return "fused"

    def _uses_torch_fused(self, group: dict[str, Any], p: Tensor) -> bool:
        """Uncoupled params whose state dtype equals their own go through torch's fused AdamW kernel."""
        return (
            self._implementation(group) == "fused"
            and not group["coupled"]
            and p.dtype == _state_dtype(p, group["state_dtype"])
            and p.dtype in _TORCH_FUSED_DTYPES
        )

    def _init_state(self, group: dict[str, Any], p: Tensor, torch_fused: bool) -> None:
        """Create the (empty) state of ``p``; ``torch_fused``: ``p`` goes through torch's fused kernel, which wants
        the step counter on ``p``'s device (every other kernel reads it on the CPU)."""
        state = self.state[p]
        dtype = _state_dtype(p, group["state_dtype"])
        column_dtype = _column_state_dtype(p, group["state_dtype"])
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if torch_fused else _CPU)
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["coupled"] and group["compact"]:
            state["exp_avg_sq"] = self._zeros_column_state(p, column_dtype)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = (
                self._zeros_column_state(p, column_dtype)
                if group["coupled"]
                else torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            )

    def _zeros_column_state(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        shape = (1, *p.shape[1:])
        if _is_dtensor(p):
            from .distributed import column_state_zeros

            return column_state_zeros(p, shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        batches = [self._collect(group, index) if group["update"] == "adam" else dict(_EMPTY_BATCH)
                   for index, group in enumerate(self.param_groups)]

        # Stage 1 (before anything is written): per-column gradient statistics of coupled tensors.
        # They feed the compact second moment and the non-finite check.
        native = self._native_coupled(batches)
        if native is not None:
            # every coupled tensor takes the C++ CPU kernel, which also takes the statistics and passes the verdict
            finite = self._native_coupled_step(native)
        else:
            for group, batch in zip(self.param_groups, batches):
                if group["coupled"]:
                    implementation = self._implementation(group)
                    batch["grad_sq_means"] = [
                        self._grad_sq_column_mean(p, g, implementation, _column_state_dtype(p, group["state_dtype"]))
                        for p, g in zip(batch["params"], batch["grads"])
                    ]
                    if batch["dtensors"]:
                        self._drop_stand_ins_nobody_needs(batch)
            finite = self.nonfinite == "ignore" or self._coupled_grads_finite(batches)
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

        # Stage 2: the update, per group, with the chosen kernel.
        for group, batch in zip(self.param_groups, batches):
            if group["update"] == "sgd":  # after the non-finite verdict, so a skipped step skips it too
                _sgd_step(group)
                continue
            if not batch["params"] or (native is not None and group["coupled"]):
                continue
            coupled_adam(
                batch["params"],
                batch["grads"],
                batch["exp_avgs"],
                batch["exp_avg_sqs"],
                batch["max_exp_avg_sqs"],
                batch["steps"],
                grad_sq_means=batch.get("grad_sq_means"),
                column_means=batch["column_means"],
                coupled=group["coupled"],
                implementation=self._implementation(group),
                torch_fused=batch["torch_fused"],
                **_hyperparameters(group),
            )
        return loss

    def _native_coupled(self, batches: list[dict[str, Any]]) -> list[tuple] | None:
        """The coupled tensors of this step as ``(kernel, p, g, m, v, v_max, step, group)``, when every one of them
        goes through the C++ CPU kernel (fused implementation, plain CPU tensors the kernel takes, the size policy
        of ``_kernels.cpp_wanted``); None otherwise, and then all take the general path."""
        native, policy = [], None
        for group, batch in zip(self.param_groups, batches):
            if not group["coupled"] or not batch["params"]:
                continue
            if batch["dtensors"] or self._implementation(group) != "fused":
                return None
            policy = policy or _kernels.read_policy()
            compact, maximize = group["compact"], group["maximize"]
            v_maxes = batch["max_exp_avg_sqs"] if group["amsgrad"] else [None] * len(batch["params"])
            for p, g, m, v, v_max, step in zip(batch["params"], batch["grads"], batch["exp_avgs"],
                                                batch["exp_avg_sqs"], v_maxes, batch["steps"]):
                # (full mode: the float32 column mean of v that the kernel updates is taken right before it runs)
                kernel = _kernels.cpp_wanted(p, policy) and _cpu_kernels.step_kernel(
                    p, g, m, None if compact else v, step, v if compact else None, None, v_max, maximize=maximize)
                if not kernel:
                    return None
                native.append((kernel, p, g, m, v, v_max, step, group))
        return native

    def _native_coupled_step(self, native: list[tuple]) -> bool:
        """Step the coupled tensors of ``_native_coupled`` with the C++ kernel; False (nothing written) when the
        non-finite check fails.

        The largest tensor goes last, statistics, verdict and update in one call (its gradient is still in cache
        when the update reads it again); the others' statistics are taken and checked before that.
        """
        if not native:
            return True
        check = self.nonfinite != "ignore"
        *others, last = sorted(native, key=lambda item: item[1].numel())
        means = [_kernels.column_sq_sum(g, torch.float32, divisor=g.shape[0]) for _, _, g, *_ in others]
        if check and means and not math.isfinite(torch.stack([s.sum() for s in means]).sum().item()):
            return False
        if not _native_step(*last, grad_sq_mean=None, check_finite=check):
            return False
        for item, mean in zip(others, means):
            _native_step(*item, grad_sq_mean=mean)
        return True

    def _collect(self, group: dict[str, Any], index: int) -> dict[str, Any]:
        """The tensors of one group that step now, with their state (created on first use) and kernel route.

        Runs for every param on every step, so the common case (plain tensors, state already made) is a few list
        comprehensions; row-sharded DTensors and first steps take the longer road.
        """
        coupled, amsgrad, state_dtype = group["coupled"], group["amsgrad"], group["state_dtype"]
        group_params = group["params"]
        dtensors = any(map(_is_dtensor, group_params))
        if dtensors:
            params, grads, column_means = self._dtensor_params_and_grads(group, group_params)
        else:
            params = [p for p in group_params if p.grad is not None]
            grads = [p.grad for p in params]
            column_means = [None] * len(params)
        if any(g.is_sparse for g in grads):
            p = next(p for p, g in zip(params, grads) if g.is_sparse)
            raise ValueError(
                f"CoupledAdam does not support sparse gradients ({_param_label(group, p, index)}); "
                "use nn.Embedding(sparse=False) or torch.optim.SparseAdam for that parameter"
            )
        if coupled and any(p.dim() < 2 for p in params):
            p = next(p for p in params if p.dim() < 2)
            raise ValueError(
                f"CoupledAdam: coupled {_param_label(group, p, index)} is {p.dim()}-D at step time: something "
                "flattened it after the optimizer was built (DeepSpeed ZeRO, FSDP1 and XLA FSDP do). The rows "
                "the coupled mean runs over are lost; use DDP or FSDP2 (fsdp_version: 2) instead."
            )
        # uncoupled params whose state has their own dtype go through torch's fused AdamW kernel
        if not coupled and self._implementation(group) == "fused":
            routes = [p.dtype in _TORCH_FUSED_DTYPES and (state_dtype is None or state_dtype == p.dtype)
                      for p in params]
        else:
            routes = [False] * len(params)
        all_state = self.state
        states = [all_state[p] for p in params]
        for p, state, route in zip(params, states, routes):
            if not state:
                self._init_state(group, p, route)
                continue
            # the step counter lives on p's device for torch's fused kernel, on the CPU otherwise; the kernel
            # choice may have changed since the state was made (or it was loaded)
            step = state["step"]
            if route and not p.is_cpu:
                if step.device != p.device:
                    state["step"] = step.to(p.device)
            elif not step.is_cpu:
                state["step"] = step.to(_CPU)
        return dict(
            params=params, grads=grads, exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s["exp_avg_sq"] for s in states],
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if amsgrad else [],
            steps=[s["step"] for s in states], torch_fused=routes, column_means=column_means,
            dtensors=dtensors,
        )

    def _dtensor_params_and_grads(self, group: dict[str, Any], group_params: list[Tensor]
                                  ) -> tuple[list[Tensor], list[Tensor], list[Callable[[Tensor], Tensor] | None]]:
        """``_collect``'s params, grads and column reducers for a group that holds DTensors (FSDP2)."""
        params, grads, column_means = [], [], []
        for p in group_params:
            grad = p.grad
            dtensor = _is_dtensor(p)
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
            column_means.append(self._column_reducer(group, p) if dtensor else None)
        return params, grads, column_means

    def _column_reducer(self, group: dict[str, Any], p: Tensor) -> Callable[[Tensor], Tensor] | None:
        """Reducer of a coupled tensor whose rows are split over ranks, else None.

        Derived on first use from the DTensor's own placements, because accelerate swaps the optimizer's
        parameters for DTensors after the optimizer is built.
        """
        if group["coupled"] and _is_dtensor(p) and p not in self._column_reducers:
            from .distributed import row_sharded_column_mean

            self._column_reducers[p] = row_sharded_column_mean(p)
        return self._column_reducers.get(p)

    def _drop_stand_ins_nobody_needs(self, batch: dict[str, Any]) -> None:
        """Undo the zero stand-in of a row-sharded coupled tensor when no rank had a gradient for it.

        Then every rank skips it, as a single process skips a tensor without gradient; if some rank had one,
        this rank steps with zero gradient rows, as the unsharded tensor would.
        """
        params = batch["params"]
        unused = [
            i for i, p in enumerate(params)
            if p.grad is None and not batch["column_means"][i].any_rank_has_grad()
        ]
        n = len(params)
        for i in reversed(unused):
            if int(self.state[params[i]]["step"]) == 0:
                del self.state[params[i]]  # created by this step's _collect only
            for values in batch.values():
                if isinstance(values, list) and len(values) == n:
                    del values[i]

    def _grad_sq_column_mean(self, p: Tensor, grad: Tensor, implementation: str = "single_tensor",
                             dtype: torch.dtype = torch.float32) -> Tensor:
        """Global per-column mean of g*g over rows, shape [1, *shape[1:]], accumulated in ``dtype``.

        A reduction kernel reads g once and allocates nothing of size [V, H]: vector norm for the reference
        path, the blocked column sums of ``_kernels`` (several times faster on CPU) for the others.
        """
        g = _local(grad)
        reducer = self._column_reducers.get(p)
        if g.shape[0] == 0:
            col_sum = torch.zeros((1, *g.shape[1:]), dtype=dtype, device=g.device)
        elif implementation == "single_tensor":
            col_sum = torch.linalg.vector_norm(g, 2, dim=0, keepdim=True, dtype=dtype).square_()
        elif reducer is None:
            return _kernels.column_sq_sum(g, dtype, divisor=g.shape[0])  # the mean, divided inside the kernel
        else:
            col_sum = _kernels.column_sq_sum(g, dtype)
        if reducer is not None:
            return reducer(col_sum)
        return col_sum.div_(g.shape[0])

    def _coupled_grads_finite(self, batches: list[dict[str, Any]]) -> bool:
        """Whether every coupled gradient is finite: its column sums of g*g are inf/NaN exactly when some entry is
        (or when they overflow, which would wreck the second moment as surely). One host sync on one scalar."""
        stats = [s.sum() for b in batches for s in b.get("grad_sq_means") or ()]
        sharded = [p for g in self.param_groups if g["coupled"] for p in g["params"] if _is_dtensor(p)]
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
                    _check_state_layout(group, index, p, saved_state[pid])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, converting second-moment layouts where that is exact.

        - per-element ``exp_avg_sq`` (plain AdamW, or ``compact=False``) into a compact coupled group: averaged
          over dim 0 (what the coupled update reads anyway);
        - compact into a full-state coupled group: broadcast over rows (gives the same column mean, so the
          same updates);
        - compact into an uncoupled (plain AdamW) group: refused, since per-element second moments cannot be
          recovered from their column means.

        Loaded state takes this optimizer's ``state_dtype`` (torch's loader would cast it to the param dtype).
        """
        self._check_state_fits(state_dict)  # before anything changes: on error the optimizer is as it was
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        current_groups = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, current, saved in zip(self.param_groups, current_groups, state_dict["param_groups"]):
            saved_keys = set(saved)
            for key, value in current.items():
                # torch restores the saved hyperparameters; keys the checkpoint lacks (a plain AdamW state has no
                # `coupled`) keep this optimizer's value, and the storage layout is always this optimizer's own
                if key not in saved_keys or key in _STRUCTURAL_KEYS:
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
                    state[key] = _to_like(saved_state[pid][key], p)
            _convert_second_moments(state, group, p, index)
            dtypes = _state_dtypes(group, p)
            if _is_dtensor(p):
                from .distributed import lay_out_state_like_param

                lay_out_state_like_param(state, p, dtypes, coupled=group["coupled"], compact=group["compact"])
            else:
                for key, dtype in dtypes.items():
                    if key in state and state[key].dtype != dtype:
                        state[key] = state[key].to(dtype)
            step_device = p.device if self._uses_torch_fused(group, p) else torch.device("cpu")
            if "step" in state:
                # a copy: torch's loader hands back the very step tensor of the source optimizer
                state["step"] = torch.as_tensor(state["step"]).to(dtype=torch.float32, device=step_device, copy=True)


def _check_state_layout(group: dict[str, Any], index: int, p: Tensor, saved: dict[str, Any]) -> None:
    """ValueError naming the parameter and both shapes when a saved moment does not fit ``p`` in this group."""
    full_shape = tuple(p.shape)
    column_shape = (1, *p.shape[1:])
    fits = {"exp_avg": {full_shape}}
    second = {full_shape, column_shape} if group["coupled"] else {full_shape}
    fits["exp_avg_sq"] = fits["max_exp_avg_sq"] = second
    for key, allowed in fits.items():
        value = saved.get(key)
        if not isinstance(value, Tensor):
            continue
        shape = tuple(value.shape)
        if shape in allowed:
            continue
        if not group["coupled"] and key != "exp_avg" and shape == column_shape:
            raise ValueError(
                f"CoupledAdam.load_state_dict: {_param_label(group, p, index)} is in an uncoupled (plain AdamW) "
                f"group, but its saved {key} has shape {list(shape)} (a compact coupled second moment), not "
                f"{list(full_shape)}. Per-element second moments cannot be recovered from column means: keep the "
                "parameter in a coupled group, or save the state with compact=False."
            )
        expected = " or ".join(str(list(s)) for s in sorted(allowed, key=len))
        raise ValueError(
            f"CoupledAdam.load_state_dict: saved {key} of shape {list(shape)} does not fit "
            f"{_param_label(group, p, index)}, which needs {expected}: the state belongs to another model or "
            "another partition of its parameters; nothing was loaded"
        )


def _to_like(value: Tensor, p: Tensor) -> Tensor:
    """A copy of loaded state on ``p``'s device (its dtype is settled after layout conversion)."""
    if _is_dtensor(p) or _is_dtensor(value):
        return value  # distributed checkpoint loading places DTensor state itself
    return value.to(device=p.device, copy=True)


def _state_dtypes(group: dict[str, Any], p: Tensor) -> dict[str, torch.dtype]:
    """The dtype of each state tensor of ``p`` in ``group``'s layout."""
    dtype = _state_dtype(p, group["state_dtype"])
    column = _column_state_dtype(p, group["state_dtype"])
    coupled = group["coupled"]
    return {
        "exp_avg": dtype,
        "exp_avg_sq": column if coupled and group["compact"] else dtype,
        "max_exp_avg_sq": column if coupled else dtype,
    }


def _convert_second_moments(state: dict[str, Any], group: dict[str, Any], p: Tensor, index: int) -> None:
    full_shape = tuple(p.shape)
    column_shape = (1, *p.shape[1:])
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        if key not in state:
            continue
        v = state[key]
        shape = tuple(v.shape)
        if group["coupled"]:
            if key == "max_exp_avg_sq" and shape == full_shape:
                # AMSGrad of coupled tensors tracks the max of the column mean; a per-element max converts to
                # the column mean of the maxima (an upper bound of what it would have been)
                state[key] = _column_mean(v)
            elif group["compact"] and key == "exp_avg_sq" and shape == full_shape and shape != column_shape:
                state[key] = _column_mean(v)
            elif not group["compact"] and key == "exp_avg_sq" and shape == column_shape and shape != full_shape:
                state[key] = v.expand(full_shape).clone()
        elif shape != full_shape:
            raise ValueError(
                f"CoupledAdam.load_state_dict: {_param_label(group, p, index)} is in an uncoupled (plain AdamW) "
                f"group, but its saved {key} has shape {list(shape)} (a compact coupled second moment), not "
                f"{list(full_shape)}. Per-element second moments cannot be recovered from column means: keep the "
                "parameter in a coupled group, or save the state with compact=False."
            )
        elif group["amsgrad"] and key == "exp_avg_sq" and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = v.clone()
    if group["amsgrad"] and "max_exp_avg_sq" not in state and "exp_avg_sq" in state:
        v = state["exp_avg_sq"]
        state["max_exp_avg_sq"] = _column_mean(v) if tuple(v.shape) == full_shape and group["coupled"] else v.clone()


# ---------------------------------------------------------------------- validation helpers
def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A group's keyword arguments of ``coupled_adam``, other than the tensors and the kernel choice."""
    beta1, beta2 = group["betas"]
    return dict(compact=group["compact"], amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                lr=_as_float(group["lr"]), weight_decay=group["weight_decay"], eps=group["eps"],
                avg_scale=group["avg_scale"], maximize=group["maximize"])


def _param_label(group: dict[str, Any], p: Tensor, index: int) -> str:
    names = group.get("param_names")
    if names:
        for name, q in zip(names, group["params"]):
            if q is p:
                return f"parameter {name!r} (group {index}, shape {list(p.shape)})"
    position = next((i for i, q in enumerate(group["params"]) if q is p), "?")
    return f"parameter {position} of group {index} (shape {list(p.shape)})"


_EMPTY_BATCH: dict[str, Any] = dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], max_exp_avg_sqs=[], steps=[],
                                    torch_fused=[], column_means=[], dtensors=False, grad_sq_means=[])


def _sgd_step(group: dict[str, Any]) -> None:
    """``torch.optim.SGD``'s update with ``momentum=0``, ``dampening=0``, ``nesterov=False``, one tensor at a time."""
    lr, weight_decay = _as_float(group["lr"]), group["weight_decay"]
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = -p.grad if group["maximize"] else p.grad
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        p.add_(grad, alpha=-lr)


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
                f"CoupledAdam does not support complex tensors: {_param_label(group, p, index)}; "
                "view them as real with torch.view_as_real"
            )
        if not p.is_floating_point():
            raise TypeError(f"CoupledAdam can only optimize floating-point tensors: {_param_label(group, p, index)}"
                            f" has dtype {p.dtype}")
        if group["coupled"] and p.dim() < 2:
            raise ValueError(
                f"Coupled tensors need at least 2 dims (rows = vocabulary items): {_param_label(group, p, index)}. "
                "Put biases, norms and other vectors in an uncoupled group."
            )
        state_dtype = group["state_dtype"]
        if state_dtype is not None and (
            not state_dtype.is_floating_point or torch.promote_types(p.dtype, state_dtype) != state_dtype
        ):
            raise ValueError(
                f"Invalid state_dtype {state_dtype} for {_param_label(group, p, index)} of dtype {p.dtype}: optimizer "
                "state may not be narrower than the param (the update would be rounded into it). Use None (the "
                "param's dtype) or a wider floating dtype such as torch.float32."
            )


# ---------------------------------------------------------------------- functional core
def coupled_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_sq_means: list[Tensor] | None,
    column_means: list[Callable[[Tensor], Tensor] | None] | None = None,
    coupled: bool,
    compact: bool,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    avg_scale: float,
    maximize: bool,
    implementation: str = "fused",
    torch_fused: list[bool] | None = None,
) -> None:
    """Functional Coupled Adam over one param group (see :class:`CoupledAdam` for the math).

    ``grad_sq_means[i]`` is the per-column mean of ``grads[i]**2`` over rows (``[1, H]``), required when
    ``coupled``. ``column_means[i]``, when given, maps a local per-column sum to the global mean (sharded rows).
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if coupled and grad_sq_means is None:
        raise ValueError("coupled=True needs grad_sq_means (the per-column means of grad**2)")
    hyper = dict(amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                 maximize=maximize)
    n = len(params)
    column_means = column_means or [None] * n
    if coupled:
        kernel = {"single_tensor": _single_tensor_coupled, "foreach": _multi_tensor_coupled,
                  "fused": _fused_coupled}[implementation]
        kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_sq_means, column_means,
               compact=compact, avg_scale=avg_scale, **hyper)
        return
    if implementation == "single_tensor":
        _single_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **hyper)
        return
    torch_fused = torch_fused or [False] * n
    # Inside an outer torch.compile, torch's fused kernel is opaque (a graph break, and dynamo then runs the whole
    # step eagerly); the multi-tensor ops trace, and the compiler fuses them itself.
    use_torch_fused = implementation == "fused" and not torch.compiler.is_compiling()
    if use_torch_fused and all(torch_fused):  # the common case, without index bookkeeping
        fused_idx, other_idx = None, []
    else:
        fused_idx = [i for i in range(n) if torch_fused[i]] if use_torch_fused else []
        taken = set(fused_idx)
        other_idx = [i for i in range(n) if i not in taken]
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps)
    if fused_idx is None or fused_idx:
        if fused_idx is not None:
            lists = tuple([xs[i] for i in fused_idx] if xs else xs for xs in lists)
        if any(map(_is_dtensor, lists[0])):
            lists = tuple([_local(x) for x in xs] for xs in lists)
        _torch_fused_adamw(*lists, **hyper)
    if other_idx:
        ps, gs, ms, vs, vmaxs, steps = ([xs[i] for i in other_idx] if xs else xs for xs in lists)
        # half-precision params with float32 state, which torch's fused kernel cannot take: one compiled pass each
        # for large models (see _kernels.compile_wanted_for), else the multi-tensor ops
        compiled = implementation == "fused" and _kernels.compile_wanted_for([_local(p) for p in ps])
        (_compiled_adamw if compiled else _multi_tensor_adamw)(ps, gs, ms, vs, vmaxs, steps, **hyper)


def _torch_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1,
                       beta2, lr, weight_decay, eps, maximize):
    """torch's fused AdamW kernel, as ``torch.optim.AdamW(fused=True)`` runs it (same arguments, same numbers),
    without the functional wrapper's per-call checks: on a small model those cost as much as the kernel."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    for (ps, gs, ms, vs, vmaxs, steps), _ in grouped.values():
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(ps, gs, ms, vs, vmaxs, steps, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, maximize=maximize)


# --- reference: one tensor at a time, written to be read --------------------------------------------------
def _single_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1,
                         beta2, lr, weight_decay, eps, maximize):
    for i, param in enumerate(params):
        p, g = _working_copies(param, grads[i], _local(exp_avgs[i]).dtype, maximize)
        m, v, step = _local(exp_avgs[i]), _local(exp_avg_sqs[i]), state_steps[i]
        step += 1
        bc1, bc2_sqrt = _bias_corrections(step.item(), beta1, beta2)

        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax = _local(max_exp_avg_sqs[i])
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
        _write_back(param, p)


def _single_tensor_coupled(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_sq_means,
                           column_means, *, compact, avg_scale, amsgrad, beta1, beta2, lr, weight_decay, eps,
                           maximize):
    for i, param in enumerate(params):
        p, g = _working_copies(param, grads[i], _local(exp_avgs[i]).dtype, maximize)
        m, v, step = _local(exp_avgs[i]), _local(exp_avg_sqs[i]), state_steps[i]
        step += 1
        bc1, bc2_sqrt = _bias_corrections(step.item(), beta1, beta2)

        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        if compact:
            # v is [1, H]: the EMA of the column means of g*g equals the column mean of the per-element EMA
            v.mul_(beta2).add_(_local(grad_sq_means[i]), alpha=1 - beta2)
            v_bar = v * avg_scale
        else:
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            v_bar = _global_column_mean(v, column_means[i]) * avg_scale
        if amsgrad:
            vmax = _local(max_exp_avg_sqs[i])
            torch.maximum(vmax, v_bar / avg_scale, out=vmax)
            v_bar = vmax * avg_scale
        denom = (v_bar.sqrt() / bc2_sqrt).add_(eps)  # [1, H], broadcast over the rows
        p.addcdiv_(m, denom, value=-lr / bc1)
        _write_back(param, p)


def _global_column_mean(x: Tensor, reducer: Callable[[Tensor], Tensor] | None) -> Tensor:
    if reducer is None:
        return _column_mean(x)
    return reducer(x.sum(dim=0, keepdim=True))


def _working_copies(param: Tensor, grad: Tensor, dtype: torch.dtype, maximize: bool) -> tuple[Tensor, Tensor]:
    """Plain tensors in the state dtype ``dtype``: with float32 state, half-precision params are updated in float32
    and rounded once."""
    p, g = _local(param), _local(grad)
    if p.dtype != dtype:
        p = p.to(dtype)
    if g.dtype != dtype:
        g = g.to(dtype)
    return p, (-g if maximize else g)


def _write_back(param: Tensor, working: Tensor) -> None:
    local = _local(param)
    if working is not local and working.data_ptr() != local.data_ptr():
        local.copy_(working)


# --- multi-tensor (foreach) ---------------------------------------------------------------------------------
def _multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1,
                        beta2, lr, weight_decay, eps, maximize):
    if not params:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [[_local(p) for p in params], [_local(g) for g in grads], [_local(m) for m in exp_avgs],
         [_local(v) for v in exp_avg_sqs], [_local(v) for v in max_exp_avg_sqs] if amsgrad else [None] * len(params),
         state_steps]
    )
    for (_device, _dtype), ((ps, gs, ms, vs, vmaxs, steps), _) in grouped.items():
        dtype = ms[0].dtype
        work = [p if p.dtype == dtype else p.to(dtype) for p in ps]
        gs = [g if g.dtype == dtype else g.to(dtype) for g in gs]
        if maximize:
            gs = torch._foreach_neg(gs)
        torch._foreach_add_(steps, 1)
        bc = [_bias_corrections(s.item(), beta1, beta2) for s in steps]

        if weight_decay != 0:
            torch._foreach_mul_(work, 1 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        if amsgrad:
            torch._foreach_maximum_(vmaxs, vs)
            vs = vmaxs
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [b[1] for b in bc])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(work, ms, denom, [-lr / b[0] for b in bc])
        for p, w in zip(ps, work):
            if w is not p:
                p.copy_(w)


def _multi_tensor_coupled(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_sq_means,
                          column_means, *, compact, avg_scale, amsgrad, beta1, beta2, lr, weight_decay, eps,
                          maximize):
    """Coupled tensors are few (1-3 per model) and large: per-tensor in-place ops, no [V, H] temporaries.

    Passes over [V, H] memory in compact mode: weight decay (skipped when 0), m <- lerp(m, g), p <- p - c*m/d.
    The column statistics of g were taken before (one read of g).
    """
    for i, param in enumerate(params):
        p, g = _working_copies(param, grads[i], _local(exp_avgs[i]).dtype, maximize)
        m, v, step = _local(exp_avgs[i]), _local(exp_avg_sqs[i]), state_steps[i]
        step += 1
        bc1, bc2_sqrt = _bias_corrections(step.item(), beta1, beta2)

        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        if compact:
            v.mul_(beta2).add_(_local(grad_sq_means[i]), alpha=1 - beta2)
            v_col = v
        else:
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            v_col = _global_column_mean(v, column_means[i])
        if amsgrad:
            vmax = _local(max_exp_avg_sqs[i])
            torch.maximum(vmax, v_col, out=vmax)
            v_col = vmax
        denom = v_col.mul(avg_scale / (bc2_sqrt * bc2_sqrt)).sqrt_().add_(eps)
        if m.dtype == denom.dtype:
            p.addcdiv_(m, denom, value=-lr / bc1)
        else:
            _addcdiv_by_rows_(p, m, denom, -lr / bc1)
        _write_back(param, p)


# Elements per block of rows in _addcdiv_by_rows_ (1 MiB of float32: the working buffers stay in cache).
_ROW_BLOCK_ELEMENTS = 1 << 18


def _addcdiv_by_rows_(p: Tensor, m: Tensor, denom: Tensor, value: float) -> None:
    """``p.addcdiv_(m, denom, value=value)`` for half-precision ``p`` and ``m`` with a float32 ``[1, H]`` denom,
    with the same numbers (computed in float32, rounded into ``p`` once).

    torch runs the mixed-dtype op in a slow element-by-element loop (12x a same-dtype op on CPU); here blocks of
    rows are converted into float32 buffers that stay in cache, updated there with same-dtype ops, and copied back.
    Rounding ``denom`` to bf16/fp16 instead would be fast but not the same numbers, and eps underflows in fp16.
    """
    rows = p.shape[0]
    block = max(1, min(rows, _ROW_BLOCK_ELEMENTS // max(1, p[0].numel())))
    p_work = torch.empty((block, *p.shape[1:]), dtype=denom.dtype, device=p.device)
    m_work = torch.empty_like(p_work)
    for start in range(0, rows, block):
        p_rows, m_rows = p[start:start + block], m[start:start + block]
        n = p_rows.shape[0]
        work = p_work[:n].copy_(p_rows)
        work.addcdiv_(m_work[:n].copy_(m_rows), denom, value=value)
        p_rows.copy_(work)


# --- fused: compiled one-pass kernels for large coupled tensors ------------------------------------------------
def _fused_coupled(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_sq_means,
                   column_means, *, compact, avg_scale, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize):
    """The multi-tensor math, with the [V, H] work done in one pass: the C++ kernel on CPU (which also does the
    [1, H] column arithmetic), a torch.compile'd one on GPUs (and on CPUs where the C++ kernels cannot be built).

    Reads p, g, m and writes p, m once (plus v in full-state mode). Tensors that both ``_kernels.cpp_wanted`` and
    ``_kernels.compile_wanted`` decline (small ones, by default) take the eager multi-tensor ops.
    """
    hyper = dict(compact=compact, avg_scale=avg_scale, amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
                 weight_decay=weight_decay, eps=eps, maximize=maximize)
    policy = _kernels.read_policy()  # (once per call, not per tensor and kernel)
    for i, param in enumerate(params):
        p = _local(param)
        native, compiled = _kernels.cpp_wanted(p, policy), _kernels.compile_wanted(p, policy)
        if not (native or compiled):
            _multi_tensor_coupled([param], [grads[i]], [exp_avgs[i]], [exp_avg_sqs[i]],
                                  [max_exp_avg_sqs[i]] if amsgrad else [], [state_steps[i]], [grad_sq_means[i]],
                                  [column_means[i]], **hyper)
            continue
        g, m, v, step = _local(grads[i]), _local(exp_avgs[i]), _local(exp_avg_sqs[i]), state_steps[i]
        grad_sq_mean = _local(grad_sq_means[i])
        v_col = _column_v(v, compact, column_means[i])
        v_max = _local(max_exp_avg_sqs[i]) if amsgrad else None
        if native and _cpu_kernels.coupled_step(
                p, g, m, None if compact else v, v_col, v_max, step, grad_sq_mean=grad_sq_mean, lr=lr, beta1=beta1,
                beta2=beta2, weight_decay=weight_decay, eps=eps, avg_scale=avg_scale, maximize=maximize):
            continue
        step += 1
        bc1, bc2_sqrt = _bias_corrections(step.item(), beta1, beta2)
        decay, neg_step_size, v_scale = 1 - lr * weight_decay, -lr / bc1, avg_scale / (bc2_sqrt * bc2_sqrt)
        v_col.mul_(beta2).add_(grad_sq_mean, alpha=1 - beta2)
        if amsgrad:
            torch.maximum(v_max, v_col, out=v_max)
            v_col = v_max
        denom = v_col.mul(v_scale).sqrt_().add_(eps)
        _kernels.coupled_update_(p, g, m, denom, decay=decay, beta1=beta1, neg_step_size=neg_step_size,
                                 maximize=maximize, exp_avg_sq=None if compact else v, beta2=beta2, compiled=compiled)


def _column_v(v: Tensor, compact: bool, reducer: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The ``vbar`` the one-pass kernels update in place: the compact state itself, or in full mode a float32 copy of
    the old per-element v's column mean. (The pass updates v itself, so the new column mean follows by linearity:
    mean(b2 v + (1 - b2) g^2) = b2 mean(v) + (1 - b2) mean(g^2), one read of the old v.)"""
    if compact:
        return v
    column_dtype = torch.promote_types(v.dtype, torch.float32)
    if reducer is not None:
        return reducer(_kernels.column_sum(v, column_dtype))
    return _kernels.column_sum(v, column_dtype, divisor=v.shape[0])


def _native_step(kernel: Callable[..., Any], p: Tensor, g: Tensor, m: Tensor, v: Tensor, v_max: Tensor | None,
                 step: Tensor, group: dict[str, Any], *, grad_sq_mean: Tensor | None,
                 check_finite: bool = False) -> bool:
    """One coupled tensor of ``CoupledAdam.step`` through its C++ kernel (see ``_cpu_kernels.coupled_step``)."""
    compact = group["compact"]
    beta1, beta2 = group["betas"]
    return _cpu_kernels.run_step(
        kernel, p, g, m, None if compact else v, _column_v(v, compact, None), v_max, step, grad_sq_mean=grad_sq_mean,
        check_finite=check_finite, lr=_as_float(group["lr"]), beta1=beta1, beta2=beta2,
        weight_decay=group["weight_decay"], eps=group["eps"], avg_scale=group["avg_scale"])


def _compiled_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1, beta2,
                    lr, weight_decay, eps, maximize):
    """Plain AdamW one tensor at a time, each through the compiled one-pass kernel of ``_kernels``."""
    for i, param in enumerate(params):
        step = state_steps[i]
        step += 1
        bc1, bc2_sqrt = _bias_corrections(step.item(), beta1, beta2)
        _kernels.adamw_update_(
            _local(param), _local(grads[i]), _local(exp_avgs[i]), _local(exp_avg_sqs[i]),
            _local(max_exp_avg_sqs[i]) if amsgrad else None, decay=1 - lr * weight_decay, beta1=beta1, beta2=beta2,
            neg_step_size=-lr / bc1, bc2_sqrt=bc2_sqrt, eps=eps, maximize=maximize, compiled=True)

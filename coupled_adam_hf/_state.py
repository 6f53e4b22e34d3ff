"""Optimizer state of :class:`~coupled_adam_hf.CoupledAdam`: layouts, dtypes, and conversion between them.

A parameter ``p`` of shape ``[V, *rest]`` has ``step`` (a float32 scalar), ``exp_avg`` (shape of ``p``) and
``exp_avg_sq``, plus ``max_exp_avg_sq`` with AMSGrad. The second moments come in two layouts:

- *full*: shape of ``p``, as ``torch.optim.AdamW`` keeps them (uncoupled groups, and coupled groups with
  ``compact=False``, as the paper's reference code does);
- *compact* (column): ``[1, *rest]``, one value per hidden column: Coupled Adam's second moment is a mean over the
  vocabulary axis (Stollenwerk & Stollenwerk, ACL 2025), and the mean of an exponential moving average is the moving average of the
  means, so a coupled group needs nothing more. AMSGrad's maximum of a coupled tensor is always compact.

``load_state_dict`` converts between the layouts where that is exact (full -> compact: the column mean; compact ->
full: broadcast over rows, which has the same column mean) and refuses the one direction that is not
(compact -> an uncoupled AdamW group). This module is also the one place that knows what a DTensor is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no DTensors at all
    DTensor = ()  # type: ignore[assignment,misc]

__all__ = [
    "STRUCTURAL_KEYS", "Reducer", "any_dtensor", "check_state_layout", "column_mean", "column_state_dtype", "convert_second_moments",
    "init_state", "is_dtensor", "local", "param_label", "state_dtype", "state_dtypes", "to_like",
]

_CPU = torch.device("cpu")

#: For a coupled tensor whose rows are sharded over ranks: the map from a local per-column sum over rows to the
#: global per-column mean (see ``coupled_adam_hf.distributed.row_sharded_column_mean``).
Reducer = Callable[[Tensor], Tensor]

#: Param-group keys that describe how state is laid out, not hyperparameters: ``load_state_dict`` keeps the values
#: this optimizer was built with and converts the loaded state to them.
STRUCTURAL_KEYS = ("coupled", "update", "compact", "state_dtype")


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and their state are)."""
    return isinstance(t, DTensor)


def any_dtensor(tensors: list[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (one subclass check per distinct type: this runs every step)."""
    return any(issubclass(kind, DTensor) for kind in set(map(type, tensors))) if DTensor else False


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise (kernels work on plain tensors)."""
    return t.to_local() if isinstance(t, DTensor) else t


def state_dtype(param: Tensor, group_state_dtype: torch.dtype | None) -> torch.dtype:
    """dtype of ``exp_avg`` and of full second moments: the group's ``state_dtype``, else the param's own (as in
    ``torch.optim.AdamW``)."""
    return param.dtype if group_state_dtype is None else group_state_dtype


def column_state_dtype(param: Tensor, group_state_dtype: torch.dtype | None) -> torch.dtype:
    """dtype of compact ``[1, *rest]`` statistics: at least float32 (a mean over the whole vocabulary, and tiny)."""
    return torch.promote_types(state_dtype(param, group_state_dtype), torch.float32)


def state_dtypes(group: dict[str, Any], p: Tensor) -> dict[str, torch.dtype]:
    """The dtype of each state tensor of ``p`` in ``group``'s layout."""
    dtype = state_dtype(p, group["state_dtype"])
    column = column_state_dtype(p, group["state_dtype"])
    coupled = group["coupled"]
    return {
        "exp_avg": dtype,
        "exp_avg_sq": column if coupled and group["compact"] else dtype,
        "max_exp_avg_sq": column if coupled else dtype,
    }


def param_label(group: dict[str, Any], p: Tensor, index: int) -> str:
    """How error messages name ``p``: by its name when the group carries ``param_names``, else by position."""
    names = group.get("param_names")
    if names:
        for name, q in zip(names, group["params"]):
            if q is p:
                return f"parameter {name!r} (group {index}, shape {list(p.shape)})"
    position = next((i for i, q in enumerate(group["params"]) if q is p), "?")
    return f"parameter {position} of group {index} (shape {list(p.shape)})"


def column_mean(x: Tensor) -> Tensor:
    """Mean over the vocabulary axis (dim 0), one value per hidden column, kept 2-D for broadcasting."""
    return x.mean(dim=0, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------- creation
def init_state(state: dict[str, Any], group: dict[str, Any], p: Tensor, step_on_param_device: bool) -> None:
    """Fill the empty ``state`` of ``p`` with zeros in ``group``'s layout. The step counter lives on the CPU,
    except for tensors that go through torch's fused AdamW kernel (``step_on_param_device``), which wants it on
    ``p``'s device."""
    dtype = state_dtype(p, group["state_dtype"])
    column_dtype = column_state_dtype(p, group["state_dtype"])
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if step_on_param_device else _CPU)
    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if group["coupled"] and group["compact"]:
        state["exp_avg_sq"] = _zeros_column_state(p, column_dtype)
    else:
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if group["amsgrad"]:
        state["max_exp_avg_sq"] = (
            _zeros_column_state(p, column_dtype)
            if group["coupled"]
            else torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        )


def _zeros_column_state(p: Tensor, dtype: torch.dtype) -> Tensor:
    shape = (1, *p.shape[1:])
    if is_dtensor(p):
        from .distributed import column_state_zeros

        return column_state_zeros(p, shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=p.device)


# ---------------------------------------------------------------------------------------------- loading
_NOT_RECOVERABLE = (
    "Per-element second moments cannot be recovered from column means: keep the parameter in a coupled group, or "
    "save the state with compact=False."
)


def _compact_into_uncoupled(group: dict[str, Any], p: Tensor, index: int, key: str, shape: tuple[int, ...]) -> str:
    return (
        f"CoupledAdam.load_state_dict: {param_label(group, p, index)} is in an uncoupled (plain AdamW) group, but "
        f"its saved {key} has shape {list(shape)} (a compact coupled second moment), not {list(p.shape)}. "
        + _NOT_RECOVERABLE
    )


def check_state_layout(group: dict[str, Any], index: int, p: Tensor, saved: dict[str, Any]) -> None:
    """ValueError naming the parameter and both shapes when a saved moment does not fit ``p`` in this group."""
    full_shape = tuple(p.shape)
    column_shape = (1, *p.shape[1:])
    second = {full_shape, column_shape} if group["coupled"] else {full_shape}
    fits = {"exp_avg": {full_shape}, "exp_avg_sq": second, "max_exp_avg_sq": second}
    for key, allowed in fits.items():
        value = saved.get(key)
        if not isinstance(value, Tensor):
            continue
        shape = tuple(value.shape)
        if shape in allowed:
            continue
        if not group["coupled"] and key != "exp_avg" and shape == column_shape:
            raise ValueError(_compact_into_uncoupled(group, p, index, key, shape))
        expected = " or ".join(str(list(s)) for s in sorted(allowed, key=len))
        raise ValueError(
            f"CoupledAdam.load_state_dict: saved {key} of shape {list(shape)} does not fit "
            f"{param_label(group, p, index)}, which needs {expected}: the state belongs to another model or "
            "another partition of its parameters; nothing was loaded"
        )


def to_like(value: Tensor, p: Tensor) -> Tensor:
    """A copy of loaded state on ``p``'s device (its dtype is settled after layout conversion)."""
    if is_dtensor(p) or is_dtensor(value):
        return value  # distributed checkpoint loading places DTensor state itself
    return value.to(device=p.device, copy=True)


def convert_second_moments(state: dict[str, Any], group: dict[str, Any], p: Tensor, index: int) -> None:
    """Bring loaded ``exp_avg_sq`` / ``max_exp_avg_sq`` into ``group``'s layout, in place (see the module doc)."""
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
                state[key] = column_mean(v)
            elif group["compact"] and key == "exp_avg_sq" and shape == full_shape and shape != column_shape:
                state[key] = column_mean(v)
            elif not group["compact"] and key == "exp_avg_sq" and shape == column_shape and shape != full_shape:
                state[key] = v.expand(full_shape).clone()
        elif shape != full_shape:
            raise ValueError(_compact_into_uncoupled(group, p, index, key, shape))
        elif group["amsgrad"] and key == "exp_avg_sq" and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = v.clone()
    if group["amsgrad"] and "max_exp_avg_sq" not in state and "exp_avg_sq" in state:
        v = state["exp_avg_sq"]
        state["max_exp_avg_sq"] = column_mean(v) if tuple(v.shape) == full_shape and group["coupled"] else v.clone()


def settle_loaded_state(state: dict[str, Any], group: dict[str, Any], p: Tensor, index: int,
                        step_on_param_device: bool) -> None:
    """After torch's loader: this optimizer's layout and dtypes for ``p``'s loaded state, and its own step tensor."""
    convert_second_moments(state, group, p, index)
    dtypes = state_dtypes(group, p)
    if is_dtensor(p):
        from .distributed import lay_out_state_like_param

        lay_out_state_like_param(state, p, dtypes, coupled=group["coupled"], compact=group["compact"])
    else:
        for key, dtype in dtypes.items():
            if key in state and state[key].dtype != dtype:
                state[key] = state[key].to(dtype)
    if "step" in state:
        # a copy: torch's loader hands back the very step tensor of the source optimizer
        device = p.device if step_on_param_device else _CPU
        state["step"] = torch.as_tensor(state["step"]).to(dtype=torch.float32, device=device, copy=True)

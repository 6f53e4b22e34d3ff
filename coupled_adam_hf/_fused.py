"""The fast routes of :class:`~coupled_adam_hf.CoupledAdam`, and the one place that chooses a route per tensor.

Every tensor of a step takes exactly one :class:`Route`, chosen by :func:`choose_routes` from the group's
``implementation`` (``single_tensor`` / ``foreach`` / ``fused``, from the ``foreach`` and ``fused`` flags as in
torch), the tensor's device, dtype and size, the kernel policy of the environment (``COUPLED_ADAM_COMPILE``,
``COUPLED_ADAM_CPP``: see :mod:`coupled_adam_hf._kernels`) and whether an outer ``torch.compile`` is tracing:

============  =====================================================================================================
route         runs
============  =====================================================================================================
REFERENCE     single-tensor torch ops written to be read (``_functional``); ``foreach=False``
FOREACH       multi-tensor torch ops (``_functional``): ``foreach=True``, small tensors, and inside ``torch.compile``
TORCH_FUSED   torch's fused AdamW kernel, exactly as ``torch.optim.AdamW(fused=True)``: uncoupled tensors whose
              state has their own dtype
COMPILED      a torch.compile'd one-pass kernel: large coupled tensors off the CPU, and uncoupled half-precision
              tensors with float32 state (which torch's fused kernel cannot take) of large models
CPP           the hand-written C++ one-pass step of ``_cpu_kernels`` (coupled CPU tensors from 64K elements)
ONE_PASS      the one-pass kernel's ops run eagerly: coupled tensors the C++ kernel declines (float64)
============  =====================================================================================================

A coupled step is one read of ``g`` for its per-column statistics (the coupled second moment needs only the column
means of ``g*g``), then one pass that reads ``p, g, m`` and writes ``p, m``. When every coupled tensor of a step takes
``CPP`` (and none is sharded), :func:`native_coupled_step` runs statistics, non-finite verdict and update in one
C++ call per tensor.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _cpu_kernels, _kernels
from ._kernels import bias_corrections
from ._state import Reducer, local

__all__ = [
    "GroupTensors", "Route", "choose_routes", "compiled_adamw", "implementation_of", "native_coupled_step", "one_pass_coupled",
    "torch_fused_adamw", "torch_fused_eligible",
]

_TORCH_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IMPLEMENTATIONS = ("single_tensor", "foreach", "fused")



class Route(enum.Enum):
    """The kernel one tensor's update goes through (see the module docstring)."""

    REFERENCE = "reference"
    FOREACH = "foreach"
    TORCH_FUSED = "torch_fused"
    COMPILED = "compiled"
    CPP = "cpp"
    ONE_PASS = "one_pass"


def implementation_of(group: dict[str, Any]) -> str:
    """``fused`` (the default, also for ``fused=False`` alone), ``foreach`` (``foreach=True``) or ``single_tensor``
    (``foreach=False``), from a group's flags."""
    if group["fused"] and group["foreach"]:
        raise RuntimeError("CoupledAdam: `foreach` and `fused` cannot both be True")
    if group["fused"]:
        return "fused"
    if group["foreach"]:
        return "foreach"
    return "single_tensor" if group["foreach"] is False else "fused"


def torch_fused_eligible(params: list[Tensor], *, coupled: bool, implementation: str,
                         state_dtype: torch.dtype | None) -> list[bool]:
    """For each of a group's ``params``, whether it goes through torch's fused AdamW kernel (outside
    ``torch.compile``): uncoupled, fused implementation, state in the param's own dtype. Such tensors keep their
    step counter on the param's device."""
    if implementation != "fused" or coupled:
        return [False] * len(params)
    return [p.dtype in _TORCH_FUSED_DTYPES and (state_dtype is None or state_dtype == p.dtype) for p in params]


class GroupTensors(NamedTuple):
    """One group's tensors that step now, as parallel lists (``max_exp_avg_sqs`` empty without AMSGrad)."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    state_steps: list[Tensor]


def choose_routes(implementation: str, tensors: GroupTensors, *, coupled: bool, compact: bool, amsgrad: bool,
                  maximize: bool, eligible: list[bool] | None = None, policy: _kernels.Policy | None = None,
                  ) -> tuple[list[Route], list[Callable[..., Any] | None]]:
    """The route of every tensor of one group, and for ``Route.CPP`` tensors their C++ kernel (None elsewhere).

    ``eligible``: :func:`torch_fused_eligible` of each uncoupled tensor, when the caller has it already.
    """
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = tensors
    n = len(params)
    no_kernels: list[Callable[..., Any] | None] = [None] * n
    compiling = torch.compiler.is_compiling()
    if eligible is not None and not coupled and all(eligible) and not compiling:
        return [Route.TORCH_FUSED] * n, no_kernels  # the common case first: it runs for every group, every step
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "single_tensor":
        return [Route.REFERENCE] * n, no_kernels
    if implementation == "foreach":
        return [Route.FOREACH] * n, no_kernels
    if not coupled:
        # Inside an outer torch.compile torch's fused kernel is opaque (a graph break, and dynamo then runs the
        # whole step eagerly); the multi-tensor ops trace, and the compiler fuses them itself.
        if eligible is None:  # (state exists: its dtype is the group's state dtype)
            eligible = [e and m.dtype == p.dtype for e, p, m in zip(
                torch_fused_eligible(params, coupled=False, implementation=implementation, state_dtype=None),
                params, exp_avgs)]
        if not compiling and all(eligible):
            return [Route.TORCH_FUSED] * n, no_kernels
        fused = [e and not compiling for e in eligible]
        # the rest (half-precision params with float32 state): one compiled pass each for large models
        rest = [local(p) for p, f in zip(params, fused) if not f]
        other = Route.COMPILED if _kernels.compile_wanted_for(rest) else Route.FOREACH
        return [Route.TORCH_FUSED if f else other for f in fused], no_kernels
    policy = policy or _kernels.read_policy()
    routes, kernels = [], []
    for i, param in enumerate(params):
        p = local(param)
        kernel = None
        cpp = _kernels.cpp_wanted(p, policy)
        if cpp:
            v = local(exp_avg_sqs[i])
            kernel = _cpu_kernels.step_kernel(
                p, local(grads[i]), local(exp_avgs[i]), None if compact else v, state_steps[i],
                v if compact else None, None, local(max_exp_avg_sqs[i]) if amsgrad else None, maximize=maximize)
        if kernel is not None:
            route = Route.CPP
        elif _kernels.compile_wanted(p, policy):
            route = Route.COMPILED
        else:
            route = Route.ONE_PASS if cpp else Route.FOREACH
        routes.append(route)
        kernels.append(kernel)
    return routes, kernels


# ---------------------------------------------------------------------------------------------- uncoupled
def torch_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1,
                      beta2, lr, weight_decay, eps, maximize):
    """torch's fused AdamW kernel, as ``torch.optim.AdamW(fused=True)`` runs it (same arguments, same numbers),
    without the functional wrapper's per-call checks, which on a small model cost as much as the kernel."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    for (ps, gs, ms, vs, vmaxs, steps), _ in grouped.values():
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(ps, gs, ms, vs, vmaxs, steps, amsgrad=amsgrad, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, maximize=maximize)


def compiled_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1, beta2,
                   lr, weight_decay, eps, maximize):
    """Plain AdamW one tensor at a time, each through the compiled one-pass kernel of ``_kernels``."""
    for i, param in enumerate(params):
        step = state_steps[i]
        step += 1
        bc1, bc2_sqrt = bias_corrections(step.item(), beta1, beta2)
        _kernels.adamw_update_(
            local(param), local(grads[i]), local(exp_avgs[i]), local(exp_avg_sqs[i]),
            local(max_exp_avg_sqs[i]) if amsgrad else None, decay=1 - lr * weight_decay, beta1=beta1, beta2=beta2,
            neg_step_size=-lr / bc1, bc2_sqrt=bc2_sqrt, eps=eps, maximize=maximize, compiled=True)


# ---------------------------------------------------------------------------------------------- coupled
def column_v(v: Tensor, compact: bool, reducer: Reducer | None) -> Tensor:
    """The ``vbar`` the one-pass kernels update in place: the compact state itself, or in full mode a float32 copy of
    the old per-element v's column mean. (The pass updates v itself, so the new column mean follows by linearity:
    mean(b2 v + (1 - b2) g^2) = b2 mean(v) + (1 - b2) mean(g^2), one read of the old v.)"""
    if compact:
        return v
    column_dtype = torch.promote_types(v.dtype, torch.float32)
    if reducer is not None:
        return reducer(_kernels.column_sum(v, column_dtype))
    return _kernels.column_sum(v, column_dtype, divisor=v.shape[0])


def one_pass_coupled(route: Route, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                     max_exp_avg_sq: Tensor | None, step: Tensor, grad_sq_mean: Tensor, reducer: Reducer | None, *,
                     compact: bool, avg_scale: float, amsgrad: bool, beta1: float, beta2: float, lr: float,
                     weight_decay: float, eps: float, maximize: bool) -> None:
    """One coupled tensor by route ``CPP``, ``COMPILED`` or ``ONE_PASS``: the ``[1, H]`` column arithmetic, then one
    pass over ``[V, H]`` that reads p, g, m and writes p, m (plus v in full-state mode)."""
    p, g, m, v = local(param), local(grad), local(exp_avg), local(exp_avg_sq)
    grad_sq_mean = local(grad_sq_mean)
    v_col = column_v(v, compact, reducer)
    v_max = local(max_exp_avg_sq) if amsgrad else None
    if route is Route.CPP and _cpu_kernels.coupled_step(
            p, g, m, None if compact else v, v_col, v_max, step, grad_sq_mean=grad_sq_mean, lr=lr, beta1=beta1,
            beta2=beta2, weight_decay=weight_decay, eps=eps, avg_scale=avg_scale, maximize=maximize):
        return
    # (a CPP tensor whose actual statistics the C++ kernel declines takes the compiled pass where that is wanted)
    compiled = route is Route.COMPILED or (route is Route.CPP and _kernels.compile_wanted(p))
    step += 1
    bc1, bc2_sqrt = bias_corrections(step.item(), beta1, beta2)
    decay, neg_step_size, v_scale = 1 - lr * weight_decay, -lr / bc1, avg_scale / (bc2_sqrt * bc2_sqrt)
    v_col.mul_(beta2).add_(grad_sq_mean, alpha=1 - beta2)
    if amsgrad:
        torch.maximum(v_max, v_col, out=v_max)
        v_col = v_max
    denom = v_col.mul(v_scale).sqrt_().add_(eps)
    _kernels.coupled_update_(p, g, m, denom, decay=decay, beta1=beta1, neg_step_size=neg_step_size,
                             maximize=maximize, exp_avg_sq=None if compact else v, beta2=beta2, compiled=compiled)


class NativeItem(NamedTuple):
    """A coupled tensor of :func:`native_coupled_step`: its C++ kernel, tensors and group hyperparameters."""

    kernel: Callable[..., Any]
    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    step: Tensor
    hyper: dict[str, Any]

    def run(self, *, grad_sq_mean: Tensor | None, check_finite: bool = False) -> bool:
        h = self.hyper
        v = self.exp_avg_sq
        return _cpu_kernels.run_step(
            self.kernel, self.param, self.grad, self.exp_avg, None if h["compact"] else v,
            column_v(v, h["compact"], None), self.max_exp_avg_sq, self.step, grad_sq_mean=grad_sq_mean,
            check_finite=check_finite, lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"],
            weight_decay=h["weight_decay"], eps=h["eps"], avg_scale=h["avg_scale"])


def native_coupled_step(items: list[NativeItem], check_finite: bool) -> bool:
    """Step every coupled tensor of an optimizer step through its C++ kernel; False (nothing written) when
    ``check_finite`` and a gradient is not finite.

    The largest tensor goes last, statistics, verdict and update in one call (its gradient is still in cache
    when the update reads it again); the others' statistics are taken and checked before that.
    """
    if not items:
        return True
    *others, last = sorted(items, key=lambda item: item.param.numel())
    means = [_kernels.column_sq_sum(item.grad, torch.float32, divisor=item.grad.shape[0]) for item in others]
    if check_finite and means and not math.isfinite(torch.stack([s.sum() for s in means]).sum().item()):
        return False
    if not last.run(grad_sq_mean=None, check_finite=check_finite):
        return False
    for item, mean in zip(others, means):
        item.run(grad_sq_mean=mean)
    return True

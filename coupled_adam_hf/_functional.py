"""Functional Coupled Adam: :func:`coupled_adam` over one param group, and the torch-op kernels it dispatches to.

The single-tensor kernels (``Route.REFERENCE``) are the readable definition, line by line the update of
:class:`~coupled_adam_hf.CoupledAdam`'s docstring; every faster route is tested against them. The multi-tensor
kernels (``Route.FOREACH``) are the same math with torch's ``_foreach`` ops, in place, without ``[V, H]``
temporaries. The fused routes live in ``_fused``, which also chooses the route of each tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _fused, _kernels
from ._fused import Route
from ._kernels import bias_corrections
from ._state import Reducer, any_dtensor, column_mean, local

__all__ = ["coupled_adam", "grad_sq_column_mean", "sgd_step"]


def coupled_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_sq_means: list[Tensor] | None,
    column_reducers: list[Reducer | None] | None = None,
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
    routes: list[Route] | None = None,
) -> None:
    """Functional Coupled Adam over one param group (see :class:`~coupled_adam_hf.CoupledAdam` for the math).

    ``grad_sq_means[i]``: the per-column mean of ``grads[i]**2`` over rows (``[1, H]``), required when ``coupled``
    (:func:`grad_sq_column_mean`). ``column_reducers[i]``, when given, maps a local per-column sum to the global
    mean (rows sharded over ranks). ``routes``: each tensor's route (``_fused.choose_routes``); by default chosen
    here from ``implementation``.
    """
    if coupled and grad_sq_means is None:
        raise ValueError("coupled=True needs grad_sq_means (the per-column means of grad**2)")
    if routes is None:
        tensors = _fused.GroupTensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        routes, _ = _fused.choose_routes(implementation, tensors, coupled=coupled, compact=compact, amsgrad=amsgrad,
                                         maximize=maximize)
    hyper = dict(amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                 maximize=maximize)
    n = len(params)
    reducers = column_reducers or [None] * n
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps)
    for route, indices in _by_route(routes):
        ps, gs, ms, vs, vmaxs, steps = lists if indices is None else (
            [xs[i] for i in indices] if xs else xs for xs in lists)
        if not coupled:
            if route is Route.TORCH_FUSED:
                if any_dtensor(ps):
                    ps, gs, ms, vs, vmaxs, steps = ([local(x) for x in xs] for xs in (ps, gs, ms, vs, vmaxs, steps))
                _fused.torch_fused_adamw(ps, gs, ms, vs, vmaxs, steps, **hyper)
            else:
                {Route.REFERENCE: _single_tensor_adamw, Route.FOREACH: _multi_tensor_adamw,
                 Route.COMPILED: _fused.compiled_adamw}[route](ps, gs, ms, vs, vmaxs, steps, **hyper)
            continue
        means, rs = (grad_sq_means, reducers) if indices is None else (
            [grad_sq_means[i] for i in indices], [reducers[i] for i in indices])
        if route is Route.REFERENCE:
            _single_tensor_coupled(ps, gs, ms, vs, vmaxs, steps, means, rs, compact=compact, avg_scale=avg_scale,
                                   **hyper)
        elif route is Route.FOREACH:
            _multi_tensor_coupled(ps, gs, ms, vs, vmaxs, steps, means, rs, compact=compact, avg_scale=avg_scale,
                                  **hyper)
        else:
            for i in range(len(ps)):
                _fused.one_pass_coupled(route, ps[i], gs[i], ms[i], vs[i], vmaxs[i] if amsgrad else None, steps[i],
                                        means[i], rs[i], compact=compact, avg_scale=avg_scale, **hyper)


def _by_route(routes: list[Route]) -> list[tuple[Route, list[int] | None]]:
    """Each route with the indices of its tensors, in order of first appearance; ``None`` for "all of them"."""
    if not routes:
        return []
    first = routes[0]
    if all(r is first for r in routes):  # the common case, without index bookkeeping
        return [(first, None)]
    indices: dict[Route, list[int]] = {}
    for i, route in enumerate(routes):
        indices.setdefault(route, []).append(i)
    return list(indices.items())


def grad_sq_column_mean(grad: Tensor, reducer: Reducer | None, route: Route, dtype: torch.dtype) -> Tensor:
    """Global per-column mean of ``g*g`` over rows, shape ``[1, *shape[1:]]``, accumulated in ``dtype``.

    A reduction that reads ``g`` once and allocates nothing of size ``[V, H]``: ``vector_norm`` on the reference
    route, the blocked column sums of ``_kernels`` on the others. ``reducer`` (rows sharded over ranks) turns the
    local column sum into the global mean.
    """
    g = local(grad)
    if g.shape[0] == 0:
        col_sum = torch.zeros((1, *g.shape[1:]), dtype=dtype, device=g.device)
    elif route is Route.REFERENCE:
        col_sum = torch.linalg.vector_norm(g, 2, dim=0, keepdim=True, dtype=dtype).square_()
    elif reducer is None:
        return _kernels.column_sq_sum(g, dtype, divisor=g.shape[0])  # the mean, divided inside the kernel
    else:
        col_sum = _kernels.column_sq_sum(g, dtype)
    if reducer is not None:
        return reducer(col_sum)
    return col_sum.div_(g.shape[0])


def sgd_step(params: list[Tensor], *, lr: float, weight_decay: float, maximize: bool) -> None:
    """``torch.optim.SGD``'s update with ``momentum=0``, ``dampening=0``, ``nesterov=False``, one tensor at a time
    (the paper's §6.2 ablation trains the embeddings so)."""
    for p in params:
        if p.grad is None:
            continue
        grad = -p.grad if maximize else p.grad
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        p.add_(grad, alpha=-lr)


# ---------------------------------------------------------------------------------------------- reference
def _single_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1,
                         beta2, lr, weight_decay, eps, maximize):
    for i, param in enumerate(params):
        p, g, m, v, bc1, bc2_sqrt = _begin_step(param, grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i],
                                                beta1, beta2, maximize)

        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax = local(max_exp_avg_sqs[i])
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
        _write_back(param, p)


def _single_tensor_coupled(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_sq_means,
                           column_reducers, *, compact, avg_scale, amsgrad, beta1, beta2, lr, weight_decay, eps,
                           maximize):
    for i, param in enumerate(params):
        p, g, m, v, bc1, bc2_sqrt = _begin_step(param, grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i],
                                                beta1, beta2, maximize)

        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        if compact:
            # v is [1, H]: the EMA of the column means of g*g equals the column mean of the per-element EMA
            v.mul_(beta2).add_(local(grad_sq_means[i]), alpha=1 - beta2)
            v_bar = v * avg_scale
        else:
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            v_bar = _global_column_mean(v, column_reducers[i]) * avg_scale
        if amsgrad:
            vmax = local(max_exp_avg_sqs[i])
            torch.maximum(vmax, v_bar / avg_scale, out=vmax)
            v_bar = vmax * avg_scale
        denom = (v_bar.sqrt() / bc2_sqrt).add_(eps)  # [1, H], broadcast over the rows
        p.addcdiv_(m, denom, value=-lr / bc1)
        _write_back(param, p)


def _global_column_mean(x: Tensor, reducer: Reducer | None) -> Tensor:
    return column_mean(x) if reducer is None else reducer(x.sum(dim=0, keepdim=True))


def _begin_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, beta1: float,
                beta2: float, maximize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    """A one-tensor step's start: ``p, g, m, v`` as plain tensors, ``p`` and ``g`` in the state dtype (with float32
    state, half-precision params are updated in float32 and rounded once, by ``_write_back``), the step counter
    incremented, and the bias corrections."""
    m, v = local(exp_avg), local(exp_avg_sq)
    p, g = local(param), local(grad)
    if p.dtype != m.dtype:
        p = p.to(m.dtype)
    if g.dtype != m.dtype:
        g = g.to(m.dtype)
    step += 1
    bc1, bc2_sqrt = bias_corrections(step.item(), beta1, beta2)
    return p, (-g if maximize else g), m, v, bc1, bc2_sqrt


def _write_back(param: Tensor, working: Tensor) -> None:
    target = local(param)
    if working is not target and working.data_ptr() != target.data_ptr():
        target.copy_(working)


# ---------------------------------------------------------------------------------------------- multi-tensor
def _multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad, beta1,
                        beta2, lr, weight_decay, eps, maximize):
    if not params:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [[local(p) for p in params], [local(g) for g in grads], [local(m) for m in exp_avgs],
         [local(v) for v in exp_avg_sqs], [local(v) for v in max_exp_avg_sqs] if amsgrad else [None] * len(params),
         state_steps]
    )
    for (_device, _dtype), ((ps, gs, ms, vs, vmaxs, steps), _) in grouped.items():
        dtype = ms[0].dtype
        work = [p if p.dtype == dtype else p.to(dtype) for p in ps]
        gs = [g if g.dtype == dtype else g.to(dtype) for g in gs]
        if maximize:
            gs = torch._foreach_neg(gs)
        torch._foreach_add_(steps, 1)
        bc = [bias_corrections(s.item(), beta1, beta2) for s in steps]

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
                          column_reducers, *, compact, avg_scale, amsgrad, beta1, beta2, lr, weight_decay, eps,
                          maximize):
    """Coupled tensors are few (1-3 per model) and large: per-tensor in-place ops, no [V, H] temporaries.

    Passes over [V, H] memory in compact mode: weight decay (skipped when 0), m <- lerp(m, g), p <- p - c*m/d.
    The column statistics of g were taken before (one read of g).
    """
    for i, param in enumerate(params):
        p, g, m, v, bc1, bc2_sqrt = _begin_step(param, grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i],
                                                beta1, beta2, maximize)

        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        if compact:
            v.mul_(beta2).add_(local(grad_sq_means[i]), alpha=1 - beta2)
            v_col = v
        else:
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            v_col = _global_column_mean(v, column_reducers[i])
        if amsgrad:
            vmax = local(max_exp_avg_sqs[i])
            torch.maximum(vmax, v_col, out=vmax)
            v_col = vmax
        denom = v_col.mul(avg_scale / (bc2_sqrt * bc2_sqrt)).sqrt_().add_(eps)
        if m.dtype == denom.dtype:
            p.addcdiv_(m, denom, value=-lr / bc1)
        else:
            _addcdiv_by_rows_(p, m, denom, -lr / bc1)
        _write_back(param, p)


# Elements per block of rows in _addcdiv_by_rows_ (1 MiB of float32: the working buffers stay in cache).
ROW_BLOCK_ELEMENTS = 1 << 18


def _addcdiv_by_rows_(p: Tensor, m: Tensor, denom: Tensor, value: float) -> None:
    """``p.addcdiv_(m, denom, value=value)`` for half-precision ``p`` and ``m`` with a float32 ``[1, H]`` denom,
    with the same numbers (computed in float32, rounded into ``p`` once).

    torch runs that mixed-dtype op element by element; here blocks of rows are converted into float32 buffers that
    stay in cache, updated there with same-dtype ops, and copied back. Rounding ``denom`` to bf16/fp16 instead
    would be fast but not the same numbers, and eps underflows in fp16.
    """
    rows = p.shape[0]
    block = max(1, min(rows, ROW_BLOCK_ELEMENTS // max(1, p[0].numel())))
    p_work = torch.empty((block, *p.shape[1:]), dtype=denom.dtype, device=p.device)
    m_work = torch.empty_like(p_work)
    for start in range(0, rows, block):
        p_rows, m_rows = p[start:start + block], m[start:start + block]
        n = p_rows.shape[0]
        work = p_work[:n].copy_(p_rows)
        work.addcdiv_(m_work[:n].copy_(m_rows), denom, value=value)
        p_rows.copy_(work)

"""Kernel bodies (compiled one-pass updates, column sums) and the environment's kernel policy.

A coupled matrix ``E`` of shape ``[V, H]`` needs no per-element second moment (one value per column), so its step
can move fewer bytes than AdamW's: one read of ``g`` for the per-column statistics, then one pass that reads
``p, g, m`` and writes ``p, m`` (24 bytes per fp32 parameter, against AdamW's 28). Plain torch ops cannot get there: every op is
its own pass over ``[V, H]`` memory (``m.lerp_`` and ``p.addcdiv_`` alone move 24 bytes), and on CPU torch's
column reductions (``vector_norm(g, dim=0)``) run at a fraction of memory bandwidth. Hence:

- :func:`column_sq_sum` / :func:`column_sum`: per-column sums over rows: on CPU the C++ kernel of
  ``_cpu_kernels``, else (or where it cannot be built) blocks of rows accumulated into a small buffer;
- :func:`coupled_update_`: the element-wise part of a coupled step, and :func:`adamw_update_`: plain AdamW for a
  half-precision param with float32 state (which torch's fused kernel cannot take). Each is the reference path's
  sequence of ops; compiled by ``torch.compile`` (inductor: vectorized C++ on CPU, Triton on CUDA) it becomes one
  pass over memory, run eagerly it is the fallback. On CPU the optimizer calls the hand-written C++ step of
  ``_cpu_kernels`` instead (:func:`cpp_wanted`), which also takes the column statistics and does the ``[1, H]``
  column arithmetic.

What the environment allows is answered here, per coupled tensor by :func:`cpp_wanted` (CPU) and
:func:`compile_wanted`, and per set of uncoupled half-precision tensors by :func:`compile_wanted_for`; the route each
tensor takes is chosen from these answers in one place, ``_fused.choose_routes``. Two environment variables:

- ``COUPLED_ADAM_COMPILE``: ``auto`` (default) takes the C++ CPU kernels from :data:`AUTO_CPP_MIN_NUMEL` elements
  on (built once per machine, about 2 s per variant, cached on disk) and compiles with torch.compile from
  :data:`AUTO_COMPILE_MIN_NUMEL` on (seconds once per process, which only pays off for real embedding matrices);
  smaller tensors, and the test suite, stay on eager ops. ``1`` / ``always``: fast kernels whatever the size;
  ``0`` / ``never``: eager ops only;
- ``COUPLED_ADAM_CPP``: ``0`` keeps the C++ kernels out (CPUs then run the torch.compile'd ones, as GPUs do).

A failed compile (no C++ compiler, no Triton, an inductor bug) is logged at debug level and that kernel stays
eager for the rest of the process. Inside an outer ``torch.compile`` (a compiled training step) the eager ops are
used, so the outer graph captures and fuses them itself.
"""

from __future__ import annotations

import logging
import math
import os
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _cpu_kernels

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_COMPILE_MIN_NUMEL", "AUTO_CPP_MIN_NUMEL", "adamw_update_", "bias_corrections", "column_sq_sum",
    "column_sum", "compile_wanted", "compile_wanted_for", "coupled_update_", "cpp_enabled", "cpp_wanted", "Policy",
    "read_policy",
]

#: ``COUPLED_ADAM_COMPILE=auto`` compiles coupled tensors from this size on (2**24 elements: a 32k x 512 matrix;
#: GPT-2's 50304 x 768 is 2.3x that). Below it, a step saves too little to repay the one-off compile time.
AUTO_COMPILE_MIN_NUMEL = 1 << 24

#: ``COUPLED_ADAM_COMPILE=auto`` runs coupled CPU tensors from this size on (2**16 elements: a 512 x 128 matrix)
#: through the hand-written C++ kernels of ``_cpu_kernels``. They are compiled once per machine (cached on disk), not
#: per process, so they pay off much earlier than a torch.compile'd kernel; below this size a step is dominated by
#: call overhead, which the eager ops have as well (docs/performance.md has the measurements).
AUTO_CPP_MIN_NUMEL = 1 << 16

# Column sums on CPU: elements per block of rows in the accumulation loop (a 2 MiB float32 buffer: large enough that
# the per-block overhead vanishes, small enough to stay in cache).
_EAGER_BLOCK_ELEMENTS = 1 << 19

_COMPILE_ENV = "COUPLED_ADAM_COMPILE"
_CPP_ENV = "COUPLED_ADAM_CPP"
_broken: set[str] = set()  # kernels whose compilation failed in this process
_compiled: dict[tuple, Callable[..., Any]] = {}  # one compiled function per kernel and signature


# ---------------------------------------------------------------------------------------------- policy
def compile_policy() -> str:
    """``auto``, ``always`` or ``never``, from ``COUPLED_ADAM_COMPILE``."""
    raw = os.environ.get(_COMPILE_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on", "always"):
        return "always"
    if raw in ("0", "false", "no", "off", "never"):
        return "never"
    raise ValueError(f"{_COMPILE_ENV}={raw!r} is not understood; use auto, 1 (always) or 0 (never)")


def cpp_enabled() -> bool:
    """``COUPLED_ADAM_CPP`` (default ``1``): ``0`` keeps the hand-written C++ CPU kernels out, so CPUs run the
    torch.compile'd kernels (or eager ops) as GPUs do: for comparing the two, or to rule the C++ kernels out."""
    raw = os.environ.get(_CPP_ENV, "1").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{_CPP_ENV}={raw!r} is not understood; use 1 (the default) or 0 (no C++ kernels)")


class Policy(NamedTuple):
    """The kernel choice of the environment: ``compile`` (``auto``/``always``/``never``) and ``cpp``."""

    compile: str
    cpp: bool


def read_policy() -> Policy:
    """``COUPLED_ADAM_COMPILE`` and ``COUPLED_ADAM_CPP``, read now (an optimizer step reads them once)."""
    return Policy(compile_policy(), cpp_enabled())


def compile_wanted(t: Tensor, policy: Policy | None = None) -> bool:
    """Whether the fused path should run compiled kernels on tensor ``t`` (a plain, local tensor)."""
    if t.device.type not in ("cpu", "cuda"):
        return False
    if torch.compiler.is_compiling():  # an outer torch.compile traces the eager math itself
        return False
    choice = policy.compile if policy is not None else compile_policy()
    if choice == "never":
        return False
    return choice == "always" or t.numel() >= AUTO_COMPILE_MIN_NUMEL


def cpp_wanted(t: Tensor, policy: Policy | None = None) -> bool:
    """Whether a coupled CPU tensor ``t`` should go through the C++ kernels of ``_cpu_kernels``."""
    if not t.is_cpu or torch.compiler.is_compiling() or not _cpu_kernels.available():
        return False
    policy = policy or read_policy()
    if not policy.cpp or policy.compile == "never":
        return False
    return policy.compile == "always" or t.numel() >= AUTO_CPP_MIN_NUMEL


def _signature(value: Any) -> Any:
    if isinstance(value, Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device)
    return value


def _run_compiled(name: str, eager: Callable[..., Any], *args: Any) -> Any:
    """Run ``eager`` compiled for these exact shapes; on any compile failure fall back to it for good.

    One compiled function per signature (shapes, strides, dtypes, flags), each on its own copy of the code object:
    dynamo then never recompiles, so its recompile limit (8 per code object, which a model's dozen parameter
    shapes would exceed) does not apply, and no kernel is built for dynamic shapes, which inductor's CPU code runs
    at about half the speed of a static-shape kernel.
    """
    if name not in _broken:
        key = (name, *map(_signature, args))
        fn = _compiled.get(key)
        try:
            if fn is None:
                code = eager.__code__.replace(co_name=f"{eager.__name__}_{len(_compiled)}")
                clone = types.FunctionType(code, eager.__globals__, code.co_name, eager.__defaults__)
                fn = _compiled[key] = torch.compile(clone, fullgraph=True, dynamic=False,
                                                   options={"emulate_precision_casts": True})
            return fn(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager kernel
            _broken.add(name)
            logger.debug("coupled_adam_hf: torch.compile of %s failed, using eager torch ops: %r", name, error)
    return eager(*args)


# ---------------------------------------------------------------------------------------------- column sums
def _column_sum(x: Tensor, dtype: torch.dtype, square: bool, divisor: float) -> Tensor:
    shape = (1, *x.shape[1:])
    if x.shape[0] == 0 or x.numel() == 0:
        return torch.zeros(shape, dtype=dtype, device=x.device)
    if dtype == torch.float32 and cpp_wanted(x):
        total = _cpu_kernels.column_sum(x, square, divisor)
        if total is not None:
            return total
    total = _torch_column_sum(x, dtype, square)
    return total if divisor == 1.0 else total.div_(divisor)


def _torch_column_sum(x: Tensor, dtype: torch.dtype, square: bool) -> Tensor:
    shape = (1, *x.shape[1:])
    flat = x.reshape(x.shape[0], -1)
    rows, cols = flat.shape
    if x.device.type != "cpu":
        # GPU column reductions run at bandwidth; vector_norm also avoids the [V, N] temporary of (x*x).sum(0)
        if square:
            total = torch.linalg.vector_norm(flat, 2, dim=0, keepdim=True, dtype=dtype).square_()
        else:
            total = flat.sum(dim=0, keepdim=True, dtype=dtype)
        return total.reshape(shape)
    # On CPU, accumulate blocks of rows into a reused buffer: every block streams through contiguous memory and
    # the buffer stays in cache. torch's own column reductions walk down the columns (vector_norm(x, dim=0) of
    # GPT-2's embedding gradient takes longer than a whole fused AdamW step of it), and inductor's generated
    # reduction is no faster than this loop.
    block = max(1, min(rows, _EAGER_BLOCK_ELEMENTS // cols))
    acc = torch.zeros(block, cols, dtype=dtype, device=x.device)
    # half-precision input: converted block by block into one reused buffer (a fresh .to(dtype) per block would
    # cost an allocation and its page faults every time)
    converted = torch.empty_like(acc) if flat.dtype != dtype else None
    for start in range(0, rows, block):
        chunk = flat[start:start + block]
        if converted is not None:
            chunk = converted[: chunk.shape[0]].copy_(chunk)
        target = acc[: chunk.shape[0]]
        if square:
            target.addcmul_(chunk, chunk)
        else:
            target.add_(chunk)
    return acc.sum(dim=0, keepdim=True).reshape(shape)


def column_sq_sum(x: Tensor, dtype: torch.dtype, divisor: float = 1.0) -> Tensor:
    """Per-column sum of ``x * x`` over dim 0, divided by ``divisor`` (the row count gives the mean), shape
    ``[1, *x.shape[1:]]``, accumulated in ``dtype``.

    One read of ``x`` at close to memory bandwidth; nothing of its size is allocated.
    """
    return _column_sum(x, dtype, True, divisor)


def column_sum(x: Tensor, dtype: torch.dtype, divisor: float = 1.0) -> Tensor:
    """Per-column sum of ``x`` over dim 0, divided by ``divisor``, shape ``[1, *x.shape[1:]]``, accumulated in
    ``dtype``."""
    return _column_sum(x, dtype, False, divisor)


# ---------------------------------------------------------------------------------------------- the update
def bias_corrections(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Adam's bias corrections at ``step``: ``1 - beta1**step`` and ``sqrt(1 - beta2**step)``."""
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def _scalars_like(t: Tensor, values: list[float]) -> Tensor:
    """Step-dependent scalars as a tensor on ``t``'s device, in at least float32 (a bf16 ``1 - lr * wd`` would round
    to 1); on a GPU through pinned memory, without a sync."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    if t.device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(t.device, non_blocking=True)


def _coupled_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor | None, denom: Tensor,
                    scalars: Tensor, maximize: bool) -> None:
    """m <- m + (1-b1) (g - m); (full state) v <- b2 v + (1-b2) g^2; p <- p * decay + neg_step_size * m / denom.

    ``scalars`` holds ``[decay, 1 - beta1, neg_step_size, beta2, 1 - beta2]`` as a tensor: values that change
    from step to step must be tensors, or the compiler specializes on them and recompiles every step.
    Computed in ``scalars.dtype`` (at least float32), each tensor rounded once when stored, and ``p`` updated
    from ``m`` as stored, like the C++ kernel: the rounding is explicit, because inductor fuses half-precision ops
    without rounding between them, which eager ops would do. Run eagerly it is several passes over memory;
    compiled, inductor fuses it into one pass that reads p, g, m (and v) and writes p, m (and v).
    """
    decay, one_minus_beta1, neg_step_size, beta2, one_minus_beta2 = scalars.unbind()
    compute = scalars.dtype
    g = grad.to(compute)
    if maximize:
        g = -g
    m = exp_avg.to(compute)
    m = m + (g - m) * one_minus_beta1  # lerp's formula (for weights < 0.5) without its branch
    exp_avg.copy_(m)
    m = _as_stored(m, exp_avg.dtype)
    if exp_avg_sq is not None:
        exp_avg_sq.copy_(exp_avg_sq.to(compute) * beta2 + g * g * one_minus_beta2)
    param.copy_(param.to(compute) * decay + m / denom * neg_step_size)


def _as_stored(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` and back: the value a tensor of that dtype holds after ``copy_(x)``."""
    return x if dtype == x.dtype else x.to(dtype).to(x.dtype)


def coupled_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, denom: Tensor, *, decay: float,
                    beta1: float, neg_step_size: float, maximize: bool, exp_avg_sq: Tensor | None = None,
                    beta2: float = 0.0, compiled: bool = False) -> None:
    """The element-wise part of a coupled step, in place, in one pass over memory when ``compiled``
    (torch.compile); else eager torch ops. (The C++ CPU kernel, ``_cpu_kernels.coupled_step``, also takes the
    column arithmetic that computes ``denom``.)

    ``denom`` is the ``[1, H]`` denominator (``sqrt(vbar) / sqrt(1 - b2^t) + eps``), broadcast over rows;
    ``exp_avg_sq`` (full-state mode only) is updated with ``beta2`` in the same pass.
    """
    scalars = _scalars_like(exp_avg, [decay, 1.0 - beta1, neg_step_size, beta2, 1.0 - beta2])
    args = (param, grad, exp_avg, exp_avg_sq, denom, scalars, maximize)
    if compiled:
        _run_compiled("coupled_update", _coupled_update, *args)
    else:
        _coupled_update(*args)


# ---------------------------------------------------------------------------------------------- mixed-precision AdamW
def _adamw_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
                  scalars: Tensor, maximize: bool) -> None:
    """Plain AdamW for a half-precision ``param`` with float32 state, the reference kernel's ops in one pass.

    ``scalars``: ``[decay, 1 - beta1, beta2, 1 - beta2, neg_step_size, bias_correction2_sqrt, eps]``.
    torch's fused AdamW needs the state in the param's dtype, so these params would otherwise take the multi-tensor
    ops, with float32 copies of p and g and a pass per op.
    """
    decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps = scalars.unbind()
    g = grad.to(exp_avg.dtype)
    if maximize:
        g = -g
    exp_avg.add_((g - exp_avg) * one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(g * g * one_minus_beta2)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
        v = max_exp_avg_sq
    denom = v.sqrt() / bc2_sqrt + eps
    p = param.to(exp_avg.dtype)
    p.mul_(decay).add_(exp_avg / denom * neg_step_size)
    if p is not param:
        param.copy_(p)


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
                  *, decay: float, beta1: float, beta2: float, neg_step_size: float, bc2_sqrt: float, eps: float,
                  maximize: bool, compiled: bool = False) -> None:
    """One AdamW step of one tensor, in place (one pass over memory when ``compiled``)."""
    scalars = _scalars_like(exp_avg, [decay, 1.0 - beta1, beta2, 1.0 - beta2, neg_step_size, bc2_sqrt, eps])
    args = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, maximize)
    if compiled:
        _run_compiled("adamw_update", _adamw_update, *args)
    else:
        _adamw_update(*args)


def compile_wanted_for(tensors: list[Tensor]) -> bool:
    """Whether a set of (uncoupled) tensors should use compiled kernels: their total size decides under ``auto``."""
    if not tensors or torch.compiler.is_compiling():
        return False
    if any(t.device.type not in ("cpu", "cuda") for t in tensors):
        return False
    policy = compile_policy()
    if policy == "never":
        return False
    return policy == "always" or sum(t.numel() for t in tensors) >= AUTO_COMPILE_MIN_NUMEL

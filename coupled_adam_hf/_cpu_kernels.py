"""Hand-written C++ kernels for coupled tensors on CPU, built with inductor's C++ toolchain.

Two loops carry a coupled step on CPU, and neither is a good fit for generated code:

- the per-column sum of ``g*g`` over rows (an *outer* reduction: inductor's C++ backend, torch's
  ``vector_norm(g, dim=0)`` and a blocked ``addcmul_`` loop all run well below the speed of reading ``g``);
- the one-pass update ``m <- m + (1-b1)(g-m)``, ``p <- p*decay + m*step`` over ``[V, H]``, preceded by the ``[H]``
  column arithmetic (second-moment EMA, AMSGrad maximum, the step per column): as torch ops that is half a dozen
  tiny kernels, whose dispatch cost a small model's step more than the row pass saves.

``coupled_step`` runs both in one call, with the non-finite verdict between them and the step counter and bias
corrections before the update, so ``CoupledAdam.step`` makes a single call per coupled tensor: on a CPU whose caches
the rest of the training step has just flushed, every Python function and torch op the step runs costs tens of
microseconds. ``column_sum`` is the first loop alone. Each is a plain OpenMP loop over rows with a vectorizable inner
loop over columns. Column sums go over fixed blocks of rows that are combined in order: the result does not depend
on the number of threads (a resumed run on another machine steps bit for bit the same).

The sources are compiled on first use by ``torch._inductor``'s ``CppPythonBindingsCodeCache`` (the compiler,
flags, OpenMP and vector ISA that inductor's own CPU kernels use; about 2 s per variant, then cached on disk
across processes). That is a private torch API: if it is missing, or the compile fails (no C++ compiler), the
caller falls back to the portable kernels in ``_kernels`` and this module is not tried again in the process.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# float64 tensors (tests, analysis) stay on torch ops: these kernels compute in float32
_C_TYPES = {
    torch.float32: "float",
    torch.bfloat16: "c10::BFloat16",
    torch.float16: "c10::Half",
}

_PRELUDE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <ATen/cpu/vec/functional.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>
typedef IN_T in_t;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
// Loops step over 2W elements: two float vectors, which is one full vector of bfloat16/half, so half-precision
// memory is read and written with full-width loads and stores and converted in registers (a W-element load of
// half-precision data is a masked or partial load, and storing a rounded value then loading it back stalls on
// store forwarding: both made the bf16 kernels slower than the float32 ones).
constexpr int64_t W2 = 2 * W;
template <typename T> inline void load2(const T* ptr, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(ptr);
    b = Vec::loadu(ptr + W);
  } else {
    static_assert(at::vec::Vectorized<T>::size() == W2, "a half-precision vector must hold two float vectors");
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(ptr));
  }
}
// stores a, b as T; afterwards a, b hold the values as stored (rounded to T)
template <typename T> inline void store2(T* ptr, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(ptr);
    b.store(ptr + W);
  } else {
    const auto stored = at::vec::convert_from_float<T>(a, b);
    stored.store(ptr);
    std::tie(a, b) = at::vec::convert_to_float<T>(stored);
  }
}
"""

# Per-column sums over rows, shared by both kernels. Rows are cut into blocks whose size depends on the shape only;
# each block sums its rows in order into its own row of a buffer, and the blocks are then added in order, so the
# result does not depend on the number of threads. Narrow rows (up to ROW_AT_A_TIME_COLS columns) are added one row
# at a time, one sequential stream with the accumulator in L1; wider ones eight rows at a time in registers. (Each
# was the faster at reading the gradient from memory at its widths: 256 and 768 columns one way, 2048 the other.)
_COLUMN_SUMS = r"""
constexpr int64_t ROW_AT_A_TIME_COLS = 1024;
template <bool SQ> inline void accumulate(Vec& s, const Vec& value) {
  s = SQ ? at::vec::fmadd(value, value, s) : s + value;
}
template <bool SQ> inline float term(float value) { return SQ ? value * value : value; }
template <bool SQ, typename T> inline void add_row(const T* row, float* acc, int64_t cols, int64_t vec_cols) {
  for (int64_t j = 0; j < vec_cols; j += W2) {
    Vec s0 = Vec::loadu(acc + j), s1 = Vec::loadu(acc + j + W), v0, v1;
    load2(row + j, v0, v1);
    accumulate<SQ>(s0, v0);
    accumulate<SQ>(s1, v1);
    s0.store(acc + j);
    s1.store(acc + j + W);
  }
  for (int64_t j = vec_cols; j < cols; ++j) acc[j] += term<SQ>(static_cast<float>(row[j]));
}
// rows [r0, r1) of x into acc (cols values, overwritten), each row added in order
template <bool SQ, typename T> void block_column_sums(const T* x, float* acc, int64_t r0, int64_t r1, int64_t cols) {
  const int64_t vec_cols = cols - cols % W2;
  std::fill(acc, acc + cols, 0.0f);
  int64_t r = r0;
  if (cols > ROW_AT_A_TIME_COLS) {
    for (; r + 8 <= r1; r += 8) {
      const T* row = x + r * cols;
      for (int64_t j = 0; j < vec_cols; j += W2) {
        Vec s0 = Vec::loadu(acc + j), s1 = Vec::loadu(acc + j + W);
        for (int64_t u = 0; u < 8; ++u) {
          Vec v0, v1;
          load2(row + u * cols + j, v0, v1);
          accumulate<SQ>(s0, v0);
          accumulate<SQ>(s1, v1);
        }
        s0.store(acc + j);
        s1.store(acc + j + W);
      }
      for (int64_t j = vec_cols; j < cols; ++j) {
        for (int64_t u = 0; u < 8; ++u) acc[j] += term<SQ>(static_cast<float>(row[u * cols + j]));
      }
    }
  }
  for (; r < r1; ++r) add_row<SQ>(x + r * cols, acc, cols, vec_cols);
}
// out[j] = (sum over rows of x[r, j], or of its square) / divisor
template <bool SQ, typename T> void column_sums(const T* x, float* out, int64_t rows, int64_t cols, float divisor) {
  const int64_t block_rows = std::max<int64_t>(64, (rows + 255) / 256);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  // one buffer per calling thread, kept between calls: a fresh one of this size is an mmap, page faults and an
  // munmap on every call (every block zeroes its own part)
  // (thread_local: taken by pointer before the parallel region, whose worker threads would see their own)
  static thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(blocks * cols)) buffer.resize(blocks * cols);
  float* const partial = buffer.data();
  #pragma omp parallel
  {
  #pragma omp for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    block_column_sums<SQ>(x, partial + b * cols, b * block_rows, std::min(rows, (b + 1) * block_rows), cols);
  }
  // (the implicit barrier of the loop above: every block is done)
  #pragma omp for schedule(static)
  for (int64_t j = 0; j < cols; ++j) {
    float s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[b * cols + j];
    out[j] = s / divisor;
  }
  }
}
"""

# Per-column sum over rows of x (SQUARE: of x*x), in float, divided by `divisor` (1: the sum; rows: the mean).
_COLUMN_SUM = _PRELUDE + _COLUMN_SUMS + r"""
extern "C" int64_t kernel(const in_t* x, float* out, int64_t rows, int64_t cols, float divisor) {
  column_sums<SQUARE>(x, out, rows, cols, divisor);
  return 0;
}
"""

# A coupled step in place, computed in float, each tensor rounded once when stored.
# Statistics (`stats` 1 or 2): the column means of g^2 (`grad_sq_mean`, else given), with 1: when their sum is not
# finite, nothing is written and the kernel returns 0 (the caller skips the step).
# Counter and bias corrections: step <- step + 1, then 1 - b1^t and sqrt(1 - b2^t) in double, from the same double
# hyperparameters and with the same expressions as the Python paths, so every path steps with the same float scalars.
# Column phase (serial, `cols` values): vbar <- b2 vbar + (1-b2) mean(g^2) in `v_col` (the compact state, or the
# column mean of the old per-element v, which becomes that of the new one by linearity); with AMSGRAD
# v_max <- max(v_max, vbar) and vbar <- v_max; then the step per column, neg_step / (sqrt(vbar * v_scale) + eps).
# Row pass (parallel, one pass over memory): m <- m + (1-b1)(g - m); with FULL also v <- b2 v + (1-b2) g^2; then
# p <- p * decay + m * step[col], with m as stored (rounded to the state dtype), as the reference path reads it.
_COUPLED_UPDATE = _PRELUDE + _COLUMN_SUMS + r"""
typedef STATE_T state_t;
inline void update_one(in_t* p, const in_t* g, state_t* m, state_t* v, float scale, float decay, float c1,
                       float beta2, float c2) {
  float grad = static_cast<float>(*g);
  if (MAXIMIZE) grad = -grad;
  const float old_m = static_cast<float>(*m);
  const state_t new_m = static_cast<state_t>(std::fma(grad - old_m, c1, old_m));
  *m = new_m;
  if (FULL) *v = static_cast<state_t>(std::fma(grad * grad, c2, static_cast<float>(*v) * beta2));
  *p = static_cast<in_t>(std::fma(static_cast<float>(new_m), scale, static_cast<float>(*p) * decay));
}
inline Vec new_moment(const Vec& grad, const Vec& old_m, const Vec& c1) {
  return at::vec::fmadd(grad - old_m, c1, old_m);
}
inline Vec new_second_moment(const Vec& grad, const Vec& old_v, const Vec& beta2, const Vec& c2) {
  return at::vec::fmadd(grad * grad, c2, old_v * beta2);
}
inline Vec new_param(const Vec& m, const Vec& scale, const Vec& old_p, const Vec& decay) {
  return at::vec::fmadd(m, scale, old_p * decay);
}
// torch.maximum: NaN wins
inline float nan_max(float a, float b) { return std::isnan(a) ? a : (std::isnan(b) ? b : std::max(a, b)); }
extern "C" int64_t kernel(in_t* p, const in_t* g, state_t* m, state_t* v, float* v_col, const float* grad_sq_mean,
                          float* v_max, float* step, int64_t rows, int64_t cols, double lr, double beta1,
                          double beta2, double weight_decay, double eps, double avg_scale, int64_t stats) {
  // (thread_local, kept between calls; taken by pointer before the parallel regions)
  static thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(2 * cols)) buffer.resize(2 * cols);
  float* const scale = buffer.data();
  if (stats != 0) {
    float* const mean = scale + cols;
    column_sums<true>(g, mean, rows, cols, static_cast<float>(rows));
    if (stats == 1) {
      float total = 0.0f;
      for (int64_t j = 0; j < cols; ++j) total += mean[j];
      if (!std::isfinite(total)) return 0;
    }
    grad_sq_mean = mean;
  }
  const float t = *step + 1.0f;
  *step = t;
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(t)));
  const float decay = static_cast<float>(1.0 - lr * weight_decay), c1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2);
  const float v_scale = static_cast<float>(avg_scale / (bc2_sqrt * bc2_sqrt)), eps_f = static_cast<float>(eps);
  const float neg_step = static_cast<float>(-lr / bc1);
  for (int64_t j = 0; j < cols; ++j) {
    float vbar = std::fma(grad_sq_mean[j], c2, v_col[j] * b2);
    v_col[j] = vbar;
    if (AMSGRAD) vbar = v_max[j] = nan_max(v_max[j], vbar);
    scale[j] = neg_step / (std::sqrt(vbar * v_scale) + eps_f);
  }
  const int64_t vec_cols = cols - cols % W2;
  const Vec decay_v(decay), c1_v(c1), beta2_v(b2), c2_v(c2);
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    in_t* pr = p + r * cols;
    const in_t* gr = g + r * cols;
    state_t* mr = m + r * cols;
    state_t* vr = FULL ? v + r * cols : nullptr;
    for (int64_t j = 0; j < vec_cols; j += W2) {
      Vec g0, g1, m0, m1, p0, p1;
      load2(gr + j, g0, g1);
      if (MAXIMIZE) {
        g0 = g0.neg();
        g1 = g1.neg();
      }
      load2(mr + j, m0, m1);
      m0 = new_moment(g0, m0, c1_v);
      m1 = new_moment(g1, m1, c1_v);
      store2(mr + j, m0, m1);  // m0, m1 are now as stored
      if (FULL) {
        Vec v0, v1;
        load2(vr + j, v0, v1);
        v0 = new_second_moment(g0, v0, beta2_v, c2_v);
        v1 = new_second_moment(g1, v1, beta2_v, c2_v);
        store2(vr + j, v0, v1);
      }
      load2(pr + j, p0, p1);
      p0 = new_param(m0, Vec::loadu(scale + j), p0, decay_v);
      p1 = new_param(m1, Vec::loadu(scale + j + W), p1, decay_v);
      store2(pr + j, p0, p1);
    }
    for (int64_t j = vec_cols; j < cols; ++j) update_one(pr + j, gr + j, mr + j, FULL ? vr + j : nullptr, scale[j],
                                                         decay, c1, b2, c2);
  }
  return 1;
}
"""

_lock = threading.Lock()
_loaded: dict[tuple, Callable[..., Any]] = {}
_unavailable: list[str] = []  # why the kernels cannot be built in this process (empty: not known to fail)


def _source(template: str, **types: str) -> str:
    source = template
    for name, value in types.items():
        source = source.replace(name, value)
    return source


# inductor's Python bindings pass float arguments as C floats and return None; these kernels take their
# hyperparameters as doubles (to compute the bias corrections exactly as Python does) and return an int64 status.
_PARSE_DOUBLE = """
template <> inline double parse_arg<double>(PyObject* args, size_t n) {{
    const double result = PyFloat_AsDouble(PyTuple_GET_ITEM(args, n));
    if(result == -1.0 && PyErr_Occurred()) [[unlikely]]
        throw std::runtime_error("expected float arg");
    return result;
}}
"""


@functools.cache
def _bindings() -> Any:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class Bindings(CppPythonBindingsCodeCache):
        cache: dict = {}
        call_entry_function = "return PyLong_FromLongLong(kernel({}));"
        extra_parse_arg = _PARSE_DOUBLE

    return Bindings


def _load(key: tuple, argtypes: Callable[[], list[str]], source: Callable[[], str]) -> Callable[..., Any] | None:
    """The compiled kernel for ``key``, built on first use from ``argtypes()`` and ``source()``; None once a build
    has failed in this process."""
    fn = _loaded.get(key)
    if fn is not None or _unavailable:
        return fn
    with _lock:
        fn = _loaded.get(key)
        if fn is None and not _unavailable:
            try:
                fn = _loaded[key] = _bindings().load_pybinding(argtypes(), source())
            except Exception as error:  # noqa: BLE001 - no compiler, no inductor, a changed private API
                _unavailable.append(repr(error))
                logger.debug("coupled_adam_hf: C++ CPU kernels unavailable, using torch ops: %r", error)
                return None
    return fn


def _usable(*tensors: Tensor) -> bool:
    return all(t.is_cpu and t.dtype in _C_TYPES and t.is_contiguous() for t in tensors)


def available() -> bool:
    """False once building a kernel has failed in this process."""
    return not _unavailable


def column_sum(x: Tensor, square: bool, divisor: float = 1.0) -> Tensor | None:
    """Per-column float32 sum over dim 0 of ``x`` (``square``: of ``x*x``), divided by ``divisor``, shape
    ``[1, *x.shape[1:]]``; None when these kernels cannot take the input."""
    if x.dim() < 1 or x.numel() == 0 or not _usable(x):
        return None
    c_type = _C_TYPES[x.dtype]
    fn = _load(("column_sum", x.dtype, square),
               lambda: [f"const {c_type}*", "float*", "int64_t", "int64_t", "float"],
               lambda: _source(_COLUMN_SUM, IN_T=c_type, SQUARE=_bool(square)))
    if fn is None:
        return None
    rows = x.shape[0]
    out = torch.empty((1, *x.shape[1:]), dtype=torch.float32)
    fn(x, out, rows, x.numel() // rows, float(divisor))
    return out


def coupled_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor | None, column_v: Tensor,
                 max_column_v: Tensor | None, step: Tensor, *, grad_sq_mean: Tensor | None, check_finite: bool = False,
                 lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, avg_scale: float,
                 maximize: bool) -> bool | None:
    """A coupled step in place (see ``_COUPLED_UPDATE``), step counter and bias corrections included.

    ``grad_sq_mean``: the column means of ``grad**2`` (``[1, *shape[1:]]``, float32), or None to have the kernel
    take them itself in the same call; then with ``check_finite`` a non-finite result writes nothing (not even the
    step counter) and returns False. ``column_v``: ``vbar`` (float32, one value per column), updated in place: the
    compact ``exp_avg_sq``, or in full mode (``exp_avg_sq`` given) the column mean of the old ``exp_avg_sq``.
    ``max_column_v``: AMSGrad's running maximum of ``vbar``, or None. ``step``: the float32 counter of ``param``.
    Returns None (nothing done) when these kernels cannot take the input, else whether the step was taken.
    """
    kernel = step_kernel(param, grad, exp_avg, exp_avg_sq, step, column_v, grad_sq_mean, max_column_v,
                         maximize=maximize)
    if kernel is None:
        return None
    return run_step(kernel, param, grad, exp_avg, exp_avg_sq, column_v, max_column_v, step,
                    grad_sq_mean=grad_sq_mean, check_finite=check_finite, lr=lr, beta1=beta1, beta2=beta2,
                    weight_decay=weight_decay, eps=eps, avg_scale=avg_scale)


def step_kernel(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor | None, step: Tensor,
                column_v: Tensor | None, grad_sq_mean: Tensor | None, max_column_v: Tensor | None, *,
                maximize: bool) -> Callable[..., Any] | None:
    """The compiled ``coupled_step`` kernel for these tensors (built on first use), or None when it cannot take
    them: plain contiguous CPU tensors of the kernels' dtypes, a float32 step counter, and float32 per-column
    tensors with one value per column of ``param`` (``column_v`` None: checked by the caller; AMSGrad when
    ``max_column_v`` is given)."""
    if _unavailable or param.dim() < 1 or param.numel() == 0 or not _usable(param, grad, exp_avg):
        return None
    full = exp_avg_sq is not None
    if grad.dtype != param.dtype or (full and not (exp_avg_sq.dtype == exp_avg.dtype and _usable(exp_avg_sq))):
        return None
    cols = param.numel() // param.shape[0]
    if not all(c.dtype == torch.float32 and c.is_cpu and c.is_contiguous() and c.numel() == cols
               for c in (column_v, grad_sq_mean, max_column_v) if c is not None):
        return None
    if not (step.dtype == torch.float32 and step.is_cpu and step.numel() == 1):
        return None
    amsgrad = max_column_v is not None
    p_type, s_type = _C_TYPES[param.dtype], _C_TYPES[exp_avg.dtype]
    return _load(
        ("coupled_step", param.dtype, exp_avg.dtype, full, maximize, amsgrad),
        lambda: [f"{p_type}*", f"const {p_type}*", f"{s_type}*", f"{s_type}*", "float*", "const float*", "float*",
                 "float*", "int64_t", "int64_t", "double", "double", "double", "double", "double", "double",
                 "int64_t"],
        lambda: _source(_COUPLED_UPDATE, IN_T=p_type, STATE_T=s_type, FULL=_bool(full), MAXIMIZE=_bool(maximize),
                        AMSGRAD=_bool(amsgrad)),
    )


def run_step(kernel: Callable[..., Any], param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor | None,
             column_v: Tensor, max_column_v: Tensor | None, step: Tensor, *, grad_sq_mean: Tensor | None,
             check_finite: bool, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
             avg_scale: float) -> bool:
    """Run a kernel of ``step_kernel`` on the tensors it was chosen for (see ``coupled_step``)."""
    rows = param.shape[0]
    stats = 0 if grad_sq_mean is not None else (1 if check_finite else 2)
    # (unused pointer arguments get a valid tensor: exp_avg for a compact v, column_v for the others)
    return kernel(param, grad, exp_avg, exp_avg if exp_avg_sq is None else exp_avg_sq, column_v,
                  column_v if grad_sq_mean is None else grad_sq_mean,
                  column_v if max_column_v is None else max_column_v, step, rows, param.numel() // rows, lr, beta1,
                  beta2, weight_decay, eps, avg_scale, stats) == 1


def _bool(value: bool) -> str:
    return "true" if value else "false"

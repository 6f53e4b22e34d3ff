"""The fast coupled kernels (coupled_adam_hf._kernels, _cpu_kernels) compute what the reference paths compute.

Compiled kernels are forced on small tensors with COUPLED_ADAM_COMPILE=always (the default, ``auto``, keeps
tensors this small on eager ops). On CPU that selects the hand-written C++ kernels; the torch.compile'd kernels
(what GPUs, and CPUs without a working C++ build, run) are tested by switching the C++ kernels off. Compiling costs
a few seconds per new graph, so the compiled tests are few and marked slow.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from coupled_adam_hf import CoupledAdam, _cpu_kernels, _kernels

REFERENCE = dict(foreach=False, fused=False)


def _switch_to_inductor(monkeypatch):
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always")
    monkeypatch.setattr(_cpu_kernels, "_unavailable", ["switched off by the test"])
    assert not _kernels._broken, "an earlier compile failed in this process; the compiled path would not run"


@pytest.fixture
def inductor_compile(monkeypatch):
    """COUPLED_ADAM_COMPILE=always with the C++ kernels off: the torch.compile'd kernels run."""
    _switch_to_inductor(monkeypatch)
    yield
    assert not _kernels._broken, f"compiled kernels fell back to eager: {_kernels._broken}"


@pytest.fixture(params=["cpp", "inductor"])
def always_compile(request, monkeypatch):
    """COUPLED_ADAM_COMPILE=always, once with the C++ CPU kernels (asserted to have run) and once with the
    torch.compile'd kernels."""
    if request.param == "inductor":
        _switch_to_inductor(monkeypatch)
        yield
        assert not _kernels._broken, f"compiled kernels fell back to eager: {_kernels._broken}"
        return
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always")
    assert _cpu_kernels.available(), f"the C++ kernels failed to build: {_cpu_kernels._unavailable}"
    ran = []
    real = _cpu_kernels.run_step

    def spy(*args, **kwargs):
        ran.append(real(*args, **kwargs))
        return ran[-1]

    monkeypatch.setattr(_cpu_kernels, "run_step", spy)
    yield
    assert ran, "the C++ kernel did not take the coupled update"
    assert _cpu_kernels.available(), f"the C++ kernels failed to build: {_cpu_kernels._unavailable}"


def run_coupled(weight, grads, *, lrs=None, **kwargs):
    """Train one coupled matrix plus a small uncoupled one; returns (optimizer, coupled param, history)."""
    p = weight.detach().clone().requires_grad_()
    bias = torch.linspace(-1, 1, 5, dtype=weight.dtype).requires_grad_()
    opt = CoupledAdam([{"params": [p], "coupled": True}, {"params": [bias]}], **kwargs)
    history = []
    for step, g in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[step]
        p.grad = g.to(p.dtype)
        bias.grad = torch.full_like(bias, 0.1 * (step + 1))
        opt.step()
        history.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
    return opt, p, history


def gradients(shape, steps, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * scale for _ in range(steps)]


# ------------------------------------------------------------------------------------------- column sums
# VECTOR_BODY_AND_TAIL columns: the C++ loops step over 2 float vectors (32 columns with AVX-512, 16 with AVX2), then
# finish a row element by element; 77 columns run both parts on every vector ISA, fewer than 16 only the tail.
VECTOR_BODY_AND_TAIL = 77


@pytest.mark.parametrize("shape, dtype", [
    ((1000, 24), torch.float32),
    ((1000, VECTOR_BODY_AND_TAIL), torch.float32),
    ((70000, 3), torch.float32),    # several blocks of rows, the last one partial
    ((300, 1100), torch.float32),   # wide rows: eight at a time, then the block's leftover rows one by one
    ((130, 3, 4), torch.bfloat16),  # >2-D coupled tensors reduce over dim 0 only; bf16 accumulates in fp32
    ((130, VECTOR_BODY_AND_TAIL), torch.bfloat16),
    ((130, VECTOR_BODY_AND_TAIL), torch.float16),
    ((0, 8), torch.float32),        # an empty shard
], ids=["1000x24", "1000x77", "70000x3-blocks", "300x1100-wide", "130x3x4-bf16", "130x77-bf16", "130x77-fp16", "empty"])
@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_column_sums_equal_float64_sums_over_rows(shape, dtype, kernel, monkeypatch):
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always" if kernel == "cpp" else "never")
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    exact = x.double()
    got_sq = _kernels.column_sq_sum(x, torch.float32)
    got = _kernels.column_sum(x, torch.float32)
    assert got_sq.shape == got.shape == (1, *shape[1:])
    assert got_sq.dtype == got.dtype == torch.float32
    torch.testing.assert_close(got_sq.double(), (exact * exact).sum(0, keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), exact.sum(0, keepdim=True), rtol=1e-5, atol=1e-4)


def test_column_sums_need_no_temporary_of_the_tensors_size(monkeypatch):
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "never")  # the torch-ops path (the C++ one allocates nothing big)
    x = torch.randn(4 * _kernels._EAGER_BLOCK_ELEMENTS // 16 + 5, 16)
    allocated = []
    real_zeros = torch.zeros

    def spy_zeros(*shape, **kwargs):
        out = real_zeros(*shape, **kwargs)
        allocated.append(out.numel())
        return out

    monkeypatch.setattr(torch, "zeros", spy_zeros)
    got = _kernels.column_sq_sum(x, torch.float32)
    monkeypatch.undo()
    torch.testing.assert_close(got, (x * x).sum(0, keepdim=True), rtol=1e-5, atol=1e-5)
    assert allocated and max(allocated) <= _kernels._EAGER_BLOCK_ELEMENTS < x.numel() / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_column_sums_do_not_depend_on_the_thread_count(dtype, monkeypatch):
    """Rows are summed in blocks fixed by the shape, not by the threads: a resumed run on a machine with another
    core count steps bit for bit the same."""
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always")
    x = torch.randn(5000, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    threads = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(_kernels.column_sq_sum(x, torch.float32))
    finally:
        torch.set_num_threads(threads)
    assert _cpu_kernels.available()
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])
    torch.testing.assert_close(sums[0].double(), x.double().square().sum(0, keepdim=True), rtol=1e-5, atol=0)


def test_cpp_build_failure_falls_back_to_torch_ops_with_the_same_numbers(monkeypatch, caplog):
    from torch._inductor import codecache

    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always")
    monkeypatch.setattr(_cpu_kernels, "_loaded", {})
    monkeypatch.setattr(_cpu_kernels, "_unavailable", [])
    monkeypatch.setattr(_kernels, "_compiled", {})
    monkeypatch.setattr(_kernels, "_broken", set())
    attempts = []

    def no_compiler(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", no_compiler)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # and inductor runs the eager function
    weight, grads = torch.randn(70, 6), gradients((70, 6), 4)
    with caplog.at_level(logging.DEBUG, logger="coupled_adam_hf._cpu_kernels"):
        _, got, _ = run_coupled(weight, grads, lr=1e-2, weight_decay=0.1)
    assert len(attempts) == 1, "a failed build must not be retried"
    assert not _cpu_kernels.available() and "C++ CPU kernels unavailable" in caplog.text
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "never")
    _, want, _ = run_coupled(weight, grads, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------- compile policy
def test_auto_policy_compiles_only_embedding_sized_tensors(monkeypatch):
    monkeypatch.delenv("COUPLED_ADAM_COMPILE", raising=False)
    big = torch.zeros(1).expand(_kernels.AUTO_COMPILE_MIN_NUMEL)  # numel without the memory
    small = torch.zeros(64, 32)
    assert _kernels.compile_policy() == "auto"
    assert _kernels.compile_wanted(big) and not _kernels.compile_wanted(small)
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "0")
    assert not _kernels.compile_wanted(big)
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "1")
    assert _kernels.compile_wanted(small)
    assert not _kernels.compile_wanted(torch.zeros(64, 32, device="meta")), "only cpu and cuda tensors compile"


def test_auto_policy_takes_the_cpp_kernels_from_64k_elements(monkeypatch):
    monkeypatch.delenv("COUPLED_ADAM_COMPILE", raising=False)
    assert _kernels.cpp_wanted(torch.zeros(1).expand(_kernels.AUTO_CPP_MIN_NUMEL))
    assert not _kernels.cpp_wanted(torch.zeros(1).expand(_kernels.AUTO_CPP_MIN_NUMEL - 1))
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "0")
    assert not _kernels.cpp_wanted(torch.zeros(1).expand(_kernels.AUTO_CPP_MIN_NUMEL))
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "1")
    assert _kernels.cpp_wanted(torch.zeros(4, 4))
    assert not _kernels.cpp_wanted(torch.zeros(4, 4, device="meta")), "C++ kernels are for CPU tensors"


def test_unknown_compile_policy_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="auto, 1 .always. or 0 .never."):
        _kernels.compile_policy()


def test_cpp_switch_keeps_the_cpp_kernels_out_and_the_compiled_ones_in(monkeypatch):
    """COUPLED_ADAM_CPP=0: a CPU runs the torch.compile'd kernels, as a GPU does (what the benchmark compares)."""
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "1")
    monkeypatch.setenv("COUPLED_ADAM_CPP", "0")
    t = torch.zeros(4, 4)
    assert not _kernels.cpp_wanted(t) and _kernels.compile_wanted(t)
    monkeypatch.setenv("COUPLED_ADAM_CPP", "1")
    assert _kernels.cpp_wanted(t)
    monkeypatch.setenv("COUPLED_ADAM_CPP", "maybe")
    with pytest.raises(ValueError, match="COUPLED_ADAM_CPP='maybe'.*1 .the default. or 0"):
        _kernels.cpp_wanted(t)


def test_small_tensors_stay_eager_under_the_default_policy(monkeypatch):
    monkeypatch.delenv("COUPLED_ADAM_COMPILE", raising=False)

    def no_compiling(*args, **kwargs):
        raise AssertionError("torch.compile must not be called for small tensors under the auto policy")

    def no_cpp(*args, **kwargs):
        raise AssertionError("the C++ kernels must not be built for small tensors under the auto policy")

    monkeypatch.setattr(torch, "compile", no_compiling)
    monkeypatch.setattr(_kernels, "_compiled", {})
    monkeypatch.setattr(_cpu_kernels, "_load", no_cpp)
    run_coupled(torch.randn(40, 8), gradients((40, 8), 3), lr=1e-2)


def test_compile_failure_falls_back_to_eager_with_identical_numbers_and_a_debug_log(monkeypatch, caplog):
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always")
    monkeypatch.setattr(_cpu_kernels, "_unavailable", ["switched off by the test"])
    monkeypatch.setattr(_kernels, "_compiled", {})
    monkeypatch.setattr(_kernels, "_broken", set())
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(fn.__name__)
            raise RuntimeError("simulated: no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    weight, grads = torch.randn(70, 6), gradients((70, 6), 4)
    with caplog.at_level(logging.DEBUG, logger="coupled_adam_hf._kernels"):
        _, got, _ = run_coupled(weight, grads, lr=1e-2, weight_decay=0.1)
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "never")
    _, want, _ = run_coupled(weight, grads, lr=1e-2, weight_decay=0.1)
    assert calls, "the compiled kernels were not attempted"
    assert _kernels._broken == {"coupled_update"}
    assert len(calls) == 1, "a kernel that failed to compile must not be retried every step"
    assert "torch.compile of coupled_update failed" in caplog.text
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------- parity of the compiled path
CASES = {
    "plain": dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
    "wd-amsgrad-scale-maximize": dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True,
                                      avg_scale=4.0, maximize=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("cols", [12, VECTOR_BODY_AND_TAIL])
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "full"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_compiled_fused_path_matches_reference_path_every_step_and_fp64_at_the_end(case, compact, cols,
                                                                                  always_compile):
    hyper = CASES[case]
    weight, grads = gradients((150, cols), 1, seed=7)[0], gradients((150, cols), 12, scale=0.5)
    lrs = [hyper["lr"] * (1 - i / 24) for i in range(12)]  # a schedule: the lr changes every step
    _, fast_p, fast = run_coupled(weight, grads, lrs=lrs, compact=compact, fused=True, **hyper)
    _, ref_p, ref = run_coupled(weight, grads, lrs=lrs, compact=compact, **REFERENCE, **hyper)
    for step, (got, want) in enumerate(zip(fast, ref)):
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
    expected = fp64_coupled_adam(weight, grads, lrs, **{k: v for k, v in hyper.items() if k != "lr"})
    torch.testing.assert_close(fast_p.double(), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_amsgrad_steps_with_the_running_maximum_when_gradients_shrink(always_compile):
    """With shrinking gradients vbar falls, and AMSGrad must divide by its running maximum instead (with growing
    ones the two coincide, and a kernel that ignored the maximum would pass)."""
    weight = gradients((150, VECTOR_BODY_AND_TAIL), 1, seed=7)[0]
    grads = [g * 0.5**step for step, g in enumerate(gradients((150, VECTOR_BODY_AND_TAIL), 10))]
    hyper = dict(betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)
    lrs = [1e-2] * len(grads)
    _, fast_p, _ = run_coupled(weight, grads, lr=1e-2, fused=True, amsgrad=True, **hyper)
    expected = fp64_coupled_adam(weight, grads, lrs, amsgrad=True, **hyper)
    without_maximum = fp64_coupled_adam(weight, grads, lrs, **hyper)
    assert (expected - without_maximum).abs().max() > 1e-3  # the two are told apart
    torch.testing.assert_close(fast_p.double(), expected, rtol=2e-5, atol=2e-6)


def fp64_coupled_adam(weight, grads, lrs, *, betas, eps, weight_decay, avg_scale=1.0, amsgrad=False,
                      maximize=False):
    """Coupled Adam's update (the paper's algorithm) for one coupled matrix written out in float64, no code shared with the package."""
    b1, b2 = betas
    w = weight.detach().double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    vmax = None
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = -g.double() if maximize else g.double()
        w = w * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vbar = avg_scale * v.mean(dim=0, keepdim=True)
        if amsgrad:
            vmax = vbar if vmax is None else torch.maximum(vmax, vbar)
            vbar = vmax
        w = w - lr / (1 - b1**t) * m / (vbar.sqrt() / math.sqrt(1 - b2**t) + eps)
    return w


@pytest.mark.slow
@pytest.mark.parametrize("cols", [12, VECTOR_BODY_AND_TAIL])
@pytest.mark.parametrize("param_dtype, state_dtype", [
    (torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float16, None), (torch.float16, torch.float32),
], ids=["bf16-state", "bf16-fp32-state", "fp16-state", "fp16-fp32-state"])
def test_compiled_path_with_half_precision_params_rounds_once_per_stored_tensor(param_dtype, state_dtype, cols,
                                                                               always_compile):
    """bf16/fp16 params: the one-pass kernels compute in float32 and round p (and half-precision m) once per step.
    Against the same math in float64 with those same rounding points, they may differ only where a float32
    intermediate tips a rounding the other way (and the runs then go on from values one ulp apart): a few elements,
    by an ulp or two. A mistake in the math (a scalar rounded to bf16, a lost weight decay, m read back other than
    as stored) moves most elements."""
    weight, grads = gradients((150, cols), 1, seed=7)[0].to(param_dtype), gradients((150, cols), 8, scale=0.5)
    hyper = dict(lr=1e-2, weight_decay=0.1, state_dtype=state_dtype)
    fast_opt, fast_p, fast = run_coupled(weight, grads, fused=True, **hyper)
    assert fast_p.dtype == param_dtype
    assert fast_opt.state[fast_p]["exp_avg"].dtype == (state_dtype or param_dtype)
    want = rounded_coupled_adam(weight, grads, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype or param_dtype)
    for (p_fast, m_fast, _), (p_want, m_want) in zip(fast, want):
        for got, expected in ((p_fast, p_want), (m_fast, m_want)):
            if expected.dtype != torch.float32:
                ulps = half_precision_ulps(got, expected)
                assert ulps.max() <= 2 and (ulps > 0).float().mean() < 0.05
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def rounded_coupled_adam(weight, grads, *, lr, weight_decay, state_dtype, betas=(0.9, 0.999), eps=1e-8):
    """Coupled Adam's update in float64 with the fast path's rounding points: m stored in ``state_dtype``, p in its own dtype."""
    b1, b2 = betas
    p = weight.clone()
    m = torch.zeros_like(weight, dtype=state_dtype)
    v = torch.zeros((1, weight.shape[1]), dtype=torch.float64)
    history = []
    for t, g in enumerate(grads, start=1):
        g = g.to(weight.dtype).double()
        m = (m.double() + (g - m.double()) * (1 - b1)).to(state_dtype)
        v = b2 * v + (1 - b2) * (g * g).mean(dim=0, keepdim=True)
        denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
        p = (p.double() * (1 - lr * weight_decay) - lr / (1 - b1**t) * m.double() / denom).to(weight.dtype)
        history.append((p, m))
    return history


def half_precision_ulps(a, b):
    """|a - b| in units in the last place of ``a``'s dtype (bf16 or fp16) at the larger magnitude (at least 1/8:
    near zero, where the ulp shrinks, a value that crossed zero one ulp apart would count as hundreds)."""
    assert a.dtype == b.dtype
    eps = torch.finfo(a.dtype).eps  # 2**-7 for bf16, 2**-10 for fp16
    a, b = a.float(), b.float()
    magnitude = torch.maximum(a.abs(), b.abs()).clamp_min(0.125)
    ulp = eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    return (a - b).abs() / ulp


@pytest.mark.slow
@pytest.mark.parametrize("amsgrad, maximize", [(False, False), (True, True)], ids=["plain", "amsgrad-maximize"])
def test_compiled_adamw_for_bf16_params_matches_the_reference_path(amsgrad, maximize, inductor_compile):
    """Uncoupled bf16 params with float32 state, which torch's fused kernel cannot take: the fused path runs them
    through a compiled one-pass AdamW instead, with the reference path's numbers."""
    shapes = [(40, 8), (8,), (8, 24), (24, 8)]  # shapes change from tensor to tensor: compiled once, dynamic
    gen = torch.Generator().manual_seed(0)
    fast = [torch.randn(s, generator=gen).bfloat16().requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in fast]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    hyper["state_dtype"] = torch.float32
    fast_opt, ref_opt = CoupledAdam(fast, fused=True, **hyper), CoupledAdam(ref, **REFERENCE, **hyper)
    for step in range(6):
        for p, q in zip(fast, ref):
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            q.grad = p.grad.clone()
        for opt in (fast_opt, ref_opt):
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            opt.step()
        for p, q in zip(fast, ref):
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                assert fast_opt.state[p][key].dtype == torch.float32
                torch.testing.assert_close(fast_opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=1e-7)
            # the same float32 result rounded once into bf16: at most one bf16 ulp apart
            torch.testing.assert_close(p, q, rtol=2**-7, atol=1e-6)


@pytest.mark.slow
def test_lr_schedule_does_not_recompile_the_kernels(inductor_compile):
    weight, grads = torch.randn(90, 10), gradients((90, 10), 8)
    run_coupled(weight, grads[:2], lr=1e-2)  # compiles (or loads) the graphs for this configuration
    before = counters["stats"]["unique_graphs"]
    run_coupled(weight, grads, lrs=[1e-2 / (i + 1) for i in range(8)], lr=1e-2)
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.slow
def test_nonfinite_gradient_on_the_compiled_path_skips_the_step(always_compile):
    weight = torch.randn(90, 10)
    grads = gradients((90, 10), 3)
    grads[2][5, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt, p, history = run_coupled(weight, grads, lr=1e-2, fused=True)
    assert opt.skipped_steps == 1
    for got, want in zip(history[2], history[1]):
        assert torch.equal(got, want)


def test_cpp_step_scalars_are_the_python_bias_corrections_rounded_once(monkeypatch):
    """The C++ step computes 1 - b1^t, sqrt(1 - b2^t) and the other step scalars in double from the same double
    hyperparameters and expressions as the Python paths, then rounds each to float32 once. Rows built so that p
    ends up holding them: (p=0, g=m=1) gives the step per column, (p=1, g=m=0) the weight decay factor."""
    lr, beta1, beta2, eps, weight_decay, avg_scale = 3e-3, 0.9, 0.95, 0.1, 0.01, 4.0
    for t in (1, 2, 7):
        p = torch.tensor([[0.0] * 3, [1.0] * 3])
        g = torch.tensor([[1.0] * 3, [0.0] * 3])
        m = g.clone()
        v = torch.zeros(1, 3)  # vbar = (1 - b2) * mean(g^2) = (1 - b2) / 2, in float32
        step = torch.tensor(float(t - 1))
        assert _cpu_kernels.coupled_step(p, g, m, None, v, None, step, grad_sq_mean=torch.full((1, 3), 0.5),
                                         lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                                         avg_scale=avg_scale, maximize=False)
        f32 = np.float32
        bc1, bc2_sqrt = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
        vbar = f32(0.5) * f32(1.0 - beta2)  # fma(0.5, c2, 0): exact product, one rounding either way
        scale = f32(-lr / bc1) / (np.sqrt(vbar * f32(avg_scale / (bc2_sqrt * bc2_sqrt))) + f32(eps))
        assert step.item() == t
        assert v[0, 0].item() == vbar
        assert p[0, 0].item() == scale, f"step {t}: the step per column differs from the float32 of the formula"
        assert p[1, 0].item() == f32(1.0 - lr * weight_decay)


def _two_coupled(policy="skip", **kwargs):
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(150, VECTOR_BODY_AND_TAIL, generator=gen).requires_grad_()
    small = torch.randn(40, VECTOR_BODY_AND_TAIL, generator=gen).requires_grad_()
    bias = torch.randn(5, generator=gen).requires_grad_()
    # the smaller one first and in its own group: the C++ path reorders by size, groups keep their hyperparameters
    opt = CoupledAdam([{"params": [small], "coupled": True, "lr": 5e-3, "weight_decay": 0.1},
                       {"params": [big], "coupled": True}, {"params": [bias]}], lr=1e-2, nonfinite=policy,
                      **kwargs)
    return opt, [small, big, bias]


def _step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def test_cpp_path_steps_several_coupled_tensors_as_the_reference_does(monkeypatch):
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always")
    runs = []
    real = _cpu_kernels.run_step

    def spy(*args, grad_sq_mean, **kwargs):
        runs.append(grad_sq_mean is None)
        return real(*args, grad_sq_mean=grad_sq_mean, **kwargs)

    monkeypatch.setattr(_cpu_kernels, "run_step", spy)
    fast, fast_params = _two_coupled()
    ref, ref_params = _two_coupled(**REFERENCE)
    for seed in range(6):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) for p in fast_params]
        _step_with(fast, fast_params, grads)
        _step_with(ref, ref_params, grads)
    # per step: first the larger tensor, taking its own statistics; then the smaller one, with those taken before
    assert runs == [True, False] * 6
    for a, b in zip(fast_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.state.values(), ref.state.values()):
        assert a["step"].item() == b["step"].item() == 6


@pytest.mark.parametrize("bad", [0, 1], ids=["in-the-smaller", "in-the-larger"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_cpp_path_checks_every_coupled_tensor_before_writing_any(bad, policy, monkeypatch):
    """The larger tensor's kernel takes its statistics, checks them and updates in one call; the smaller ones are
    checked before it runs. A NaN in either leaves every param and every state tensor as it was."""
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", "always")
    opt, params = _two_coupled(policy)
    for seed in range(2):
        _step_with(opt, params, [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) for p in params])
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    grads = [torch.randn(p.shape) for p in params]
    grads[bad][7, 3] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            _step_with(opt, params, grads)
    else:
        with pytest.warns(RuntimeWarning, match="skipped a step"):
            _step_with(opt, params, grads)
        assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    after = opt.state_dict()["state"]
    for index, state in state_before["state"].items():
        assert state.keys() == after[index].keys()
        assert all(torch.equal(after[index][key], value) for key, value in state.items())


# ------------------------------------------------------------------------------------------- inside torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_compiled_optimizer_step_runs_as_many_graphs_whatever_the_parameter_count(impl):
    """``torch.compile(opt.step)`` gives the same numbers as eager, and one step runs a fixed number of compiled
    graphs (no graph break per parameter) when ``capture_scalar_outputs`` lets the step counter's ``.item()``
    trace and ``nonfinite="ignore"`` drops the data-dependent skip branch (docs/performance.md explains both)."""
    from torch._inductor.compile_fx import compile_fx

    kernel = dict(foreach=True) if impl == "foreach" else dict(fused=True)
    graph_runs = [0]

    def counting_inductor(gm, example_inputs):
        compiled = compile_fx(gm, example_inputs)

        def run(*args):
            graph_runs[0] += 1
            return compiled(*args)
        return run

    def make(matrices):
        gen = torch.Generator().manual_seed(0)
        embeddings = [torch.randn(64, 16, generator=gen).requires_grad_() for _ in range(matrices)]
        others = [torch.randn(16, 16, generator=gen).requires_grad_() for _ in range(matrices)]
        opt = CoupledAdam([{"params": embeddings, "coupled": True, "weight_decay": 0.0},
                           {"params": others, "weight_decay": 0.1}], lr=1e-2, nonfinite="ignore", **kernel)
        return [*embeddings, *others], opt

    graphs_per_step = {}
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        for matrices in (1, 3):
            torch._dynamo.reset()
            (eager_params, eager_opt), (params, opt) = make(matrices), make(matrices)
            compiled_step = torch.compile(opt.step, backend=counting_inductor)
            for i in range(3):
                for p, q in zip(eager_params, params):
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
                    q.grad = p.grad.clone()
                eager_opt.step()
                graph_runs[0] = 0
                # the first step creates the state (another graph); compiling from the second on keeps this short
                compiled_step() if i else opt.step()
            graphs_per_step[matrices] = graph_runs[0]
            for a, b in zip(eager_params, params):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert 0 < graphs_per_step[1] == graphs_per_step[3], f"graphs run per step: {graphs_per_step}"

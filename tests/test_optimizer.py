"""Properties of CoupledAdam (Stollenwerk & Stollenwerk, ACL 2025): inclusions, invariants, parity between kernels, state handling."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch

from coupled_adam_hf import CoupledAdam

IMPLEMENTATIONS = {
    "single_tensor": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(foreach=False, fused=True),
    "default": dict(),
}


def make_params(seed: int = 0, shapes=((13, 6), (6, 4), (4,)), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def gradient_stream(shapes, steps: int, seed: int = 1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def run(optimizer, params, grads_seq):
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        optimizer.step()


# ----------------------------------------------------------------------------- an independent reference
def reference_coupled_adam_fp64(weights, grads_seq, *, lr, betas, eps, weight_decay, coupled, avg_scale=1.0,
                                amsgrad=False):
    """The paper's update formulas written out directly in float64, no shared code with the package."""
    b1, b2 = betas
    w = [x.detach().double().clone() for x in weights]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    vmax = [None] * len(w)
    for t, grads in enumerate(grads_seq, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            w[i] = w[i] * (1 - lr * weight_decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            second = avg_scale * v[i].mean(dim=0, keepdim=True) if coupled[i] else v[i]
            if amsgrad:
                vmax[i] = second if vmax[i] is None else torch.maximum(vmax[i], second)
                second = vmax[i]
            m_hat = m[i] / (1 - b1**t)
            w[i] = w[i] - lr * m_hat / (torch.sqrt(second) / math.sqrt(1 - b2**t) + eps)
    return w


# ----------------------------------------------------------------------------- inclusions
HYPERPARAMETER_CASES = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=False, maximize=False),
    dict(lr=5e-2, betas=(0.0, 0.5), eps=1e-3, weight_decay=0.5, amsgrad=True, maximize=False),
    dict(lr=1e-3, betas=(0.95, 0.99), eps=0.0, weight_decay=1e-2, amsgrad=True, maximize=True),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("hyper", HYPERPARAMETER_CASES, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_without_coupled_group_equals_torch_adamw_after_50_steps(impl, hyper):
    params = make_params()
    theirs = clone_params(params)
    grads = list(gradient_stream([p.shape for p in params], 50))
    run(CoupledAdam(params, **hyper, **IMPLEMENTATIONS[impl]), params, grads)
    run(torch.optim.AdamW(theirs, **hyper), theirs, grads)
    for ours, ref in zip(params, theirs):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("compact", [True, False])
def test_coupled_matrix_with_identical_row_gradients_equals_adamw(impl, compact):
    """All rows share one v when their gradients are equal, so coupling changes nothing."""
    E = make_params(shapes=[(9, 5)])[0]
    E_ref = clone_params([E])[0]
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(1, 5, generator=gen).expand(9, 5).clone()] for _ in range(30)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, amsgrad=True)
    opt = CoupledAdam([{"params": [E], "coupled": True}], compact=compact, **hyper, **IMPLEMENTATIONS[impl])
    run(opt, [E], grads)
    run(torch.optim.AdamW([E_ref], **hyper), [E_ref], grads)
    torch.testing.assert_close(E, E_ref, rtol=1e-5, atol=1e-6)


def zero_sum_gradients(V, H, steps, seed=4):
    """Rows summing to zero, with very different scales per row (like frequent vs rare tokens)."""
    gen = torch.Generator().manual_seed(seed)
    row_scale = torch.logspace(-3, 1, V).unsqueeze(1)
    out = []
    for _ in range(steps):
        g = torch.randn(V, H, generator=gen) * row_scale
        out.append([g - g.mean(dim=0, keepdim=True)])
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("compact", [True, False])
def test_zero_sum_gradients_keep_mean_row_fixed_while_adamw_moves_it(impl, compact):
    V, H = 64, 16
    grads = zero_sum_gradients(V, H, 40)
    E = make_params(shapes=[(V, H)])[0]
    E_adam = clone_params([E])[0]
    mu0 = E.detach().mean(0).clone()
    opt = CoupledAdam([{"params": [E], "coupled": True, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95),
                      eps=1e-8, compact=compact, **IMPLEMENTATIONS[impl])
    run(opt, [E], grads)
    run(torch.optim.AdamW([E_adam], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0), [E_adam], grads)

    coupled_drift = (E.detach().mean(0) - mu0).norm() / mu0.norm()
    adam_drift = (E_adam.detach().mean(0) - mu0).norm() / mu0.norm()
    assert coupled_drift < 1e-6, coupled_drift
    assert adam_drift > 1e-2, adam_drift  # the symmetry breaking Coupled Adam removes


@pytest.mark.parametrize("eps", [1e-8, 1e-1])
def test_zero_sum_gradients_keep_mean_fixed_whatever_eps(eps):
    grads = zero_sum_gradients(32, 8, 25, seed=9)
    E = make_params(shapes=[(32, 8)], dtype=torch.float64)[0]
    mu0 = E.detach().mean(0).clone()
    opt = CoupledAdam([{"params": [E], "coupled": True, "weight_decay": 0.0}], lr=0.1, eps=eps)
    centered = [[g.double() - g.double().mean(0, keepdim=True)] for (g,) in grads]  # zero-sum in float64 too
    run(opt, [E], centered)
    assert (E.detach().mean(0) - mu0).abs().max() < 1e-12


@pytest.mark.parametrize("scale", [4.0, 0.25])
def test_avg_scale_scales_the_first_step_by_inverse_sqrt(scale):
    """With eps negligible, avg_scale = s divides the embedding step by sqrt(s)."""
    grads = list(gradient_stream([(20, 6)], 1))
    base, scaled = make_params(shapes=[(20, 6)], dtype=torch.float64) * 2
    start = base.detach().clone()
    scaled = clone_params([base])[0]
    for E, s in ((base, 1.0), (scaled, scale)):
        opt = CoupledAdam([{"params": [E], "coupled": True, "avg_scale": s}], lr=1e-2, eps=0.0, weight_decay=0.0)
        run(opt, [E], [[g.double() for g in gs] for gs in grads])
    torch.testing.assert_close((scaled - start), (base - start) / math.sqrt(scale), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- parity
CASES = [
    dict(amsgrad=False, weight_decay=0.0, avg_scale=1.0),
    dict(amsgrad=True, weight_decay=0.1, avg_scale=2.0),
]


def coupled_setup(dtype=torch.float32, **opt_kwargs):
    params = make_params(shapes=[(17, 6), (6, 4), (4,)], dtype=dtype)
    groups = [
        {"params": [params[0]], "coupled": True, "avg_scale": opt_kwargs.pop("avg_scale", 1.0)},
        {"params": params[1:]},
    ]
    return params, groups, opt_kwargs


@pytest.mark.parametrize("case", CASES, ids=["plain", "amsgrad-wd-scale"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("compact", [True, False])
def test_every_kernel_and_storage_mode_matches_fp64_reference(case, impl, compact):
    params, groups, kwargs = coupled_setup(**dict(case))
    start = [p.detach().clone() for p in params]
    grads = list(gradient_stream([p.shape for p in params], 30))
    opt = CoupledAdam(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, compact=compact,
                      **kwargs, **IMPLEMENTATIONS[impl])
    run(opt, params, grads)
    expected = reference_coupled_adam_fp64(
        start, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=case["weight_decay"],
        coupled=[True, False, False], avg_scale=case["avg_scale"], amsgrad=case["amsgrad"])
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", CASES, ids=["plain", "amsgrad-wd-scale"])
def test_kernels_and_storage_modes_agree_step_by_step(case):
    runs = {}
    grads = None
    for impl, compact in itertools.product(["single_tensor", "foreach", "fused"], [True, False]):
        params, groups, kwargs = coupled_setup(**dict(case))
        grads = grads or list(gradient_stream([p.shape for p in params], 20))
        opt = CoupledAdam(groups, lr=1e-2, compact=compact, **kwargs, **IMPLEMENTATIONS[impl])
        history = []
        for g in grads:
            run(opt, params, [g])
            history.append([p.detach().clone() for p in params] + [opt.state[params[0]]["exp_avg"].clone()])
        runs[(impl, compact)] = history
    reference = runs[("single_tensor", True)]
    for key, history in runs.items():
        for step, (got, want) in enumerate(zip(history, reference)):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} step {step}: {m}")


def test_compact_second_moment_is_the_column_mean_of_the_full_one():
    results = {}
    for compact in (True, False):
        params, groups, _ = coupled_setup()
        opt = CoupledAdam(groups, compact=compact)
        run(opt, params, gradient_stream([p.shape for p in params], 10))
        results[compact] = opt.state[params[0]]["exp_avg_sq"]
    assert results[True].shape == (1, 6) and results[False].shape == (17, 6)
    torch.testing.assert_close(results[True], results[False].mean(0, keepdim=True), rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- structure
def test_tied_weights_get_exactly_one_update_per_step():
    """One tensor used as input embedding and LM head is one parameter: stepped once, not twice."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 4)
    head = torch.nn.Linear(4, 11, bias=False)
    head.weight = emb.weight
    params = list({id(p): p for p in itertools.chain(emb.parameters(), head.parameters())}.values())
    assert len(params) == 1
    opt = CoupledAdam([{"params": params, "coupled": True}], lr=1e-2)
    tokens = torch.tensor([1, 2, 3, 4])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(emb(tokens)), torch.tensor([2, 3, 4, 5])).backward()
        opt.step()
    assert opt.state[emb.weight]["step"].item() == 3
    assert len(opt.state) == 1


def test_rows_without_gradient_follow_the_formula_and_count_in_the_mean():
    """Rare tokens: rows that never get a gradient keep m = 0 and do not move, yet they dilute the mean of v."""
    V, H, seen = 10, 3, 4
    E = make_params(shapes=[(V, H)], dtype=torch.float64)[0]
    start = E.detach().clone()
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(25):
        g = torch.zeros(V, H, dtype=torch.float64)
        g[:seen] = torch.randn(seen, H, generator=gen, dtype=torch.float64)
        grads.append([g])
    opt = CoupledAdam([{"params": [E], "coupled": True, "weight_decay": 0.0}], lr=1e-2, eps=1e-8)
    run(opt, [E], grads)
    torch.testing.assert_close(E[seen:], start[seen:], rtol=0, atol=0)
    expected = reference_coupled_adam_fp64([start], grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0, coupled=[True])[0]
    torch.testing.assert_close(E.detach(), expected, rtol=1e-10, atol=1e-12)
    # the shared denominator uses all V rows: sum over the seen rows divided by V, not by `seen`
    v = opt.state[E]["exp_avg_sq"]
    v_seen_only = torch.zeros(1, H, dtype=torch.float64)
    for t, (g,) in enumerate(grads):
        v_seen_only = 0.999 * v_seen_only + 0.001 * (g[:seen] ** 2).mean(0, keepdim=True)
    torch.testing.assert_close(v, v_seen_only * seen / V, rtol=1e-12, atol=0)


def test_stale_rows_with_old_momentum_keep_moving_by_the_formula():
    """A row seen once and then absent keeps moving with its decaying momentum over the shared denominator."""
    V, H = 6, 2
    E = torch.zeros(V, H, dtype=torch.float64, requires_grad=True)
    first = torch.zeros(V, H, dtype=torch.float64)
    first[0] = 1.0
    grads = [[first]] + [[torch.zeros(V, H, dtype=torch.float64)] for _ in range(9)]
    opt = CoupledAdam([{"params": [E], "coupled": True}], lr=0.1, betas=(0.5, 0.9), eps=0.0, weight_decay=0.0)
    run(opt, [E], grads)
    expected = reference_coupled_adam_fp64([torch.zeros(V, H)], grads, lr=0.1, betas=(0.5, 0.9), eps=0.0,
                                           weight_decay=0.0, coupled=[True])[0]
    torch.testing.assert_close(E.detach(), expected, rtol=1e-12, atol=0)
    assert (E[1:] == 0).all() and (E[0] < 0).all()


def test_state_is_created_lazily_on_first_step():
    params, groups, _ = coupled_setup()
    opt = CoupledAdam(groups)
    assert len(opt.state) == 0
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert set(opt.state) == {params[0]}  # params without a gradient get no state
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip_mid_training_continues_bit_identically(impl, amsgrad):
    params, groups, _ = coupled_setup()
    opt = CoupledAdam(groups, lr=1e-2, amsgrad=amsgrad, **IMPLEMENTATIONS[impl])
    grads = list(gradient_stream([p.shape for p in params], 12))
    run(opt, params, grads[:6])

    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    groups2 = [{"params": [resumed[0]], "coupled": True}, {"params": resumed[1:]}]
    opt2 = CoupledAdam(groups2, lr=1e-2, amsgrad=amsgrad, **IMPLEMENTATIONS[impl])
    opt2.load_state_dict(saved["opt"])

    run(opt, params, grads[6:])
    run(opt2, resumed, grads[6:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed):
        for key in opt.state[a]:
            assert torch.equal(opt.state[a][key], opt2.state[b][key]), key


def test_plain_adamw_state_loads_into_compact_mode_by_averaging_rows():
    params, groups, _ = coupled_setup()
    theirs = clone_params(params)
    adamw = torch.optim.AdamW([{"params": [theirs[0]]}, {"params": theirs[1:]}], lr=1e-2)
    run(adamw, theirs, gradient_stream([p.shape for p in params], 5))
    ours = clone_params(theirs)
    opt = CoupledAdam([{"params": [ours[0]], "coupled": True}, {"params": ours[1:]}], lr=1e-2)
    opt.load_state_dict(adamw.state_dict())
    v = opt.state[ours[0]]["exp_avg_sq"]
    assert v.shape == (1, 6)
    torch.testing.assert_close(v, adamw.state[theirs[0]]["exp_avg_sq"].mean(0, keepdim=True))
    assert opt.state[ours[1]]["exp_avg_sq"].shape == ours[1].shape  # uncoupled state untouched
    run(opt, ours, gradient_stream([p.shape for p in ours], 3, seed=7))  # and training goes on


def test_full_state_converts_to_compact_and_back_with_identical_updates():
    params, groups, _ = coupled_setup()
    full = CoupledAdam(groups, compact=False, lr=1e-2)
    run(full, params, gradient_stream([p.shape for p in params], 5))
    continuations = []
    for compact in (True, False):
        ps = clone_params(params)
        opt = CoupledAdam([{"params": [ps[0]], "coupled": True}, {"params": ps[1:]}], compact=compact, lr=1e-2)
        opt.load_state_dict(full.state_dict())
        if compact:
            # and from compact into full mode again: broadcast, so the same column mean
            again = CoupledAdam([{"params": [ps[0]], "coupled": True}, {"params": ps[1:]}], compact=False, lr=1e-2)
            again.load_state_dict(opt.state_dict())
            assert again.state[ps[0]]["exp_avg_sq"].shape == (17, 6)
            opt = again
        run(opt, ps, gradient_stream([p.shape for p in ps], 5, seed=11))
        continuations.append(ps)
    for a, b in zip(*continuations):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compact_state_into_uncoupled_group_is_refused_with_reason():
    params, groups, _ = coupled_setup()
    opt = CoupledAdam(groups)
    run(opt, params, gradient_stream([p.shape for p in params], 2))
    ps = clone_params(params)
    plain = CoupledAdam([{"params": [ps[0]]}, {"params": ps[1:]}])
    with pytest.raises(ValueError, match="cannot be recovered from column means"):
        plain.load_state_dict(opt.state_dict())


# ----------------------------------------------------------------------------- precision and devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["param-dtype-state", "fp32-state"])
def test_half_precision_state_follows_state_dtype_and_tracks_the_fp32_run(dtype, impl, state_dtype):
    params32, groups32, _ = coupled_setup()
    low = [p.detach().to(dtype).requires_grad_() for p in params32]
    groups_low = [{"params": [low[0]], "coupled": True}, {"params": low[1:]}]
    opt_low = CoupledAdam(groups_low, lr=1e-2, state_dtype=state_dtype, **IMPLEMENTATIONS[impl])
    opt32 = CoupledAdam(groups32, lr=1e-2, **IMPLEMENTATIONS[impl])
    grads = list(gradient_stream([p.shape for p in params32], 10))
    run(opt_low, low, grads)
    run(opt32, params32, grads)
    moment_dtype = dtype if state_dtype is None else torch.float32
    coupled_state = opt_low.state[low[0]]
    assert coupled_state["exp_avg"].dtype == moment_dtype
    assert coupled_state["exp_avg_sq"].dtype == torch.float32  # compact [1, H] statistics: always >= float32
    for p in low[1:]:
        assert opt_low.state[p]["exp_avg"].dtype == opt_low.state[p]["exp_avg_sq"].dtype == moment_dtype
    for a, b in zip(low, params32):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.05)
    # reloading keeps this optimizer's state dtypes (torch's loader alone would cast everything to the param dtype)
    reloaded = CoupledAdam([{"params": [low[0]], "coupled": True}, {"params": low[1:]}], lr=1e-2,
                           state_dtype=state_dtype)
    reloaded.load_state_dict(opt_low.state_dict())
    for p in low:
        for key, value in opt_low.state[p].items():
            assert reloaded.state[p][key].dtype == value.dtype
            assert torch.equal(reloaded.state[p][key], value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_foreach_coupled_half_precision_step_is_bitwise_the_reference_step(dtype, monkeypatch):
    """foreach=True updates half-precision coupled params block by block of rows in float32 buffers (torch's
    mixed-dtype addcdiv_ is slow on CPU): the same numbers as the reference's single op, for every block size."""
    import coupled_adam_hf._functional as functional_module

    monkeypatch.setattr(functional_module, "ROW_BLOCK_ELEMENTS", 5 * 6)  # blocks of 5 rows: 13 = 5 + 5 + 3
    params = {impl: make_params(shapes=[(13, 6)], dtype=dtype) for impl in ("single_tensor", "foreach")}
    opts = {impl: CoupledAdam([{"params": ps, "coupled": True}], lr=1e-2, weight_decay=0.1,
                              **IMPLEMENTATIONS[impl]) for impl, ps in params.items()}
    for impl in opts:
        run(opts[impl], params[impl], gradient_stream([(13, 6)], 6, dtype=dtype))
    (ref,), (fast,) = params["single_tensor"], params["foreach"]
    assert not torch.equal(ref, make_params(shapes=[(13, 6)], dtype=dtype)[0])  # it trained
    assert torch.equal(fast, ref)
    assert torch.equal(opts["foreach"].state[fast]["exp_avg"], opts["single_tensor"].state[ref]["exp_avg"])


def test_float32_state_tracks_the_fp32_run_closer_than_half_state():
    """What state_dtype=float32 buys: bf16 moments round away part of every small (1 - beta) contribution."""
    params32, groups32, _ = coupled_setup()
    grads = [[g.bfloat16().float() for g in step] for step in gradient_stream([p.shape for p in params32], 40)]
    opt32 = CoupledAdam(groups32, lr=1e-3)
    run(opt32, params32, grads)
    errors = {}
    for state_dtype in (None, torch.float32):
        low = [p.detach().to(torch.bfloat16).requires_grad_() for p in coupled_setup()[0]]
        opt = CoupledAdam([{"params": [low[0]], "coupled": True}, {"params": low[1:]}], lr=1e-3,
                          state_dtype=state_dtype)
        run(opt, low, grads)
        errors[state_dtype] = max(
            ((opt.state[a][key].float() - opt32.state[b][key]).abs() / opt32.state[b][key].abs().clamp_min(1e-6))
            .mean().item()
            for a, b in zip(low, params32) for key in ("exp_avg", "exp_avg_sq")
        )
    # the same gradients (bf16-exact): float32 moments match the fp32 run to float32 rounding, bf16 ones do not
    assert errors[torch.float32] < 1e-5 < 1e-3 < errors[None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_uncoupled_params_are_bitwise_torch_fused_adamw_in_their_own_dtype(dtype):
    """The default state dtype is the param's, as in torch.optim.AdamW: uncoupled params take torch's own fused
    kernel and end bit for bit where AdamW(fused=True) ends."""
    params = make_params(shapes=[(6, 4), (4,), (3, 5)], dtype=dtype)
    twins = [p.detach().clone().requires_grad_() for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-6)
    ours = CoupledAdam(params, **hyper)
    torch_opt = torch.optim.AdamW(twins, fused=True, **hyper)
    grads = list(gradient_stream([p.shape for p in params], 8))
    run(ours, params, grads)
    run(torch_opt, twins, grads)
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["exp_avg_sq"], torch_opt.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "float16"])
def test_state_dtype_narrower_than_a_param_is_refused(state_dtype):
    params = make_params(shapes=[(6, 4)], dtype=torch.float32)
    with pytest.raises(ValueError, match="may not be narrower than the param"):
        CoupledAdam(params, state_dtype=state_dtype)


@pytest.mark.parametrize("name", ["float32", "torch.float32", "fp32"])
def test_state_dtype_accepts_names_from_yaml(name):
    params = make_params(shapes=[(6, 4)], dtype=torch.bfloat16)
    assert CoupledAdam(params, state_dtype=name).param_groups[0]["state_dtype"] == torch.float32
    with pytest.raises(TypeError, match="Invalid state_dtype"):
        CoupledAdam(params, state_dtype="float33")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tensors_match_the_cpu_run(impl, dtype):
    params, groups, _ = coupled_setup(dtype=dtype)
    on_gpu = [p.detach().cuda().requires_grad_() for p in params]
    opt_gpu = CoupledAdam([{"params": [on_gpu[0]], "coupled": True}, {"params": on_gpu[1:]}], lr=1e-2,
                          **IMPLEMENTATIONS[impl])
    opt_cpu = CoupledAdam(groups, lr=1e-2, **IMPLEMENTATIONS[impl])
    grads = list(gradient_stream([p.shape for p in params], 10))
    run(opt_cpu, params, grads)
    run(opt_gpu, on_gpu, [[g.cuda() for g in gs] for gs in grads])
    for a, b in zip(on_gpu, params):
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=1e-4, atol=1e-5 if dtype == torch.float32 else 2e-2)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
        (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
        (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1: -0.1"),
        (dict(betas=(0.9,)), ValueError, "expected a pair"),
        (dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay value: -0.1"),
        (dict(avg_scale=0.0), ValueError, "Invalid avg_scale value: 0.0"),
        (dict(avg_scale=float("inf")), ValueError, "Invalid avg_scale value: inf"),
        (dict(coupled="yes"), TypeError, "'coupled' must be a bool"),
        (dict(nonfinite="explode"), ValueError, "Invalid nonfinite policy"),
        (dict(foreach=True, fused=True), RuntimeError, "cannot both be True"),
    ],
)
def test_invalid_hyperparameters_raise_errors_naming_the_value(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        CoupledAdam(make_params(shapes=[(3, 2)]), **kwargs)


def test_invalid_value_in_a_param_group_names_the_group():
    p, q = make_params(shapes=[(3, 2), (2,)])
    with pytest.raises(ValueError, match=r"group 1"):
        CoupledAdam([{"params": [p]}, {"params": [q], "lr": -3.0}])


def test_coupled_vector_is_rejected_with_its_name():
    bias = torch.zeros(5, requires_grad=True)
    with pytest.raises(ValueError, match=r"at least 2 dims.*'lm_head.bias'"):
        CoupledAdam([{"params": [("lm_head.bias", bias)], "coupled": True}])


def test_complex_and_integer_tensors_are_rejected():
    with pytest.raises(TypeError, match="complex"):
        CoupledAdam([torch.zeros(3, 2, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="floating-point"):
        CoupledAdam([torch.zeros(3, 2, dtype=torch.int64)])


def test_sparse_gradients_are_rejected_with_advice():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = CoupledAdam([{"params": list(emb.parameters()), "coupled": True}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients.*sparse=False"):
        opt.step()


# ----------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_coupled_gradient_skips_the_whole_step_by_default(bad):
    params, groups, _ = coupled_setup()
    opt = CoupledAdam(groups, lr=1e-2)
    run(opt, params, gradient_stream([p.shape for p in params], 3))
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    grads = next(gradient_stream([p.shape for p in params], 1, seed=5))
    grads[0][2, 1] = bad
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        run(opt, params, [grads])
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    after = opt.state_dict()
    for pid, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][pid][key], value)
    assert opt.skipped_steps == 1
    run(opt, params, gradient_stream([p.shape for p in params], 1, seed=6))  # recovers on the next good step
    assert all(torch.isfinite(p).all() for p in params)


def test_nonfinite_coupled_gradient_can_raise():
    params, groups, _ = coupled_setup()
    opt = CoupledAdam(groups, nonfinite="raise")
    grads = next(gradient_stream([p.shape for p in params], 1))
    grads[0][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="coupled tensor"):
        run(opt, params, [grads])


def test_nonfinite_ignore_lets_the_nan_spread_through_the_column():
    """What the check prevents: one NaN row poisons that hidden column for every row."""
    params, groups, _ = coupled_setup()
    opt = CoupledAdam(groups, nonfinite="ignore")
    grads = next(gradient_stream([p.shape for p in params], 1))
    grads[0][0, 3] = float("nan")
    run(opt, params, [grads])
    assert torch.isnan(params[0][:, 3]).all()
    assert torch.isfinite(params[0][:, :3]).all()


def test_closure_is_evaluated_with_grad_enabled_and_its_loss_returned():
    w = torch.randn(4, 3, requires_grad=True)
    opt = CoupledAdam([{"params": [w], "coupled": True}])

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0


def test_loading_a_live_optimizers_state_shares_no_tensors_with_it():
    params, groups, _ = coupled_setup()
    source = CoupledAdam(groups)
    run(source, params, gradient_stream([p.shape for p in params], 2))
    ps = clone_params(params)
    target = CoupledAdam([{"params": [ps[0]], "coupled": True}, {"params": ps[1:]}])
    target.load_state_dict(source.state_dict())
    run(target, ps, gradient_stream([p.shape for p in ps], 3))
    assert source.state[params[0]]["step"].item() == 2
    assert target.state[ps[0]]["step"].item() == 5


# ----------------------------------------------------------------------------- atomic load_state_dict
def _trained_coupled(rows: int, seed: int = 0) -> tuple[CoupledAdam, list[torch.Tensor]]:
    torch.manual_seed(seed)
    embedding, matrix = torch.randn(rows, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    opt = CoupledAdam([{"params": [embedding], "coupled": True, "param_names": ["wte.weight"]},
                       {"params": [matrix], "param_names": ["h.0.weight"]}], lr=1e-2)
    for _ in range(2):
        for p in (embedding, matrix):
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, [embedding, matrix]


def _snapshot(opt: CoupledAdam) -> tuple[dict, list[dict]]:
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    return state, [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _assert_unchanged(opt: CoupledAdam, before) -> None:
    state, groups = _snapshot(opt)
    assert groups == before[1]
    assert state.keys() == before[0].keys()
    for pid, entries in state.items():
        for key, value in entries.items():
            expected = before[0][pid][key]
            assert torch.equal(value, expected) if torch.is_tensor(value) else value == expected


def test_load_state_dict_of_another_models_embedding_fails_naming_parameter_and_shapes_and_changes_nothing():
    target, _ = _trained_coupled(rows=10)
    source, _ = _trained_coupled(rows=12, seed=1)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"saved exp_avg of shape \[12, 4\] does not fit parameter 'wte.weight' "
                                         r"\(group 0, shape \[10, 4\]\), which needs \[10, 4\]"):
        target.load_state_dict(source.state_dict())
    _assert_unchanged(target, before)


def test_load_state_dict_with_a_plain_moment_of_the_wrong_shape_is_not_called_compact_and_changes_nothing():
    target, _ = _trained_coupled(rows=10)
    source, _ = _trained_coupled(rows=10, seed=1)
    saved = source.state_dict()
    matrix_id = saved["param_groups"][1]["params"][0]
    saved["state"][matrix_id]["exp_avg_sq"] = torch.zeros(4, 3)
    before = _snapshot(target)
    with pytest.raises(ValueError) as caught:
        target.load_state_dict(saved)
    message = str(caught.value)
    assert "compact" not in message and "'h.0.weight'" in message and "[4, 3]" in message and "[4, 4]" in message
    _assert_unchanged(target, before)


def test_load_state_dict_with_other_group_or_parameter_counts_changes_nothing():
    target, params = _trained_coupled(rows=10)
    before = _snapshot(target)
    single = CoupledAdam([{"params": [torch.randn(10, 4, requires_grad=True)], "coupled": True}])
    with pytest.raises(ValueError, match="the state has 1 param groups, this optimizer 2; nothing was loaded"):
        target.load_state_dict(single.state_dict())
    saved = target.state_dict()
    saved["param_groups"][1]["params"] = saved["param_groups"][1]["params"] + [99]
    with pytest.raises(ValueError, match="group 1 of the state holds 2 parameters, this optimizer's 1"):
        target.load_state_dict(saved)
    _assert_unchanged(target, before)

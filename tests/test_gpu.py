"""What a GPU changes, checked on one: every kernel path against the float64 reference, half precision, the
non-finite skip, state_dict round trips between the device and the CPU.

The device comes from ``COUPLED_ADAM_TEST_DEVICE`` (default ``cuda``; the tests skip without one).
``scripts/gpu_check.py --dry-run`` sets it to ``cpu``, so that CI runs this file too, on the CPU kernels.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from coupled_adam_hf import CoupledAdam
from test_optimizer import (
    CASES,
    IMPLEMENTATIONS,
    clone_params,
    coupled_setup,
    gradient_stream,
    reference_coupled_adam_fp64,
    run,
)

DEVICE = torch.device(os.environ.get("COUPLED_ADAM_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
#: Kernel policies a GPU user can be on: the default (torch.compile'd Triton kernels from 2^24 elements), compiled
#: whatever the size, and eager torch ops.
POLICIES = {"auto": "auto", "compiled": "1", "eager": "0"}


def on_device(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().to(DEVICE, copy=True).requires_grad_() for p in params]


def device_groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": [params[0]], "coupled": True}, {"params": params[1:]}]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("case", CASES, ids=["plain", "amsgrad-wd-scale"])
def test_every_kernel_path_on_the_device_matches_the_fp64_reference(monkeypatch, policy, impl, compact, case):
    monkeypatch.setenv("COUPLED_ADAM_COMPILE", POLICIES[policy])
    params, _, kwargs = coupled_setup(**dict(case))
    start = [p.detach().clone() for p in params]
    grads = list(gradient_stream([p.shape for p in params], 20))
    ours = on_device(params)
    groups = device_groups(ours)
    groups[0]["avg_scale"] = case["avg_scale"]
    opt = CoupledAdam(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, compact=compact, **kwargs,
                      **IMPLEMENTATIONS[impl])
    run(opt, ours, [[g.to(DEVICE) for g in gs] for gs in grads])
    expected = reference_coupled_adam_fp64(
        start, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=case["weight_decay"],
        coupled=[True, False, False], avg_scale=case["avg_scale"], amsgrad=case["amsgrad"])
    for p, e in zip(ours, expected):
        torch.testing.assert_close(p.detach().cpu().double(), e, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params_on_the_device_track_the_fp64_reference(impl, dtype):
    params, _, _ = coupled_setup(dtype=dtype)
    start = [p.detach().clone() for p in params]
    grads = list(gradient_stream([p.shape for p in params], 10, dtype=dtype))
    ours = on_device(params)
    run(CoupledAdam(device_groups(ours), lr=1e-2, **IMPLEMENTATIONS[impl]), ours,
        [[g.to(DEVICE) for g in gs] for gs in grads])
    expected = reference_coupled_adam_fp64(start, grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                           coupled=[True, False, False])
    for p, e in zip(ours, expected):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach().cpu().double(), e, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_coupled_gradient_on_the_device_leaves_weights_and_state_untouched(impl, bad):
    params, _, _ = coupled_setup()
    ours = on_device(params)
    opt = CoupledAdam(device_groups(ours), lr=1e-2, **IMPLEMENTATIONS[impl])
    grads = [[g.to(DEVICE) for g in gs] for gs in gradient_stream([p.shape for p in params], 3)]
    run(opt, ours, grads[:2])
    weights = [p.detach().clone() for p in ours]
    state = copy.deepcopy(opt.state_dict())
    poisoned = [g.clone() for g in grads[2]]
    poisoned[0][3, 2] = bad
    with pytest.warns(RuntimeWarning):
        run(opt, ours, [poisoned])
    assert opt.skipped_steps == 1
    for p, w in zip(ours, weights):
        assert torch.equal(p.detach(), w)
    after = opt.state_dict()
    for key, entry in state["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]).cpu(), torch.as_tensor(value).cpu()), name


@pytest.mark.parametrize("compact", [True, False])
def test_state_dict_round_trips_between_the_device_and_the_cpu(compact):
    params, _, _ = coupled_setup()
    grads = list(gradient_stream([p.shape for p in params], 6))
    ours = on_device(params)
    opt = CoupledAdam(device_groups(ours), lr=1e-2, compact=compact)
    run(opt, ours, [[g.to(DEVICE) for g in gs] for gs in grads[:3]])

    cpu_params = [p.detach().to("cpu", copy=True).requires_grad_() for p in ours]
    cpu_opt = CoupledAdam(device_groups(cpu_params), lr=1e-2, compact=compact)
    cpu_opt.load_state_dict(opt.state_dict())  # device state into a CPU optimizer
    back = on_device(clone_params(cpu_params))
    back_opt = CoupledAdam(device_groups(back), lr=1e-2, compact=compact)
    back_opt.load_state_dict(cpu_opt.state_dict())  # and back onto the device
    for p in back_opt.state:
        assert all(v.device == DEVICE for k, v in back_opt.state[p].items() if k != "step" and torch.is_tensor(v))

    rest = grads[3:]
    run(opt, ours, [[g.to(DEVICE) for g in gs] for gs in rest])
    run(cpu_opt, cpu_params, rest)
    run(back_opt, back, [[g.to(DEVICE) for g in gs] for gs in rest])
    for a, b, c in zip(ours, cpu_params, back):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.detach(), a.detach(), rtol=0, atol=0)  # same device, same state: bitwise

#!/usr/bin/env python
"""Optimizer step benchmark: CoupledAdam in every mode against torch.optim.AdamW (foreach and fused).

Parameter sets take their shapes from real transformers configs (built on the meta device, then materialized):

- ``gpt2-124m``: GPT-2 124M with the paper's padded, tied 50304 x 768 token embedding (coupled);
- ``llama-1b-slice``: a Llama-3-1B-shaped slice (hidden 2048, MLP 8192, GQA 32/8 heads) with an untied 128256-vocab
  embedding and LM head (both coupled) and ``--llama-layers`` decoder layers (default 1, to fit in memory);
- ``small``: a 4-layer GPT-2, width 256, vocab 8192.

Groups follow the paper: embeddings coupled with weight decay 0, other matrices weight decay 0.1, vectors 0.
AdamW gets the same groups. Every contender steps the same parameters and gradients with its own state. Each
timed step of a contender sits right beside a fused AdamW step (B X, then X B on the next turn; the contender
order rotates every turn), and the reported ratio is the median of those adjacent-pair ratios (with its
interquartile range), robust to the load of a shared machine drifting. An in-place update of a large buffer
(``a += b``: reads a and b, writes a, the access pattern of an optimizer's passes; a plain copy would also pay for
reading its destination before writing it) runs in the same rotation and gives the memory bandwidth of the moment,
the floor; "bw %" is a contender's minimal memory traffic per step (its bytes model, below) divided by its fastest
step, relative to the fastest probe. On a shared machine the
ratio of the fastest steps ("x (min)") estimates the undisturbed ratio; the median of the pair ratios shows what a
loaded machine gives.

Two protocols (``--protocol``, default both, each with its own pairs and spread): ``warm`` times steps back to
back (a step starts with the caches holding the tail of the previous optimizer step; the bandwidth probe is timed
in its own block after the pairs, so that no pair follows it), ``cold`` runs an untimed pass over ``--flush-mib`` of
other memory before every timed step, as in training, where forward and backward run between two optimizer steps
and evict its data (and code) from the caches. On a CPU the two can differ by a few percent of a ratio: the cold
protocol charges every Python function and small torch op a step touches with its cache misses.

Bytes model (per parameter element; P, G, S = bytes of a param, grad, state element): AdamW reads p, g, m, v and
writes p, m, v: 2P + G + 4S (28 for fp32). A compact coupled tensor: one read of g for the column statistics, then
one pass reading p, g, m and writing p, m: 2P + 2G + 2S (24). Full-state coupled: also v, and one read of the old v
for its column mean: 2P + 2G + 5S (36).

Usage::

    python scripts/bench_optimizer.py --quick                          # small set, fp32, a minute on 2 cores
    python scripts/bench_optimizer.py --sets gpt2-124m --dtypes float32 --output bench.json
    python scripts/bench_optimizer.py                                  # everything (CPU: ~25 min on 2 cores)

Timings are medians after warm-up (compiled kernels compile during warm-up; the first-step time is reported
separately). CUDA is used when available (``--device``), with ``torch.cuda.synchronize()`` around every timing.
Never read absolute milliseconds from a shared machine: compare the ratios, and note the load printed with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch

from coupled_adam_hf import CoupledAdam, kernel_policy
from coupled_adam_hf.benchmarking import quantile, timed

BASELINE = "adamw_fused"


# ----------------------------------------------------------------------------------------------- parameter sets
def _model_parameters(name: str, llama_layers: int) -> tuple[list[tuple[str, torch.Size]], set[str]]:
    """(parameter name, shape) of a real architecture, and the names of the embeddings to couple."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if name == "gpt2-124m":
        config = GPT2Config(vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
        model_cls = GPT2LMHeadModel
    elif name == "small":
        config = GPT2Config(vocab_size=8192, n_positions=512, n_embd=256, n_layer=4, n_head=4, bos_token_id=0,
                            eos_token_id=0)
        model_cls = GPT2LMHeadModel
    elif name == "llama-1b-slice":
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=llama_layers,
                             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
        model_cls = LlamaForCausalLM
    else:
        raise ValueError(f"unknown parameter set {name!r}; choose from {PARAMETER_SETS}")
    with torch.device("meta"):
        model = model_cls(config)
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    shapes, coupled = [], set()
    for pname, p in model.named_parameters():  # tied weights appear once
        shapes.append((pname, p.shape))
        if id(p) in embeddings:
            coupled.add(pname)
    return shapes, coupled


PARAMETER_SETS = ("small", "gpt2-124m", "llama-1b-slice")


@dataclass
class ParameterSet:
    name: str
    dtype: torch.dtype
    params: list[torch.Tensor]
    coupled: list[bool]
    names: list[str]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def groups(self, with_coupling: bool) -> list[dict]:
        coupled = [p for p, c in zip(self.params, self.coupled) if c]
        decay = [p for p, c in zip(self.params, self.coupled) if not c and p.dim() >= 2]
        no_decay = [p for p, c in zip(self.params, self.coupled) if not c and p.dim() < 2]
        groups = [dict(params=coupled, weight_decay=0.0), dict(params=decay, weight_decay=0.1),
                  dict(params=no_decay, weight_decay=0.0)]
        if with_coupling:
            groups[0]["coupled"] = True
        return [g for g in groups if g["params"]]


def build_parameter_set(name: str, dtype: torch.dtype, device: torch.device, llama_layers: int) -> ParameterSet:
    shapes, coupled_names = _model_parameters(name, llama_layers)
    gen = torch.Generator(device="cpu").manual_seed(0)
    params, coupled, names = [], [], []
    for pname, shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        # gradients of a realistic scale; fixed for the whole run (every contender sees the same ones)
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
        coupled.append(pname in coupled_names)
        names.append(pname)
    return ParameterSet(name, dtype, params, coupled, names)


# ----------------------------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    name: str
    make: Callable[[ParameterSet], torch.optim.Optimizer]
    env: dict[str, str] = field(default_factory=dict)  # environment while this contender steps (kernel choice)
    bytes_kind: str = "adamw"  # "adamw", "compact" or "full": the bytes model for coupled tensors
    description: str = ""
    fp32_state: bool = False  # moments in float32 whatever the param dtype (state_dtype=torch.float32)


HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def _coupled(**kwargs) -> Callable[[ParameterSet], torch.optim.Optimizer]:
    return lambda ps: CoupledAdam(ps.groups(with_coupling=True), **HYPER, **kwargs)


def _adamw(**kwargs) -> Callable[[ParameterSet], torch.optim.Optimizer]:
    return lambda ps: torch.optim.AdamW(ps.groups(with_coupling=False), **HYPER, **kwargs)


ALWAYS = {"COUPLED_ADAM_COMPILE": "always"}  # fast kernels whatever the tensor size
INDUCTOR = {"COUPLED_ADAM_COMPILE": "always", "COUPLED_ADAM_CPP": "0"}  # torch.compile'd kernels, also on CPU
EAGER = {"COUPLED_ADAM_COMPILE": "never"}

CONTENDERS = [
    Contender(BASELINE, _adamw(fused=True), description="torch.optim.AdamW(fused=True)"),
    Contender("adamw_foreach", _adamw(foreach=True), description="torch.optim.AdamW(foreach=True)"),
    Contender("coupled_default", _coupled(), {}, "compact",
              "CoupledAdam(): fused, compact state; C++ kernels on CPU from 2^16 elements, torch.compile'd ones on "
              "GPU from 2^24 (COUPLED_ADAM_COMPILE=auto)"),
    Contender("coupled_fused_compiled", _coupled(fused=True), ALWAYS, "compact",
              "fused, compact, fast kernels for every size (COUPLED_ADAM_COMPILE=always: C++ on CPU)"),
    Contender("coupled_fused_inductor", _coupled(fused=True), INDUCTOR, "compact",
              "fused, compact, torch.compile'd kernels (COUPLED_ADAM_CPP=0: what a GPU runs)"),
    Contender("coupled_fused_eager", _coupled(fused=True), EAGER, "compact",
              "fused, compact, eager torch ops (no compiler)"),
    Contender("coupled_fused_nocheck", _coupled(fused=True, nonfinite="ignore"), {}, "compact",
              "default, but nonfinite='ignore' (no host sync)"),
    Contender("coupled_foreach", _coupled(foreach=True), {}, "compact", "foreach=True, compact"),
    Contender("coupled_full_fused", _coupled(fused=True, compact=False), ALWAYS, "full",
              "fused, full [V, H] second moment, fast kernels"),
    Contender("coupled_full_foreach", _coupled(foreach=True, compact=False), {}, "full",
              "foreach=True, full second moment (the paper's layout)"),
    Contender("coupled_single_tensor", _coupled(foreach=False, fused=False), {}, "compact",
              "the single-tensor reference path"),
    Contender("coupled_fp32_state", _coupled(state_dtype=torch.float32), {}, "compact",
              "default, but float32 moments for half-precision params (state_dtype=torch.float32)", True),
]
QUICK_CONTENDERS = ("adamw_fused", "adamw_foreach", "coupled_default", "coupled_fused_compiled",
                    "coupled_fused_eager", "coupled_foreach", "coupled_full_fused")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def expected_state_bytes(contender: Contender, ps: ParameterSet) -> int:
    """Estimate before building (to plan rounds that fit in memory)."""
    total = 0
    for p, coupled in zip(ps.params, ps.coupled):
        size = max(p.element_size(), 4) if contender.fp32_state else p.element_size()
        rows = p.shape[0] if p.dim() else 1
        v_numel = p.numel() // rows if coupled and contender.bytes_kind == "compact" else p.numel()
        total += (p.numel() + v_numel) * size
    return total


def traffic_bytes(contender: Contender, ps: ParameterSet) -> int:
    """Minimal bytes a step of this contender must move (see the module docstring)."""
    total = 0
    for p, coupled in zip(ps.params, ps.coupled):
        P = G = p.element_size()
        S = max(P, 4) if contender.fp32_state else P
        if coupled and contender.bytes_kind == "compact":
            per = 2 * P + 2 * G + 2 * S
        elif coupled and contender.bytes_kind == "full":
            per = 2 * P + 2 * G + 5 * S
        else:
            per = 2 * P + G + 4 * S
        total += per * p.numel()
    return total


# ----------------------------------------------------------------------------------------------- timing
def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def plan_rounds(contenders: list[Contender], ps: ParameterSet, budget: int) -> list[list[Contender]]:
    """Pack contenders into rounds that fit in ``budget`` bytes of state; every round includes the baseline."""
    baseline = next(c for c in contenders if c.name == BASELINE)
    others = [c for c in contenders if c is not baseline]
    rounds, current, used = [], [baseline], expected_state_bytes(baseline, ps)
    for c in others:
        need = expected_state_bytes(c, ps)
        if len(current) > 1 and used + need > budget:
            rounds.append(current)
            current, used = [baseline], expected_state_bytes(baseline, ps)
        current.append(c)
        used += need
    rounds.append(current)
    return rounds


@dataclass
class Result:
    set: str
    dtype: str
    contender: str
    description: str
    params: int
    coupled_params: int
    median_ms: float
    ratio_to_fused_adamw: float
    ratio_q1: float
    ratio_q3: float
    min_ms: float
    ratio_of_minimums: float
    first_step_s: float
    state_bytes: int
    state_ratio_to_adamw: float
    traffic_bytes: int
    achieved_gb_s: float
    stream_gb_s: float
    bandwidth_fraction: float
    round: int
    steps: int
    loadavg: list[float] = field(default_factory=list)
    protocol: str = "warm"  # "warm": steps back to back; "cold": a cache-flushing pass before every timed step


def stream_probe(device: torch.device, numel: int) -> Callable[[], object]:
    """``a += b`` over ``numel`` float32 elements: 12 bytes per element, read-modify-write like an optimizer pass."""
    a = torch.randn(numel, device=device)
    b = torch.randn(numel, device=device)
    return lambda: a.add_(b)


PROTOCOLS = ("warm", "cold")


def cache_flush(device: torch.device, mib: int) -> Callable[[], object]:
    """An untimed pass over ``mib`` MiB of other memory (several times the last-level cache): what the forward
    and backward passes do to the caches between two optimizer steps of a training run."""
    buffer = torch.zeros(max(1, mib << 18), device=device)
    return lambda: buffer.add_(1.0)


def run_round(ps: ParameterSet, contenders: list[Contender], steps: int, warmup: int, device: torch.device,
              stream_numel: int, round_index: int, protocols: tuple[str, ...] = ("warm",),
              flush_mib: int = 256) -> list[Result]:
    optimizers = {}
    first_step = {}
    for c in contenders:
        opt = c.make(ps)
        with mock.patch.dict(os.environ, c.env):
            first_step[c.name] = timed(opt.step, device)
            for _ in range(warmup - 1):
                opt.step()
        optimizers[c.name] = opt
    stream = stream_probe(device, stream_numel)
    for _ in range(2):
        stream()
    flush = cache_flush(device, flush_mib) if "cold" in protocols else None
    adamw_state = state_bytes(optimizers[BASELINE])
    results = []
    for protocol in protocols:
        times, ratios = _time_pairs(contenders, optimizers, stream, flush if protocol == "cold" else None, steps,
                                    device)
        results += _results(ps, contenders, optimizers, times, ratios, first_step, adamw_state, stream_numel,
                            round_index, steps, protocol)
    del optimizers
    gc.collect()
    return results


def _time_pairs(contenders: list[Contender], optimizers: dict, stream: Callable[[], object],
                flush: Callable[[], object] | None, steps: int, device: torch.device):
    """Step times of every contender and of the baseline beside it, and the pair ratios. ``flush`` (the cold
    protocol) runs untimed before every timed step and probe; without it (warm) the probe is timed after the pairs,
    so that every timed optimizer step follows another optimizer step."""
    names = [c.name for c in contenders if c.name != BASELINE] + (["_stream"] if flush is not None else [])
    times: dict[str, list[float]] = {n: [] for n in [BASELINE, *names, "_stream"]}
    ratios: dict[str, list[float]] = {c.name: [] for c in contenders}
    by_name = {c.name: c for c in contenders}

    def step_of(name: str) -> float:
        if flush is not None:
            flush()
        if name == "_stream":
            return timed(stream, device)
        with mock.patch.dict(os.environ, by_name[name].env):
            return timed(optimizers[name].step, device)

    # Every contender is timed right beside a fused AdamW step (alternately before and after it), so each ratio
    # compares two steps taken under the same load; the contender order rotates from turn to turn.
    for turn in range(steps if names else 0):
        shift = turn % len(names)
        for n in names[shift:] + names[:shift]:
            pair = (BASELINE, n) if turn % 2 == 0 else (n, BASELINE)
            measured = {name: step_of(name) for name in pair}
            times[n].append(measured[n])
            times[BASELINE].append(measured[BASELINE])
            if n in ratios:
                ratios[n].append(measured[n] / measured[BASELINE])
    if not names:  # the baseline alone
        times[BASELINE] = [step_of(BASELINE) for _ in range(steps)]
    if flush is None:
        times["_stream"] = [timed(stream, device) for _ in range(steps)]
    ratios[BASELINE] = [1.0]
    return times, ratios


def _results(ps: ParameterSet, contenders: list[Contender], optimizers: dict, times: dict, ratios: dict,
             first_step: dict, adamw_state: int, stream_numel: int, round_index: int, steps: int,
             protocol: str) -> list[Result]:
    load = list(os.getloadavg())
    stream_s = min(times["_stream"])  # bandwidths from the fastest (least disturbed) runs
    stream_gb_s = 3 * stream_numel * 4 / stream_s / 1e9
    coupled_numel = sum(p.numel() for p, c in zip(ps.params, ps.coupled) if c)
    results = []
    for c in contenders:
        median_s = statistics.median(times[c.name])
        traffic = traffic_bytes(c, ps)
        sbytes = state_bytes(optimizers[c.name])
        achieved = traffic / min(times[c.name]) / 1e9
        results.append(Result(
            set=ps.name, dtype=str(ps.dtype).removeprefix("torch."), contender=c.name, description=c.description,
            params=ps.numel, coupled_params=coupled_numel, median_ms=median_s * 1e3,
            ratio_to_fused_adamw=statistics.median(ratios[c.name]), ratio_q1=quantile(ratios[c.name], 0.25),
            ratio_q3=quantile(ratios[c.name], 0.75), min_ms=min(times[c.name]) * 1e3,
            ratio_of_minimums=min(times[c.name]) / min(times[BASELINE]), first_step_s=first_step[c.name],
            state_bytes=sbytes, state_ratio_to_adamw=sbytes / adamw_state if adamw_state else float("nan"),
            traffic_bytes=traffic, achieved_gb_s=achieved, stream_gb_s=stream_gb_s,
            bandwidth_fraction=achieved / stream_gb_s, round=round_index, steps=steps, loadavg=load,
            protocol=protocol))
    return results


def run_set(name: str, dtype: torch.dtype, contenders: list[Contender], args, device: torch.device) -> list[Result]:
    ps = build_parameter_set(name, dtype, device, args.llama_layers)
    param_bytes = 2 * sum(p.numel() * p.element_size() for p in ps.params)  # params and grads
    budget = int(args.memory_fraction * (_available_memory_bytes(device))) if args.memory_budget_gb is None \
        else int(args.memory_budget_gb * (1 << 30))
    rounds = plan_rounds(contenders, ps, budget)
    print(f"\n== {name} {str(dtype).removeprefix('torch.')}: {ps.numel / 1e6:.1f}M params "
          f"({sum(p.numel() for p, c in zip(ps.params, ps.coupled) if c) / 1e6:.1f}M coupled), params+grads "
          f"{param_bytes / 2**30:.2f} GiB, {len(rounds)} round(s), load {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for index, round_contenders in enumerate(rounds):
        results += run_round(ps, round_contenders, args.steps, args.warmup, device,
                             args.stream_mib * (1 << 20) // 4, index, _protocols(args.protocol), args.flush_mib)
    kept = results  # the baseline has a row per round: each round's ratios refer to its own baseline
    print_table(kept)
    del ps
    gc.collect()
    return kept


def _protocols(choice: str) -> tuple[str, ...]:
    return PROTOCOLS if choice == "both" else (choice,)


def print_table(results: list[Result]) -> None:
    header = (f"{'contender':24s} {'proto':>5s} {'rnd':>3s} {'ms':>8s} {'x fused':>8s} {'(IQR)':>13s} {'min ms':>8s} {'x (min)':>8s} "
              f"{'1st s':>6s} {'state MiB':>10s} {'x state':>8s} {'GB/s':>6s} {'bw %':>5s} {'load1':>6s}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.contender:24s} {r.protocol:>5s} {r.round + 1:3d} {r.median_ms:8.1f} {r.ratio_to_fused_adamw:8.3f} "
              f"{f'({r.ratio_q1:.2f}-{r.ratio_q3:.2f})':>13s} {r.min_ms:8.1f} {r.ratio_of_minimums:8.3f} "
              f"{r.first_step_s:6.2f} "
              f"{r.state_bytes / 2**20:10.1f} {r.state_ratio_to_adamw:8.3f} {r.achieved_gb_s:6.1f} "
              f"{100 * r.bandwidth_fraction:5.0f} {r.loadavg[0]:6.2f}", flush=True)
    stream = {(r.round, r.protocol): r.stream_gb_s for r in results}
    print("in-place stream bandwidth (the floor) per round: "
          + ", ".join(f"{v:.1f} GB/s ({protocol})" for (_, protocol), v in stream.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(PARAMETER_SETS),
                        help=f"comma-separated parameter sets: {', '.join(PARAMETER_SETS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes: float32, bfloat16")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset of: " + ", ".join(c.name for c in CONTENDERS))
    parser.add_argument("--steps", type=int, default=15, help="timed steps per contender (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender (compiles happen here)")
    parser.add_argument("--llama-layers", type=int, default=1, help="decoder layers in the llama-1b-slice set")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and the C++ kernels (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--stream-mib", type=int, default=256, help="buffer size of the bandwidth probe (a += b)")
    parser.add_argument("--protocol", default="both", choices=("warm", "cold", "both"),
                        help="warm: steps back to back; cold: a cache-flushing pass before every timed step, as in "
                        "training; both (default): each with its own pairs and spread")
    parser.add_argument("--flush-mib", type=int, default=256,
                        help="memory the cold protocol's flushing pass sweeps (several times the last-level cache)")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="share of available memory that optimizer states of one round may use")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="explicit state budget per round")
    parser.add_argument("--quick", action="store_true",
                        help="small set, float32, fewer contenders and steps (about a minute on 2 CPU cores)")
    parser.add_argument("--output", default=None, help="write all results as JSON to this path")
    args = parser.parse_args(argv)

    if args.quick:
        args.sets, args.dtypes = "small", "float32"
        args.steps, args.warmup = min(args.steps, 9), min(args.warmup, 2)
        args.contenders = args.contenders or ",".join(QUICK_CONTENDERS)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        if s not in PARAMETER_SETS:
            parser.error(f"unknown set {s!r}; choose from {', '.join(PARAMETER_SETS)}")
    dtypes = []
    for d in args.dtypes.split(","):
        dtype = getattr(torch, d.strip(), None)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            parser.error(f"unsupported dtype {d!r}; use float32 or bfloat16")
        dtypes.append(dtype)
    contenders = CONTENDERS
    if args.contenders:
        wanted = {c.strip() for c in args.contenders.split(",")} | {BASELINE}
        unknown = wanted - {c.name for c in CONTENDERS}
        if unknown:
            parser.error(f"unknown contenders {sorted(unknown)}; choose from {[c.name for c in CONTENDERS]}")
        contenders = [c for c in CONTENDERS if c.name in wanted]

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # (also the OpenMP threads of the C++ kernels: the same runtime)
    try:
        return _run(sets, dtypes, contenders, args, device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests do)


def _run(sets: list[str], dtypes: list[torch.dtype], contenders: list[Contender], args: argparse.Namespace,
         device: torch.device) -> int:
    machine = dict(
        device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), torch=torch.__version__, threads=torch.get_num_threads(),
        cpus=os.cpu_count(), python=sys.version.split()[0], compile_policy=kernel_policy().compile,
        cpp_kernels=kernel_policy().cpp,
        loadavg_start=list(os.getloadavg()))
    print(f"device {machine['device_name']} ({device}), torch {torch.__version__}, {machine['threads']} threads, "
          f"COUPLED_ADAM_COMPILE={machine['compile_policy']}, C++ kernels {'on' if kernel_policy().cpp else 'off'}, "
          f"load {machine['loadavg_start']}")
    results: list[Result] = []
    for s in sets:
        for dtype in dtypes:
            results += run_set(s, dtype, contenders, args, device)
    machine["loadavg_end"] = list(os.getloadavg())
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(machine=machine, args=vars(args), results=[asdict(r) for r in results]), f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""End-to-end training throughput: CoupledAdamTrainer with ``coupled_adam`` vs ``adamw_torch_fused``.

Both recipes of the quickstart (``recipes/quickstart-coupled.yaml``, ``recipes/quickstart-adamw.yaml``: the same
model, data, seed, schedule and parameter groups) train side by side in one process, in alternating rounds
(A B A B ...): every round builds a fresh model and Trainer for each recipe and trains ``--steps`` steps. The wall
time between consecutive optimizer steps (forward, backward, clipping, optimizer, scheduler and data loading) is
recorded by a callback; the first ``--skip`` steps of every run are dropped. Reported: tokens/s from the median step
time per recipe and from the fastest 10% of steps (less disturbed by other work on a shared machine), and the median
over rounds of the per-round ratios (coupled / AdamW tokens/s), with the load.

    python scripts/bench_trainer.py                       # 3 rounds x 40 steps of the quickstart
    python scripts/bench_trainer.py --rounds 5 --output bench_trainer.json
    python scripts/bench_trainer.py --max_grad_norm 0     # any further flag goes to both recipes (train.py flags)

The tokenizer is trained and the text tokenized once (as ``scripts/train.py`` does) and shared by all runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPES = {"coupled_adam": ROOT / "recipes/quickstart-coupled.yaml",
                   "adamw_torch_fused": ROOT / "recipes/quickstart-adamw.yaml"}


def _load_train_module():
    """scripts/train.py as a module: its argument parsing and data pipeline, reused unchanged."""
    spec = importlib.util.spec_from_file_location("coupled_adam_train_script", ROOT / "scripts/train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (each trains both recipes)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--skip", type=int, default=5, help="first steps of every run left out of the timing")
    parser.add_argument("--coupled-recipe", default=str(DEFAULT_RECIPES["coupled_adam"]))
    parser.add_argument("--baseline-recipe", default=str(DEFAULT_RECIPES["adamw_torch_fused"]))
    parser.add_argument("--output", default=None, help="write the results as JSON to this path")
    args, train_flags = parser.parse_known_args(argv)
    if args.steps <= args.skip + 1:
        parser.error(f"--steps ({args.steps}) must exceed --skip ({args.skip}) by at least 2")

    import torch
    import transformers
    from transformers import TrainerCallback, set_seed

    from coupled_adam_hf.trainer import CoupledAdamTrainer

    train = _load_train_module()
    transformers.utils.logging.set_verbosity_error()
    workdir = tempfile.mkdtemp(prefix="bench_trainer_")
    quiet = ["--max_steps", str(args.steps), "--eval_strategy", "no", "--save_strategy", "no", "--do_eval", "false",
             "--logging_steps", str(10 * args.steps), "--isotropy_logging_steps", "0", "--report_to", "none",
             "--disable_tqdm", "true", "--output_dir", workdir]
    recipes = {"coupled_adam": args.coupled_recipe, "adamw_torch_fused": args.baseline_recipe}
    parsed = {name: train.parse_args([path, *quiet, *train_flags]) for name, path in recipes.items()}

    # data and tokenizer once, from the coupled recipe (both recipes name the same model and data)
    model_args, data_args, training_args = parsed["coupled_adam"]
    set_seed(training_args.seed)
    raw = train.lm_data.load_raw_datasets(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file, validation_file=data_args.validation_file,
        validation_split_percentage=data_args.validation_split_percentage,
        validation_split_seed=data_args.validation_split_seed, keep_linebreaks=data_args.keep_linebreaks)
    tokenizer = train.build_tokenizer(model_args, data_args, training_args, raw, checkpoint=None)
    probe_model = train.build_model(model_args, tokenizer)
    block_size = train.default_block_size(probe_model, tokenizer, data_args.block_size)
    n_params = sum(p.numel() for p in probe_model.parameters())
    del probe_model
    dataset = train.lm_data.tokenize_and_group(raw, tokenizer, block_size, text_column=data_args.text_column_name)
    train_dataset = dataset["train"]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    def run_once(name: str) -> tuple[float, int]:
        m_args, _d_args, t_args = parsed[name]
        set_seed(t_args.seed)
        model = train.build_model(m_args, tokenizer)
        clock = StepClock()
        trainer = CoupledAdamTrainer(model=model, args=t_args, train_dataset=train_dataset,
                                     processing_class=tokenizer, data_collator=train.lm_data.CausalLMBlockCollator(),
                                     callbacks=[clock])
        trainer.train()
        gaps = sorted([b - a for a, b in zip(clock.stamps, clock.stamps[1:])][args.skip:])
        tokens_per_step = t_args.per_device_train_batch_size * t_args.gradient_accumulation_steps * block_size
        tokens_per_step *= max(1, t_args.world_size)
        return statistics.median(gaps), gaps[len(gaps) // 10], tokens_per_step

    print(f"quickstart: {n_params / 1e6:.2f}M params, block {block_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()}", flush=True)
    rounds = []
    names = list(recipes)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        row = {}
        for name in order:
            step_s, fast_step_s, tokens = run_once(name)
            row[name] = dict(median_step_s=step_s, p10_step_s=fast_step_s, tokens_per_s=tokens / step_s,
                             tokens_per_s_fast=tokens / fast_step_s)
        for key in ("tokens_per_s", "tokens_per_s_fast"):
            row[f"ratio_{key}"] = row["coupled_adam"][key] / row["adamw_torch_fused"][key]
        row["loadavg"] = list(os.getloadavg())
        rounds.append(row)
        print(f"round {r + 1}: coupled_adam {row['coupled_adam']['tokens_per_s']:8.0f} tok/s, adamw_torch_fused "
              f"{row['adamw_torch_fused']['tokens_per_s']:8.0f} tok/s, ratio {row['ratio_tokens_per_s']:.3f} "
              f"(fastest 10% of steps: {row['ratio_tokens_per_s_fast']:.3f}), load {row['loadavg'][0]:.2f}",
              flush=True)
    summary = {name: {key: statistics.median(r[name][key] for r in rounds)
                      for key in ("tokens_per_s", "tokens_per_s_fast")} for name in names}
    ratio = {key: statistics.median(r[f"ratio_{key}"] for r in rounds) for key in ("tokens_per_s", "tokens_per_s_fast")}
    print(f"\n{'optim':20s} {'tokens/s':>10s} {'(fast steps)':>13s}")
    for name in names:
        print(f"{name:20s} {summary[name]['tokens_per_s']:10.0f} {summary[name]['tokens_per_s_fast']:13.0f}")
    print(f"ratio coupled / adamw (median of rounds): {ratio['tokens_per_s']:.3f} from median steps, "
          f"{ratio['tokens_per_s_fast']:.3f} from the fastest 10% of steps; load {os.getloadavg()}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(recipes={k: str(v) for k, v in recipes.items()}, steps=args.steps, skip=args.skip,
                           params=n_params, block_size=block_size, torch=torch.__version__,
                           threads=torch.get_num_threads(), rounds=rounds, tokens_per_s=summary, ratio=ratio,
                           extra_flags=train_flags), f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark scripts run end to end and report what the performance tables of docs/performance.md are made of.

How fast anything is, is not tested here (timings on a shared machine are not test material): the tests check the
structure and the arithmetic that does not depend on the clock (state bytes, the bytes model, the baseline's ratio).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import _scripts  # tests/ is on sys.path (pytest's rootdir-relative import)


def load_script(name: str):
    return _scripts.load_script(name, f"coupled_adam_{name}")


def test_optimizer_benchmark_reports_ratio_state_and_bandwidth_of_every_contender(tmp_path, capsys):
    bench = load_script("bench_optimizer")
    settings = {k: v for k, v in os.environ.items() if k.startswith("COUPLED_ADAM_")}
    out = tmp_path / "bench.json"
    contenders = ["coupled_default", "coupled_fused_inductor", "coupled_full_fused", "coupled_foreach"]
    threads = torch.get_num_threads()
    asked = 2 if threads == 1 else 1
    assert bench.main(["--quick", "--steps", "2", "--warmup", "1", "--stream-mib", "8", "--threads", str(asked),
                       "--contenders", ",".join(contenders), "--output", str(out)]) == 0
    assert {k: v for k, v in os.environ.items() if k.startswith("COUPLED_ADAM_")} == settings, (
        "contenders' kernel settings leaked out of the benchmark")
    # (a leaked thread count changes the numerics of everything that runs after it in this process)
    assert torch.get_num_threads() == threads, "the benchmark's --threads leaked out of it"

    report = json.loads(out.read_text())
    rows = {row["contender"]: row for row in report["results"]}
    assert set(rows) == {"adamw_fused", *contenders}
    assert report["machine"]["threads"] == asked and len(report["machine"]["loadavg_start"]) == 3
    baseline = rows["adamw_fused"]
    assert baseline["ratio_to_fused_adamw"] == 1.0 and baseline["state_ratio_to_adamw"] == 1.0
    for row in rows.values():
        assert row["set"] == "small" and row["dtype"] == "float32" and row["steps"] == 2
        assert row["median_ms"] > 0 and row["ratio_to_fused_adamw"] > 0 and row["stream_gb_s"] > 0
        assert 0 < row["bandwidth_fraction"] == pytest.approx(row["achieved_gb_s"] / row["stream_gb_s"])

    # compact state drops the coupled [V, H] second moment and keeps one row: small set, V x H = 8192 x 256
    n, coupled, hidden = baseline["params"], baseline["coupled_params"], 256
    assert coupled == 8192 * hidden
    steps = 4 * 52  # one float32 step counter per tensor, in both
    compact = rows["coupled_default"]
    assert compact["state_bytes"] == 4 * (2 * n - coupled + hidden) + steps
    assert compact["state_ratio_to_adamw"] == pytest.approx(compact["state_bytes"] / baseline["state_bytes"])
    assert rows["coupled_full_fused"]["state_bytes"] == baseline["state_bytes"]
    # the bytes model: 28 per fp32 AdamW element, 24 per compact coupled element, 36 per full-state coupled one
    assert baseline["traffic_bytes"] == 28 * n
    assert compact["traffic_bytes"] == 28 * (n - coupled) + 24 * coupled
    assert rows["coupled_full_fused"]["traffic_bytes"] == 28 * (n - coupled) + 36 * coupled

    table = capsys.readouterr().out
    for name in rows:
        assert name in table
    assert "in-place stream bandwidth" in table


def test_optimizer_benchmark_refuses_unknown_sets_and_contenders_with_the_choices(capsys):
    bench = load_script("bench_optimizer")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--sets", "gpt5"])
    assert exit_info.value.code == 2 and "choose from small, gpt2-124m, llama-1b-slice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--contenders", "adam_turbo"])
    assert "coupled_default" in capsys.readouterr().err


@pytest.mark.slow
def test_trainer_benchmark_runs_both_recipes_and_reports_their_throughput_ratio(tmp_path):
    bench = load_script("bench_trainer")
    out = tmp_path / "bench_trainer.json"
    assert bench.main(["--rounds", "1", "--steps", "5", "--skip", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    (round_,) = report["rounds"]
    for name in ("coupled_adam", "adamw_torch_fused"):
        assert round_[name]["tokens_per_s"] > 0
    assert report["ratio"]["tokens_per_s"] == pytest.approx(
        round_["coupled_adam"]["tokens_per_s"] / round_["adamw_torch_fused"]["tokens_per_s"])


def test_metrics_benchmark_reports_ratios_to_one_gram_product(tmp_path, capsys):
    bench = load_script("bench_metrics")
    out = tmp_path / "bench_metrics.json"
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--repeats", "2", "--threads", "1", "--output", str(out)]) == 0
    assert torch.get_num_threads() == threads, "the benchmark's --threads leaked out of it"
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 1 and len(report["machine"]["loadavg_start"]) == 3
    assert len(report["loadavg_per_repeat"]) == 2 and report["shape"] == [4096, 64]
    rows = {row["contender"]: row for row in report["results"]}
    assert set(rows) == {"gram", "quick_isotropy", "embedding_metrics", "embedding_metrics_counts"}
    assert rows["gram"]["ratio_to_gram"] == 1.0 and rows["gram"]["calls"] == 2 * 3  # one beside each contender
    for name, row in rows.items():
        assert row["median_s"] > 0 and row["ratio_to_gram"] > 0 and len(row["ratios"]) == len(row["times_s"])
        assert row["ratio_low"] <= row["ratio_to_gram"] <= row["ratio_high"], name
    assert 0 < report["rows_seen"] < 4096
    table = capsys.readouterr().out
    for name in rows:
        assert name in table


def test_metrics_benchmark_refuses_unknown_contenders_with_the_choices(capsys):
    bench = load_script("bench_metrics")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--contenders", "svd"])
    assert exit_info.value.code == 2 and "embedding_metrics_counts" in capsys.readouterr().err

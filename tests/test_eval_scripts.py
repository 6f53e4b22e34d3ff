"""scripts/eval_isotropy.py and scripts/eval_perplexity.py on tiny checkpoints saved like real ones."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from coupled_adam_hf.metrics import embedding_metrics, read_token_counts
from coupled_adam_hf.perplexity import evaluate_perplexity

from _scripts import OFFLINE, ROOT, load_script  # tests/ is on sys.path




eval_isotropy = load_script("eval_isotropy")
eval_perplexity = load_script("eval_perplexity")


def shakespeare(chars: int) -> str:
    path = resources.files("coupled_adam_hf") / "data" / "shakespeare" / "validation.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read(chars)


def save_checkpoint(folder: Path, tokenizer, *, tied: bool, seed: int) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # a drifted mean, as Adam leaves it, so that the checkpoints differ visibly
        model.get_input_embeddings().weight.add_(0.05 if seed else 0.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("eval_scripts")
    text = shakespeare(60_000)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    (root / "train.txt").write_text(text[:40_000])
    (root / "valid.txt").write_text(text[40_000:45_000])
    return {
        "root": root,
        "tied": save_checkpoint(root / "tied", tokenizer, tied=True, seed=0),
        "untied": save_checkpoint(root / "untied", tokenizer, tied=False, seed=1),
    }


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **OFFLINE}, cwd=ROOT, timeout=300)


# ---------------------------------------------------------------------------------------------- isotropy
@pytest.mark.slow
def test_isotropy_json_holds_the_metrics_of_every_matrix_of_every_checkpoint(workspace, tmp_path):
    out = tmp_path / "iso"
    results = eval_isotropy.main([
        "--model_name_or_path", str(workspace["tied"]), str(workspace["untied"]), "--labels", "AdamW", "Coupled",
        "--count_tokens_in", str(workspace["root"] / "train.txt"), "--top_k", "50", "--output_dir", str(out),
    ])
    written = json.loads((out / "isotropy.json").read_text())
    assert set(written["checkpoints"]) == {"AdamW", "Coupled"}
    assert "c . mu >= 0" in written["iso_sign_convention"]
    assert set(written["checkpoints"]["AdamW"]["matrices"]) == {"token", "position"}  # tied head: not twice
    assert written["checkpoints"]["AdamW"]["matrices"]["token"]["roles"] == ["token", "output"]
    assert set(written["checkpoints"]["Coupled"]["matrices"]) == {"token", "output", "position"}

    model = AutoModelForCausalLM.from_pretrained(workspace["untied"])
    tokenizer = AutoTokenizer.from_pretrained(workspace["untied"])
    lines = (workspace["root"] / "train.txt").read_text().splitlines(keepends=True)
    counts = torch.bincount(torch.tensor([i for line in lines for i in tokenizer(line, add_special_tokens=False)
                                          ["input_ids"]]), minlength=len(tokenizer))
    expected = embedding_metrics(model.get_output_embeddings().weight, counts, top_k=50)
    measured = written["checkpoints"]["Coupled"]["matrices"]["output"]
    for key in ("iso", "iso_both_signs", "mean_norm_ratio", "avg_cosine", "seen/iso", "top50/iso", "freq/iso", "rho"):
        assert measured[key] == pytest.approx(expected[key], rel=1e-9), key
    assert written["checkpoints"]["Coupled"]["token_counts"]["tokens"] == int(counts.sum())
    assert "rho" not in written["checkpoints"]["Coupled"]["matrices"]["position"]  # rows are not tokens
    assert results["checkpoints"].keys() == written["checkpoints"].keys()

    for name in ("spectrum_token", "projection_token", "norm_vs_frequency_token", "metrics_token",
                 "spectrum_output", "projection_output"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_counts_from_a_file_give_the_same_metrics_as_counting_the_text(workspace, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(workspace["tied"])
    lines = (workspace["root"] / "train.txt").read_text().splitlines(keepends=True)
    counts = torch.bincount(torch.tensor([i for line in lines for i in tokenizer(line, add_special_tokens=False)
                                          ["input_ids"]]), minlength=len(tokenizer))
    (tmp_path / "counts.json").write_text(json.dumps(counts.tolist()))
    assert torch.equal(read_token_counts(str(tmp_path / "counts.json")), counts.double())
    from_file = eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--no_plots", "--token_counts_file",
                                    str(tmp_path / "counts.json"), "--output_dir", str(tmp_path / "a")])
    from_text = eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--no_plots", "--count_tokens_in",
                                    str(workspace["root"] / "train.txt"), "--output_dir", str(tmp_path / "b")])
    a = from_file["checkpoints"]["tied"]["matrices"]["token"]
    b = from_text["checkpoints"]["tied"]["matrices"]["token"]
    assert a["seen/iso"] == b["seen/iso"] and a["freq/mean_norm_ratio"] == b["freq/mean_norm_ratio"]


def test_isotropy_refuses_bad_arguments_before_loading_anything(workspace, tmp_path):
    (tmp_path / "isotropy.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--output_dir", str(tmp_path)])
    assert (tmp_path / "isotropy.json").read_text() == "{}"
    with pytest.raises(ValueError, match="2 names for 1 checkpoints"):
        eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--labels", "a", "b",
                            "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="unknown --matrices"):
        eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--matrices", "tokens",
                            "--output_dir", str(tmp_path / "x")])
    from coupled_adam_hf.cli import UsageError

    devices = {"--device must be auto, cpu or cuda": "tpu", "--device must be auto, cpu or cuda\\[:N\\], got 'cuda:x'":
               "cuda:x"}
    if not torch.cuda.is_available():
        devices["--device cuda, but no CUDA device is available"] = "cuda"
    for message, device in devices.items():
        with pytest.raises(UsageError, match=message) as caught:
            eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--device", device,
                                "--output_dir", str(tmp_path / "x")])
        assert caught.value.exit_code == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_eval_isotropy_command_line(workspace, tmp_path):
    done = run_script("eval_isotropy", "--model_name_or_path", str(workspace["tied"]), "--no_plots",
                      "--output_dir", str(tmp_path / "iso"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "||mu||^r" in done.stdout and "token+output (tied)" in done.stdout
    assert json.loads((tmp_path / "iso" / "isotropy.json").read_text())["checkpoints"]["tied"]["matrices"]["token"]
    done = run_script("eval_isotropy", "--model_name_or_path", str(tmp_path / "missing"), "--output_dir",
                      str(tmp_path / "iso2"))
    assert done.returncode != 0
    assert "eval_isotropy.py: error: cannot load checkpoint" in done.stderr and "Traceback" not in done.stderr


# -------------------------------------------------------------------------------------------- perplexity
@pytest.mark.slow
def test_perplexity_json_matches_the_library_on_the_whole_file(workspace, tmp_path):
    valid = workspace["root"] / "valid.txt"
    result = eval_perplexity.main(["--model_name_or_path", str(workspace["tied"]), "--validation_file", str(valid),
                                   "--stride", "32", "--batch_size", "8", "--output_dir", str(tmp_path)])
    written = json.loads((tmp_path / "perplexity.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(workspace["tied"])
    tokenizer = AutoTokenizer.from_pretrained(workspace["tied"])
    direct = evaluate_perplexity(model, tokenizer, valid.read_text(), stride=32, show_progress=False)
    for key in ("nll", "perplexity", "bits_per_byte"):
        assert written[key] == pytest.approx(direct[key], rel=1e-6), key
    for key in ("tokens_scored", "bytes_scored", "context_length", "stride", "dtype"):
        assert written[key] == direct[key], key
    assert written["context_length"] == 64 and written["tokens_scored"] == written["tokens_total"] - 1
    assert written["data"] == str(valid) and result["perplexity"] == written["perplexity"]


def test_perplexity_of_a_dataset_split_joins_its_rows(workspace, tmp_path):
    rows = [line for line in (workspace["root"] / "valid.txt").read_text().split("\n\n") if line][:40]
    folder = tmp_path / "local_dataset"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    result = eval_perplexity.main(["--model_name_or_path", str(workspace["tied"]), "--dataset_name", str(folder),
                                   "--dataset_split", "test", "--max_eval_tokens", "500",
                                   "--output_dir", str(tmp_path / "out")])
    model = AutoModelForCausalLM.from_pretrained(workspace["tied"])
    tokenizer = AutoTokenizer.from_pretrained(workspace["tied"])
    ids = tokenizer("\n\n".join(rows))["input_ids"][:500]
    direct = evaluate_perplexity(model, ids, show_progress=False)
    assert result["documents"] == len(rows) and result["tokens_total"] == 500
    assert result["nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert result["data"].endswith("test (first 500 tokens)")


def test_perplexity_refuses_bad_arguments(workspace, tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        eval_perplexity.main(["--model_name_or_path", str(workspace["tied"]), "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_perplexity.main(["--model_name_or_path", str(workspace["tied"]), "--validation_file",
                              str(tmp_path / "nope.txt"), "--output_dir", str(tmp_path)])
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "perplexity.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        eval_perplexity.main(["--model_name_or_path", str(workspace["tied"]), "--validation_file",
                              str(workspace["root"] / "valid.txt"), "--output_dir", str(tmp_path / "done")])
    assert (tmp_path / "done" / "perplexity.json").read_text() == "{}"
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        eval_perplexity.main(["--model_name_or_path", str(workspace["tied"]), "--validation_file",
                              str(workspace["root"] / "valid.txt"), "--context_length", "128",
                              "--output_dir", str(tmp_path / "big")])


@pytest.mark.slow
def test_eval_perplexity_command_line(workspace, tmp_path):
    done = run_script("eval_perplexity", "--model_name_or_path", str(workspace["untied"]), "--validation_file",
                      str(workspace["root"] / "valid.txt"), "--output_dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bits per byte" in done.stdout
    assert json.loads((tmp_path / "perplexity.json").read_text())["tokens_scored"] > 0


# -------------------------------------------------------------------------------------------- bad input
def test_eval_scripts_check_every_argument_before_loading_a_model_and_write_nothing(workspace, tmp_path, monkeypatch):
    from coupled_adam_hf.cli import UsageError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(eval_perplexity, "load_model_and_tokenizer", no_model)
    valid, out = workspace["root"] / "valid.txt", tmp_path / "out"
    base = ["--model_name_or_path", str(workspace["tied"]), "--validation_file", str(valid), "--output_dir", str(out)]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = {
        "--stride must be >= 1": ["--stride", "0"],
        "--stride 40 is larger than --context_length 32": ["--context_length", "32", "--stride", "40"],
        "--context_length 100 exceeds the model's maximum of 64 positions": ["--context_length", "100"],
        "--stride 80 is larger than the model's context of 64 tokens": ["--stride", "80"],
        "--device must be auto, cpu or cuda": ["--device", "tpu"],
    }
    if not torch.cuda.is_available():
        cases["--device cuda, but no CUDA device is available"] = ["--device", "cuda"]
    for message, extra in cases.items():
        with pytest.raises(UsageError, match=message) as caught:
            eval_perplexity.main(base + extra)
        assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match="is empty"):
        eval_perplexity.main(["--model_name_or_path", str(workspace["tied"]), "--validation_file", str(empty),
                              "--output_dir", str(out)])
    assert not out.exists()


def test_an_output_dir_that_is_a_file_is_not_a_directory_exit_2(workspace, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("keep me")
    for name, extra in (("eval_isotropy", []),
                        ("eval_perplexity", ["--validation_file", str(workspace["root"] / "valid.txt")])):
        done = run_script(name, "--model_name_or_path", str(workspace["tied"]), *extra, "--output_dir", str(afile))
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == f"{name}.py: error: --output_dir {afile} is not a directory"
    assert afile.read_text() == "keep me"


def test_token_counts_that_do_not_fit_the_checkpoint_are_refused_naming_both_lengths(workspace, tmp_path):
    from coupled_adam_hf.cli import UsageError

    for length, words in ((10, "holds 10 token counts, but .* its tokenizer has 300 tokens"),
                          (400, "holds 400 token counts, but the embedding of .* has 300 rows")):
        counts = tmp_path / f"counts{length}.json"
        counts.write_text(json.dumps(list(range(length))))
        with pytest.raises(UsageError, match=words):
            eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--no_plots", "--token_counts_file",
                                str(counts), "--output_dir", str(tmp_path / f"iso{length}")])
        assert not (tmp_path / f"iso{length}").exists()


def test_a_missing_token_counts_file_is_refused_before_loading(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="--token_counts_file: .* does not exist"):
        eval_isotropy.main(["--model_name_or_path", str(workspace["tied"]), "--token_counts_file",
                            str(tmp_path / "nope.json"), "--output_dir", str(tmp_path / "x")])

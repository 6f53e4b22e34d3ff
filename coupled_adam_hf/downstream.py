"""Downstream evaluation: BLiMP minimal pairs offline, scored natively or through lm-evaluation-harness.

The paper (Section 5, downstream tasks) reports lm-eval accuracy on hellaswag, winogrande, ARC, TruthfulQA,
LAMBADA and RACE, which need the Hugging Face Hub. BLiMP (Warstadt et al., TACL 2020; shipped with this package,
CC-BY 4.0, see ``data/blimp/SOURCE.md``) is the offline task: 67 paradigms x 1000 pairs of a grammatical and an
ungrammatical sentence. A pair is right when the model gives the good sentence a higher total log-probability
than the bad one, the first token conditioned on the tokenizer's BOS token (EOS when there is none), which is how
lm-eval scores a continuation with an empty context. A tie counts as wrong here; lm-eval's argmax would take the
first choice (the good sentence), so the two differ only on exact ties.

    from coupled_adam_hf.downstream import score_blimp
    result = score_blimp(model, tokenizer, limit=100)   # 100 pairs per paradigm
    result["overall"], result["fields"]["morphology"], result["paradigms"]["adjunct_island"]

``score_blimp`` is the native scorer (batched, float32 log-softmax); ``score_blimp_lm_eval`` runs the same pairs
through lm-eval's ``HFLM`` with the task ``data/blimp/blimp_local.yaml``. Both return the same structure.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BLIMP_FIELDS", "PAPER_TASKS", "LM_EVAL_EXTRA", "blimp_data_file", "load_blimp", "sentence_log_probs",
    "score_blimp", "score_blimp_lm_eval", "summarize_blimp", "blimp_task_config", "lm_eval_problem",
]

BLIMP_FIELDS = ("morphology", "syntax", "semantics", "syntax_semantics")
#: The paper's downstream tasks (lm-eval names), each reported with the metric ``acc``.
PAPER_TASKS = ("hellaswag", "winogrande", "arc_easy", "arc_challenge", "truthfulqa_mc2", "lambada_openai", "race")
LM_EVAL_EXTRA = "pip install 'coupled_adam_hf[downstream]'"


def blimp_data_file() -> Path:
    return Path(str(resources.files("coupled_adam_hf") / "data" / "blimp" / "blimp.jsonl.gz"))


def load_blimp(limit: int | None = None, paradigms: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The shipped BLiMP pairs (dicts with ``UID``, ``field``, ``sentence_good``, ``sentence_bad``, ...).

    ``limit``: the first ``limit`` pairs of each paradigm. ``paradigms``: only these UIDs. The original's one
    ``syntax/semantics`` paradigm is reported under ``syntax_semantics`` with the rest of that field.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 pairs per paradigm, got {limit}")
    wanted = set(paradigms) if paradigms is not None else None
    taken: dict[str, int] = defaultdict(int)
    pairs = []
    with gzip.open(blimp_data_file(), "rt", encoding="utf-8") as handle:
        for line in handle:
            pair = json.loads(line)
            uid = pair["UID"]
            if (wanted is not None and uid not in wanted) or (limit is not None and taken[uid] >= limit):
                continue
            taken[uid] += 1
            pair["field"] = pair["field"].replace("/", "_")
            pairs.append(pair)
    if wanted is not None and set(taken) != wanted:
        raise ValueError(f"unknown BLiMP paradigms {sorted(wanted - set(taken))}")
    return pairs


def _prefix_token_id(tokenizer) -> int:
    """The token an empty context stands for: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return token_id


@torch.no_grad()
def sentence_log_probs(model, tokenizer, sentences: Sequence[str], *, batch_size: int = 64,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Total log-probability (float64) of each sentence, its first token conditioned on BOS (EOS without one).

    As lm-eval with an empty context: the sentence is tokenized without special tokens; when its first token
    is the prefix token itself, that token is the context and is not scored. Sentences are sorted by length and
    right-padded, one forward pass per batch; the log-softmax is taken in float32 whatever the model's dtype.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefix = _prefix_token_id(tokenizer)
    encoded = []
    for ids in tokenizer(list(sentences), add_special_tokens=False)["input_ids"]:
        if not ids:
            raise ValueError("a sentence tokenizes to no tokens")
        encoded.append(list(ids) if ids[0] == prefix else [prefix] + list(ids))
    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    totals = torch.zeros(len(encoded), dtype=torch.float64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(encoded[index]) for index in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                input_ids[row, :len(encoded[index])] = torch.tensor(encoded[index])
                mask[row, :len(encoded[index])] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            sums = (token_log_probs * mask[:, 1:]).double().sum(dim=1).cpu()
            totals[torch.tensor(batch)] = sums
    finally:
        model.train(was_training)
    return totals


def summarize_blimp(pairs: Sequence[dict[str, Any]], correct: Sequence[bool]) -> dict[str, Any]:
    """Accuracy per paradigm, per field (mean over its paradigms) and overall (mean over paradigms), with the
    number of paradigms and of pairs behind each field."""
    by_paradigm: dict[str, list[bool]] = defaultdict(list)
    field_of: dict[str, str] = {}
    for pair, right in zip(pairs, correct, strict=True):
        by_paradigm[pair["UID"]].append(bool(right))
        field_of[pair["UID"]] = pair["field"]
    paradigms = {uid: sum(values) / len(values) for uid, values in sorted(by_paradigm.items())}
    fields, field_paradigms, field_pairs = {}, {}, {}
    for field in BLIMP_FIELDS:
        members = [uid for uid in paradigms if field_of[uid] == field]
        if members:
            fields[field] = sum(paradigms[uid] for uid in members) / len(members)
            field_paradigms[field] = len(members)
            field_pairs[field] = sum(len(by_paradigm[uid]) for uid in members)
    return {
        "overall": sum(paradigms.values()) / len(paradigms),
        "fields": fields,
        "paradigms": paradigms,
        "pairs": len(pairs),
        "pairs_per_paradigm": {uid: len(values) for uid, values in sorted(by_paradigm.items())},
        "paradigms_per_field": field_paradigms,
        "pairs_per_field": field_pairs,
    }


def score_blimp(model, tokenizer, *, limit: int | None = None, paradigms: Sequence[str] | None = None,
                pairs: Sequence[dict[str, Any]] | None = None, batch_size: int = 64,
                device: torch.device | str | None = None, return_decisions: bool = False) -> dict[str, Any]:
    """BLiMP accuracy of a causal LM, scored natively (see the module docstring for the rule).

    ``pairs`` (from :func:`load_blimp`) overrides ``limit``/``paradigms``. ``return_decisions`` adds
    ``decisions``: per pair, whether the good sentence won, in the order of ``pairs``.
    """
    pairs = list(pairs) if pairs is not None else load_blimp(limit, paradigms)
    sentences = [pair["sentence_good"] for pair in pairs] + [pair["sentence_bad"] for pair in pairs]
    totals = sentence_log_probs(model, tokenizer, sentences, batch_size=batch_size, device=device)
    good, bad = totals[:len(pairs)], totals[len(pairs):]
    decisions = (good > bad).tolist()
    result = summarize_blimp(pairs, decisions)
    result["scorer"] = "native"
    if return_decisions:
        result["decisions"] = decisions
    return result


def lm_eval_problem() -> str | None:
    """None when lm-eval's Hugging Face model class imports, else one line saying what to install."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as error:
        return f"lm-evaluation-harness is not installed ({error}): {LM_EVAL_EXTRA}"
    return None


def blimp_task_config(data_file: str | Path | None = None) -> dict[str, Any]:
    """The shipped lm-eval task ``blimp_local`` as a dict, its data file set (default: the shipped copy)."""
    import yaml

    text = (resources.files("coupled_adam_hf") / "data" / "blimp" / "blimp_local.yaml").read_text()
    config = yaml.safe_load(text)
    config["dataset_kwargs"]["data_files"] = {"train": str(data_file or blimp_data_file())}
    return config


def score_blimp_lm_eval(model, tokenizer=None, *, limit: int | None = None,
                        paradigms: Sequence[str] | None = None, pairs: Sequence[dict[str, Any]] | None = None,
                        batch_size: int = 64, device: str | None = None,
                        return_decisions: bool = False) -> dict[str, Any]:
    """BLiMP through lm-eval (``HFLM``, task ``blimp_local``); ``model`` is a model object or a checkpoint path.

    The selected pairs are written to a temporary JSON-lines file so that ``limit`` counts per paradigm (lm-eval's
    own ``limit`` counts per task); accuracies are aggregated from lm-eval's logged samples.
    """
    problem = lm_eval_problem()
    if problem:
        raise ImportError(problem)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    pairs = list(pairs) if pairs is not None else load_blimp(limit, paradigms)
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if device is not None:
        kwargs["device"] = str(device)
    if isinstance(model, (str, Path)):
        lm = HFLM(pretrained=str(model), **kwargs)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)
    with tempfile.TemporaryDirectory() as folder:
        data_file = Path(folder) / "blimp.jsonl"
        with open(data_file, "w", encoding="utf-8") as handle:
            for index, pair in enumerate(pairs):
                handle.write(json.dumps({**pair, "pair_index": index}) + "\n")
        output = lm_eval.simple_evaluate(model=lm, tasks=[blimp_task_config(data_file)], log_samples=True,
                                         num_fewshot=0, bootstrap_iters=0)
    samples = output["samples"]["blimp_local"]
    decisions = [None] * len(pairs)
    for sample in samples:
        decisions[sample["doc"]["pair_index"]] = bool(sample["acc"])
    if any(decision is None for decision in decisions):
        raise RuntimeError("lm-eval returned fewer samples than pairs")
    result = summarize_blimp(pairs, decisions)
    result["scorer"] = "lm-eval " + getattr(lm_eval, "__version__", "")
    if return_decisions:
        result["decisions"] = decisions
    return result

"""Token-weighted corpus perplexity from per-document (or per-window) NLL sums: a local `evaluate` module.

    import evaluate
    perplexity = evaluate.load("metrics/corpus_perplexity")
    perplexity.compute(nll_sum=[120.5, 80.2], num_tokens=[40, 31], num_bytes=[160, 118])

``perplexity = exp(sum(nll_sum) / sum(num_tokens))`` over the whole corpus, not the mean of per-text
perplexities that the Hub ``perplexity`` metric reports, and no model download: the NLLs come from your own
evaluation, e.g. ``coupled_adam_hf.perplexity.evaluate_perplexity`` (its ``nll_sum``, ``tokens_scored`` and
``bytes_scored``). Because it sums, it also aggregates across processes (``evaluate``'s ``num_process`` /
``process_id``) and across ``add_batch`` calls.
"""

import math

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list[float]`): summed negative log-likelihood in nats, one entry per document or window.
    num_tokens (`list[int]`): number of tokens scored in each entry.
    num_bytes (`list[int]`, optional): UTF-8 bytes of the scored tokens of each entry (for bits per byte);
        pass 0 where unknown, or leave it out.
Returns:
    perplexity, nll (mean nats per token), bits_per_token, bits_per_byte (None without bytes), tokens, bytes.
Examples:
    >>> perplexity = evaluate.load("metrics/corpus_perplexity")
    >>> perplexity.compute(nll_sum=[2.0, 4.0], num_tokens=[1, 2])["perplexity"]  # exp(6 / 3)
    7.38905609893065
"""

_CITATION = """\
@inproceedings{stollenwerk2025coupled,
  title = {Better Embeddings with Coupled Adam},
  author = {Stollenwerk, Nils and Stollenwerk, Felix},
  booktitle = {Proceedings of ACL},
  year = {2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CorpusPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "nll_sum": datasets.Value("float64"),
                "num_tokens": datasets.Value("int64"),
                "num_bytes": datasets.Value("int64"),
            }),
        )

    # num_bytes is optional: missing means 0 (unknown) for every entry.
    def add_batch(self, *, num_bytes=None, **kwargs):
        """Add entries (``nll_sum``, ``num_tokens``, optional ``num_bytes``)."""
        if num_bytes is None and kwargs.get("nll_sum") is not None:
            num_bytes = [0] * len(kwargs["nll_sum"])
        return super().add_batch(num_bytes=num_bytes, **kwargs)

    def add(self, *, num_bytes=None, **kwargs):
        """Add one entry."""
        return super().add(num_bytes=0 if num_bytes is None else num_bytes, **kwargs)

    def compute(self, *, num_bytes=None, **kwargs):
        """Corpus perplexity of everything added so far and of the given inputs."""
        if num_bytes is None and kwargs.get("nll_sum") is not None:
            num_bytes = [0] * len(kwargs["nll_sum"])
        return super().compute(num_bytes=num_bytes, **kwargs)

    def _compute(self, nll_sum, num_tokens, num_bytes):
        tokens = int(sum(num_tokens))
        if tokens <= 0:
            raise ValueError("no tokens scored: num_tokens must add up to at least 1")
        if any(n < 0 for n in num_tokens) or any(not math.isfinite(x) for x in nll_sum):
            raise ValueError("num_tokens must be >= 0 and nll_sum finite")
        total = float(math.fsum(nll_sum))
        # bits per byte only when every entry that scored tokens says how many bytes they cover
        known = all(b > 0 for b, n in zip(num_bytes, num_tokens) if n > 0)
        total_bytes = int(sum(num_bytes)) if known else 0
        mean = total / tokens
        return {
            "perplexity": math.exp(mean) if mean < 700 else float("inf"),
            "nll": mean,
            "bits_per_token": mean / math.log(2),
            "bits_per_byte": total / (total_bytes * math.log(2)) if total_bytes > 0 else None,
            "tokens": tokens,
            "bytes": total_bytes or None,
        }

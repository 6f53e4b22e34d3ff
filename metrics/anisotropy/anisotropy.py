"""Isotropy of an embedding matrix (Iso, relative mean norm, average cosine, IsoScore, ...): a local `evaluate` module.

    import evaluate
    anisotropy = evaluate.load("metrics/anisotropy")
    anisotropy.compute(embeddings=model.get_input_embeddings().weight.tolist())

Wraps ``coupled_adam_hf.metrics.embedding_metrics``: every row of ``embeddings`` is one vocabulary item.
Optional compute arguments: ``token_counts`` (one count per row, from the training data: adds the ``seen/``,
``top{k}/``, ``freq/`` variants and the ``rho...`` correlations) and ``top_k``. Rows may arrive in several
``add_batch`` calls; their order is kept, so ``token_counts`` must follow the same order. For a large matrix, calling
``embedding_metrics(weight)`` directly skips the Arrow round trip.
"""

import datasets
import evaluate
import torch

from coupled_adam_hf.metrics import ISO_SIGN_CONVENTION, embedding_metrics

_DESCRIPTION = __doc__ + "\nIso sign convention: " + ISO_SIGN_CONVENTION + "."

_KWARGS_DESCRIPTION = """
Args:
    embeddings (`list[list[float]]`): the rows of the embedding matrix ``[V, H]``.
    token_counts (`list[int]`, optional): unigram counts of the training data, one per row.
    top_k (`int`, optional): size of the most-frequent subset (default 1000).
Returns:
    A flat dict of floats: iso, iso_both_signs, mean_norm, mean_row_norm, mean_norm_ratio, avg_cosine, isoscore,
    effective_rank, explained_variance_top1/top10, kappa, sigma_max (the largest singular value),
    top_direction_rms (sigma_max / sqrt(V)), centered/..., abtt/... (after all-but-the-top), and with counts the
    frequency correlations rho, rho_spearman, rho_mu, rho_mu_spearman (seen rows) and rho_all... (every row, the
    paper's convention), seen/..., top{k}/..., freq/...
Examples:
    >>> anisotropy = evaluate.load("metrics/anisotropy")
    >>> round(anisotropy.compute(embeddings=[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])["avg_cosine"], 4)
    -0.3333
"""

_CITATION = """\
@inproceedings{stollenwerk2025coupled,
  title = {Better Embeddings with Coupled Adam},
  author = {Stollenwerk, Nils and Stollenwerk, Felix},
  booktitle = {Proceedings of ACL},
  year = {2025}
}
@inproceedings{mu2018allbutthetop,
  title = {All-but-the-Top: Simple and Effective Postprocessing for Word Representations},
  author = {Mu, Jiaqi and Viswanath, Pramod},
  booktitle = {ICLR},
  year = {2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Anisotropy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"embeddings": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, embeddings, token_counts=None, top_k=None):
        matrix = torch.as_tensor(embeddings, dtype=torch.float64)
        counts = None if token_counts is None else torch.as_tensor(token_counts, dtype=torch.float64)
        return embedding_metrics(matrix, counts, top_k=top_k)

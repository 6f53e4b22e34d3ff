"""Geometry of an embedding matrix: isotropy and the paper's other metrics, as pure functions of a matrix.

Every function takes a ``[V, H]`` matrix ``E`` (rows ``e_i`` are vocabulary items) on any device, computes in
float64 on that device, and returns plain Python floats. Nothing here knows about models or Trainer.

Metrics (``mu = mean_i e_i``):

``iso``
    Partition-function isotropy (Mu & Viswanath, 2018), the paper's headline metric:
    ``min_c Z(c) / max_c Z(c)`` with ``Z(c) = sum_i exp(c . e_i)`` and ``c`` over the ``H`` unit eigenvectors of
    ``E^T E``. Uncentered and scale-sensitive, as in the paper. ``log Z`` is a log-sum-exp, so large norms cannot
    overflow. Eigenvectors have no natural sign; the convention here: **each eigenvector is oriented so that
    ``c . mu >= 0``** (towards the mean embedding, so that a drifted mean shows up as a large ``Z``); where
    ``c . mu`` is zero up to rounding, the eigenvector's largest-magnitude component is made positive.
    ``iso_both_signs`` takes the min and max over all ``2H`` directions ``+-c`` and needs no convention
    (it is never larger than ``iso``).
``mean_norm``, ``mean_row_norm``, ``mean_norm_ratio``
    ``||mu||``, ``mean_i ||e_i||`` and their ratio ``||mu||^r`` (the paper's relative mean norm).
``avg_cosine``
    Mean cosine similarity over all pairs ``i != j``, exact in O(VH): ``(||sum_i u_i||^2 - V) / (V (V - 1))``
    with ``u_i = e_i / ||e_i||``. All-zero rows have no direction and are left out.
``isoscore``
    IsoScore (Rudman et al., 2022) in closed form: ``(PR - 1) / (H - 1)``, ``PR = tr(C)^2 / ||C||_F^2`` with ``C``
    the covariance of the rows. Mean-free by design.
``effective_rank``, ``explained_variance_top1``, ``explained_variance_top10``, ``kappa``, ``sigma_max``
    From the singular values ``sigma_k`` of ``E``: ``exp(entropy(sigma / sum sigma))`` (Roy & Vetterli, 2007),
    the share of ``sum sigma^2`` in the top 1 / top 10 directions, ``sigma_min / sigma_max`` over the
    ``min(V, H)`` singular values, and ``sigma_max / sqrt(V)`` (the RMS scale along the top direction).
``centered/...``
    The same on ``E - mu`` where centering changes the value: ``iso``, ``iso_both_signs``, ``avg_cosine``,
    ``effective_rank``, ``explained_variance_top*`` (that is PCA), ``kappa``.

With token counts (``embedding_metrics(E, counts)``): ``rho`` (Pearson correlation of ``||e_i||`` with
``log count_i`` over seen rows), and the whole set again over the rows seen in training (``seen/...``), over the
``k`` most frequent rows (``top{k}/...``) and weighted by unigram frequency (``freq/...``: every mean over rows
becomes a frequency-weighted mean, ``Z(c) = sum_i p_i exp(c . e_i)``, the second-moment matrix is
``sum_i p_i e_i e_i^T``, and the average cosine is over two independent draws of distinct tokens).

Cost: one float64 Gram matrix ``E^T E`` per row set serves Iso, IsoScore, the spectrum and kappa (O(VH^2)); the
projections onto the eigenvectors for ``Z(c)`` are one more O(VH^2) product each (raw and centered).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TOP_K",
    "ISO_SIGN_CONVENTION",
    "abtt_components",
    "all_but_the_top",
    "embedding_metrics",
    "pca_projection",
    "quick_isotropy",
    "read_token_counts",
    "singular_values",
]

#: Default size of the ``top{k}/...`` subset when token counts are given.
DEFAULT_TOP_K = 1000

ISO_SIGN_CONVENTION = (
    "each eigenvector c of E^T E is oriented so that c . mu >= 0 (mu = mean embedding; where c . mu is zero up to "
    "rounding, the largest-magnitude component of c is positive); iso_both_signs takes min/max of Z over all "
    "2H directions +-c and needs no convention"
)

# Columns of the eigenvector matrix projected at a time: bounds the [V, chunk] float64 temporaries of Z(c).
_PROJECTION_CHUNK = 256
_ROW_CHUNK = 16384


# ---------------------------------------------------------------------------------------------------- inputs
def _as_float64_matrix(weight: Tensor, name: str = "weight") -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [V, H], got {type(weight).__name__}")
    full_tensor = getattr(weight, "full_tensor", None)
    if full_tensor is not None:  # a DTensor: gather the rows (a collective: every rank must call this)
        weight = full_tensor()
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix [V, H] (rows = vocabulary items), got shape "
                         f"{list(weight.shape)}")
    if weight.shape[0] < 2 or weight.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 rows and 1 column, got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point matrix, got dtype {weight.dtype}")
    matrix = weight.detach().to(torch.float64)
    if not torch.isfinite(matrix).all():
        bad_rows = (~torch.isfinite(matrix)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} holds NaN or inf (first bad rows: {bad_rows}); metrics need finite values. "
                         "Check the checkpoint (a diverged run?).")
    return matrix


def _as_counts(token_counts: Tensor | object, num_rows: int, device: torch.device) -> Tensor:
    counts = torch.as_tensor(token_counts).detach()
    if counts.dim() != 1:
        raise ValueError(f"token_counts must be a 1-D vector (one count per row), got shape {list(counts.shape)}")
    if counts.is_complex() or not torch.isfinite(counts.to(torch.float64)).all() or (counts < 0).any():
        raise ValueError("token_counts must be finite and >= 0")
    if counts.numel() > num_rows:
        raise ValueError(
            f"token_counts has {counts.numel()} entries but the matrix has only {num_rows} rows: the counts come "
            "from a tokenizer with a larger vocabulary than this embedding. Count with the checkpoint's tokenizer."
        )
    counts = counts.to(device=device, dtype=torch.float64)
    if counts.numel() < num_rows:
        # Vocabularies padded to a multiple of 64 (GPT-2's 50257 -> 50304) have rows no tokenizer id reaches.
        counts = torch.cat([counts, counts.new_zeros(num_rows - counts.numel())])
    return counts


# ---------------------------------------------------------------------------------------------------- pieces
def _orient_towards(eigenvectors: Tensor, mean: Tensor) -> Tensor:
    """Flip eigenvector columns so that ``c . mean >= 0``; ties (``c . mean ~ 0``) by the largest component."""
    along_mean = mean @ eigenvectors
    tie = along_mean.abs() <= 1e-12 * (mean.norm() + 1e-300) * eigenvectors.norm(dim=0)
    largest = eigenvectors.gather(0, eigenvectors.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    sign = torch.where(tie, torch.sign(largest), torch.sign(along_mean))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return eigenvectors * sign


def _log_partition(matrix: Tensor, directions: Tensor, shift: Tensor | None, log_weights: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
    """``log Z(c)`` and ``log Z(-c)`` for every column ``c`` of ``directions``, of the rows ``matrix - shift``.

    ``Z(c) = sum_i w_i exp(c . (e_i - shift))``; ``log_weights`` None means ``w_i = 1``.
    """
    log_z_pos, log_z_neg = [], []
    for start in range(0, directions.shape[1], _PROJECTION_CHUNK):
        block = directions[:, start:start + _PROJECTION_CHUNK]
        projection = matrix @ block
        if shift is not None:
            projection -= shift @ block
        if log_weights is None:
            log_z_pos.append(torch.logsumexp(projection, dim=0))
            log_z_neg.append(torch.logsumexp(-projection, dim=0))
        else:
            log_z_pos.append(torch.logsumexp(projection + log_weights[:, None], dim=0))
            log_z_neg.append(torch.logsumexp(log_weights[:, None] - projection, dim=0))
    return torch.cat(log_z_pos), torch.cat(log_z_neg)


def _iso_from_log_partition(log_z_pos: Tensor, log_z_neg: Tensor) -> tuple[float, float]:
    iso = math.exp(float(log_z_pos.min() - log_z_pos.max()))
    both = torch.cat([log_z_pos, log_z_neg])
    return iso, math.exp(float(both.min() - both.max()))


def _spectrum_metrics(second_moment_eigenvalues: Tensor, rank: int) -> dict[str, float]:
    """Metrics of the singular values, from the eigenvalues of a (scaled) Gram matrix (any positive scale)."""
    lam = second_moment_eigenvalues.clamp_min(0).flip(0)[:max(rank, 1)]  # descending, the min(V, H) that exist
    total_sq = float(lam.sum())
    if total_sq <= 0:
        nan = float("nan")
        return {"effective_rank": nan, "explained_variance_top1": nan, "explained_variance_top10": nan,
                "kappa": nan}
    sigma = lam.sqrt()
    p = sigma / sigma.sum()
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    return {
        "effective_rank": math.exp(float(entropy)),
        "explained_variance_top1": float(lam[0]) / total_sq,
        "explained_variance_top10": float(lam[:10].sum()) / total_sq,
        "kappa": float(sigma[-1] / sigma[0]),
    }


def _average_cosine(matrix: Tensor, shift: Tensor | None, weights: Tensor | None) -> float:
    """Exact mean pairwise cosine over ``i != j`` (weighted: two independent draws of distinct rows)."""
    direction_sum = matrix.new_zeros(matrix.shape[1])
    weight_total = matrix.new_zeros(())
    weight_sq_total = matrix.new_zeros(())
    for start in range(0, matrix.shape[0], _ROW_CHUNK):
        rows = matrix[start:start + _ROW_CHUNK]
        if shift is not None:
            rows = rows - shift
        norms = rows.norm(dim=1)
        nonzero = norms > 0
        w = nonzero.to(matrix.dtype) if weights is None else weights[start:start + _ROW_CHUNK] * nonzero
        direction_sum += (rows / torch.where(nonzero, norms, torch.ones_like(norms))[:, None]).T @ w
        weight_total += w.sum()
        weight_sq_total += (w * w).sum()
    # sum_{i != j} w_i w_j cos_ij = ||sum_i w_i u_i||^2 - sum_i w_i^2
    pairs = weight_total * weight_total - weight_sq_total
    if pairs <= 0:
        return float("nan")
    return float((direction_sum @ direction_sum - weight_sq_total) / pairs)


def _matrix_metrics(matrix: Tensor, weights: Tensor | None = None, *, gram: Tensor | None = None
                    ) -> dict[str, float]:
    """The full set for one row set; ``weights`` (>= 0, any scale) make every mean over rows a weighted mean.

    ``gram``: ``matrix.T @ matrix`` when the caller already has it (unweighted only).
    """
    num_rows, dim = matrix.shape
    if weights is None:
        mean = matrix.mean(dim=0)
        second_moment = (matrix.T @ matrix if gram is None else gram) / num_rows
        mean_row_norm = matrix.norm(dim=1).mean()
        log_weights = None
        effective_rows = num_rows
    else:
        p = weights / weights.sum()
        mean = p @ matrix
        second_moment = (matrix * p[:, None]).T @ matrix
        mean_row_norm = p @ matrix.norm(dim=1)
        log_weights = torch.log(p)  # zero-weight rows get -inf: they drop out of Z
        effective_rows = int((p > 0).sum())
    covariance = second_moment - torch.outer(mean, mean)
    covariance = (covariance + covariance.T) / 2  # exact symmetry for eigh

    metrics: dict[str, float] = {"rows": float(effective_rows), "dim": float(dim)}
    eigenvalues, eigenvectors = torch.linalg.eigh((second_moment + second_moment.T) / 2)
    log_z_pos, log_z_neg = _log_partition(matrix, _orient_towards(eigenvectors, mean), None, log_weights)
    metrics["iso"], metrics["iso_both_signs"] = _iso_from_log_partition(log_z_pos, log_z_neg)

    mean_norm = float(mean.norm())
    metrics["mean_norm"] = mean_norm
    metrics["mean_row_norm"] = float(mean_row_norm)
    metrics["mean_norm_ratio"] = mean_norm / float(mean_row_norm) if mean_row_norm > 0 else float("nan")
    metrics["avg_cosine"] = _average_cosine(matrix, None, weights)

    trace = float(torch.diagonal(covariance).sum())
    frobenius_sq = float((covariance * covariance).sum())
    participation = trace * trace / frobenius_sq if frobenius_sq > 0 else float("nan")
    metrics["isoscore"] = (participation - 1) / (dim - 1) if dim > 1 else float("nan")

    metrics.update(_spectrum_metrics(eigenvalues, min(effective_rows, dim)))
    metrics["sigma_max"] = math.sqrt(max(float(eigenvalues[-1]), 0.0))

    centered_values, centered_vectors = torch.linalg.eigh(covariance)
    # Oriented by the uncentered mean as well: the same convention, and rotation-equivariant.
    log_z_pos, log_z_neg = _log_partition(matrix, _orient_towards(centered_vectors, mean), mean, log_weights)
    iso_c, iso_c_both = _iso_from_log_partition(log_z_pos, log_z_neg)
    centered = {"iso": iso_c, "iso_both_signs": iso_c_both, "avg_cosine": _average_cosine(matrix, mean, weights)}
    centered.update(_spectrum_metrics(centered_values, min(effective_rows - 1, dim)))
    metrics.update({f"centered/{key}": value for key, value in centered.items()})
    return _settle_degenerate(metrics, matrix, mean)


#: What a metric reads for a matrix without the directions it measures (see :func:`_settle_degenerate`).
_NO_SPREAD_VALUES = ("avg_cosine", "isoscore", "effective_rank", "explained_variance_top1",
                     "explained_variance_top10", "kappa", "mean_norm_ratio")


def _settle_degenerate(metrics: dict[str, float], matrix: Tensor, mean: Tensor) -> dict[str, float]:
    """Documented values instead of 0/0 for degenerate matrices, with a warning that says why.

    - every row zero: there are no directions. ``mean_norm_ratio``, ``avg_cosine``, ``isoscore``,
      ``effective_rank``, ``explained_variance_top*`` and ``kappa`` (raw and centered) are 0; ``iso`` is 1 (every
      direction gives ``Z(c) = V``, so the formula's value is exact, but it says nothing about isotropy).
    - every row the same (one distinct row, e.g. an embedding that was never trained apart from a shared shift):
      the centered matrix is zero, so the ``centered/...`` spread metrics and ``isoscore`` are 0.
    Rows that are constant across the hidden dims (rank 1) need no special value, but get the same warning.
    """
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    if scale == 0.0:
        why, keys = "every row is zero", [*_NO_SPREAD_VALUES, *(f"centered/{k}" for k in _NO_SPREAD_VALUES)]
    elif float((matrix - mean).abs().max()) <= 1e-12 * scale:
        why, keys = "every row is the same vector", ["isoscore", *(f"centered/{k}" for k in _NO_SPREAD_VALUES)]
    elif metrics.get("explained_variance_top1", 0.0) >= 1.0 - 1e-9:
        why, keys = "the rows span one direction (rank 1)", []
    else:
        return metrics
    warnings.warn(f"embedding metrics of a degenerate {list(matrix.shape)} matrix: {why}; ratios that would be "
                  "0/0 are reported as 0 and Iso is at an extreme (see embedding_metrics' docstring)",
                  RuntimeWarning, stacklevel=3)
    for key in keys:
        if key in metrics and not math.isfinite(metrics[key]):
            metrics[key] = 0.0
    return metrics


# ---------------------------------------------------------------------------------------------------- public
def embedding_metrics(
    weight: Tensor,
    token_counts: Tensor | None = None,
    *,
    top_k: int | None = None,
) -> dict[str, float]:
    """Every metric of the module docstring for one embedding matrix, as a flat ``{name: float}`` dict.

    Args:
        weight: ``[V, H]`` matrix, rows are vocabulary items (any float dtype, any device; a DTensor is gathered).
        token_counts: optional ``[V']`` unigram counts of the training data, ``V' <= V`` (rows beyond ``V'``, such
            as the padding rows of a vocabulary rounded up to a multiple of 64, count as never seen). Adds ``rho``,
            ``seen_rows``, ``seen/...``, ``top{k}/...`` and ``freq/...``.
        top_k: size of the most-frequent subset (default :data:`DEFAULT_TOP_K`); keys are ``top{top_k}/...`` even
            when fewer rows were seen (then ``top{top_k}/rows`` is the number of seen rows).

    Keys without counts: ``iso``, ``iso_both_signs``, ``mean_norm``, ``mean_row_norm``, ``mean_norm_ratio``,
    ``avg_cosine``, ``isoscore``, ``effective_rank``, ``explained_variance_top1``, ``explained_variance_top10``,
    ``kappa``, ``sigma_max``, ``rows``, ``dim`` and ``centered/...`` variants.

    Degenerate matrices (all rows zero, all rows equal, rank 1) give a ``RuntimeWarning`` saying which, and the
    values documented in :func:`_settle_degenerate` (0 for ratios that would be 0/0) instead of NaN.

    Example::

        >>> from coupled_adam_hf.metrics import embedding_metrics
        >>> m = embedding_metrics(model.get_input_embeddings().weight)
        >>> m["iso"], m["mean_norm_ratio"]
    """
    matrix = _as_float64_matrix(weight)
    gram = matrix.T @ matrix
    all_rows = _matrix_metrics(matrix, gram=gram)
    if token_counts is None:
        return all_rows
    metrics = dict(all_rows)

    counts = _as_counts(token_counts, matrix.shape[0], matrix.device)
    seen = counts > 0
    num_seen = int(seen.sum())
    metrics["seen_rows"] = float(num_seen)
    metrics["tokens_counted"] = float(counts.sum())
    if num_seen < 2:
        raise ValueError(f"token_counts mark only {num_seen} row(s) as seen; seen/top-k/frequency metrics need at "
                         "least 2. Are the counts from this checkpoint's tokenizer and training data?")

    seen_index = seen.nonzero().flatten()
    seen_matrix = matrix[seen_index]
    seen_counts = counts[seen_index]
    log_counts = torch.log(seen_counts)
    norms = seen_matrix.norm(dim=1)
    metrics["rho"] = _pearson(norms, log_counts)

    if num_seen == matrix.shape[0]:
        seen_metrics = all_rows
    else:
        # Usually only a few rows are unseen (padding, glitch tokens): subtracting their Gram matrix from the
        # full one costs O(unseen * H^2) instead of O(seen * H^2).
        unseen_matrix = matrix[~seen]
        seen_gram = gram - unseen_matrix.T @ unseen_matrix if unseen_matrix.shape[0] < num_seen else None
        seen_metrics = _matrix_metrics(seen_matrix, gram=seen_gram)
    metrics.update({f"seen/{key}": value for key, value in seen_metrics.items()})

    requested = DEFAULT_TOP_K if top_k is None else int(top_k)
    if requested < 2:
        raise ValueError(f"top_k must be >= 2, got {top_k}")
    # Stable order: equal counts keep vocabulary order, so the subset is reproducible. The key keeps the requested
    # k (comparable across checkpoints); top{k}/rows says how many rows it held when fewer were seen.
    top_index = torch.sort(seen_counts, descending=True, stable=True).indices[:requested]
    metrics.update({f"top{requested}/{key}": value
                    for key, value in _matrix_metrics(seen_matrix[top_index]).items()})
    metrics.update({f"freq/{key}": value for key, value in _matrix_metrics(seen_matrix, seen_counts).items()})
    return metrics


def quick_isotropy(weight: Tensor) -> dict[str, float]:
    """``iso``, ``mean_norm_ratio`` and ``avg_cosine`` only: one Gram matrix, one eigh, one projection.

    Same definitions and sign convention as :func:`embedding_metrics`; meant for logging during training.
    """
    matrix = _as_float64_matrix(weight)
    mean = matrix.mean(dim=0)
    gram = matrix.T @ matrix
    _, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)
    oriented = _orient_towards(eigenvectors, mean)
    log_z = torch.cat([torch.logsumexp(matrix @ oriented[:, s:s + _PROJECTION_CHUNK], dim=0)
                       for s in range(0, oriented.shape[1], _PROJECTION_CHUNK)])
    mean_row_norm = float(matrix.norm(dim=1).mean())
    if mean_row_norm == 0.0:
        warnings.warn(f"quick_isotropy of a degenerate {list(matrix.shape)} matrix: every row is zero; "
                      "mean_norm_ratio and avg_cosine are reported as 0, Iso as 1", RuntimeWarning, stacklevel=2)
    return {
        "iso": math.exp(float(log_z.min() - log_z.max())),
        "mean_norm_ratio": float(mean.norm()) / mean_row_norm if mean_row_norm > 0 else 0.0,  # all-zero: 0
        "avg_cosine": _average_cosine(matrix, None, None) if mean_row_norm > 0 else 0.0,
    }


def singular_values(weight: Tensor, *, centered: bool = False) -> Tensor:
    """The ``min(V, H)`` singular values of ``E`` (or of ``E - mu``), descending, float64 on the CPU."""
    matrix = _as_float64_matrix(weight)
    if centered:
        matrix = matrix - matrix.mean(dim=0)
    return torch.linalg.svdvals(matrix).cpu()


def abtt_components(hidden_size: int) -> int:
    """``D = ceil(H / 100)``: the number of top principal directions all-but-the-top removes (Mu & Viswanath, 2018)."""
    return max(1, math.ceil(hidden_size / 100))


def all_but_the_top(weight: Tensor, num_components: int | None = None) -> Tensor:
    """All-but-the-top post-processing (Mu & Viswanath, 2018): ``E - mu`` minus its top ``D`` principal components.

    ``e_i -> (e_i - mu) - sum_{d <= D} (u_d . (e_i - mu)) u_d`` with ``u_d`` the leading eigenvectors of the
    covariance of the rows; ``D`` defaults to :func:`abtt_components` (``ceil(H / 100)``). Returns a float64
    ``[V, H]`` matrix on the input's device. The top directions of a covariance are its well-conditioned end, so
    they come from ``eigh`` of the ``H x H`` matrix (one Gram product) rather than an SVD of ``E``.
    """
    matrix = _as_float64_matrix(weight)
    hidden = matrix.shape[1]
    if num_components is None:
        num_components = abtt_components(hidden)
    if not 0 <= num_components < hidden:
        raise ValueError(f"num_components must be in [0, {hidden - 1}] for H = {hidden}, got {num_components}")
    centered = matrix - matrix.mean(dim=0)
    if num_components == 0:
        return centered
    covariance = centered.T @ centered
    _, eigenvectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    top = eigenvectors[:, -num_components:]
    return centered - (centered @ top) @ top.T


def pca_projection(weight: Tensor, num_components: int = 2, *, centered: bool = False) -> tuple[Tensor, Tensor]:
    """Rows projected on the top right-singular directions: ``(coordinates [V, k], mean coordinates [k])``.

    ``centered=False`` (the default) takes the directions of the uncentered ``E^T E`` and keeps the origin where it
    is, so a drifted mean shows as a cloud away from ``(0, 0)``; ``centered=True`` is classical PCA (directions of
    the covariance, coordinates of ``e_i - mu``). Both on the CPU in float64.
    """
    matrix = _as_float64_matrix(weight)
    mean = matrix.mean(dim=0)
    if num_components < 1 or num_components > matrix.shape[1]:
        raise ValueError(f"num_components must be in [1, {matrix.shape[1]}], got {num_components}")
    second_moment = matrix.T @ matrix - (matrix.shape[0] * torch.outer(mean, mean) if centered else 0)
    _, eigenvectors = torch.linalg.eigh((second_moment + second_moment.T) / 2)
    directions = eigenvectors.flip(1)[:, :num_components]
    directions = _orient_towards(directions, mean)
    rows = matrix - mean if centered else matrix
    mean_coordinates = (torch.zeros_like(mean) if centered else mean) @ directions
    return (rows @ directions).cpu(), mean_coordinates.cpu()


def read_token_counts(source: str | Mapping[int, int] | list[int]) -> Tensor:
    """Token counts as a float64 vector from a ``.json`` (a list, ``{"counts": [...]}`` or ``{id: count}``),
    ``.npy``, ``.pt``/``.bin`` file, or from such a list/dict in memory."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"token counts file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".json":
            source = json.loads(path.read_text())
        elif suffix == ".npy":
            return torch.from_numpy(np.load(path)).to(torch.float64).flatten()
        elif suffix in (".pt", ".bin"):
            return torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True)).to(torch.float64)
        else:
            raise ValueError(f"token counts file {str(path)!r}: unknown format {suffix!r}; use .json, .npy or .pt")
    if isinstance(source, Mapping) and "counts" in source:
        source = source["counts"]
    if isinstance(source, Mapping):
        ids = [int(key) for key in source]
        counts = torch.zeros(max(ids) + 1 if ids else 0, dtype=torch.float64)
        for key, value in source.items():
            counts[int(key)] = float(value)
        return counts
    return torch.as_tensor(source, dtype=torch.float64).flatten()


def _pearson(x: Tensor, y: Tensor) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else float("nan")

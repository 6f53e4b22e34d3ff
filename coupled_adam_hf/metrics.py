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
``effective_rank``, ``explained_variance_top1``, ``explained_variance_top10``, ``kappa``, ``sigma_max``,
``top_direction_rms``
    From the singular values ``sigma_1 >= ... >= sigma_r`` of ``E`` (``r = min(V, H)``):
    ``exp(entropy(sigma / sum sigma))`` (Roy & Vetterli, 2007), the share of ``sum sigma^2`` in the top 1 / top 10
    directions, ``kappa = sigma_r / sigma_1`` (the paper's ``Smin / Smax``), ``sigma_max = sigma_1`` (the plain
    largest singular value, as the paper reports it) and ``top_direction_rms = sigma_1 / sqrt(V)``, the RMS
    coordinate of the rows along the top right-singular direction (comparable across vocabulary sizes).
    The singular values come from the Gram matrix's eigenvalues, whose absolute error (``~eps sigma_1^2``, up to
    ``V`` times that for structured rows) loses the small end: from them alone, a true ``kappa`` of 1e-8 reads
    9.8e-9 and 1e-10 reads 0.
    Singular values below ``1e-2 sigma_1`` are therefore recomputed from the projections of the rows on the Gram
    matrix's eigenvectors, which the Iso pass computes anyway, with the leakage of the large directions projected
    out (recursively, on ever fewer columns): ``kappa`` is exact to a relative ``1e-6`` or better down to
    ``1e-12``, like an SVD of ``E``, at no extra cost for a well-conditioned matrix.
``centered/...``
    The same on ``E - mu`` where centering changes the value: ``iso``, ``iso_both_signs``, ``avg_cosine``,
    ``effective_rank``, ``explained_variance_top*`` (that is PCA), ``kappa``.
``abtt/...``
    The same after all-but-the-top post-processing (Mu & Viswanath, 2018; :func:`all_but_the_top`: remove the mean
    and the top ``D = ceil(H / 100)`` principal directions), as the paper's evaluation code measures Iso after it:
    ``iso``, ``iso_both_signs``, ``avg_cosine``, ``isoscore``, ``effective_rank`` and ``components`` (``D``). The
    eigenvectors of the post-processed matrix are those of the covariance, oriented as for ``centered/iso``; the
    ``D`` removed directions see ``c . e_i = 0``, so ``Z(c) = V`` there. Needs ``H >= 2``.

With token counts (``embedding_metrics(E, counts)``), correlations with log token frequency, of the row norm
``||e_i||`` and of ``e_i . mu`` (``mu`` the mean over all rows), Pearson and Spearman (ranks with ties averaged):

- ``rho``, ``rho_spearman``: ``||e_i||`` against ``log count_i``, over the rows seen in training;
- ``rho_mu``, ``rho_mu_spearman``: ``e_i . mu`` against ``log count_i``, over the rows seen in training;
- ``rho_all``, ``rho_all_spearman``, ``rho_mu_all``, ``rho_mu_all_spearman``: the same against
  ``log(p_i + 1e-10)`` over every row, ``p_i = count_i / sum count`` (the paper's convention; unseen and padding
  rows sit at ``log 1e-10``);

and the whole set again over the rows seen in training (``seen/...``), over the ``k`` most frequent rows
(``top{k}/...``) and weighted by unigram frequency (``freq/...``: every mean over rows becomes a
frequency-weighted mean, ``Z(c) = sum_i p_i exp(c . e_i)``, the second-moment matrix is ``sum_i p_i e_i e_i^T``,
the average cosine is over two independent draws of distinct tokens, and the singular values are those of the rows
scaled by ``sqrt(p_i)`` times ``sqrt(rows)``, i.e. weights of mean 1, so that equal counts give the unweighted values).

Cost: per row set, one float64 Gram matrix (``seen/`` reuses the full one when few rows are unseen; built from its
upper column blocks only, about half a general product's work, see :func:`_gram`), two ``H x H``
eigendecompositions and one pass over the rows that projects them on the raw and the centered eigenvectors
(``O(V H^2)`` each); everything else (norms, cosines, the log-sum-exps, all-but-the-top) rides on that pass in row
chunks of bounded size, without a float64 copy of the matrix or of a row subset.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
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

# Float64 elements per row chunk: bounds each [rows, H] temporary of a pass (32 MiB on a CPU, where the chunk
# should stay near the caches; larger on a GPU, where bigger products run faster).
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_DEFAULT_CHUNK_ELEMENTS = 1 << 25
# Row chunks of the Gram accumulation (one buffer only, reused): the Gram blocks are products with the chunk's rows
# as inner dimension, which run at full speed only when that dimension is long, so they take larger chunks.
_GRAM_CHUNK_ELEMENTS = {"cpu": 1 << 24}
# Row blocks of the exponential sums of Iso on a CPU: a chunk's projection is read from memory once, and the
# exponentials, reciprocals and weighted sums of a block run while it sits in the cores' caches (2 MiB: one L2 of
# the EPYC this was measured on). On a GPU the whole chunk is one block.
_PARTITION_BLOCK_ELEMENTS = {"cpu": 1 << 18}

# An eigenvalue of a float64 Gram matrix carries an absolute error of c * eps * lambda_max, so sqrt(lambda) is a
# singular value with relative error c * eps / (2 lambda / lambda_max). c is about 1 for random-like rows but grows
# to about V when the rows' rounding errors add up coherently (structured matrices); below this fraction of
# lambda_max (sigma below 1e-2 sigma_max, where that error could pass 1e-9) the small end is recomputed (_SmallEnd).
_SMALL_EIGENVALUE = 1e-4

# Below this bound of |c . x_i| the exponentials of Z(c) need no shift: e^300 ~ 2e130 leaves room for sums over
# any vocabulary weighted by any token count, and e^-300 is far above the smallest normal float64.
_UNSHIFTED_EXPONENT = 300.0

# The paper's convention for log frequencies over every row: log(p_i + 1e-10) (never-seen rows get log 1e-10).
_PAPER_PROBABILITY_FLOOR = 1e-10


# ---------------------------------------------------------------------------------------------------- inputs
def _checked_matrix(weight: Tensor, name: str = "weight") -> Tensor:
    """``weight`` detached (a DTensor gathered), checked to be a finite real ``[V, H]`` matrix; dtype kept."""
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
    weight = weight.detach()
    # Row sums are finite when the rows are (NaN and inf propagate); only an overflowing sum of finite values, or
    # a real NaN/inf, pays for the element-wise check.
    if not bool(torch.isfinite(weight.sum(dim=1)).all()) and not bool(torch.isfinite(weight).all()):
        bad_rows = (~torch.isfinite(weight)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} holds NaN or inf (first bad rows: {bad_rows}); metrics need finite values. "
                         "Check the checkpoint (a diverged run?).")
    return weight


def _as_float64_matrix(weight: Tensor, name: str = "weight") -> Tensor:
    return _checked_matrix(weight, name).to(torch.float64)


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


# ---------------------------------------------------------------------------------------------------- Gram products
# Column blocks of a Gram product: X^T X is symmetric, but a general product computes both triangles. Splitting the
# H columns into k blocks and computing only the k (k + 1) / 2 blocks on and above the diagonal (each a plain
# BLAS-3 product of column slices) does (k + 1) / (2k) of the work; the blocks below are their transposes. Wider
# blocks keep each product efficient, so k grows with H up to _GRAM_MAX_BLOCKS.
_GRAM_BLOCK_COLUMNS = 192
_GRAM_MAX_BLOCKS = 4


def _gram_blocks(dim: int, blocks: int | None = None) -> list[int]:
    """Column boundaries ``[0, ..., dim]`` of the blocks of a ``dim x dim`` Gram matrix (at most ``dim`` blocks)."""
    if blocks is None:
        blocks = min(_GRAM_MAX_BLOCKS, dim // _GRAM_BLOCK_COLUMNS)
    blocks = max(1, min(blocks, dim))
    return [(index * dim) // blocks for index in range(blocks + 1)]


def _add_gram_upper(gram: Tensor, left: Tensor, right: Tensor, bounds: list[int]) -> None:
    """``gram += left^T right`` on the blocks on and above the diagonal only; ``left^T right`` must be symmetric
    (``left = right``, or ``left`` its rows scaled). :func:`_mirror_gram` fills the rest once all rows are in."""
    for low, high in itertools.pairwise(bounds):
        gram[low:high, low:].addmm_(left[:, low:high].T, right[:, low:])


def _mirror_gram(gram: Tensor, bounds: list[int]) -> Tensor:
    """Copies the blocks above the diagonal to those below (transposed); the diagonal blocks stay as computed."""
    for low, high in itertools.pairwise(bounds[1:]):
        gram[low:high, :low] = gram[:low, low:high].T
    return gram


def _gram(matrix: Tensor, blocks: int | None = None) -> Tensor:
    """``matrix^T matrix`` from the upper column blocks only: the same to rounding, about half the work."""
    bounds = _gram_blocks(matrix.shape[1], blocks)
    if len(bounds) == 2:
        return matrix.T @ matrix
    gram = matrix.new_zeros(matrix.shape[1], matrix.shape[1])
    _add_gram_upper(gram, matrix, matrix, bounds)
    return _mirror_gram(gram, bounds)


# ---------------------------------------------------------------------------------------------------- row sets
class _RowSet:
    """Rows of ``weight`` to measure: all of them or those at ``index``, optionally with weights ``>= 0``.

    Rows of weight 0 are not part of the set: a set that holds most rows of the matrix is all rows with weight 0
    on the others, which costs those few rows' share of the work instead of a gathered copy.

    Rows are read in float64 chunks of bounded size (a view when ``weight`` is float64 and the rows are
    contiguous), so no float64 copy of the matrix or of a subset is ever made. The chunking depends only on the
    shape and the device, never on the dtype: a bfloat16 matrix and its float64 copy give bitwise equal metrics.
    """

    def __init__(self, weight: Tensor, index: Tensor | None = None, weights: Tensor | None = None):
        self.weight = weight
        self.index = index
        self.weights = weights
        self.num_rows = weight.shape[0] if index is None else int(index.numel())
        self.dim = weight.shape[1]
        elements = _CHUNK_ELEMENTS.get(weight.device.type, _DEFAULT_CHUNK_ELEMENTS)
        self.chunk_rows = max(1, elements // self.dim)
        gram_elements = _GRAM_CHUNK_ELEMENTS.get(weight.device.type, _DEFAULT_CHUNK_ELEMENTS)
        self.gram_chunk_rows = max(1, gram_elements // self.dim)

    def new_buffer(self, chunk_rows: int | None = None) -> Tensor:
        return torch.empty(min(chunk_rows or self.chunk_rows, self.num_rows), self.dim, dtype=torch.float64,
                           device=self.weight.device)

    def chunks(self, buffer: Tensor | None = None, chunk_rows: int | None = None
               ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """``(rows [r, H] float64, weights [r] or None)``; rows may live in ``buffer`` (overwritten next chunk)."""
        direct = self.weight.dtype == torch.float64 and self.index is None
        chunk_rows = chunk_rows or self.chunk_rows
        for start in range(0, self.num_rows, chunk_rows):
            stop = min(start + chunk_rows, self.num_rows)
            if self.index is None:
                rows = self.weight[start:stop]
            else:
                rows = self.weight.index_select(0, self.index[start:stop])
            if not direct:
                target = buffer[:stop - start] if buffer is not None else None
                rows = rows.to(torch.float64) if target is None else target.copy_(rows)
            yield rows, None if self.weights is None else self.weights[start:stop]

    def second_moments(self, norm_bound: float | None = None) -> tuple[Tensor, Tensor, float]:
        """``(sum_i w_i e_i e_i^T, sum_i w_i e_i, max_i ||e_i||)`` in float64 (``w_i = 1`` without weights);
        a known ``norm_bound`` (of a superset of the rows) is passed through instead of the maximum."""
        gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.weight.device)
        column_sum = torch.zeros(self.dim, dtype=torch.float64, device=self.weight.device)
        largest_norm = torch.zeros((), dtype=torch.float64, device=self.weight.device)
        buffer = (None if self.weight.dtype == torch.float64 and self.index is None
                  else self.new_buffer(self.gram_chunk_rows))
        bounds = _gram_blocks(self.dim)
        for rows, weights in self.chunks(buffer, self.gram_chunk_rows):
            weighted = rows if weights is None else rows * weights[:, None]
            _add_gram_upper(gram, weighted, rows, bounds)
            column_sum += weighted.sum(dim=0)
            if norm_bound is None:
                largest_norm = torch.maximum(largest_norm, torch.linalg.vector_norm(rows, dim=1).max())
        _mirror_gram(gram, bounds)
        return gram, column_sum, float(largest_norm) if norm_bound is None else norm_bound


# ---------------------------------------------------------------------------------------------------- pieces
def _orient_towards(eigenvectors: Tensor, mean: Tensor) -> Tensor:
    """Flip eigenvector columns so that ``c . mean >= 0``; ties (``c . mean ~ 0``) by the largest component."""
    along_mean = mean @ eigenvectors
    tie = along_mean.abs() <= 1e-12 * (mean.norm() + 1e-300) * eigenvectors.norm(dim=0)
    largest = eigenvectors.gather(0, eigenvectors.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    sign = torch.where(tie, torch.sign(largest), torch.sign(along_mean))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return eigenvectors * sign


def _symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the exactly symmetrized matrix; on a CPU in one thread (see :func:`_symmetric_eighs`)."""
    return _symmetric_eighs(matrix)[0]


def _symmetric_eighs(*matrices: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``eigh`` of each exactly symmetrized matrix; on a CPU each in one thread, up to ``torch.get_num_threads()``
    of them side by side.

    LAPACK's symmetric eigensolver on an ``H x H`` matrix is a long chain of small steps with a barrier each: extra
    threads gain it little, and on cores shared with other work every barrier waits for a descheduled thread (a
    multi-threaded call then takes several times the single-threaded one). Independent eigendecompositions (the
    second moment and the covariance of one row set) instead run one per thread at once, which uses the cores
    without barriers. Each result is the single-threaded one, bitwise. The ``O(V H^2)`` products around them stay
    multi-threaded.
    """
    symmetric = [(matrix + matrix.T) / 2 for matrix in matrices]
    threads = torch.get_num_threads()
    if symmetric[0].device.type != "cpu" or threads == 1:
        return [torch.linalg.eigh(matrix) for matrix in symmetric]
    torch.set_num_threads(1)  # also what each worker thread of the pool below runs with
    try:
        if len(symmetric) == 1:
            return [torch.linalg.eigh(symmetric[0])]
        with ThreadPoolExecutor(max_workers=min(threads, len(symmetric))) as pool:
            return list(pool.map(torch.linalg.eigh, symmetric))
    finally:
        torch.set_num_threads(threads)


class _LogPartition:
    """``log Z(c)`` (and ``log Z(-c)``) per column, streamed over row chunks: ``Z(c) = sum_i w_i exp(c . x_i)``.

    ``norm_bound``: an upper bound of the rows' norms, so ``|c . x_i| <= norm_bound`` for a unit ``c``. Up to
    :data:`_UNSHIFTED_EXPONENT` every ``exp(+-c . x_i)`` and every sum is a normal float64, and the exponentials
    are taken as they are (one pass). Beyond it each chunk is shifted by its column maximum (minimum for ``-c``)
    and the running sums are rescaled when the maximum grows, as a log-sum-exp does: large norms cannot overflow.
    Both give ``log Z`` to rounding.
    """

    def __init__(self, both_signs: bool, norm_bound: float):
        self.both_signs = both_signs
        self.unshifted = norm_bound <= _UNSHIFTED_EXPONENT
        self.shift: list[Tensor | None] = [None, None]  # running maxima of +x and of -x
        self.total: list[Tensor | None] = [None, None]

    def _accumulate(self, sign: int, shift: Tensor, total: Tensor) -> None:
        if self.shift[sign] is None:
            self.shift[sign], self.total[sign] = shift, total
            return
        new_shift = torch.maximum(self.shift[sign], shift)
        self.total[sign] = (self.total[sign] * torch.exp(self.shift[sign] - new_shift)
                            + total * torch.exp(shift - new_shift))
        self.shift[sign] = new_shift

    def add(self, projection: Tensor, weights: Tensor, scratch: Tensor | None) -> None:
        """Consumes ``projection`` ``[r, m]`` (overwritten); ``weights`` ``[r]``; ``scratch`` like ``projection``."""
        elements = _PARTITION_BLOCK_ELEMENTS.get(projection.device.type)
        block = projection.shape[0] if elements is None else max(1, elements // max(1, projection.shape[1]))
        for start in range(0, projection.shape[0], block):
            stop = start + block
            self._add_block(projection[start:stop], weights[start:stop],
                            None if scratch is None else scratch[start:stop])

    def _add_block(self, projection: Tensor, weights: Tensor, scratch: Tensor | None) -> None:
        if self.unshifted:
            positive = projection.exp_()
            if self.both_signs:  # exp(-x) = 1 / exp(x) to rounding, both normal numbers here: one pass, not two
                negative = torch.reciprocal(positive, out=scratch) if scratch is not None else 1 / positive
                self._add_unshifted(1, weights @ negative)
            self._add_unshifted(0, weights @ positive)
            return
        if self.both_signs:
            low, high = torch.aminmax(projection, dim=0)
            negative = torch.sub(low, projection, out=scratch) if scratch is not None else low - projection
            self._accumulate(1, -low, weights @ negative.exp_())
        else:
            high = projection.amax(dim=0)
        self._accumulate(0, high, weights @ projection.sub_(high).exp_())

    def _add_unshifted(self, sign: int, total: Tensor) -> None:
        if self.total[sign] is None:
            self.shift[sign], self.total[sign] = total.new_zeros(()), total
        else:
            self.total[sign] += total

    def result(self) -> tuple[Tensor, Tensor | None]:
        logs = [None if s is None else torch.log(t) + s for s, t in zip(self.shift, self.total)]
        return logs[0], logs[1]


def _iso(log_z: Tensor) -> float:
    return math.exp(float(log_z.min() - log_z.max()))


class _CosineSum:
    """Exact mean pairwise cosine over ``i != j`` (weighted: two independent draws of distinct rows), streamed."""

    def __init__(self, dim: int, device: torch.device):
        self.direction_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.weight_total = torch.zeros((), dtype=torch.float64, device=device)
        self.weight_sq_total = torch.zeros((), dtype=torch.float64, device=device)

    def coefficients(self, norms: Tensor, weights: Tensor) -> Tensor:
        """``w_i / ||x_i||`` for a chunk (0 for all-zero rows: no direction); counts the chunk's weights. The
        caller adds ``sum_i coefficient_i x_i`` with :meth:`add`."""
        nonzero = norms > 0
        w = weights * nonzero
        self.weight_total += w.sum()
        self.weight_sq_total += (w * w).sum()
        return w / torch.where(nonzero, norms, torch.ones_like(norms))

    def add(self, direction_sum: Tensor) -> None:
        self.direction_sum += direction_sum

    def result(self) -> float:
        # sum_{i != j} w_i w_j cos_ij = ||sum_i w_i u_i||^2 - sum_i w_i^2
        pairs = self.weight_total * self.weight_total - self.weight_sq_total
        if pairs <= 0:
            return float("nan")
        return float((self.direction_sum @ self.direction_sum - self.weight_sq_total) / pairs)


def _small_count(eigenvalues: Tensor) -> int:
    """How many of the (ascending) eigenvalues of a Gram matrix are too small to give accurate singular values."""
    largest = float(eigenvalues[-1])
    return int((eigenvalues < _SMALL_EIGENVALUE * largest).sum()) if largest > 0 else 0


def _accurate_singular_values(matrix: Tensor) -> Tensor:
    """Singular values of an in-memory float64 matrix, descending, each accurate to its own size.

    The Gram matrix's eigenvalues give the large ones. The columns of ``P = M C`` (``C`` its eigenvectors) for
    the small eigenvalues hold the small singular values, plus leakage of the large directions of size
    ``~eps sigma_max^2 / sigma_big`` (the eigenvector error): projected out against the large columns
    (``P_s - P_b (P_b^T P_s) / lambda_b``, with ``P_b^T P_b = lambda_b`` to relative rounding), the rest is the
    same problem on fewer columns.
    """
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    if matrix.shape[1] == 0:
        return matrix.new_zeros(0)
    values, vectors = _symmetric_eigh(_gram(matrix))
    small = _small_count(values)
    if small == 0:
        return values.clamp_min(0).sqrt().flip(0)
    projection = matrix @ vectors
    big, low = projection[:, small:], projection[:, :small]
    residual = low - big @ ((big.T @ low) / values[small:, None])
    return torch.cat([values[small:].sqrt(), _accurate_singular_values(residual)]).sort(descending=True).values


class _SmallEnd:
    """The singular values of a row set whose Gram matrix is ill-conditioned, from its projection pass.

    ``eigenvalues``/``basis``: of the (weighted, normalized) second-moment matrix ``sum_i q_i x_i x_i^T``. When
    some eigenvalues are too small (:func:`_small_count`), the pass hands each chunk's projection ``X C`` here
    before it is consumed: the small columns (scaled by ``sqrt(q_i)``) are kept and their overlap with the large
    ones accumulated; :meth:`singular_values` then subtracts the leakage (one more product with only the small
    columns' width) and finishes with :func:`_accurate_singular_values`. Inactive (free) for well-conditioned sets.
    """

    def __init__(self, eigenvalues: Tensor, basis: Tensor):
        self.eigenvalues = eigenvalues
        self.basis = basis
        self.small = _small_count(eigenvalues)
        self.kept: list[Tensor] = []
        self.overlap = None

    def add(self, projection: Tensor, row_scale: Tensor | float) -> None:
        """``projection``: ``X C`` of one chunk; ``row_scale``: ``sqrt(q_i)`` of its rows (or one number)."""
        if not self.small:
            return
        scale = row_scale[:, None] if isinstance(row_scale, Tensor) else row_scale
        low = projection[:, :self.small] * scale
        overlap = projection[:, self.small:].T @ (low * scale)
        self.overlap = overlap if self.overlap is None else self.overlap + overlap
        self.kept.append(low)

    def singular_values(self, rows: _RowSet, shift: Tensor | None, row_scale: Tensor | float) -> Tensor:
        """Descending singular values of the rows ``sqrt(q_i) (x_i - shift)``."""
        big_values = self.eigenvalues[self.small:].clamp_min(0).sqrt().flip(0)
        if not self.small:
            return big_values
        correction = self.basis[:, self.small:] @ (self.overlap / self.eigenvalues[self.small:, None])
        leaked = []
        for start, (x, _) in zip(range(0, rows.num_rows, rows.chunk_rows), rows.chunks()):
            scale = row_scale if isinstance(row_scale, float) else row_scale[start:start + x.shape[0], None]
            leaked.append(((x if shift is None else x - shift) @ correction) * scale)
        residual = torch.cat(self.kept) - torch.cat(leaked)
        return torch.cat([big_values, _accurate_singular_values(residual)]).sort(descending=True).values


def _spectrum_metrics(sigma: Tensor, rank: int) -> dict[str, float]:
    """Metrics of the descending singular values ``sigma`` (any positive scale), of which ``rank`` exist."""
    sigma = sigma[:max(rank, 1)]
    lam = sigma * sigma
    total_sq = float(lam.sum())
    if total_sq <= 0:
        nan = float("nan")
        return {"effective_rank": nan, "explained_variance_top1": nan, "explained_variance_top10": nan,
                "kappa": nan}
    p = sigma / sigma.sum()
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()
    return {
        "effective_rank": math.exp(float(entropy)),
        "explained_variance_top1": float(lam[0]) / total_sq,
        "explained_variance_top10": float(lam[:10].sum()) / total_sq,
        "kappa": float(sigma[-1] / sigma[0]),
    }


def _isoscore(covariance_trace: float, covariance_frobenius_sq: float, dim: int) -> float:
    participation = (covariance_trace * covariance_trace / covariance_frobenius_sq if covariance_frobenius_sq > 0
                     else float("nan"))
    return (participation - 1) / (dim - 1) if dim > 1 else float("nan")


def _row_set_metrics(rows: _RowSet, moments: tuple[Tensor, Tensor, float] | None = None, *, full: bool = True,
                     row_statistics: bool = False, row_norms: Tensor | None = None
                     ) -> tuple[dict[str, float], Tensor | None, Tensor | None]:
    """The full set for one row set (``full=False``: what :func:`quick_isotropy` reports).

    ``moments``: :meth:`_RowSet.second_moments` when the caller already has them (the norm bound may be one of a
    superset of the rows). ``row_norms``: ``||e_i||`` of every row of the set when known. With ``row_statistics``,
    also returns ``||e_i||`` and ``e_i . mu`` of every row of the set (else ``None, None``).
    """
    device, dim = rows.weight.device, rows.dim
    gram, column_sum, norm_bound = rows.second_moments() if moments is None else moments
    weighted = rows.weights is not None
    total_weight = rows.weights.sum() if weighted else float(rows.num_rows)
    mean = column_sum / total_weight
    second_moment = gram / total_weight
    effective_rows = int((rows.weights > 0).sum()) if weighted else rows.num_rows
    members = (lambda values, w: torch.where(w > 0, values, 0.0)) if weighted else (lambda values, w: values)
    # the singular values below are those of the rows sqrt(q_i) x_i, q_i = w_i / sum w (sum_i q_i x_i x_i^T is the
    # second moment); sqrt(rows) times them are the plain singular values (weights of mean 1)
    row_scale = (rows.weights / total_weight).sqrt() if weighted else 1.0 / math.sqrt(rows.num_rows)

    if full:
        covariance = second_moment - torch.outer(mean, mean)
        (eigenvalues, eigenvectors), (centered_values, centered_vectors) = _symmetric_eighs(second_moment,
                                                                                              covariance)
    else:
        eigenvalues, eigenvectors = _symmetric_eigh(second_moment)
    raw_basis = _orient_towards(eigenvectors, mean)
    raw_small = _SmallEnd(eigenvalues, raw_basis) if full else None
    raw_partition, raw_cosine = _LogPartition(full, norm_bound), _CosineSum(dim, device)
    if full:
        # Oriented by the uncentered mean as well: the same convention, and rotation-equivariant.
        centered_basis = _orient_towards(centered_vectors, mean)
        centered_small = _SmallEnd(centered_values, centered_basis)
        # ||x_i - mu|| <= ||x_i|| + ||mu||
        centered_partition = _LogPartition(True, norm_bound + float(mean.norm()))
        centered_cosine = _CosineSum(dim, device)
        removed = abtt_components(dim) if dim > 1 else 0  # all-but-the-top: the top D centered directions
        top_directions = centered_basis[:, dim - removed:]
        abtt_cosine = _CosineSum(dim, device)

    norm_sum = torch.zeros((), dtype=torch.float64, device=device)
    largest = torch.zeros(3, dtype=torch.float64, device=device)  # max ||x_i||, ||x_i - mu||, ||abtt(x)_i||
    norms_of_rows, mean_dots = [], []
    direct = rows.weight.dtype == torch.float64 and rows.index is None
    rows_buffer = None if direct else rows.new_buffer()
    projection_buffer, scratch = rows.new_buffer(), rows.new_buffer() if full else None
    if full:
        centered_buffer, centered_projection_buffer = rows.new_buffer(), rows.new_buffer()
    ones = torch.ones(min(rows.chunk_rows, rows.num_rows), dtype=torch.float64, device=device)
    for start, (x, w) in zip(range(0, rows.num_rows, rows.chunk_rows), rows.chunks(rows_buffer)):
        count = x.shape[0]
        w = ones[:count] if w is None else w
        q_scale = row_scale if isinstance(row_scale, float) else row_scale[start:start + count]
        norms = torch.linalg.vector_norm(x, dim=1) if row_norms is None else row_norms[start:start + count]
        norm_sum += w @ norms
        raw_coefficients = raw_cosine.coefficients(norms, w)
        if row_statistics:
            norms_of_rows.append(norms)
            mean_dots.append(x @ mean)
        projection = torch.matmul(x, raw_basis, out=projection_buffer[:count])
        if full:
            raw_small.add(projection, q_scale)
        raw_partition.add(projection, w, None if scratch is None else scratch[:count])
        if not full:
            raw_cosine.add(x.T @ raw_coefficients)
            continue
        centered = torch.sub(x, mean, out=centered_buffer[:count])
        centered_norms = torch.linalg.vector_norm(centered, dim=1)
        centered_coefficients = centered_cosine.coefficients(centered_norms, w)
        centered_projection = torch.matmul(centered, centered_basis, out=centered_projection_buffer[:count])
        largest[0] = torch.maximum(largest[0], members(norms, w).max())
        largest[1] = torch.maximum(largest[1], members(centered_norms, w).max())
        if removed:
            # The all-but-the-top row is (e_i - mu) minus its top-D principal components: its norm is that of its
            # projection on the other eigenvectors (no cancellation), and sum_i a_i abtt_i comes from the rows below.
            abtt_norms = torch.linalg.vector_norm(centered_projection[:, :dim - removed], dim=1)
            abtt_coefficients = abtt_cosine.coefficients(abtt_norms, w)
            largest[2] = torch.maximum(largest[2], members(abtt_norms, w).max())
            coefficients = torch.stack([raw_coefficients, centered_coefficients, abtt_coefficients], dim=1)
        else:
            coefficients = torch.stack([raw_coefficients, centered_coefficients], dim=1)
        # One pass over the rows for every direction sum: sum_i a_i (x_i - mu) = X^T a - mu sum_i a_i, and the
        # all-but-the-top one also subtracts the top directions U (U^T (x_i - mu)) = U t_i.
        sums = (coefficients.T @ x).T  # row-major x read as rows: several times faster than x.T @ coefficients
        raw_cosine.add(sums[:, 0])
        centered_cosine.add(sums[:, 1] - mean * centered_coefficients.sum())
        if removed:
            top = centered_projection[:, dim - removed:]
            abtt_cosine.add(sums[:, 2] - mean * abtt_coefficients.sum() - top_directions @ (top.T @ abtt_coefficients))
        centered_small.add(centered_projection, q_scale)
        centered_partition.add(centered_projection, w, scratch[:count])

    log_z, log_z_negative = raw_partition.result()
    mean_norm, mean_row_norm = float(mean.norm()), float(norm_sum / total_weight)
    metrics: dict[str, float] = {"rows": float(effective_rows), "dim": float(dim), "iso": _iso(log_z)}
    if not full:
        metrics.update(mean_norm_ratio=mean_norm / mean_row_norm if mean_row_norm > 0 else float("nan"),
                       avg_cosine=raw_cosine.result(), mean_row_norm=mean_row_norm)
        return metrics, None, None
    metrics["iso_both_signs"] = _iso(torch.cat([log_z, log_z_negative]))
    metrics["mean_norm"] = mean_norm
    metrics["mean_row_norm"] = mean_row_norm
    metrics["mean_norm_ratio"] = mean_norm / mean_row_norm if mean_row_norm > 0 else float("nan")
    metrics["avg_cosine"] = raw_cosine.result()
    covariance_trace = float(torch.diagonal(covariance).sum())
    metrics["isoscore"] = _isoscore(covariance_trace, float((covariance * covariance).sum()), dim)

    sigma = raw_small.singular_values(rows, None, row_scale)
    metrics.update(_spectrum_metrics(sigma, min(effective_rows, dim)))
    metrics["sigma_max"] = float(sigma[0]) * math.sqrt(effective_rows)
    metrics["top_direction_rms"] = float(sigma[0])

    log_zc, log_zc_negative = centered_partition.result()
    centered_metrics = {"iso": _iso(log_zc), "iso_both_signs": _iso(torch.cat([log_zc, log_zc_negative])),
                        "avg_cosine": centered_cosine.result()}
    centered_sigma = centered_small.singular_values(rows, mean, row_scale)
    centered_metrics.update(_spectrum_metrics(centered_sigma, min(effective_rows - 1, dim)))
    metrics.update({f"centered/{key}": value for key, value in centered_metrics.items()})

    if removed:
        # The removed directions have c . e_i = 0 after the post-processing, so Z(+-c) = sum_i w_i there; the
        # others are eigenvectors of the post-processed covariance with the centered projections unchanged.
        log_total = torch.log(torch.as_tensor(total_weight, dtype=torch.float64, device=device)).reshape(1)
        kept = slice(0, dim - removed)
        log_za = torch.cat([log_zc[kept], log_total])
        log_za_both = torch.cat([log_za, log_zc_negative[kept], log_total])
        kept_values = centered_values[kept]
        abtt_metrics = {"iso": _iso(log_za), "iso_both_signs": _iso(log_za_both),
                        "avg_cosine": abtt_cosine.result(),
                        "isoscore": _isoscore(float(kept_values.sum()), float((kept_values * kept_values).sum()),
                                              dim),
                        "effective_rank": _spectrum_metrics(kept_values.clamp_min(0).sqrt().flip(0),
                                                            min(effective_rows - 1, dim) - removed)["effective_rank"],
                        "components": float(removed)}
        metrics.update({f"abtt/{key}": value for key, value in abtt_metrics.items()})

    metrics = _settle_degenerate(metrics, [float(v) for v in largest], [effective_rows, dim])
    if row_statistics:
        return metrics, torch.cat(norms_of_rows), torch.cat(mean_dots)
    return metrics, None, None


#: What a metric reads for a matrix without the directions it measures (see :func:`_settle_degenerate`).
_NO_SPREAD_VALUES = ("avg_cosine", "isoscore", "effective_rank", "explained_variance_top1",
                     "explained_variance_top10", "kappa", "mean_norm_ratio")
_ABTT_SPREAD_VALUES = ("abtt/avg_cosine", "abtt/isoscore", "abtt/effective_rank")


def _settle_degenerate(metrics: dict[str, float], largest: list[float], shape: list[int]) -> dict[str, float]:
    """Documented values instead of 0/0 for degenerate matrices, with a warning that says why.

    ``largest``: the largest ``||e_i||``, ``||e_i - mu||`` and ``||abtt(E)_i||`` of the row set.

    - every row zero: there are no directions. ``mean_norm_ratio``, ``avg_cosine``, ``isoscore``,
      ``effective_rank``, ``explained_variance_top*`` and ``kappa`` (raw and centered) are 0; ``iso`` is 1 (every
      direction gives ``Z(c) = V``, so the formula's value is exact, but it says nothing about isotropy).
    - every row the same (one distinct row, e.g. an embedding that was never trained apart from a shared shift):
      the centered matrix is zero, so the ``centered/...`` spread metrics and ``isoscore`` are 0.
    - the centered rows span at most ``D`` directions (all-but-the-top leaves zero rows, up to rounding, e.g. a
      rank-1 matrix): ``abtt/avg_cosine``, ``abtt/isoscore`` and ``abtt/effective_rank`` are 0, ``abtt/iso`` and
      ``abtt/iso_both_signs`` 1 (the values of an exactly zero matrix, not of its rounding noise).
    Rows that are constant across the hidden dims (rank 1) need no other special value, but get the same warning.
    """
    scale, centered_scale, abtt_scale = largest
    abtt_empty = "abtt/iso" in metrics and abtt_scale <= 1e-12 * scale
    if scale == 0.0:
        why, keys = "every row is zero", [*_NO_SPREAD_VALUES, *(f"centered/{k}" for k in _NO_SPREAD_VALUES)]
    elif centered_scale <= 1e-12 * scale:
        why, keys = "every row is the same vector", ["isoscore", *(f"centered/{k}" for k in _NO_SPREAD_VALUES)]
    elif metrics.get("explained_variance_top1", 0.0) >= 1.0 - 1e-9:
        why, keys = "the rows span one direction (rank 1)", []
    elif abtt_empty:
        why, keys = (f"the centered rows span at most {int(metrics['abtt/components'])} direction(s), which "
                     "all-but-the-top removes"), []
    else:
        return metrics
    warnings.warn(f"embedding metrics of a degenerate {shape} matrix: {why}; ratios that would be "
                  "0/0 are reported as 0 and Iso is at an extreme (see embedding_metrics' docstring)",
                  RuntimeWarning, stacklevel=4)
    for key in keys:
        if key in metrics and not math.isfinite(metrics[key]):
            metrics[key] = 0.0
    if abtt_empty:
        metrics.update({key: 0.0 for key in _ABTT_SPREAD_VALUES})
        metrics.update({"abtt/iso": 1.0, "abtt/iso_both_signs": 1.0})
    return metrics


def _pearson(x: Tensor, y: Tensor) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else float("nan")


def _ranks(values: Tensor) -> Tensor:
    """1-based ranks, ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = torch.argsort(values, stable=True)
    _, group, sizes = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(sizes, dim=0).to(torch.float64)
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    ranks[order] = (ends - (sizes.to(torch.float64) - 1) / 2)[group]
    return ranks


def _spearman(x: Tensor, y: Tensor) -> float:
    return _pearson(_ranks(x), _ranks(y))


def _frequency_correlations(norms: Tensor, mean_dots: Tensor, counts: Tensor, seen: Tensor) -> dict[str, float]:
    """``rho...`` of the module docstring: over the seen rows with ``log count``, over all rows as the paper."""
    log_counts = torch.log(counts[seen])
    log_probability = torch.log(counts / counts.sum() + _PAPER_PROBABILITY_FLOOR)
    metrics = {}
    for name, values in (("rho", norms), ("rho_mu", mean_dots)):
        metrics[name] = _pearson(values[seen], log_counts)
        metrics[f"{name}_spearman"] = _spearman(values[seen], log_counts)
        metrics[f"{name}_all"] = _pearson(values, log_probability)
        metrics[f"{name}_all_spearman"] = _spearman(values, log_probability)
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
            as the padding rows of a vocabulary rounded up to a multiple of 64, count as never seen). Adds the
            ``rho...`` correlations, ``seen_rows``, ``tokens_counted``, ``seen/...``, ``top{k}/...`` and
            ``freq/...``.
        top_k: size of the most-frequent subset (default :data:`DEFAULT_TOP_K`); keys are ``top{top_k}/...`` even
            when fewer rows were seen (then ``top{top_k}/rows`` is the number of seen rows).

    Keys without counts: ``iso``, ``iso_both_signs``, ``mean_norm``, ``mean_row_norm``, ``mean_norm_ratio``,
    ``avg_cosine``, ``isoscore``, ``effective_rank``, ``explained_variance_top1``, ``explained_variance_top10``,
    ``kappa``, ``sigma_max``, ``top_direction_rms``, ``rows``, ``dim``, the ``centered/...`` and (for ``H >= 2``)
    the ``abtt/...`` variants.

    Degenerate matrices (all rows zero, all rows equal, rank 1, nothing left after all-but-the-top) give a
    ``RuntimeWarning`` saying which, and the values documented in :func:`_settle_degenerate` (0 for ratios that
    would be 0/0) instead of NaN.

    Example::

        >>> from coupled_adam_hf.metrics import embedding_metrics
        >>> m = embedding_metrics(model.get_input_embeddings().weight)
        >>> m["iso"], m["mean_norm_ratio"]
    """
    weight = _checked_matrix(weight)
    counts = None if token_counts is None else _as_counts(token_counts, weight.shape[0], weight.device)
    requested = DEFAULT_TOP_K if top_k is None else int(top_k)
    if counts is not None:
        num_seen = int((counts > 0).sum())
        if num_seen < 2:
            raise ValueError(f"token_counts mark only {num_seen} row(s) as seen; seen/top-k/frequency metrics need "
                             "at least 2. Are the counts from this checkpoint's tokenizer and training data?")
        if requested < 2:
            raise ValueError(f"top_k must be >= 2, got {top_k}")

    all_rows = _RowSet(weight)
    gram, column_sum, norm_bound = moments = all_rows.second_moments()
    all_metrics, norms, mean_dots = _row_set_metrics(all_rows, moments, row_statistics=counts is not None)
    if counts is None:
        return all_metrics
    metrics = dict(all_metrics)
    seen = counts > 0
    metrics["seen_rows"] = float(num_seen)
    metrics["tokens_counted"] = float(counts.sum())
    metrics.update(_frequency_correlations(norms, mean_dots, counts, seen))

    seen_index = seen.nonzero().flatten()
    mostly_seen = 2 * num_seen >= weight.shape[0]
    if num_seen == weight.shape[0]:
        seen_metrics = all_metrics
    elif mostly_seen:
        # Usually only a few rows are unseen (padding, glitch tokens): the seen set is every row with weight 0 on
        # those, and subtracting their Gram matrix from the full one costs O(unseen * H^2), not O(seen * H^2).
        unseen_gram, unseen_sum, _ = _RowSet(weight, (~seen).nonzero().flatten()).second_moments()
        seen_moments = gram - unseen_gram, column_sum - unseen_sum, norm_bound
        seen_metrics, _, _ = _row_set_metrics(_RowSet(weight, weights=seen.to(torch.float64)), seen_moments,
                                              row_norms=norms)
    else:
        seen_metrics, _, _ = _row_set_metrics(_RowSet(weight, seen_index))
    metrics.update({f"seen/{key}": value for key, value in seen_metrics.items()})

    # Stable order: equal counts keep vocabulary order, so the subset is reproducible. The key keeps the requested
    # k (comparable across checkpoints); top{k}/rows says how many rows it held when fewer were seen.
    seen_counts = counts[seen_index]
    top_index = seen_index[torch.sort(seen_counts, descending=True, stable=True).indices[:requested]]
    top_metrics, _, _ = _row_set_metrics(_RowSet(weight, top_index))
    metrics.update({f"top{requested}/{key}": value for key, value in top_metrics.items()})
    if mostly_seen:
        freq_rows = _RowSet(weight, weights=counts)
        freq_metrics, _, _ = _row_set_metrics(freq_rows, freq_rows.second_moments(norm_bound), row_norms=norms)
    else:
        freq_metrics, _, _ = _row_set_metrics(_RowSet(weight, seen_index, seen_counts))
    metrics.update({f"freq/{key}": value for key, value in freq_metrics.items()})
    return metrics


def quick_isotropy(weight: Tensor) -> dict[str, float]:
    """``iso``, ``mean_norm_ratio`` and ``avg_cosine`` only: one Gram matrix, one eigh, one projection.

    Same definitions and sign convention as :func:`embedding_metrics`; meant for logging during training.
    """
    rows = _RowSet(_checked_matrix(weight))
    metrics, _, _ = _row_set_metrics(rows, full=False)
    if metrics["mean_row_norm"] == 0.0:
        warnings.warn(f"quick_isotropy of a degenerate {[rows.num_rows, rows.dim]} matrix: every row is zero; "
                      "mean_norm_ratio and avg_cosine are reported as 0, Iso as 1", RuntimeWarning, stacklevel=2)
        return {"iso": metrics["iso"], "mean_norm_ratio": 0.0, "avg_cosine": 0.0}
    return {key: metrics[key] for key in ("iso", "mean_norm_ratio", "avg_cosine")}


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
    covariance = _gram(centered)
    _, eigenvectors = _symmetric_eigh(covariance)
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
    second_moment = _gram(matrix) - (matrix.shape[0] * torch.outer(mean, mean) if centered else 0)
    _, eigenvectors = _symmetric_eigh(second_moment)
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

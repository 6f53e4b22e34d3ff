"""Embedding metrics: known answers, invariances, and agreement with slow direct formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coupled_adam_hf.metrics import (
    _gram,
    _gram_blocks,
    _RowSet,
    abtt_components,
    all_but_the_top,
    embedding_metrics,
    pca_projection,
    quick_isotropy,
    read_token_counts,
    singular_values,
)

SCALE_FREE = ("mean_norm_ratio", "avg_cosine", "isoscore", "effective_rank", "explained_variance_top1",
              "explained_variance_top10", "kappa", "centered/avg_cosine", "centered/effective_rank",
              "centered/kappa")


def gaussian_cloud(rows: int, dim: int, scale: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, dim, generator=generator, dtype=torch.float64)


def unit(dim: int, index: int) -> torch.Tensor:
    vector = torch.zeros(dim, dtype=torch.float64)
    vector[index] = 1.0
    return vector


# ------------------------------------------------------------------------------------------- known answers
def test_isotropic_gaussian_cloud_is_isotropic():
    m = embedding_metrics(gaussian_cloud(20000, 16, scale=0.3))
    assert m["iso"] > 0.99 and m["iso_both_signs"] > 0.98
    assert abs(m["avg_cosine"]) < 1e-3
    assert m["mean_norm_ratio"] < 0.02
    assert m["isoscore"] > 0.99
    assert m["effective_rank"] > 15.9
    assert m["kappa"] > 0.9
    assert m["centered/iso"] > 0.99


def test_shifted_cloud_has_the_shift_as_mean_norm_ratio_and_low_iso():
    dim, sigma, shift = 16, 0.3, 3.0
    cloud = gaussian_cloud(20000, dim, scale=sigma)
    m = embedding_metrics(cloud + shift * unit(dim, 5))
    row_norm = math.sqrt(shift**2 + dim * sigma**2)
    assert m["mean_norm"] == pytest.approx(shift, rel=0.01)
    assert m["mean_norm_ratio"] == pytest.approx(shift / row_norm, abs=0.01)
    assert m["avg_cosine"] == pytest.approx(shift**2 / row_norm**2, abs=0.01)
    # Z along the shift is exp(shift) times Z along any other eigenvector (the Gaussian factors cancel)
    assert m["iso"] == pytest.approx(math.exp(-shift), rel=0.05)
    assert m["iso_both_signs"] == pytest.approx(math.exp(-2 * shift), rel=0.05)
    # centering removes the shift; IsoScore ignores the mean by design
    assert m["centered/iso"] > 0.99
    assert m["isoscore"] == pytest.approx(embedding_metrics(cloud)["isoscore"], abs=1e-9)
    assert m["centered/avg_cosine"] == pytest.approx(embedding_metrics(cloud)["centered/avg_cosine"], abs=1e-9)


def test_rank_one_matrix_has_exact_iso_and_unit_effective_rank():
    rows, dim = 50, 8
    amplitudes = torch.linspace(0.5, 1.5, rows, dtype=torch.float64)
    direction = torch.arange(1.0, dim + 1, dtype=torch.float64)
    m = embedding_metrics(torch.outer(amplitudes, direction))
    # eigenvectors orthogonal to the direction see c . e_i = 0, so Z = V there
    expected_iso = rows / torch.exp(amplitudes * direction.norm()).sum()
    assert m["iso"] == pytest.approx(float(expected_iso), rel=1e-9, abs=0)
    assert m["avg_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert m["mean_norm_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["explained_variance_top1"] == pytest.approx(1.0, abs=1e-12)
    assert m["kappa"] < 1e-6
    assert m["isoscore"] == pytest.approx(0.0, abs=1e-9)


def test_iso_of_large_norm_embeddings_does_not_overflow():
    rows, dim = 40, 4
    m = embedding_metrics(torch.outer(torch.ones(rows, dtype=torch.float64), 1000.0 * unit(dim, 0)))
    assert m["iso"] == 0.0 and m["iso_both_signs"] == 0.0  # exp(-1000) underflows: the true value, not NaN
    shifted = gaussian_cloud(500, dim, scale=1.0) * 300 + 2000 * unit(dim, 1)
    m = embedding_metrics(shifted)
    assert all(math.isfinite(value) for value in m.values())


def test_iso_scales_as_a_power_while_scale_free_metrics_do_not_move():
    rows, dim = 30, 5
    constant_rows = torch.outer(torch.ones(rows, dtype=torch.float64), 0.7 * unit(dim, 2))
    base = embedding_metrics(constant_rows)["iso"]
    for factor in (2.0, 3.0):
        assert embedding_metrics(factor * constant_rows)["iso"] == pytest.approx(base**factor, rel=1e-9)

    matrix = gaussian_cloud(200, 12, scale=1.0) + 0.5
    reference = embedding_metrics(matrix)
    for factor in (1e-3, 7.0):
        scaled = embedding_metrics(factor * matrix)
        for key in SCALE_FREE:
            assert scaled[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
        assert scaled["mean_norm"] == pytest.approx(factor * reference["mean_norm"], rel=1e-9)


def test_orthonormal_rows():
    dim = 8
    q, _ = torch.linalg.qr(gaussian_cloud(dim, dim, scale=1.0, seed=3))
    m = embedding_metrics(q)
    assert m["avg_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert m["kappa"] == pytest.approx(1.0, abs=1e-9)
    assert m["effective_rank"] == pytest.approx(dim, rel=1e-9)
    assert m["mean_norm_ratio"] == pytest.approx(1 / math.sqrt(dim), rel=1e-9)
    # covariance of orthonormal rows: eigenvalues 1/H (H-1 times) and 0, so PR = H - 1
    assert m["isoscore"] == pytest.approx((dim - 2) / (dim - 1), rel=1e-9)
    # rows and their negatives: every row has one antipodal partner and is orthogonal to the rest
    m = embedding_metrics(torch.cat([q, -q]))
    assert m["avg_cosine"] == pytest.approx(-1 / (2 * dim - 1), abs=1e-12)
    assert m["mean_norm"] == pytest.approx(0.0, abs=1e-12)


def test_metrics_are_invariant_under_rotations_of_the_hidden_space():
    matrix = gaussian_cloud(300, 10, scale=0.8, seed=1) + 0.4 * unit(10, 0) + 0.2
    rotation, _ = torch.linalg.qr(gaussian_cloud(10, 10, scale=1.0, seed=2))
    before, after = embedding_metrics(matrix), embedding_metrics(matrix @ rotation)
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-8, abs=1e-10), key


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(2, 40), dim=st.integers(1, 12), shift=st.floats(-3, 3), scale=st.floats(0.01, 5),
       seed=st.integers(0, 2**16))
def test_metrics_stay_in_their_ranges(rows, dim, shift, scale, seed):
    m = embedding_metrics(gaussian_cloud(rows, dim, scale, seed) + shift)
    assert 0.0 <= m["iso_both_signs"] <= m["iso"] <= 1.0
    assert 0.0 <= m["centered/iso_both_signs"] <= m["centered/iso"] <= 1.0
    assert -1.0 / (rows - 1) - 1e-9 <= m["avg_cosine"] <= 1.0 + 1e-9
    assert 0.0 <= m["mean_norm_ratio"] <= 1.0 + 1e-9
    assert 1.0 - 1e-9 <= m["effective_rank"] <= min(rows, dim) + 1e-9
    assert 0.0 <= m["kappa"] <= 1.0 + 1e-12
    if dim > 1:
        assert -1e-9 <= m["isoscore"] <= 1.0 + 1e-9


# ------------------------------------------------------------------------------- slow direct formulas agree
def oriented_eigenvectors(second_moment: np.ndarray, mean: np.ndarray) -> np.ndarray:
    _, vectors = np.linalg.eigh(second_moment)
    return vectors * np.sign(mean @ vectors)


def direct_iso(points: np.ndarray, directions: np.ndarray) -> tuple[float, float]:
    z_pos = [sum(math.exp(float(c @ e)) for e in points) for c in directions.T]
    z_neg = [sum(math.exp(-float(c @ e)) for e in points) for c in directions.T]
    return min(z_pos) / max(z_pos), min(z_pos + z_neg) / max(z_pos + z_neg)


def test_agrees_with_direct_formulas_on_a_small_matrix():
    matrix = (gaussian_cloud(40, 6, scale=0.7, seed=5) + 0.3 * torch.arange(6.0, dtype=torch.float64)).numpy()
    m = embedding_metrics(torch.from_numpy(matrix))
    rows, dim = matrix.shape
    mean = matrix.mean(axis=0)

    iso, iso_both = direct_iso(matrix, oriented_eigenvectors(matrix.T @ matrix, mean))
    assert m["iso"] == pytest.approx(iso, rel=1e-10)
    assert m["iso_both_signs"] == pytest.approx(iso_both, rel=1e-10)
    centered = matrix - mean
    iso, iso_both = direct_iso(centered, oriented_eigenvectors(centered.T @ centered, mean))
    assert m["centered/iso"] == pytest.approx(iso, rel=1e-10)
    assert m["centered/iso_both_signs"] == pytest.approx(iso_both, rel=1e-10)

    units = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    cosines = units @ units.T
    assert m["avg_cosine"] == pytest.approx((cosines.sum() - np.trace(cosines)) / (rows * (rows - 1)), rel=1e-12, abs=0)
    units = centered / np.linalg.norm(centered, axis=1, keepdims=True)
    cosines = units @ units.T
    assert m["centered/avg_cosine"] == pytest.approx((cosines.sum() - np.trace(cosines)) / (rows * (rows - 1)),
                                                     rel=1e-10, abs=1e-14)

    assert m["mean_norm"] == pytest.approx(np.linalg.norm(mean), rel=1e-12)
    assert m["mean_norm_ratio"] == pytest.approx(np.linalg.norm(mean) / np.linalg.norm(matrix, axis=1).mean())

    sigma = np.linalg.svd(matrix, compute_uv=False)
    p = sigma / sigma.sum()
    assert m["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert m["kappa"] == pytest.approx(sigma[-1] / sigma[0], rel=1e-9)
    assert m["explained_variance_top1"] == pytest.approx(sigma[0] ** 2 / (sigma**2).sum(), rel=1e-9)
    # sigma_max is the plain largest singular value (the paper's Smax); its RMS form has its own name
    assert m["sigma_max"] == pytest.approx(sigma[0], rel=1e-9)
    assert m["top_direction_rms"] == pytest.approx(sigma[0] / math.sqrt(rows), rel=1e-9)
    sigma_c = np.linalg.svd(centered, compute_uv=False)
    assert m["centered/kappa"] == pytest.approx(sigma_c[-1] / sigma_c[0], rel=1e-9)

    # IsoScore as Rudman et al. (2022) state it: PCA, normalised variance vector, isotropy defect
    variances = np.sort(np.linalg.eigvalsh(np.cov(matrix.T)))[::-1]
    normalised = math.sqrt(dim) * variances / np.linalg.norm(variances)
    defect = np.linalg.norm(normalised - 1) / math.sqrt(2 * (dim - math.sqrt(dim)))
    fraction = (dim - defect**2 * (dim - math.sqrt(dim))) ** 2 / dim**2
    assert m["isoscore"] == pytest.approx((dim * fraction - 1) / (dim - 1), rel=1e-9)


def test_quick_isotropy_matches_the_full_set():
    matrix = gaussian_cloud(500, 24, scale=0.5, seed=7) + 0.2
    quick, full = quick_isotropy(matrix), embedding_metrics(matrix)
    assert set(quick) == {"iso", "mean_norm_ratio", "avg_cosine"}
    for key, value in quick.items():
        assert value == pytest.approx(full[key], rel=1e-10), key


@pytest.mark.parametrize("rows, dim, blocks", [(1, 7, 3), (37, 2, 5), (53, 13, 4), (40, 768, 4), (9, 10, 8),
                                               (200, 96, 1), (64, 5, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocked_gram_matches_the_plain_product(rows, dim, blocks, dtype):
    matrix = (gaussian_cloud(rows, dim, scale=1.0, seed=rows + dim) + 0.5).to(dtype)
    bounds = _gram_blocks(dim, blocks)
    assert bounds[0] == 0 and bounds[-1] == dim and len(bounds) == min(blocks, dim) + 1
    assert all(low < high for low, high in itertools.pairwise(bounds))
    reference = matrix.T @ matrix
    blocked = _gram(matrix, blocks)
    assert blocked.dtype == dtype and blocked.shape == (dim, dim)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((blocked - reference).abs().max()) <= tolerance * float(reference.abs().max())


def test_row_set_second_moments_match_plain_sums(monkeypatch):
    monkeypatch.setitem(__import__("coupled_adam_hf.metrics").metrics._GRAM_CHUNK_ELEMENTS, "cpu", 7 * 400)
    monkeypatch.setattr(__import__("coupled_adam_hf.metrics").metrics, "_GRAM_BLOCK_COLUMNS", 100)
    matrix = gaussian_cloud(50, 401, scale=1.0, seed=3) + 0.2  # chunks of 6 rows, 4 column blocks of 100-101
    weights = torch.rand(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    index = torch.tensor([3, 1, 4, 15, 9, 26, 5, 35, 8, 9, 7, 49])
    for rows, plain in ((_RowSet(matrix), matrix), (_RowSet(matrix.to(torch.float32)), matrix.float().double()),
                        (_RowSet(matrix, index=index), matrix[index])):
        gram, column_sum, largest = rows.second_moments()
        reference = plain.T @ plain
        assert float((gram - reference).abs().max()) <= 1e-12 * float(reference.abs().max())
        assert torch.allclose(column_sum, plain.sum(dim=0), rtol=1e-12, atol=1e-12)
        assert largest == pytest.approx(float(plain.norm(dim=1).max()), rel=1e-12)
    gram, column_sum, _ = _RowSet(matrix, weights=weights).second_moments()
    reference = (matrix * weights[:, None]).T @ matrix
    assert float((gram - reference).abs().max()) <= 1e-12 * float(reference.abs().max())
    assert torch.allclose(column_sum, weights @ matrix, rtol=1e-12, atol=1e-12)


def test_metrics_do_not_depend_on_the_gram_blocks(monkeypatch):
    import coupled_adam_hf.metrics as metrics_module

    matrix = gaussian_cloud(300, 26, scale=0.5, seed=11) + 0.2
    matrix[:, -1] = matrix[:, 0] + 1e-9 * matrix[:, 1]  # ill-conditioned: the exact small-end path of kappa
    counts = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(2))
    plain = embedding_metrics(matrix, counts, top_k=40)  # H < 2 * _GRAM_BLOCK_COLUMNS: one block
    monkeypatch.setattr(metrics_module, "_GRAM_BLOCK_COLUMNS", 6)  # 4 blocks of 6-7 columns
    blocked = embedding_metrics(matrix, counts, top_k=40)
    assert blocked.keys() == plain.keys()
    for key, value in plain.items():
        # abtt/effective_rank takes sqrt of the Gram eigenvalues as they are: the tiny one is rounding noise of size
        # sqrt(eps) sigma_max, which moves the entropy at that level whatever the order of the sums
        tolerance = 1e-7 if key.endswith("abtt/effective_rank") else 1e-9
        assert blocked[key] == pytest.approx(value, rel=tolerance, abs=1e-12), key


@pytest.mark.parametrize("scale", [0.5, 100.0], ids=["unshifted", "shifted"])  # norms up to 420 > 300: shifted
def test_iso_does_not_depend_on_the_blocks_of_the_exponential_sums(monkeypatch, scale):
    import coupled_adam_hf.metrics as metrics_module

    matrix = gaussian_cloud(500, 5, scale=scale, seed=12) + 0.3 * scale
    monkeypatch.setitem(metrics_module._CHUNK_ELEMENTS, "cpu", 5 * 120)  # chunks of 120 rows
    monkeypatch.setattr(metrics_module, "_PARTITION_BLOCK_ELEMENTS", {})  # a chunk is one block
    counts = torch.randint(0, 40, (500,), generator=torch.Generator().manual_seed(3))  # weighted sets too
    whole = embedding_metrics(matrix, counts, top_k=50)
    quick = quick_isotropy(matrix)
    monkeypatch.setattr(metrics_module, "_PARTITION_BLOCK_ELEMENTS", {"cpu": 5 * 7})  # blocks of 7 rows, a rest
    blocked = embedding_metrics(matrix, counts, top_k=50)
    keys = [key for key in whole if key.endswith(("iso", "iso_both_signs"))]
    assert len(keys) == 4 * 6  # all rows, seen, top-k, frequency-weighted: raw, centered, all-but-the-top
    assert all(0 < whole[key] < 1 for key in keys)  # measurable values, not underflows
    # against log-sum-exp of the plain projections, eigenvectors oriented towards the mean
    mean = matrix.mean(dim=0)
    for prefix, second_moment, rows in (("", matrix.T @ matrix / 500, matrix),
                                        ("centered/", torch.cov(matrix.T, correction=0), matrix - mean)):
        vectors = torch.linalg.eigh(second_moment).eigenvectors
        projection = rows @ (vectors * torch.sign(mean @ vectors))
        log_z = torch.logsumexp(projection, dim=0)
        both = torch.cat([log_z, torch.logsumexp(-projection, dim=0)])
        # abs=0: pytest.approx otherwise also accepts any difference below 1e-12, which these values are
        iso, iso_both = math.exp(float(log_z.min() - log_z.max())), math.exp(float(both.min() - both.max()))
        assert whole[f"{prefix}iso"] == pytest.approx(iso, rel=1e-9, abs=0)
        assert whole[f"{prefix}iso_both_signs"] == pytest.approx(iso_both, rel=1e-9, abs=0)
    for key in keys:
        assert blocked[key] == pytest.approx(whole[key], rel=1e-12, abs=0), key
    assert quick_isotropy(matrix)["iso"] == pytest.approx(quick["iso"], rel=1e-12, abs=0)


def test_paired_eigendecompositions_are_the_single_threaded_ones_and_restore_the_threads(monkeypatch):
    from coupled_adam_hf.metrics import _symmetric_eighs

    first = gaussian_cloud(200, 40, scale=1.0, seed=13)
    second = gaussian_cloud(200, 40, scale=1.0, seed=14) + 0.5
    matrices = [first.T @ first, second.T @ second]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [torch.linalg.eigh((m + m.T) / 2) for m in matrices]
        torch.set_num_threads(2)
        paired = _symmetric_eighs(*matrices)  # one thread each, side by side
        assert torch.get_num_threads() == 2
        for (values, vectors), (expected_values, expected_vectors) in zip(paired, alone, strict=True):
            assert torch.equal(values, expected_values) and torch.equal(vectors, expected_vectors)
        two_threads = embedding_metrics(second, torch.arange(200) % 7, top_k=30)
        torch.set_num_threads(1)
        one_thread = embedding_metrics(second, torch.arange(200) % 7, top_k=30)
        for key, value in one_thread.items():
            assert two_threads[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

        def failing(matrix):
            raise torch.linalg.LinAlgError("did not converge")

        torch.set_num_threads(2)
        monkeypatch.setattr(torch.linalg, "eigh", failing)
        with pytest.raises(torch.linalg.LinAlgError):
            _symmetric_eighs(*matrices)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_low_precision_inputs_are_measured_in_float64():
    matrix = (gaussian_cloud(300, 16, scale=0.5, seed=8) + 0.1).to(torch.bfloat16)
    low, exact = embedding_metrics(matrix), embedding_metrics(matrix.to(torch.float64))
    assert low == exact


# ------------------------------------------------------------------------------------------- token counts
def test_seen_top_k_and_frequency_variants_are_the_metrics_of_their_row_sets():
    matrix = gaussian_cloud(60, 6, scale=0.5, seed=9) + 0.3
    counts = torch.tensor([0, 0, 5] + [int(c) for c in torch.randint(1, 6, (55,), generator=torch.Generator()
                                                                      .manual_seed(0))], dtype=torch.int64)
    m = embedding_metrics(matrix, counts, top_k=10)  # 58 counts for 60 rows: the last 2 rows count as unseen
    seen = torch.cat([counts, torch.zeros(2, dtype=torch.int64)]) > 0
    assert m["seen_rows"] == 56
    for key, value in embedding_metrics(matrix[seen]).items():
        assert m[f"seen/{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    seen_counts = counts[seen[:58]]
    order = torch.sort(seen_counts.to(torch.float64), descending=True, stable=True).indices[:10]
    for key, value in embedding_metrics(matrix[seen][order]).items():
        assert m[f"top10/{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    clipped = embedding_metrics(matrix, counts, top_k=500)  # more than the 56 seen rows: all of them, same key
    assert clipped["top500/rows"] == 56 and clipped["top500/iso"] == pytest.approx(m["seen/iso"], rel=1e-9)
    # weighting by integer counts equals repeating each row count times (for metrics that are means over rows)
    repeated = embedding_metrics(torch.repeat_interleave(matrix[seen], seen_counts, dim=0))
    for key in ("iso", "iso_both_signs", "mean_norm", "mean_norm_ratio", "isoscore", "effective_rank", "kappa",
                "centered/iso"):
        assert m[f"freq/{key}"] == pytest.approx(repeated[key], rel=1e-9), key


def test_gram_shortcut_for_few_unseen_rows_gives_the_same_seen_metrics():
    matrix = gaussian_cloud(50, 5, scale=1.0, seed=10) + 0.5
    counts = torch.ones(50)
    counts[[3, 17]] = 0
    m = embedding_metrics(matrix, counts)
    direct = embedding_metrics(matrix[counts > 0])
    for key, value in direct.items():
        assert m[f"seen/{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_rho_is_one_when_norms_grow_linearly_with_log_frequency():
    counts = torch.arange(1, 201, dtype=torch.float64)
    directions = torch.nn.functional.normalize(gaussian_cloud(200, 8, scale=1.0, seed=11), dim=1)
    m = embedding_metrics(directions * (1.0 + 0.5 * counts.log())[:, None], counts)
    assert m["rho"] == pytest.approx(1.0, abs=1e-12)
    m = embedding_metrics(directions * (5.0 - 0.5 * counts.log())[:, None], counts)
    assert m["rho"] == pytest.approx(-1.0, abs=1e-12)


def test_bad_counts_are_refused_with_a_reason():
    matrix = gaussian_cloud(10, 4, scale=1.0)
    with pytest.raises(ValueError, match="larger vocabulary"):
        embedding_metrics(matrix, torch.ones(11))
    with pytest.raises(ValueError, match="only 1 row"):
        embedding_metrics(matrix, torch.tensor([3.0] + [0.0] * 9))
    with pytest.raises(ValueError, match=">= 0"):
        embedding_metrics(matrix, -torch.ones(10))


def test_bad_matrices_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="2-D"):
        embedding_metrics(torch.ones(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        embedding_metrics(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        embedding_metrics(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 rows"):
        embedding_metrics(torch.ones(1, 3))


def test_read_token_counts_accepts_lists_dicts_and_files(tmp_path):
    assert read_token_counts([1, 0, 2]).tolist() == [1.0, 0.0, 2.0]
    assert read_token_counts({"0": 4, "3": 1}).tolist() == [4.0, 0.0, 0.0, 1.0]
    (tmp_path / "c.json").write_text('{"counts": [2, 3]}')
    assert read_token_counts(str(tmp_path / "c.json")).tolist() == [2.0, 3.0]
    np.save(tmp_path / "c.npy", np.array([1, 2, 3]))
    assert read_token_counts(str(tmp_path / "c.npy")).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(FileNotFoundError):
        read_token_counts(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------------ helpers for the plots
def test_singular_values_and_projection_helpers():
    matrix = gaussian_cloud(100, 6, scale=1.0, seed=12) + 3 * unit(6, 4)
    sigma = singular_values(matrix)
    assert torch.allclose(sigma, torch.linalg.svdvals(matrix), rtol=1e-12, atol=0)
    coordinates, mean = pca_projection(matrix)
    # uncentered: the first direction is the drift, so the cloud sits about 3 away from the origin
    assert coordinates.shape == (100, 2) and mean[0] == pytest.approx(3.0, abs=0.3)
    coordinates, mean = pca_projection(matrix, centered=True)
    assert torch.allclose(coordinates.mean(dim=0), torch.zeros(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_give_the_cpu_values():
    matrix = gaussian_cloud(2000, 64, scale=0.5, seed=13) + 0.1
    counts = torch.randint(0, 50, (2000,))
    cpu, gpu = embedding_metrics(matrix, counts), embedding_metrics(matrix.cuda(), counts.cuda())
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key


# ------------------------------------------------------------------------------------ the evaluate module
def test_local_evaluate_module_gives_the_library_values(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    from pathlib import Path

    module = Path(__file__).resolve().parents[1] / "metrics" / "anisotropy"
    anisotropy = evaluate.load(str(module), experiment_id="test_metrics")
    matrix = gaussian_cloud(60, 5, scale=1.0, seed=14) + 0.3
    counts = torch.randint(0, 20, (60,), generator=torch.Generator().manual_seed(0))
    anisotropy.add_batch(embeddings=matrix[:25].tolist())
    anisotropy.add_batch(embeddings=matrix[25:].tolist())
    result = anisotropy.compute(token_counts=counts.tolist(), top_k=10)
    assert result == pytest.approx(embedding_metrics(matrix, counts, top_k=10), rel=1e-12, abs=0, nan_ok=True)


# ------------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("name, matrix, why", [
    ("all zero", torch.zeros(6, 4), "every row is zero"),
    ("one distinct row", torch.tensor([[1.0, 2.0, 3.0, 4.0]]).repeat(6, 1), "every row is the same vector"),
    ("constant rows", torch.arange(1.0, 7.0).unsqueeze(1).repeat(1, 4), "rank 1"),
])
def test_degenerate_matrices_warn_why_and_report_documented_values_instead_of_nan(name, matrix, why):
    with pytest.warns(RuntimeWarning, match=why):
        metrics = embedding_metrics(matrix)
    assert all(math.isfinite(value) for value in metrics.values()), name
    if name == "all zero":
        assert metrics["iso"] == 1.0 and metrics["mean_norm_ratio"] == 0.0 and metrics["avg_cosine"] == 0.0
        assert metrics["kappa"] == 0.0 and metrics["effective_rank"] == 0.0
        with pytest.warns(RuntimeWarning, match="every row is zero"):
            quick = quick_isotropy(matrix)
        assert quick == {"iso": 1.0, "mean_norm_ratio": 0.0, "avg_cosine": 0.0}
    if name == "one distinct row":
        assert metrics["centered/effective_rank"] == 0.0 and metrics["isoscore"] == 0.0
        assert metrics["mean_norm_ratio"] == pytest.approx(1.0)


def test_a_healthy_matrix_gives_no_degeneracy_warning():
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        embedding_metrics(torch.randn(50, 8))


def test_all_but_the_top_matches_its_definition():
    """Against a plain numpy PCA: rows centered, then the top-D principal components projected out."""
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(300, 20)) @ np.diag(np.linspace(5.0, 0.1, 20)) + 3.0
    reference = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(reference, full_matrices=False)
    for d in (0, 1, 3):
        top = vt[:d].T
        expected = reference - reference @ top @ top.T
        got = all_but_the_top(torch.from_numpy(matrix), d).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-10)
    assert abtt_components(20) == 1 and abtt_components(768) == 8 and abtt_components(100) == 1
    default = all_but_the_top(torch.from_numpy(matrix)).numpy()
    np.testing.assert_allclose(default, reference - reference @ vt[:1].T @ vt[:1], atol=1e-10)
    # The result is mean-free and orthogonal to the removed directions.
    assert np.abs(default.mean(axis=0)).max() < 1e-10
    with pytest.raises(ValueError, match="num_components"):
        all_but_the_top(torch.from_numpy(matrix), 20)


# ------------------------------------------------------------------------------- kappa down to 1e-12
def exact_matrix_with_singular_values(exponents: list[int], rows: int = 4096, seed: int = 0) -> torch.Tensor:
    """``2 rows x H`` float64 matrix with *exactly* the singular values ``2^-a`` (``H = len(exponents)``).

    ``sum_j 2^-a_j u_j w_j^T`` with Sylvester-Hadamard columns (scaled by a power of two): ``w_j`` the columns of
    the ``H x H`` one, ``u_j`` columns of the ``rows x rows`` one, the last (smallest) one on rows of its own. Every
    entry is then a sum of signed powers of two spanning under 53 bits, so nothing is rounded, and the smallest
    direction's rows carry nothing else: a computation in float64 (an SVD, or this module) can resolve it to a
    relative ~1e-9 even at 1e-12 (rounded random rotations would blur it by ~1e-6 of itself). The columns of a
    Hadamard matrix but the first sum to zero, so the mean row is exactly zero and centering changes nothing.
    """
    dim = len(exponents)
    for n in (rows, dim):
        assert n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0, "powers of 4: 1/sqrt(n) is a power of two"

    def hadamard(n: int) -> torch.Tensor:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h

    big = torch.tensor([2.0 ** -a for a in exponents[:-1]], dtype=torch.float64)
    u = hadamard(rows) / math.sqrt(rows)
    w = hadamard(dim) / math.sqrt(dim)
    top = (u[:, 1:dim] * big) @ w[:, :dim - 1].T
    bottom = torch.outer(u[:, dim] * 2.0 ** -exponents[-1], w[:, dim - 1])
    matrix = torch.cat([top, bottom])
    return matrix[torch.randperm(2 * rows, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("smallest", [13, 27, 33, 40])  # sigma_min ~ 1.2e-4, 7.5e-9, 1.2e-10, 9.1e-13
def test_kappa_is_exact_down_to_1e_12(smallest):
    exponents = [0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 7, 7] + [smallest]
    matrix = exact_matrix_with_singular_values(exponents)
    expected = 2.0 ** -smallest  # sigma_max = 2^0
    assert float(matrix.mean(dim=0).abs().max()) == 0.0
    m = embedding_metrics(matrix)
    assert m["kappa"] == pytest.approx(expected, rel=1e-6, abs=0)  # abs=0: approx would accept any 1e-12
    assert m["centered/kappa"] == pytest.approx(expected, rel=1e-6, abs=0)  # the rows have mean zero
    assert m["sigma_max"] == pytest.approx(1.0, rel=1e-12)
    assert m["top_direction_rms"] == pytest.approx(1.0 / math.sqrt(matrix.shape[0]), rel=1e-12, abs=0)
    sigma = torch.tensor([2.0 ** -a for a in exponents], dtype=torch.float64)
    p = sigma / sigma.sum()
    assert m["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-12)
    # the same matrix in the other row sets (weighted by equal counts: the same singular values)
    counted = embedding_metrics(matrix, torch.ones(matrix.shape[0]), top_k=1024)
    for prefix in ("seen/", "freq/"):
        assert counted[f"{prefix}kappa"] == pytest.approx(expected, rel=1e-6, abs=0), prefix
        assert counted[f"{prefix}sigma_max"] == pytest.approx(1.0, rel=1e-12), prefix
    if smallest >= 33:  # what the test guards against: the Gram matrix's eigenvalues cannot resolve these
        from_gram = float(torch.linalg.eigvalsh(matrix.T @ matrix)[0].clamp_min(0).sqrt())
        assert abs(from_gram / expected - 1) > 1e-3


def test_kappa_of_several_tiny_singular_values_and_of_wide_matrices_matches_an_svd():
    generator = torch.Generator().manual_seed(21)
    basis, _ = torch.linalg.qr(torch.randn(3000, 24, generator=generator, dtype=torch.float64))
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=generator, dtype=torch.float64))
    sigma = torch.logspace(0, -9, 24, dtype=torch.float64)  # a continuum: no gap between large and small
    matrix = (basis * sigma) @ rotation.T
    m = embedding_metrics(matrix)
    reference = torch.linalg.svdvals(matrix)
    assert m["kappa"] == pytest.approx(float(reference[-1] / reference[0]), rel=1e-6, abs=0)
    assert m["kappa"] == pytest.approx(1e-9, rel=1e-6, abs=0)
    # fewer rows than columns (a top-k subset of a wide model): min(V, H) = V singular values
    wide = torch.randn(20, 50, generator=generator, dtype=torch.float64) + 0.3
    m = embedding_metrics(wide)
    reference = torch.linalg.svdvals(wide)
    assert m["kappa"] == pytest.approx(float(reference[-1] / reference[0]), rel=1e-9)
    p = reference / reference.sum()
    assert m["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    centered = torch.linalg.svdvals(wide - wide.mean(dim=0))[:19]  # V - 1 directions after centering
    assert m["centered/kappa"] == pytest.approx(float(centered[-1] / centered[0]), rel=1e-9)


# ------------------------------------------------------------------------------- frequency correlations
def test_frequency_correlations_match_scipy_over_seen_rows_and_in_the_papers_convention():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(22)
    matrix = gaussian_cloud(400, 12, scale=0.5, seed=22) + 0.4
    counts = torch.randint(0, 8, (390,), generator=generator)  # ties and unseen rows; 10 padding rows
    m = embedding_metrics(matrix, counts, top_k=50)
    full_counts = torch.cat([counts, torch.zeros(10, dtype=counts.dtype)]).to(torch.float64).numpy()
    norms = matrix.norm(dim=1).numpy()
    mean_dots = (matrix @ matrix.mean(dim=0)).numpy()
    seen = full_counts > 0
    log_counts = np.log(full_counts[seen])
    log_probability = np.log(full_counts / full_counts.sum() + 1e-10)
    expected = {
        "rho": stats.pearsonr(norms[seen], log_counts).statistic,
        "rho_spearman": stats.spearmanr(norms[seen], log_counts).statistic,
        "rho_mu": stats.pearsonr(mean_dots[seen], log_counts).statistic,
        "rho_mu_spearman": stats.spearmanr(mean_dots[seen], log_counts).statistic,
        "rho_all": stats.pearsonr(norms, log_probability).statistic,
        "rho_all_spearman": stats.spearmanr(norms, log_probability).statistic,
        "rho_mu_all": stats.pearsonr(mean_dots, log_probability).statistic,
        "rho_mu_all_spearman": stats.spearmanr(mean_dots, log_probability).statistic,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_spearman_is_one_for_any_increasing_relation_and_ties_share_their_rank():
    counts = torch.arange(1, 201, dtype=torch.float64)
    directions = torch.nn.functional.normalize(gaussian_cloud(200, 8, scale=1.0, seed=23), dim=1)
    m = embedding_metrics(directions * torch.exp(0.02 * counts)[:, None], counts)  # monotone, far from linear
    assert m["rho_spearman"] == pytest.approx(1.0, abs=1e-12) and m["rho"] < 0.999
    assert m["rho_all_spearman"] == pytest.approx(1.0, abs=1e-12)
    # two count levels, norms in the same two levels: ties averaged, so Spearman is exactly 1
    counts = torch.tensor([1.0, 5.0] * 50)
    axes = torch.stack([unit(8, i % 8) for i in range(100)])  # exact unit rows: equal levels give equal norms
    m = embedding_metrics(axes * (1 + counts)[:, None], counts)
    assert m["rho_spearman"] == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------- all-but-the-top
def test_abtt_metrics_are_those_of_the_post_processed_matrix():
    matrix = gaussian_cloud(600, 16, scale=1.0, seed=24) @ torch.diag(torch.linspace(3.0, 0.2, 16,
                                                                                     dtype=torch.float64)) + 0.5
    m = embedding_metrics(matrix)
    processed = all_but_the_top(matrix)
    direct = embedding_metrics(processed)
    assert m["abtt/components"] == abtt_components(16) == 1
    for key in ("iso_both_signs", "avg_cosine", "isoscore", "effective_rank"):
        assert m[f"abtt/{key}"] == pytest.approx(direct[key], rel=1e-6), key
    # abtt/iso orients the eigenvectors by the mean of E (as centered/iso does): a direct evaluation so
    points = processed.numpy()
    iso, iso_both = direct_iso(points, oriented_eigenvectors(points.T @ points, matrix.mean(dim=0).numpy()))
    assert m["abtt/iso"] == pytest.approx(iso, rel=1e-9)
    assert m["abtt/iso_both_signs"] == pytest.approx(iso_both, rel=1e-9)
    # the removed direction was the most anisotropic one: what is left is closer to isotropic
    assert m["abtt/iso"] > m["centered/iso"]


def test_abtt_of_a_matrix_it_empties_reports_the_values_of_a_zero_matrix():
    two_rows = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 1.0, 3.0, 2.0]], dtype=torch.float64).repeat(5, 1)
    with pytest.warns(RuntimeWarning, match="all-but-the-top removes"):
        m = embedding_metrics(two_rows)
    assert m["abtt/iso"] == 1.0 and m["abtt/avg_cosine"] == 0.0 and m["abtt/isoscore"] == 0.0
    assert m["abtt/effective_rank"] == 0.0
    assert m["centered/avg_cosine"] == pytest.approx(-1.0 / 9, rel=1e-9)  # +v and -v, 5 each: (40 - 50) / 90


def test_seen_and_frequency_sets_of_a_mostly_unseen_vocabulary():
    """Few seen rows are gathered, most seen rows are measured in place (weight 0 on the others): same values."""
    matrix = gaussian_cloud(80, 6, scale=0.5, seed=25) + 0.3
    for seen_rows in (20, 70):
        counts = torch.zeros(80)
        counts[torch.randperm(80, generator=torch.Generator().manual_seed(seen_rows))[:seen_rows]] = \
            torch.arange(1.0, seen_rows + 1)
        m = embedding_metrics(matrix, counts, top_k=10)
        seen = counts > 0
        for key, value in embedding_metrics(matrix[seen]).items():
            assert m[f"seen/{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), (seen_rows, key)
        repeated = embedding_metrics(torch.repeat_interleave(matrix[seen], counts[seen].long(), dim=0))
        for key in ("iso", "iso_both_signs", "mean_norm_ratio", "isoscore", "effective_rank", "kappa",
                    "centered/iso", "abtt/iso", "abtt/isoscore"):
            assert m[f"freq/{key}"] == pytest.approx(repeated[key], rel=1e-9), (seen_rows, key)

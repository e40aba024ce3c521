"""Metrics of sclatent.tools against brute-force loops and known values."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sclatent.tools import foscttm, foscttm_per_cell, knn_transfer_accuracy, pearson_cellwise, pearson_genewise


def _foscttm_loop(x, y):
    n = len(x)
    d = np.array([[np.linalg.norm(x[i] - y[j]) for j in range(n)] for i in range(n)])
    fx = np.array([sum(d[i, j] < d[i, i] for j in range(n)) / n for i in range(n)])
    fy = np.array([sum(d[j, i] < d[i, i] for j in range(n)) / n for i in range(n)])
    return fx, fy


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_foscttm_matches_brute_force_loop(chunk_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 4))
    y = x + rng.normal(scale=0.8, size=x.shape)
    fx, fy = foscttm_per_cell(x, y, chunk_size=chunk_size)
    ex, ey = _foscttm_loop(x, y)
    np.testing.assert_allclose(fx, ex)
    np.testing.assert_allclose(fy, ey)
    assert foscttm(x, y, chunk_size=chunk_size) == pytest.approx((ex.mean() + ey.mean()) / 2)
    assert not np.allclose(fx, fy)  # the two directions really differ on this data


def test_foscttm_known_values():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 8))
    assert foscttm(z, z) == 0.0
    assert foscttm(z, z + 1e-3) == 0.0  # a tiny shift keeps every true match nearest
    # every cell is the reverse of its match: x_i = i, y_i = n - 1 - i on a line
    line = np.arange(5.0)[:, None]
    fx, fy = foscttm_per_cell(line, line[::-1])
    ex, ey = _foscttm_loop(line, line[::-1])
    np.testing.assert_allclose(fx, ex)
    np.testing.assert_allclose(fy, ey)
    # unrelated embeddings give about 0.5
    assert abs(foscttm(rng.normal(size=(400, 5)), rng.normal(size=(400, 5))) - 0.5) < 0.05


def test_foscttm_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        foscttm(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        foscttm(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2-D"):
        foscttm(np.zeros(3), np.zeros(3))


def test_knn_transfer_accuracy():
    rng = np.random.default_rng(2)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.repeat(["a", "b", "c"], 30)
    ref = centers[np.repeat(np.arange(3), 30)] + rng.normal(size=(90, 2))
    qry = centers[np.repeat(np.arange(3), 30)] + rng.normal(size=(90, 2))
    assert knn_transfer_accuracy(ref, labels, qry, labels, k=5) == 1.0
    assert knn_transfer_accuracy(ref, labels, qry, labels, k=5, chunk_size=7) == 1.0
    wrong = np.roll(labels, 30)
    assert knn_transfer_accuracy(ref, labels, qry, wrong, k=5) == 0.0
    # brute force with k = 1 on random data
    r, q = rng.normal(size=(40, 3)), rng.normal(size=(25, 3))
    lab_r, lab_q = rng.choice(["x", "y"], 40), rng.choice(["x", "y"], 25)
    nearest = np.array([np.argmin([np.linalg.norm(qi - rj) for rj in r]) for qi in q])
    assert knn_transfer_accuracy(r, lab_r, q, lab_q, k=1) == pytest.approx(np.mean(lab_r[nearest] == lab_q))
    # a tie between two labels goes to the closer neighbours
    ref2 = np.array([[1.0], [1.1], [-3.0], [-3.1]])
    assert knn_transfer_accuracy(ref2, ["near", "near", "far", "far"], np.array([[0.0]]), ["near"], k=4) == 1.0


def test_pearson_helpers_against_numpy():
    rng = np.random.default_rng(3)
    obs = rng.poisson(1.0, size=(30, 12)).astype(float)
    obs[:, 3] = 0.0  # a constant feature has no correlation
    pred = obs + rng.normal(size=obs.shape)
    g = pearson_genewise(pred, sp.csr_matrix(obs), chunk_size=5)
    c = pearson_cellwise(pred, obs, chunk_size=4)
    for j in range(obs.shape[1]):
        if j == 3:
            assert np.isnan(g[j])
        else:
            assert g[j] == pytest.approx(np.corrcoef(pred[:, j], obs[:, j])[0, 1])
    for i in range(obs.shape[0]):
        assert c[i] == pytest.approx(np.corrcoef(pred[i], obs[i])[0, 1])
    np.testing.assert_allclose(pearson_genewise(obs + 1.0, obs)[[0, 1, 2]], 1.0)
    with pytest.raises(ValueError, match="same shape"):
        pearson_cellwise(pred[:, :3], obs)

"""Metrics for shared latent spaces and cross-modal imputation.

Everything here takes plain arrays (NumPy or anything ``numpy.asarray`` accepts; the
observed matrices of the Pearson helpers may also be SciPy sparse) and returns NumPy
values. Distances are computed in row chunks, so memory stays ``O(chunk_size * n)``
instead of ``O(n^2)``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import cdist

__all__ = [
    "foscttm",
    "foscttm_per_cell",
    "knn_transfer_accuracy",
    "pearson_cellwise",
    "pearson_genewise",
]

#: Number of float64 distance entries held at once by the chunked computations.
_CHUNK_ENTRIES = 2**24


def _as_2d_float(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (cells x dimensions); got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return arr


def _chunk_rows(n_rows: int, n_cols: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        return int(chunk_size)
    return max(1, min(n_rows, _CHUNK_ENTRIES // max(n_cols, 1)))


def foscttm_per_cell(
    x: np.ndarray, y: np.ndarray, metric: str = "euclidean", chunk_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell FOSCTTM in both directions.

    Row ``i`` of ``x`` and row ``i`` of ``y`` are two views of the same cell (its "true
    match"). For each cell ``i``, the x-direction value is the fraction of cells ``j``
    with ``d(x_i, y_j) < d(x_i, y_i)``; the y-direction value is the fraction of cells
    ``j`` with ``d(x_j, y_i) < d(x_i, y_i)``. This is the definition of scglue's
    ``scglue.metrics.foscttm`` (strict inequality, fractions over all ``n`` cells).

    Parameters
    ----------
    x, y
        ``(n_cells, n_dims)`` embeddings of the same cells in the same order (e.g. the
        RNA-only and the ATAC-only latent).
    metric
        Any metric of :func:`scipy.spatial.distance.cdist`.
    chunk_size
        Rows of ``x`` per distance block; ``None`` picks one that keeps each block near
        16 M entries.

    Returns
    -------
    foscttm_x, foscttm_y
        ``(n_cells,)`` each, values in ``[0, 1)``.
    """
    x = _as_2d_float(x, "x")
    y = _as_2d_float(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (matched cells); got {x.shape} and {y.shape}.")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x and y have no cells.")
    step = _chunk_rows(n, n, chunk_size)
    # The true-match distances, taken from the same cdist computation as the blocks below
    # (cdist computes every pair independently, so the values are bitwise identical).
    diag = np.empty(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        diag[start:stop] = np.diagonal(cdist(x[start:stop], y[start:stop], metric=metric))
    closer_x = np.empty(n)
    closer_y = np.zeros(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = cdist(x[start:stop], y, metric=metric)  # (chunk, n): d(x_i, y_j)
        closer_x[start:stop] = (block < diag[start:stop, None]).sum(1)
        closer_y += (block < diag[None, :]).sum(0)
    return closer_x / n, closer_y / n


def foscttm(x: np.ndarray, y: np.ndarray, metric: str = "euclidean", chunk_size: int | None = None) -> float:
    """Fraction of samples closer than the true match (FOSCTTM), both directions averaged.

    ``0`` means every cell's two views are mutual nearest neighbours; ``0.5`` is what
    unrelated embeddings give. See :func:`foscttm_per_cell` for the definition.

    Parameters
    ----------
    x, y
        ``(n_cells, n_dims)`` embeddings of the same cells in the same order.
    metric
        Any metric of :func:`scipy.spatial.distance.cdist`.
    chunk_size
        Rows per distance block (``None``: automatic).

    Returns
    -------
    float
        ``(mean(foscttm_x) + mean(foscttm_y)) / 2``.

    Examples
    --------
    >>> z = np.random.default_rng(0).normal(size=(100, 5))
    >>> foscttm(z, z)
    0.0
    """
    fx, fy = foscttm_per_cell(x, y, metric, chunk_size)
    return float((fx.mean() + fy.mean()) / 2)


def knn_transfer_accuracy(
    reference: np.ndarray,
    reference_labels,
    query: np.ndarray,
    query_labels,
    k: int = 15,
    metric: str = "euclidean",
    chunk_size: int | None = None,
) -> float:
    """Accuracy of k-nearest-neighbour label transfer from ``reference`` to ``query``.

    Each query cell gets the majority label of its ``k`` nearest reference cells; ties
    go to the label whose tied neighbours have the smallest summed distance. Used for
    cross-modal transfer: fit on the RNA-only latents of labelled cells, predict the
    ATAC-only latents' labels.

    Parameters
    ----------
    reference, reference_labels
        ``(n_ref, n_dims)`` embedding and its ``n_ref`` labels.
    query, query_labels
        ``(n_query, n_dims)`` embedding and its true labels.
    k
        Number of neighbours (capped at ``n_ref``).
    metric
        Any metric of :func:`scipy.spatial.distance.cdist`.
    chunk_size
        Query rows per distance block (``None``: automatic).

    Returns
    -------
    float
        Fraction of query cells whose predicted label equals the true one.
    """
    reference = _as_2d_float(reference, "reference")
    query = _as_2d_float(query, "query")
    ref_labels = np.asarray(reference_labels).astype(str)
    qry_labels = np.asarray(query_labels).astype(str)
    if reference.shape[1] != query.shape[1]:
        raise ValueError(f"reference and query must have the same dimension; got {reference.shape[1]} and {query.shape[1]}.")
    if len(ref_labels) != len(reference) or len(qry_labels) != len(query):
        raise ValueError("Each embedding needs one label per row.")
    if len(reference) == 0 or len(query) == 0:
        raise ValueError("reference and query need at least one cell each.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    k = min(k, len(reference))
    classes, ref_codes = np.unique(ref_labels, return_inverse=True)
    step = _chunk_rows(len(query), len(reference), chunk_size)
    predicted = np.empty(len(query), dtype=np.int64)
    for start in range(0, len(query), step):
        d = cdist(query[start : start + step], reference, metric=metric)
        nn = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else np.tile(np.arange(d.shape[1]), (len(d), 1))
        nn_d = np.take_along_axis(d, nn, 1)
        codes = ref_codes[nn]
        votes = np.zeros((len(d), len(classes)))
        dist_sum = np.zeros((len(d), len(classes)))
        rows = np.repeat(np.arange(len(d)), k)
        np.add.at(votes, (rows, codes.ravel()), 1.0)
        np.add.at(dist_sum, (rows, codes.ravel()), nn_d.ravel())
        # majority vote; among tied labels the smaller summed distance wins
        score = votes - dist_sum / (dist_sum.max() + 1.0) / (k + 1)
        score[votes == 0] = -np.inf
        predicted[start : start + step] = score.argmax(1)
    return float((classes[predicted] == qry_labels).mean())


def _dense(x, name: str) -> np.ndarray:
    arr = x.toarray() if sp.issparse(x) else np.asarray(x)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got shape {arr.shape}.")
    return arr


def _pearson_along(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    num = (a * b).sum(axis)
    den = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den == 0] = np.nan
    return r


def _pearson(predicted, observed, axis: int, chunk_size: int | None) -> np.ndarray:
    if predicted.shape != observed.shape:
        raise ValueError(f"predicted and observed must have the same shape; got {predicted.shape} and {observed.shape}.")
    n_rows, n_cols = predicted.shape
    if axis == 0:  # one value per column: chunk over columns
        step = _chunk_rows(n_cols, n_rows, chunk_size)
        obs = observed.tocsc() if sp.issparse(observed) else observed
        parts = [
            _pearson_along(_dense(predicted[:, s : s + step], "predicted"), _dense(obs[:, s : s + step], "observed"), 0)
            for s in range(0, n_cols, step)
        ]
    else:  # one value per row: chunk over rows
        step = _chunk_rows(n_rows, n_cols, chunk_size)
        obs = observed.tocsr() if sp.issparse(observed) else observed
        parts = [
            _pearson_along(_dense(predicted[s : s + step], "predicted"), _dense(obs[s : s + step], "observed"), 1)
            for s in range(0, n_rows, step)
        ]
    return np.concatenate(parts) if parts else np.zeros(0)


def pearson_genewise(predicted, observed, chunk_size: int | None = None) -> np.ndarray:
    """Pearson correlation of each feature (column) across cells.

    Parameters
    ----------
    predicted
        ``(n_cells, n_features)`` imputed or denoised values (dense).
    observed
        ``(n_cells, n_features)`` observed values (dense or SciPy sparse).
    chunk_size
        Columns per block (``None``: automatic).

    Returns
    -------
    numpy.ndarray
        ``(n_features,)``; ``NaN`` where either column is constant (e.g. a feature never
        observed in these cells). Summarize with :func:`numpy.nanmean`.
    """
    if hasattr(predicted, "to_numpy"):
        predicted = predicted.to_numpy()
    return _pearson(predicted, observed, 0, chunk_size)


def pearson_cellwise(predicted, observed, chunk_size: int | None = None) -> np.ndarray:
    """Pearson correlation of each cell (row) across features.

    Parameters
    ----------
    predicted
        ``(n_cells, n_features)`` imputed or denoised values (dense).
    observed
        ``(n_cells, n_features)`` observed values (dense or SciPy sparse).
    chunk_size
        Rows per block (``None``: automatic).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)``; ``NaN`` where either row is constant.
    """
    if hasattr(predicted, "to_numpy"):
        predicted = predicted.to_numpy()
    return _pearson(predicted, observed, 1, chunk_size)

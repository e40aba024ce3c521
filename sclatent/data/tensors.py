"""A dataset's cells as tensors, and batch extraction by index.

Counts come from one of two sources behind the same ``rows(idx)`` interface:
:class:`ModalityMatrix` (in memory, CSR tensors on the training device) and
:class:`BackedMatrix` (a matrix of an ``.h5ad``/``.h5mu`` file opened with ``backed="r"``,
read in contiguous spans per batch). The per-cell constants (library sizes, log-factorials,
covariate codes, modality masks) are always in memory.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln

from ..batch import BatchRows, CellBatch, Covariates


def index_dtype(max_value: int) -> np.dtype:
    """int32 when every value fits (half the memory of int64), else int64."""
    return np.dtype(np.int32) if max_value < np.iinfo(np.int32).max else np.dtype(np.int64)


def _gather_rows(starts: torch.Tensor, lengths: torch.Tensor, n_features: int, col: torch.Tensor, val: torch.Tensor, dense: bool = True):
    """Rows given by ``(starts, lengths)`` into ``col``/``val`` as dense (``None`` unless
    ``dense``) + COO (rows in order)."""
    n = len(starts)
    device = val.device
    row = torch.repeat_interleave(torch.arange(n, device=device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(len(row), device=device) + torch.repeat_interleave(starts - first, lengths)
    c, v = col[pos].long(), val[pos]
    if not dense:
        return None, (row, c, v)
    out = torch.zeros(n * n_features, device=device, dtype=val.dtype)
    out.index_copy_(0, row * n_features + c, v)  # flat copy: faster than 2-D index_put
    return out.view(n, n_features), (row, c, v)

__all__ = ["BackedMatrix", "CellTensors", "ModalityMatrix", "index_dtype"]

class ModalityMatrix:
    """Counts of one modality stored as CSR tensors, with a vectorized row gather.

    CSR keeps 100k-peak matrices small, and it hands every batch the coordinates of its
    nonzero counts for free, which the sparse likelihood path needs
    (:meth:`~sclatent.distributions.CountLikelihood.sum_log_prob_sparse`).

    Parameters
    ----------
    matrix
        ``numpy`` array or ``scipy.sparse`` matrix of counts (read only, never modified).
    """

    def __init__(self, matrix):
        self.shape = tuple(matrix.shape)
        csr = sp.csr_matrix(matrix, dtype=np.float32, copy=True)  # always a copy: the clean-up below works in place
        csr = csr.copy() if csr is matrix else csr
        csr.eliminate_zeros()
        csr.sum_duplicates()  # canonical form: duplicates summed (as toarray() and the row totals do), indices sorted
        # int32 wherever the values fit: half the memory of int64 (indices are widened per batch)
        self.crow = torch.as_tensor(csr.indptr.astype(index_dtype(csr.nnz)))
        self.col = torch.as_tensor(csr.indices.astype(index_dtype(csr.shape[1])))
        self.val = torch.as_tensor(csr.data.astype(np.float32))
        # per-cell sum of lgamma(x + 1): the data-only constant of the count likelihoods, once
        log_fact = sp.csr_matrix((gammaln(csr.data.astype(np.float64) + 1.0), csr.indices, csr.indptr), shape=csr.shape)
        self.log_factorial = torch.as_tensor(np.asarray(log_fact.sum(axis=1)).ravel().astype(np.float32))

    @classmethod
    def _from_parts(cls, shape, crow, col, val, log_factorial) -> ModalityMatrix:
        obj = cls.__new__(cls)
        obj.shape, obj.crow, obj.col, obj.val, obj.log_factorial = shape, crow, col, val, log_factorial
        return obj

    def to(self, device: torch.device | str) -> ModalityMatrix:
        """A copy on ``device``."""
        return ModalityMatrix._from_parts(
            self.shape, self.crow.to(device), self.col.to(device), self.val.to(device), self.log_factorial.to(device)
        )

    def rows(self, idx: torch.Tensor, dense: bool = True) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows ``idx`` as a dense ``(len(idx), n_features)`` float32 tensor and as COO.

        Returns
        -------
        dense, (rows, cols, values)
            The dense block (``None`` when ``dense=False``: 100k-peak batches are 100 MB), and
            its nonzero entries with ``rows`` indexing into ``idx``.
        """
        idx = idx.to(self.val.device)
        starts = self.crow[idx].long()
        lengths = self.crow[idx + 1].long() - starts
        return _gather_rows(starts, lengths, self.shape[1], self.col, self.val, dense)


class BackedMatrix:
    """Counts of one modality read from an HDF5 matrix on disk, a batch at a time.

    The matrix is an AnnData-encoded CSR group (``indptr``, ``indices``, ``data``; the
    ``indptr`` is held in memory, 8 bytes per cell) or a dense 2-D dataset. A batch's
    cells are sorted and read in spans of neighbouring rows (rows closer than ``gap`` are
    read together), so blocks of contiguous cells (:class:`~sclatent.data.IndexBatches`
    with ``block_size > 1``) cost a few sequential reads per batch. Reads go straight to
    ``h5py``: about 5x faster than anndata's ``CSRDataset`` row indexing for 16
    blocks of 16 cells (``benchmarks/RESULTS.md``).

    Parameters
    ----------
    source
        ``h5py.Group`` (CSR) or ``h5py.Dataset`` (dense).
    n_features
        Width of the result (the model's features).
    log_factorial
        ``(n_cells,)`` per-cell ``sum lgamma(x + 1)`` in the dataset's cell order (from the
        chunked pass that read the per-cell constants).
    row_of_cell
        Dataset cell -> row of ``source`` (-1: the cell does not have this modality);
        ``None``: the identity.
    column_map
        Column of ``source`` -> model feature (-1: dropped); ``None``: the identity.
    gap
        Rows at most this far apart are read in one span.
    """

    def __init__(
        self,
        source,
        n_features: int,
        log_factorial: torch.Tensor,
        row_of_cell: np.ndarray | None = None,
        column_map: np.ndarray | None = None,
        gap: int = 64,
    ):
        self.source = source
        self.dense_source = not hasattr(source, "keys")
        if not self.dense_source:
            self.indptr = np.asarray(source["indptr"][:], dtype=np.int64)
            self._indices, self._data = source["indices"], source["data"]
        self.shape = (len(log_factorial), int(n_features))
        self.log_factorial = log_factorial
        self.row_of_cell = row_of_cell
        self.column_map = None if column_map is None else torch.as_tensor(np.asarray(column_map, dtype=np.int64))
        self.gap = int(gap)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> BackedMatrix:
        """A reader whose batches are put on ``device`` (the data stay on disk)."""
        other = BackedMatrix.__new__(BackedMatrix)
        other.__dict__.update(self.__dict__)
        other.device = torch.device(device)
        other.log_factorial = self.log_factorial.to(device)
        return other

    def _spans(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """``[(first, last + 1)]`` covering the sorted ``rows``, bridging gaps <= ``gap``."""
        breaks = np.flatnonzero(np.diff(rows) > self.gap)
        firsts = np.concatenate([rows[:1], rows[breaks + 1]])
        lasts = np.concatenate([rows[breaks], rows[-1:]])
        return list(zip(firsts.tolist(), (lasts + 1).tolist()))

    def rows(self, idx: torch.Tensor, dense: bool = True) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Cells ``idx`` as a dense ``(len(idx), n_features)`` float32 tensor (unless
        ``dense=False``) and as COO (see :meth:`ModalityMatrix.rows`), read from disk and put
        on the reader's device."""
        cells = idx.detach().cpu().numpy()
        local = cells if self.row_of_cell is None else self.row_of_cell[cells]
        have = np.flatnonzero(local >= 0)
        wanted = np.unique(local[have])
        if self.dense_source:
            block = np.zeros((len(wanted), self.source.shape[1]), dtype=np.float32)
            offset = 0
            for a, b in self._spans(wanted):
                part = self.source[a:b]
                take = wanted[(wanted >= a) & (wanted < b)] - a
                block[offset : offset + len(take)] = part[take]
                offset += len(take)
            sub = sp.csr_matrix(block)
            starts_w, lengths_w = sub.indptr[:-1].astype(np.int64), np.diff(sub.indptr).astype(np.int64)
            col, val = torch.as_tensor(sub.indices.astype(np.int64)), torch.as_tensor(sub.data.astype(np.float32))
        else:
            cols, vals, starts_w = [], [], np.zeros(len(wanted), dtype=np.int64)
            offset, w = 0, 0
            for a, b in self._spans(wanted):
                lo, hi = int(self.indptr[a]), int(self.indptr[b])
                cols.append(np.asarray(self._indices[lo:hi], dtype=np.int64))
                vals.append(np.asarray(self._data[lo:hi], dtype=np.float32))
                k = int(np.searchsorted(wanted, b))
                starts_w[w:k] = offset + self.indptr[wanted[w:k]] - lo
                offset += hi - lo
                w = k
            lengths_w = self.indptr[wanted + 1] - self.indptr[wanted]
            col = torch.as_tensor(np.concatenate(cols) if cols else np.zeros(0, np.int64))
            val = torch.as_tensor(np.concatenate(vals) if vals else np.zeros(0, np.float32))
        # every requested cell in the order asked (cells without the modality: empty rows)
        where = np.searchsorted(wanted, local[have])
        starts, lengths = np.zeros(len(cells), dtype=np.int64), np.zeros(len(cells), dtype=np.int64)
        starts[have], lengths[have] = starts_w[where], lengths_w[where]
        if self.column_map is not None:
            mapped = self.column_map[col]
            keep = mapped >= 0
            if not bool(keep.all()):  # dropped columns: re-pack the entries
                counts_per_entry = torch.cumsum(keep.long(), 0)
                ends = torch.as_tensor(starts + lengths)
                before = torch.where(torch.as_tensor(starts) > 0, counts_per_entry[(torch.as_tensor(starts) - 1).clamp_min(0)], 0)
                new_starts = before
                new_lengths = torch.where(torch.as_tensor(lengths) > 0, counts_per_entry[(ends - 1).clamp_min(0)] - before, 0)
                starts, lengths = new_starts.numpy(), new_lengths.numpy()
                col, val = mapped[keep], val[keep]
            else:
                col = mapped
        block, coo = _gather_rows(torch.as_tensor(starts), torch.as_tensor(lengths), self.shape[1], col, val, dense)
        device = self.device
        if device.type == "cpu":
            return block, coo
        block = None if block is None else block.to(device, non_blocking=True)
        return block, tuple(t.to(device, non_blocking=True) for t in coo)


@dataclass
class CellTensors:
    """All cells of a dataset: counts per modality (in memory or on disk) and per-cell tensors.

    Parameters
    ----------
    counts
        Modality name -> :class:`ModalityMatrix` or :class:`BackedMatrix`, in model order.
    observed
        ``(n, M)`` float 0/1.
    log_library
        ``(n, M)`` float.
    covariates
        Per-cell covariates, by name.
    """

    counts: dict[str, ModalityMatrix | BackedMatrix]
    observed: torch.Tensor
    log_library: torch.Tensor
    covariates: Covariates

    def __post_init__(self):
        # which cells have which modality, on the host: batches learn their rows from it
        # without asking the device (see BatchRows)
        self.observed_host = self.observed.detach().cpu() != 0

    @property
    def n_cells(self) -> int:
        return self.observed.shape[0]

    @property
    def device(self) -> torch.device:
        return self.observed.device

    @property
    def backed(self) -> bool:
        """Whether some counts are read from disk (:class:`BackedMatrix`)."""
        return any(isinstance(v, BackedMatrix) for v in self.counts.values())

    def to(self, device: torch.device | str) -> CellTensors:
        """A copy of every tensor on ``device`` (no-op when already there); on-disk counts
        stay on disk and deliver their batches there."""
        device = torch.device(device)
        if device == self.device:
            return self
        return CellTensors(
            {k: v.to(device) for k, v in self.counts.items()},
            self.observed.to(device),
            self.log_library.to(device),
            self.covariates.to(device),
        )

    def batch(self, idx: torch.Tensor, dense: Collection[str] | None = None) -> CellBatch:
        """The cells ``idx`` as a :class:`CellBatch` on this dataset's device.

        ``idx`` may be on the host (as the training plan keeps it) or on the device; from a
        host ``idx`` the batch is built without any host-device synchronization. Every
        modality comes as COO nonzeros; those in ``dense`` (``None``: all) also as a dense
        block, the others with ``counts[name] = None`` (the model says which it needs:
        :attr:`~sclatent.module.SCLatentModule.dense_count_modalities`).
        """
        host = idx.cpu() if idx.device.type != "cpu" else idx
        rows_of = BatchRows.from_observed(self.observed_host[host], tuple(self.counts), self.device)
        idx = idx.to(self.device, non_blocking=True)
        rows = {
            k: v.rows(host if isinstance(v, BackedMatrix) else idx, dense=dense is None or k in dense)
            for k, v in self.counts.items()
        }
        return CellBatch(
            counts={k: r[0] for k, r in rows.items()},
            nonzero={k: r[1] for k, r in rows.items()},
            log_factorial={k: v.log_factorial.index_select(0, idx) for k, v in self.counts.items()},
            observed=self.observed.index_select(0, idx),
            log_library=self.log_library.index_select(0, idx),
            covariates=self.covariates.index(idx),
            rows=rows_of,
        )

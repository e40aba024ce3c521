"""Whole-dataset tensors that live on the training device, and batch extraction by index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln

from ..batch import CellBatch, Covariates

__all__ = ["CellTensors", "ModalityMatrix"]

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
        self.crow = torch.as_tensor(csr.indptr.astype(np.int64))
        self.col = torch.as_tensor(csr.indices.astype(np.int64))
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

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows ``idx`` as a dense ``(len(idx), n_features)`` float32 tensor and as COO.

        Returns
        -------
        dense, (rows, cols, values)
            The dense block, and its nonzero entries with ``rows`` indexing into ``idx``.
        """
        starts = self.crow[idx]
        lengths = self.crow[idx + 1] - starts
        row = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(len(row), device=idx.device) + torch.repeat_interleave(starts - first, lengths)
        col, val = self.col[pos], self.val[pos]
        out = torch.zeros(len(idx) * self.shape[1], device=self.val.device)
        out.index_copy_(0, row * self.shape[1] + col, val)  # flat copy: faster than 2-D index_put
        return out.view(len(idx), self.shape[1]), (row, col, val)


@dataclass
class CellTensors:
    """All cells of a dataset as tensors.

    Parameters
    ----------
    counts
        Modality name -> :class:`ModalityMatrix`, in model order.
    observed
        ``(n, M)`` float 0/1.
    log_library
        ``(n, M)`` float.
    covariates
        Per-cell covariates, by name.
    """

    counts: dict[str, ModalityMatrix]
    observed: torch.Tensor
    log_library: torch.Tensor
    covariates: Covariates

    @property
    def n_cells(self) -> int:
        return self.observed.shape[0]

    @property
    def device(self) -> torch.device:
        return self.observed.device

    def to(self, device: torch.device | str) -> CellTensors:
        """A copy of every tensor on ``device`` (no-op when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return CellTensors(
            {k: v.to(device) for k, v in self.counts.items()},
            self.observed.to(device),
            self.log_library.to(device),
            self.covariates.to(device),
        )

    def batch(self, idx: torch.Tensor) -> CellBatch:
        """The cells ``idx`` (an index tensor on the same device) as a dense :class:`CellBatch`."""
        rows = {k: v.rows(idx) for k, v in self.counts.items()}
        return CellBatch(
            counts={k: r[0] for k, r in rows.items()},
            nonzero={k: r[1] for k, r in rows.items()},
            log_factorial={k: v.log_factorial.index_select(0, idx) for k, v in self.counts.items()},
            observed=self.observed.index_select(0, idx),
            log_library=self.log_library.index_select(0, idx),
            covariates=self.covariates.index(idx),
        )

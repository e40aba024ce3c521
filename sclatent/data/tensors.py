"""Whole-dataset tensors that live on the training device, and batch extraction by index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..module import CellBatch
from ..nn import Covariates

__all__ = ["CellTensors", "ModalityMatrix", "DENSE_LIMIT_BYTES"]

#: Matrices smaller than this (as float32) are stored dense on the device, larger ones as CSR.
DENSE_LIMIT_BYTES = 512 * 2**20


class ModalityMatrix:
    """Counts of one modality, dense or CSR, with a vectorized ``rows(idx) -> dense`` gather.

    Parameters
    ----------
    matrix
        ``numpy`` array or ``scipy.sparse`` matrix of counts (read only, never modified).
    dense_limit_bytes
        Store dense when ``n_cells * n_features * 4`` is at most this.
    """

    def __init__(self, matrix, dense_limit_bytes: int = DENSE_LIMIT_BYTES):
        n, g = matrix.shape
        self.shape = (n, g)
        self.dense: torch.Tensor | None = None
        if n * g * 4 <= dense_limit_bytes:
            arr = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
            self.dense = torch.as_tensor(np.asarray(arr, dtype=np.float32)).clone()
        else:
            csr = sp.csr_matrix(matrix)  # copies when the input is CSC/dense; never edits in place
            self.crow = torch.as_tensor(csr.indptr.astype(np.int64))
            self.col = torch.as_tensor(csr.indices.astype(np.int64))
            self.val = torch.as_tensor(csr.data.astype(np.float32))

    @classmethod
    def _from_parts(cls, shape, dense=None, crow=None, col=None, val=None) -> ModalityMatrix:
        obj = cls.__new__(cls)
        obj.shape, obj.dense = shape, dense
        if dense is None:
            obj.crow, obj.col, obj.val = crow, col, val
        return obj

    def to(self, device: torch.device | str) -> ModalityMatrix:
        """A copy on ``device``."""
        if self.dense is not None:
            return ModalityMatrix._from_parts(self.shape, dense=self.dense.to(device))
        return ModalityMatrix._from_parts(self.shape, crow=self.crow.to(device), col=self.col.to(device), val=self.val.to(device))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense ``(len(idx), n_features)`` float32 rows ``idx``."""
        if self.dense is not None:
            return self.dense.index_select(0, idx)
        starts = self.crow[idx]
        lengths = self.crow[idx + 1] - starts
        out = torch.zeros(len(idx), self.shape[1], device=self.val.device)
        total = int(lengths.sum())
        if total == 0:
            return out
        row = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(total, device=idx.device) - torch.repeat_interleave(first - starts, lengths)
        out[row, self.col[pos]] = self.val[pos]
        return out


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
        Per-cell covariates.
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
            Covariates(self.covariates.categorical.to(device), self.covariates.continuous.to(device)),
        )

    def batch(self, idx: torch.Tensor) -> CellBatch:
        """The cells ``idx`` (an index tensor on the same device) as a dense :class:`CellBatch`."""
        return CellBatch(
            counts={k: v.rows(idx) for k, v in self.counts.items()},
            observed=self.observed.index_select(0, idx),
            log_library=self.log_library.index_select(0, idx),
            covariates=self.covariates.index(idx),
        )

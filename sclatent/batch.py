"""The tensors a batch of cells is made of: covariates by name, counts, masks.

These types are shared by the data layer (which builds them) and the torch modules
(which read them); they depend on torch alone, so neither layer imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["CellBatch", "Covariates"]


@dataclass(frozen=True)
class Covariates:
    """Per-cell covariates as tensors, addressed by their ``obs`` column name.

    Parameters
    ----------
    categorical
        Column name -> integer codes, ``(n_cells,)`` (or ``(k, n_cells)`` broadcast over
        ``k`` latent samples). Order is the registry's and is kept.
    continuous
        ``(n_cells, n_continuous)`` float values, columns in ``continuous_names`` order.
    continuous_names
        Names of the continuous columns.
    """

    categorical: Mapping[str, torch.Tensor]
    continuous: torch.Tensor
    continuous_names: tuple[str, ...] = ()

    @classmethod
    def empty(cls, n_cells: int, device: torch.device | str | None = None) -> Covariates:
        """No covariates, for ``n_cells`` cells."""
        return cls({}, torch.zeros(n_cells, 0, device=device), ())

    def __post_init__(self):
        if self.continuous.shape[-1] != len(self.continuous_names):
            raise ValueError(
                f"continuous has {self.continuous.shape[-1]} column(s) but {len(self.continuous_names)} name(s) were given."
            )

    def code(self, name: str) -> torch.Tensor:
        """Codes of the categorical covariate ``name``; ``KeyError`` lists the known ones."""
        try:
            return self.categorical[name]
        except KeyError:
            raise KeyError(f"No categorical covariate {name!r}; this batch has {list(self.categorical)}.") from None

    def index(self, idx: torch.Tensor) -> Covariates:
        """Rows ``idx`` of every covariate."""
        return Covariates({k: v[idx] for k, v in self.categorical.items()}, self.continuous[idx], self.continuous_names)

    def expand(self, k: int) -> Covariates:
        """The covariates broadcast over a leading sample axis of size ``k`` (no copy)."""
        return Covariates(
            {n: v.expand(k, *v.shape) for n, v in self.categorical.items()},
            self.continuous.expand(k, *self.continuous.shape),
            self.continuous_names,
        )

    def replace(self, name: str, code: int) -> Covariates:
        """A copy in which every cell has category ``code`` of covariate ``name`` (e.g. a
        counterfactual batch); the other covariates are shared, not copied."""
        self.code(name)
        categorical = dict(self.categorical)
        categorical[name] = torch.full_like(categorical[name], code)
        return Covariates(categorical, self.continuous, self.continuous_names)

    def to(self, device: torch.device | str) -> Covariates:
        """The covariates on ``device``."""
        return Covariates({k: v.to(device) for k, v in self.categorical.items()}, self.continuous.to(device), self.continuous_names)


@dataclass
class CellBatch:
    """A batch of cells as tensors on one device.

    Parameters
    ----------
    counts
        Modality name -> ``(n, n_features)`` raw counts (zeros where not observed).
    observed
        ``(n, n_modalities)`` 0/1 float: which modalities each cell has.
    log_library
        ``(n, n_modalities)`` log of the size factor of each modality (0 where not observed).
    covariates
        Categorical codes and continuous values, by name.
    nonzero
        Optional modality name -> ``(rows, cols, values)`` COO of the nonzero counts;
        when present the likelihood is computed from them (same value, much cheaper).
    log_factorial
        Optional modality name -> ``(n,)`` per-cell ``sum_g lgamma(x_g + 1)`` (precomputed
        once per dataset; used with ``nonzero``).
    """

    counts: dict[str, torch.Tensor]
    observed: torch.Tensor
    log_library: torch.Tensor
    covariates: Covariates
    nonzero: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    log_factorial: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> CellBatch:
        """The batch on ``device`` (itself when already there)."""
        device = torch.device(device)
        if self.observed.device == device:
            return self
        return CellBatch(
            {k: v.to(device) for k, v in self.counts.items()},
            self.observed.to(device),
            self.log_library.to(device),
            self.covariates.to(device),
            {k: tuple(t.to(device) for t in v) for k, v in self.nonzero.items()},
            {k: v.to(device) for k, v in self.log_factorial.items()},
        )

    @property
    def n_cells(self) -> int:
        """Number of cells in the batch."""
        return self.observed.shape[0]

    def subset(self, rows: torch.Tensor, modalities: tuple[str, ...] | None = None) -> CellBatch:
        """The cells ``rows`` (ascending, distinct), keeping the counts of ``modalities`` only.

        The nonzero entries are re-indexed to the new rows and stay in row order.
        """
        keep = tuple(self.counts) if modalities is None else modalities
        new_index = torch.full((self.n_cells,), -1, dtype=torch.long, device=rows.device)
        new_index[rows] = torch.arange(len(rows), device=rows.device)
        nonzero = {}
        for name in keep:
            if name in self.nonzero:
                r, c, v = self.nonzero[name]
                r = new_index[r]
                inside = (r >= 0).nonzero().squeeze(1)
                nonzero[name] = (r[inside], c[inside], v[inside])
        return CellBatch(
            {k: self.counts[k].index_select(0, rows) for k in keep},
            self.observed.index_select(0, rows),
            self.log_library.index_select(0, rows),
            self.covariates.index(rows),
            nonzero,
            {k: self.log_factorial[k].index_select(0, rows) for k in keep if k in self.log_factorial},
        )

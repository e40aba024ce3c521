"""The tensors a batch of cells is made of: covariates by name, counts, masks.

These types are shared by the data layer (which builds them) and the torch modules
(which read them); they depend on torch alone, so neither layer imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["BatchRows", "CellBatch", "Covariates"]


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


@dataclass(frozen=True)
class BatchRows:
    """Which rows of a batch have which modalities, as index tensors on the batch's device.

    Built on the host from the cells' observed modalities when the batch is made
    (:meth:`from_observed`), so the model decodes only the cells that have a modality
    without asking the device which ones they are: no host synchronization in the training
    step. Every modality's entry is there even when no cell of the batch has it (an empty
    index tensor): decoding zero cells still puts every decoder in the graph, which
    distributed training needs.

    Parameters
    ----------
    present
        Modality name -> ascending rows that have it, or ``None`` when every row has it.
    paired
        Ascending rows with two or more modalities, or ``None`` when every row has.
    single
        Ascending rows with exactly one modality.
    single_modality
        For each row of ``single``, the position of its modality (model order).
    n_single_modalities
        How many distinct modalities the ``single`` rows have.
    absent
        Modality name -> ascending rows that lack it (empty when every row has it).
    """

    present: Mapping[str, torch.Tensor | None]
    paired: torch.Tensor | None
    single: torch.Tensor
    single_modality: torch.Tensor
    n_single_modalities: int
    absent: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_observed(cls, observed: torch.Tensor, names: tuple[str, ...], device: torch.device | str | None = None) -> BatchRows:
        """The rows of a batch from its ``(n, M)`` observed mask (on any device; read on the host)."""
        seen = observed.detach().to("cpu") != 0
        n = seen.shape[0]
        arange = torch.arange(n)

        def rows(mask: torch.Tensor) -> torch.Tensor | None:
            return None if bool(mask.all()) and n else arange[mask].to(device, non_blocking=True)

        k = seen.sum(1)
        single = k == 1
        single_modality = seen[single].to(torch.long).argmax(1)
        return cls(
            {name: rows(seen[:, j]) for j, name in enumerate(names)},
            rows(k > 1),
            arange[single].to(device, non_blocking=True),
            single_modality.to(device, non_blocking=True),
            int(single_modality.unique().numel()),
            {name: arange[~seen[:, j]].to(device, non_blocking=True) for j, name in enumerate(names)},
        )

    def to(self, device: torch.device | str) -> BatchRows:
        """The same rows on ``device``."""

        def move(t):
            return None if t is None else t.to(device)

        return BatchRows(
            {k: move(v) for k, v in self.present.items()}, move(self.paired), self.single.to(device),
            self.single_modality.to(device), self.n_single_modalities, {k: v.to(device) for k, v in self.absent.items()},
        )


@dataclass
class CellBatch:
    """A batch of cells as tensors on one device.

    Parameters
    ----------
    counts
        Modality name -> ``(n, n_features)`` raw counts (zeros where not observed), or
        ``None`` for a modality given by its ``nonzero`` entries only.
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
    rows
        Optional :class:`BatchRows` computed on the host when the batch was built;
        :meth:`batch_rows` computes it (with a device synchronization) when absent.
    """

    counts: dict[str, torch.Tensor | None]
    observed: torch.Tensor
    log_library: torch.Tensor
    covariates: Covariates
    nonzero: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    log_factorial: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: BatchRows | None = None

    def batch_rows(self, names: tuple[str, ...]) -> BatchRows:
        """Which rows have which of the modalities ``names`` (the columns of ``observed``, in
        order): kept from when the batch was built, or computed now."""
        if self.rows is None:
            self.rows = BatchRows.from_observed(self.observed, tuple(names), self.observed.device)
        return self.rows

    def to(self, device: torch.device | str) -> CellBatch:
        """The batch on ``device`` (itself when already there)."""
        device = torch.device(device)
        if self.observed.device == device:
            return self
        return CellBatch(
            {k: None if v is None else v.to(device) for k, v in self.counts.items()},
            self.observed.to(device),
            self.log_library.to(device),
            self.covariates.to(device),
            {k: tuple(t.to(device) for t in v) for k, v in self.nonzero.items()},
            {k: v.to(device) for k, v in self.log_factorial.items()},
            None if self.rows is None else self.rows.to(device),
        )

    @property
    def n_cells(self) -> int:
        """Number of cells in the batch."""
        return self.observed.shape[0]

    def subset(self, rows: torch.Tensor, modalities: tuple[str, ...] | None = None, complete: bool = False) -> CellBatch:
        """The cells ``rows`` (ascending, distinct), keeping the counts of ``modalities`` only.

        The nonzero entries are re-indexed to the new rows and stay in row order. With
        ``complete=True`` the caller promises that every nonzero entry of the kept
        modalities lies in ``rows`` (e.g. ``rows`` are the cells that have the modality),
        which skips the filtering and its device synchronization.
        """
        keep = tuple(self.counts) if modalities is None else modalities
        new_index = torch.full((self.n_cells,), -1, dtype=torch.long, device=rows.device)
        new_index[rows] = torch.arange(len(rows), device=rows.device)
        nonzero = {}
        for name in keep:
            if name in self.nonzero:
                r, c, v = self.nonzero[name]
                r = new_index[r]
                if complete:
                    nonzero[name] = (r, c, v)
                else:
                    inside = (r >= 0).nonzero().squeeze(1)
                    nonzero[name] = (r[inside], c[inside], v[inside])
        return CellBatch(
            {k: None if self.counts[k] is None else self.counts[k].index_select(0, rows) for k in keep},
            self.observed.index_select(0, rows),
            self.log_library.index_select(0, rows),
            self.covariates.index(rows),
            nonzero,
            {k: self.log_factorial[k].index_select(0, rows) for k in keep if k in self.log_factorial},
        )

"""Inference diagnostics: amortization gap and posterior collapse (pure tensor/pandas helpers).

Nothing here reads AnnData; :class:`~sclatent.SCLatent` calls these helpers from
:meth:`~sclatent.SCLatent.get_amortization_gap` and :meth:`~sclatent.SCLatent.latent_diagnostics`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..inference import GaussianPosterior

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "AmortizationGap",
    "LatentDiagnostics",
    "elbo_with_noise",
    "gap_summary",
    "latent_summary",
]

#: A latent dimension is *active* when its KL to the prior, averaged over cells, exceeds this (nats).
ACTIVE_UNIT_THRESHOLD = 0.01


class AmortizationGap(NamedTuple):
    """Result of :meth:`~sclatent.SCLatent.get_amortization_gap`; unpacks as ``per_cell, summary``.

    Attributes
    ----------
    per_cell
        DataFrame indexed by ``obs_names`` with ``elbo_amortized``, ``elbo_refined`` and
        ``gap = elbo_refined - elbo_amortized`` (nats per cell).
    summary
        Series: ``mean_gap``, ``median_gap``, ``mean_elbo_amortized``,
        ``mean_elbo_refined``, ``frac_cells_improved``, ``n_cells``, ``refine_steps``,
        ``refine_lr``, ``n_samples``, ``refine_seconds`` and ``ms_per_1000_cells``
        (wall time of the refinement alone).
    """

    per_cell: pd.DataFrame
    summary: pd.Series


class LatentDiagnostics(NamedTuple):
    """Result of :meth:`~sclatent.SCLatent.latent_diagnostics`; unpacks as ``per_dimension, n_active, kl``.

    Attributes
    ----------
    per_dimension
        DataFrame indexed by latent dimension (``z0``, ``z1``, ...) with ``kl`` (mean over
        cells of ``KL(q(z_d | x) || N(0, 1))``, nats), ``active`` (``kl`` above the
        threshold) and ``mean_variance`` (variance over cells of the posterior mean, the
        activity statistic of Burda et al. 2016).
    n_active
        Number of active dimensions.
    kl
        Mean over cells of the total KL, equal to ``per_dimension["kl"].sum()``.
    """

    per_dimension: pd.DataFrame
    n_active: int
    kl: float


@torch.no_grad()
def elbo_with_noise(
    module, batch, q: GaussianPosterior, observed: torch.Tensor, eps: torch.Tensor, max_elements: int = 2**24
) -> torch.Tensor:
    """Per-cell ELBO of ``q`` averaged over the given standard-normal noise ``eps``.

    ``z_k = mean + eps_k * std`` for ``eps`` of shape ``(k, n, d)``: passing the same
    ``eps`` for two posteriors gives common random numbers, so their difference has far
    less Monte-Carlo noise than two independent estimates. The reconstruction is
    ``module.log_likelihood`` (the term the model trains and :meth:`get_elbo` reports);
    samples are decoded in chunks of at most ``max_elements`` cell-feature entries.
    """
    n = q.mean.shape[0]
    n_features = sum(m.n_features for m in module.modalities)
    chunk = max(1, max_elements // max(1, n * n_features))
    std = (0.5 * q.logvar).exp()
    rec = torch.zeros(n, dtype=q.mean.dtype, device=q.mean.device)
    for start in range(0, eps.shape[0], chunk):
        z = q.mean + eps[start : start + chunk] * std
        rec = rec + module.log_likelihood(z, batch, observed).sum(0)
    return rec / eps.shape[0] - q.kl_to_standard().sum(-1)


def gap_summary(
    per_cell: pd.DataFrame, refine_steps: int, refine_lr: float, n_samples: int, refine_seconds: float
) -> pd.Series:
    """Summary row of a per-cell gap table (see :class:`AmortizationGap`)."""
    n = len(per_cell)
    return pd.Series(
        {
            "mean_gap": float(per_cell["gap"].mean()),
            "median_gap": float(per_cell["gap"].median()),
            "mean_elbo_amortized": float(per_cell["elbo_amortized"].mean()),
            "mean_elbo_refined": float(per_cell["elbo_refined"].mean()),
            "frac_cells_improved": float((per_cell["gap"] > 0).mean()),
            "n_cells": n,
            "refine_steps": refine_steps,
            "refine_lr": refine_lr,
            "n_samples": n_samples,
            "refine_seconds": refine_seconds,
            "ms_per_1000_cells": 1e6 * refine_seconds / max(n, 1),
        },
        name="amortization_gap",
        dtype=float,
    )


def latent_summary(kl: np.ndarray, means: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> LatentDiagnostics:
    """Posterior-collapse diagnostics from per-cell, per-dimension KLs and posterior means, both ``(n, d)``."""
    kl_dim = kl.astype(np.float64).mean(0)
    frame = pd.DataFrame(
        {
            "kl": kl_dim,
            "active": kl_dim > threshold,
            "mean_variance": means.astype(np.float64).var(0),
        },
        index=pd.Index([f"z{d}" for d in range(kl.shape[1])], name="dimension"),
    )
    return LatentDiagnostics(frame, int(frame["active"].sum()), float(kl.astype(np.float64).sum(1).mean()))

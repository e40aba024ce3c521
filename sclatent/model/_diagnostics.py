"""Inference diagnostics: amortization gap and posterior collapse.

:class:`DiagnosticMethods` (mixed into :class:`~sclatent.SCLatent`) holds
:meth:`~DiagnosticMethods.get_amortization_gap` and :meth:`~DiagnosticMethods.latent_diagnostics`;
the helpers below it are pure tensor/pandas code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..config import InferenceConfig
from ..inference import GaussianPosterior

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "AmortizationGap",
    "DiagnosticMethods",
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


class DiagnosticMethods:
    """Inference diagnostics of :class:`~sclatent.SCLatent` (uses the plumbing of
    :class:`~sclatent.model._outputs.OutputMethods`)."""

    def get_amortization_gap(
        self,
        adata=None,
        modality: str | Sequence[str] | None = None,
        **options,
    ) -> AmortizationGap:
        """Per-cell amortization gap: how much ELBO the encoder leaves on the table.

        For every cell, the encoder's (product-of-experts) posterior ``q_enc`` is refined
        by ``refine_steps`` Adam steps on that cell's ELBO with all weights frozen (the
        same refinement as ``refine_steps=`` of :meth:`get_latent_representation`), and
        both posteriors are scored:

        - ``elbo_amortized``: ``E_q_enc[log p(x | z)] - KL(q_enc || p(z))``, the bound that
          amortized inference achieves (what :meth:`get_elbo` reports);
        - ``elbo_refined``: the same for the refined posterior ``q_K``;
        - ``gap = elbo_refined - elbo_amortized`` (nats per cell).

        ``log p(x) - elbo_amortized`` (the *inference gap*, Cremer et al. 2018) splits into
        the *approximation gap* ``log p(x) - max_q ELBO(q)`` (the limit of a diagonal
        Gaussian, which no encoder can remove) and the *amortization gap*
        ``max_q ELBO(q) - elbo_amortized`` (the price of one shared encoder, which
        refinement removes). ``gap`` estimates the latter from below: it converges to it
        as ``refine_steps`` grows (compare a few values), and it is not negative apart
        from Monte-Carlo noise. For the whole inference gap, compare with
        :meth:`get_marginal_ll` (its ``refine_steps`` gives a tighter ``log p(x)``).

        Both ELBOs are estimated with the same ``n_samples`` standard-normal draws per cell
        (common random numbers, ``z = mean + eps * std``), so noise largely cancels in
        the gap. The evaluation draws come from their own generator (seeded with
        ``seed + 1``), so ``elbo_amortized`` is the same whatever ``refine_steps`` is, and
        the refinement noise is that of ``get_latent_representation(refine_steps=...,
        seed=seed)`` with the same ``batch_size``; results are deterministic for a
        given ``seed``.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data); use held-out cells to
            measure generalization of the encoder.
        modality
            ``None`` uses the fused posterior and the ELBO of all observed modalities; a
            name (e.g. ``"rna"``) uses only that expert (with the prior) and that
            modality's likelihood, i.e. the gap of the RNA-only view of each cell. Every
            cell must have the modality.
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`), with these
            defaults here: ``refine_steps=100`` (close to convergence for typical models),
            ``n_samples=16`` (Monte-Carlo samples per cell for evaluating each ELBO),
            ``batch_size=256`` (cells refined together), ``refine_lr``, ``seed`` (of the
            refinement and evaluation noise).

        Returns
        -------
        AmortizationGap
            A named tuple ``(per_cell, summary)``: ``per_cell`` is a DataFrame indexed by
            ``obs_names`` with ``elbo_amortized``, ``elbo_refined`` and ``gap``;
            ``summary`` a Series with ``mean_gap``, ``median_gap``, ``mean_elbo_amortized``,
            ``mean_elbo_refined``, ``frac_cells_improved``, ``n_cells``, the settings, and
            ``refine_seconds`` / ``ms_per_1000_cells`` (refinement wall time).

        Examples
        --------
        >>> per_cell, summary = model.get_amortization_gap(test_adata, refine_steps=100)
        >>> adata.obs["amortization_gap"] = per_cell["gap"]
        """
        opts = InferenceConfig.of(options, "get_amortization_gap", refine_steps=100, n_samples=16, batch_size=256)
        tensors, obs_names = self._tensors_for(adata)
        use = self._modality_mask(modality)
        gen = self._generator(opts.seed)  # refinement noise, as in get_latent_representation
        eval_gen = self._generator(opts.seed + 1)  # evaluation noise, independent of K
        amortized, refined, seconds = [], [], 0.0
        for batch in self._batches(tensors, opts.batch_size):
            q, observed = self._posterior(batch, use, replace(opts, refine_steps=0), gen)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            q_refined = self.module.refine(batch, q, opts.refine_steps, opts.refine_lr, observed, gen)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds += time.perf_counter() - t0
            eps = torch.randn((opts.n_samples, *q.mean.shape), generator=eval_gen, device=self.device, dtype=q.mean.dtype)
            amortized.append(elbo_with_noise(self.module, batch, q, observed, eps).cpu())
            refined.append(elbo_with_noise(self.module, batch, q_refined, observed, eps).cpu())
        e0, e1 = torch.cat(amortized).double().numpy(), torch.cat(refined).double().numpy()
        per_cell = pd.DataFrame({"elbo_amortized": e0, "elbo_refined": e1, "gap": e1 - e0}, index=obs_names)
        return AmortizationGap(per_cell, gap_summary(per_cell, opts.refine_steps, opts.refine_lr, opts.n_samples, seconds))

    def latent_diagnostics(
        self,
        adata=None,
        modality: str | Sequence[str] | None = None,
        threshold: float = ACTIVE_UNIT_THRESHOLD,
        **options,
    ) -> LatentDiagnostics:
        """Posterior-collapse diagnostics: KL to the prior per latent dimension and active units.

        A dimension ``d`` whose posterior equals the prior for every cell
        (``KL(q(z_d | x) || N(0, 1)) = 0``) carries no information about the cell: it has
        *collapsed*. This reports, per dimension, the KL averaged over cells (closed form,
        nats) and counts the *active units*, those with mean KL above ``threshold``.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        modality
            ``None`` uses the fused posterior; a name uses that expert only (e.g. to see
            which dimensions the ATAC encoder uses).
        threshold
            Mean KL (nats) above which a dimension counts as active.
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`); with
            ``refine_steps`` the refined posterior is diagnosed instead of the encoder's.

        Returns
        -------
        LatentDiagnostics
            A named tuple ``(per_dimension, n_active, kl)``: ``per_dimension`` is a
            DataFrame indexed ``z0, z1, ...`` with ``kl`` (mean over cells), ``active``
            (``kl > threshold``) and ``mean_variance`` (variance over cells of the
            posterior mean, Burda et al.'s activity statistic); ``n_active`` is the
            number of active dimensions; ``kl`` the mean total KL per cell, which equals
            ``per_dimension["kl"].sum()``.
        """
        opts = InferenceConfig.of(options, "latent_diagnostics")
        tensors, _ = self._tensors_for(adata)
        use = self._modality_mask(modality)
        gen = self._generator(opts.seed)
        kls, means = [], []
        for batch in self._batches(tensors, opts.batch_size):
            q, _ = self._posterior(batch, use, opts, gen)
            kls.append(q.kl_to_standard().cpu())
            means.append(q.mean.cpu())
        return latent_summary(torch.cat(kls).numpy(), torch.cat(means).numpy(), threshold)

"""Inference diagnostics: amortization gap, inference-gap decomposition, posterior collapse.

:class:`DiagnosticMethods` (mixed into :class:`~sclatent.SCLatent`) holds
:meth:`~DiagnosticMethods.get_amortization_gap`, :meth:`~DiagnosticMethods.get_inference_gap`
and :meth:`~DiagnosticMethods.latent_diagnostics`; the helpers below it are pure
tensor/pandas code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..batch import CellBatch
from ..config import InferenceConfig
from ..inference import importance_log_weights, importance_ratios, log_mean_exp, mean_stderr
from ..module import Posterior

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "AmortizationGap",
    "DiagnosticMethods",
    "INFERENCE_GAP_TERMS",
    "InferenceGap",
    "LatentDiagnostics",
    "RefinedBatch",
    "elbo_with_noise",
    "gap_summary",
    "inference_gap_columns",
    "inference_gap_summary",
    "latent_summary",
    "log_likelihood_draws",
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


#: The estimates of :meth:`~sclatent.SCLatent.get_inference_gap`, each a column with a ``_se`` partner.
INFERENCE_GAP_TERMS = (
    "log_px", "elbo_refined", "elbo_amortized", "approximation_gap", "amortization_gap", "inference_gap",
)


class InferenceGap(NamedTuple):
    """Result of :meth:`~sclatent.SCLatent.get_inference_gap`; unpacks as ``per_cell, summary``.

    Attributes
    ----------
    per_cell
        DataFrame indexed by ``obs_names`` with, for each term ``t`` of
        :data:`INFERENCE_GAP_TERMS` (``log_px``, ``elbo_refined``, ``elbo_amortized``,
        ``approximation_gap``, ``amortization_gap``, ``inference_gap``), the column ``t``
        (nats per cell) followed by ``t_se``, its Monte-Carlo standard error.
    summary
        Series: ``mean_t`` and ``mean_t_se`` (Monte-Carlo standard error of the mean over
        cells) for each term, ``max_log_px_se``, ``frac_cells_ordered``, ``n_cells``,
        ``refine_steps``, ``refine_lr``, ``n_samples``, ``refine_seconds``,
        ``ms_per_1000_cells`` (refinement alone) and ``seconds`` (the whole call).
    """

    per_cell: pd.DataFrame
    summary: pd.Series


class RefinedBatch(NamedTuple):
    """One batch of cells with the encoder's and the refined posterior, as both gap methods score them."""

    batch: CellBatch
    observed: torch.Tensor
    amortized: Posterior
    refined: Posterior
    eps: torch.Tensor  # (n_samples, n, d) evaluation noise, shared by both posteriors
    refine_seconds: float


class LatentDiagnostics(NamedTuple):
    """Result of :meth:`~sclatent.SCLatent.latent_diagnostics`; unpacks as ``per_dimension, n_active, kl``.

    Attributes
    ----------
    per_dimension
        DataFrame indexed by latent dimension (``z0``, ``z1``, ...) with ``kl`` (mean over
        cells of ``KL(q(z_d | x) || N(0, 1))``, nats; for ``posterior="flow"`` that of each
        marginal's moment-matched Gaussian, from 64 draws), ``active`` (``kl`` above the
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
def log_likelihood_draws(
    module, batch, q: Posterior, observed: torch.Tensor, eps: torch.Tensor, max_elements: int = 2**24
) -> torch.Tensor:
    """``log p(x | z_k)`` per draw and cell, ``(k, n)``, for ``z_k = q.from_noise(eps_k)``
    (``mean + eps_k * std`` for the diagonal posterior, then the flow for a flow).

    ``eps`` is standard-normal noise of shape ``(k, n, d)``: passing the same ``eps`` for
    two posteriors gives common random numbers. The likelihood is ``module.log_likelihood``
    of the ``observed`` modalities (the term the model trains and :meth:`get_elbo`
    reports); samples are decoded in chunks of at most ``max_elements`` cell-feature entries.
    """
    n = q.mean.shape[0]
    n_features = sum(m.n_features for m in module.modalities)
    chunk = max(1, max_elements // max(1, n * n_features))
    return torch.cat(
        [module.log_likelihood(q.from_noise(eps[start : start + chunk]), batch, observed) for start in range(0, eps.shape[0], chunk)]
    )


@torch.no_grad()
def elbo_with_noise(
    module, batch, q: Posterior, observed: torch.Tensor, eps: torch.Tensor, max_elements: int = 2**24
) -> torch.Tensor:
    """Per-cell ELBO of ``q`` averaged over the given standard-normal noise ``eps``.

    ``z_k = q.from_noise(eps_k)`` for ``eps`` of shape ``(k, n, d)``: passing the same
    ``eps`` for two posteriors gives common random numbers, so their difference has far
    less Monte-Carlo noise than two independent estimates. The reconstruction is the mean of
    :func:`log_likelihood_draws`, the KL the closed form (diagonal) or its estimate on the
    same draws (flow).
    """
    return (log_likelihood_draws(module, batch, q, observed, eps, max_elements) - q.kl_estimate(q.from_noise(eps))).mean(0)


def inference_gap_columns(
    rec_amortized: torch.Tensor, rec_refined: torch.Tensor, log_weights: torch.Tensor,
    kl_amortized: torch.Tensor, kl_refined: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-cell columns of :class:`InferenceGap` from one batch's per-draw values.

    ``rec_amortized`` / ``rec_refined`` are ``log p(x | z_k)`` ``(k, n)`` of the two
    posteriors on the same noise, ``log_weights`` the importance log weights of the refined
    draws, ``kl_*`` the KL terms per draw ``(k, n)`` (constant over draws in closed form). Every estimate is a mean over the same
    ``k`` draws of a per-draw term (for ``log_px``, to first order, the self-normalized ratio
    :func:`~sclatent.inference.importance_ratios`), so the standard error of each estimate,
    and of each difference of two, is :func:`~sclatent.inference.mean_stderr` of its
    per-draw terms: common noise cancels in the gaps. Computed in float64.
    """
    rec_amortized, rec_refined, log_weights = rec_amortized.double(), rec_refined.double(), log_weights.double()
    ratios = importance_ratios(log_weights)
    log_px = log_mean_exp(log_weights)
    refined_draws = rec_refined - kl_refined.double()  # per-draw ELBO terms
    amortized_draws = rec_amortized - kl_amortized.double()
    elbo_refined, elbo_amortized = refined_draws.mean(0), amortized_draws.mean(0)
    terms = {  # estimate and its per-draw terms
        "log_px": (log_px, ratios),
        "elbo_refined": (elbo_refined, refined_draws),
        "elbo_amortized": (elbo_amortized, amortized_draws),
        "approximation_gap": (log_px - elbo_refined, ratios - refined_draws),
        "amortization_gap": (elbo_refined - elbo_amortized, refined_draws - amortized_draws),
        "inference_gap": (log_px - elbo_amortized, ratios - amortized_draws),
    }
    columns = {}
    for name in INFERENCE_GAP_TERMS:
        value, draws = terms[name]
        columns[name], columns[f"{name}_se"] = value, mean_stderr(draws)
    return columns


def _settings(n_cells: int, refine_steps: int, refine_lr: float, n_samples: int, refine_seconds: float) -> dict[str, float]:
    """The summary fields that say how a gap was measured and what the refinement cost."""
    return {
        "n_cells": n_cells,
        "refine_steps": refine_steps,
        "refine_lr": refine_lr,
        "n_samples": n_samples,
        "refine_seconds": refine_seconds,
        "ms_per_1000_cells": 1e6 * refine_seconds / max(n_cells, 1),
    }


def gap_summary(
    per_cell: pd.DataFrame, refine_steps: int, refine_lr: float, n_samples: int, refine_seconds: float
) -> pd.Series:
    """Summary row of a per-cell gap table (see :class:`AmortizationGap`)."""
    return pd.Series(
        {
            "mean_gap": float(per_cell["gap"].mean()),
            "median_gap": float(per_cell["gap"].median()),
            "mean_elbo_amortized": float(per_cell["elbo_amortized"].mean()),
            "mean_elbo_refined": float(per_cell["elbo_refined"].mean()),
            "frac_cells_improved": float((per_cell["gap"] > 0).mean()),
            **_settings(len(per_cell), refine_steps, refine_lr, n_samples, refine_seconds),
        },
        name="amortization_gap",
        dtype=float,
    )


def inference_gap_summary(
    per_cell: pd.DataFrame, refine_steps: int, refine_lr: float, n_samples: int, refine_seconds: float, seconds: float
) -> pd.Series:
    """Summary row of a per-cell inference-gap table (see :class:`InferenceGap`).

    Cells are estimated independently, so the Monte-Carlo standard error of a mean over
    cells is ``sqrt(sum_i se_i^2) / n``; it says nothing of the cell-to-cell spread.
    """
    n = max(len(per_cell), 1)
    fields = {}
    for name in INFERENCE_GAP_TERMS:
        fields[f"mean_{name}"] = float(per_cell[name].mean())
        fields[f"mean_{name}_se"] = float(np.sqrt((per_cell[f"{name}_se"] ** 2).sum()) / n)
    ordered = (per_cell["log_px"] >= per_cell["elbo_refined"]) & (per_cell["elbo_refined"] >= per_cell["elbo_amortized"])
    return pd.Series(
        {
            **fields,
            "max_log_px_se": float(per_cell["log_px_se"].max()),
            "frac_cells_ordered": float(ordered.mean()),
            **_settings(len(per_cell), refine_steps, refine_lr, n_samples, refine_seconds),
            "seconds": seconds,
        },
        name="inference_gap",
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

    def _refined_batches(
        self, adata, modality: str | Sequence[str] | None, opts: InferenceConfig
    ) -> tuple[pd.Index, Iterator[RefinedBatch]]:
        """``(obs_names, batches)``: each batch of cells with the encoder's posterior, the
        posterior refined by ``opts.refine_steps`` steps and ``opts.n_samples`` draws of
        evaluation noise. The refinement noise comes from ``seed`` (as in
        ``get_latent_representation(refine_steps=..., seed=seed)``), the evaluation noise
        from its own generator (``seed + 1``), so it does not depend on the refinement."""
        tensors, obs_names = self._tensors_for(adata)
        use = self._modality_mask(modality)

        def batches() -> Iterator[RefinedBatch]:
            gen = self._generator(opts.seed)
            eval_gen = self._generator(opts.seed + 1)
            for batch in self._batches(tensors, opts.batch_size):
                q, observed = self._posterior(batch, use, replace(opts, refine_steps=0), gen)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                q_refined = self.module.refine(batch, q, opts.refine_steps, opts.refine_lr, observed, gen, method=opts.refine_method)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - t0
                eps = torch.randn((opts.n_samples, *q.mean.shape), generator=eval_gen, device=self.device, dtype=q.mean.dtype)
                yield RefinedBatch(batch, observed, q, q_refined, eps, seconds)

        return obs_names, batches()

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
        obs_names, batches = self._refined_batches(adata, modality, opts)
        amortized, refined, seconds = [], [], 0.0
        for b in batches:
            amortized.append(elbo_with_noise(self.module, b.batch, b.amortized, b.observed, b.eps).cpu())
            refined.append(elbo_with_noise(self.module, b.batch, b.refined, b.observed, b.eps).cpu())
            seconds += b.refine_seconds
        e0, e1 = torch.cat(amortized).double().numpy(), torch.cat(refined).double().numpy()
        per_cell = pd.DataFrame({"elbo_amortized": e0, "elbo_refined": e1, "gap": e1 - e0}, index=obs_names)
        return AmortizationGap(per_cell, gap_summary(per_cell, opts.refine_steps, opts.refine_lr, opts.n_samples, seconds))

    def get_inference_gap(
        self,
        adata=None,
        modality: str | Sequence[str] | None = None,
        **options,
    ) -> InferenceGap:
        """Per-cell decomposition of the inference gap into approximation and amortization gaps.

        The *inference gap* ``log p(x) - ELBO(q_enc)`` of the encoder's posterior ``q_enc``
        splits into two parts (Cremer, Li and Duvenaud 2018):

        - the *approximation gap* ``log p(x) - ELBO(q*) = KL(q* || p(z | x))``, where
          ``q*`` is the best diagonal Gaussian for the cell: the limit of the variational
          family, which no encoder can remove;
        - the *amortization gap* ``ELBO(q*) - ELBO(q_enc)``: the price of one shared
          encoder for all cells, which per-cell optimization removes.

        Theory orders the three terms ``log p(x) >= ELBO(q*) >= ELBO(q_enc)``. ``q*`` is
        found per cell by refining ``q_enc`` with ``refine_steps`` Adam steps on that
        cell's ELBO, weights frozen (the monotone refinement of
        :meth:`get_amortization_gap` and :meth:`get_latent_representation`); a finite
        number of steps reaches ``q*`` from below, so ``amortization_gap`` is a lower and
        ``approximation_gap`` an upper estimate of the true parts (their sum does not
        depend on ``q*``). :meth:`get_amortization_gap` is the cheaper half (no ``log p(x)``).

        ``log p(x)`` is the importance-sampled estimate
        ``log (1/K) sum_k p(x | z_k) p(z_k) / q*(z_k)`` with ``z_k ~ q*`` (the estimator of
        :meth:`get_marginal_ll` with the refined posterior as proposal, ``K = n_samples``).
        Its Monte-Carlo standard error comes from the delta method on the importance
        weights, ``sqrt((K sum_k w~_k^2 - 1) / (K - 1))`` for self-normalized weights
        ``w~``; it is reliable when the weights are not dominated by a few draws, i.e.
        when the error is small. The estimate is biased low by about ``se^2 / 2``
        (Jensen), so it stays a lower bound of ``log p(x)`` in expectation.

        All three terms are estimated on the same ``n_samples`` standard-normal draws per
        cell (common random numbers: ``z = mean + eps * std`` for both posteriors, and the
        importance samples are the refined posterior's draws), the ELBOs with the
        closed-form KL, as :meth:`get_amortization_gap` does: with the same options its
        ``elbo_amortized`` and ``elbo_refined`` are these columns. Each ``_se`` column is the
        standard error over the draws of that estimate, and for a gap of the paired
        difference, in which the common noise cancels. The noise is that of
        :meth:`get_amortization_gap`: refinement from ``seed``, evaluation from
        ``seed + 1``; results are deterministic for a given ``seed``.

        Parameters
        ----------
        adata, modality
            As in :meth:`get_amortization_gap` (held-out cells measure how the encoder
            generalizes); with a modality name, ``log_px`` is that view's marginal
            likelihood, e.g. ``log p(x_rna)``.
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`), with these
            defaults here: ``refine_steps=200`` (steps to ``q*``; near convergence for
            typical models, compare a larger value), ``n_samples=1000`` (draws per cell
            shared by the three estimates; at least 2), ``batch_size=256`` (cells refined
            together), ``refine_lr``, ``seed``.

        Returns
        -------
        InferenceGap
            A named tuple ``(per_cell, summary)``. ``per_cell`` is a DataFrame indexed by
            ``obs_names``, nats per cell, each column followed by its Monte-Carlo standard
            error ``<column>_se``:

            - ``log_px``: importance-sampled ``log p(x)``, refined proposal;
            - ``elbo_refined``: ``ELBO(q*)``, the refined posterior's ELBO;
            - ``elbo_amortized``: ``ELBO(q_enc)``, the encoder's (what :meth:`get_elbo` reports);
            - ``approximation_gap = log_px - elbo_refined``;
            - ``amortization_gap = elbo_refined - elbo_amortized``;
            - ``inference_gap = log_px - elbo_amortized``, the sum of the two.

            ``summary`` is a Series with ``mean_<column>`` and ``mean_<column>_se`` (the
            Monte-Carlo standard error of that mean over cells, ``sqrt(sum se^2) / n``) for
            each of the six, ``max_log_px_se``, ``frac_cells_ordered`` (cells with
            ``log_px >= elbo_refined >= elbo_amortized`` as estimated), ``n_cells``, the
            settings, ``refine_seconds`` / ``ms_per_1000_cells`` (refinement wall time) and
            ``seconds`` (the whole call).

        Raises
        ------
        ValueError
            For ``n_samples < 2`` (no standard error), an option out of range, an unknown
            modality or cells without it.
        TypeError
            For a keyword that is not an inference option.

        Examples
        --------
        >>> per_cell, summary = model.get_inference_gap(test_adata)
        >>> summary[["mean_approximation_gap", "mean_amortization_gap", "mean_log_px_se"]]
        """
        t_start = time.perf_counter()
        opts = InferenceConfig.of(options, "get_inference_gap", refine_steps=200, n_samples=1000, batch_size=256)
        if opts.n_samples < 2:
            raise ValueError(f"get_inference_gap needs n_samples >= 2 for its Monte-Carlo standard errors, got {opts.n_samples}.")
        obs_names, batches = self._refined_batches(adata, modality, opts)
        parts, seconds = [], 0.0
        for b in batches:
            rec_amortized = log_likelihood_draws(self.module, b.batch, b.amortized, b.observed, b.eps)
            rec_refined = log_likelihood_draws(self.module, b.batch, b.refined, b.observed, b.eps)
            with torch.no_grad():
                z_refined = b.refined.from_noise(b.eps)
                log_weights = importance_log_weights(rec_refined, z_refined, b.refined)
                kls = (b.amortized.kl_estimate(b.amortized.from_noise(b.eps)), b.refined.kl_estimate(z_refined))
                columns = inference_gap_columns(rec_amortized, rec_refined, log_weights, *kls)
            parts.append({name: value.cpu() for name, value in columns.items()})
            seconds += b.refine_seconds
        per_cell = pd.DataFrame({name: torch.cat([p[name] for p in parts]).numpy() for name in parts[0]}, index=obs_names)
        summary = inference_gap_summary(
            per_cell, opts.refine_steps, opts.refine_lr, opts.n_samples, seconds, time.perf_counter() - t_start
        )
        return InferenceGap(per_cell, summary)

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
            with torch.no_grad():
                kls.append(q.marginal_kl_to_standard(gen).cpu())
                means.append(q.location.cpu())
        return latent_summary(torch.cat(kls).numpy(), torch.cat(means).numpy(), threshold)

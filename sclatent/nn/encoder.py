"""Amortized Gaussian encoder: one per modality."""

from __future__ import annotations

import torch
from torch import nn

from .mlp import CovariateMLP, Covariates

__all__ = ["GaussianEncoder"]


class GaussianEncoder(nn.Module):
    """Map an input to the mean and log-variance of a diagonal Gaussian ``q(z | x)``.

    Parameters
    ----------
    n_in
        Input width (number of features of the modality).
    n_latent
        Latent dimension.
    n_hidden, n_layers, dropout_rate
        Size of the hidden network, see :class:`~sclatent.nn.CovariateMLP`.
    n_cats_per_cov, n_continuous
        Covariates the encoder sees (empty/0 for an encoder that ignores them).
    """

    def __init__(
        self,
        n_in: int,
        n_latent: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cats_per_cov: tuple[int, ...] = (),
        n_continuous: int = 0,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        self.body = CovariateMLP(
            n_in, n_hidden, n_layers, n_cats_per_cov, n_continuous, inject_covariates=False, dropout_rate=dropout_rate
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)

    def forward(self, x: torch.Tensor, cov: Covariates | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean, logvar)``, each ``(n, n_latent)``; log-variance clamped to [-12, 8]."""
        h = self.body(x, cov)
        return self.mean(h), self.logvar(h).clamp(-12.0, 8.0)

"""Amortized Gaussian encoder: one per modality."""

from __future__ import annotations

from dataclasses import replace

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Covariates
from .mlp import CovariateMLP, SparseRows

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
    categorical, n_continuous
        Covariates the encoder sees (empty/0 for an encoder that ignores them).
    input_dropout
        Dropout on the input features during training (inverted: kept entries are scaled
        by ``1 / (1 - p)``); for sparse inputs it drops nonzero entries.
    """

    def __init__(
        self,
        n_in: int,
        n_latent: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        categorical: Mapping[str, int] | None = None,
        n_continuous: int = 0,
        dropout_rate: float = 0.1,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}.")
        self.input_dropout = input_dropout
        self.body = CovariateMLP(
            n_in, n_hidden, n_layers, categorical, n_continuous, inject_covariates=False, dropout_rate=dropout_rate
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)

    def forward(self, x: torch.Tensor | SparseRows, cov: Covariates | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean, logvar)``, each ``(n, n_latent)``; log-variance clamped to [-12, 8]."""
        if self.input_dropout > 0 and self.training:
            if isinstance(x, SparseRows):
                x = replace(x, values=F.dropout(x.values, self.input_dropout))
            else:
                x = F.dropout(x, self.input_dropout)
        h = self.body(x, cov)
        dtype = self.mean.weight.dtype  # the posterior in full precision, also under autocast
        return self.mean(h).to(dtype), self.logvar(h).to(dtype).clamp(-12.0, 8.0)

"""Decoder from the latent space to feature proportions of one modality."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..batch import Covariates
from .mlp import CovariateMLP

__all__ = ["CountDecoder"]


class CountDecoder(nn.Module):
    """``z, s -> log rho`` with ``rho = softmax(f(z, s))`` over the features.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_out
        Number of features of the modality.
    n_hidden, n_layers, dropout_rate
        Hidden network, see :class:`~sclatent.nn.CovariateMLP`.
    categorical, n_continuous
        Covariates injected at every hidden layer.
    zero_inflation
        Also output per-feature zero-inflation logits (for ``"zinb"``).
    """

    def __init__(
        self,
        n_latent: int,
        n_out: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        categorical: Mapping[str, int] | None = None,
        n_continuous: int = 0,
        dropout_rate: float = 0.0,
        zero_inflation: bool = False,
    ):
        super().__init__()
        self.body = CovariateMLP(
            n_latent, n_hidden, n_layers, categorical, n_continuous, inject_covariates=True, dropout_rate=dropout_rate
        )
        self.logits = nn.Linear(n_hidden, n_out)
        self.zi_logits = nn.Linear(n_hidden, n_out) if zero_inflation else None

    def forward(
        self, z: torch.Tensor, cov: Covariates | None = None, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(log_rho, zi_logits)``; ``log_rho`` is a log-softmax over the last axis
        (with ``normalize=False``: the logits before it, for likelihoods that normalize
        lazily, see :meth:`~sclatent.distributions.Poisson.from_logits`)."""
        h = self.body(z, cov)
        # under autocast (mixed precision) the products run in low precision; the likelihood does not
        log_rho = self.logits(h).to(self.logits.weight.dtype)
        if normalize:
            log_rho = torch.log_softmax(log_rho, dim=-1)
        zi = self.zi_logits(h).to(self.logits.weight.dtype) if self.zi_logits is not None else None
        return log_rho, zi

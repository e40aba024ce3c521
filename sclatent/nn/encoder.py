"""Amortized Gaussian encoder: one per modality."""

from __future__ import annotations

from dataclasses import replace

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Covariates
from .mlp import CovariateMLP, SparseRows

__all__ = ["GaussianEncoder", "StatisticEncoder", "embedding_statistic"]


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
        return self._gaussian(self.body(self._dropped(x), cov))

    def _dropped(self, x: torch.Tensor | SparseRows) -> torch.Tensor | SparseRows:
        """``x`` after the input dropout (in training)."""
        if self.input_dropout > 0 and self.training:
            if isinstance(x, SparseRows):
                return replace(x, values=F.dropout(x.values, self.input_dropout))
            return F.dropout(x, self.input_dropout)
        return x

    def _gaussian(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` from the hidden layer, in full precision (also under autocast)."""
        dtype = self.mean.weight.dtype
        return self.mean(h).to(dtype), self.logvar(h).to(dtype).clamp(-12.0, 8.0)


def embedding_statistic(counts: torch.Tensor | SparseRows, embedding: torch.Tensor) -> torch.Tensor:
    """Per cell ``[t / N, log N]``, ``(n, d + 1)``: ``t = sum_f x_f u_f``, the count-weighted
    sum of its features' ``(n_features, d)`` embeddings ``u``, and ``N = sum_f x_f`` its total
    (at least 1).

    ``counts`` are raw counts, dense ``(n, n_features)`` or as :class:`SparseRows`.
    """
    with_total = torch.cat([embedding, torch.ones_like(embedding[:, :1])], 1)  # the total as one more column
    if isinstance(counts, SparseRows):
        sums = F.embedding_bag(counts.cols, with_total, counts.offsets, mode="sum", per_sample_weights=counts.values.to(embedding.dtype))
    else:
        sums = counts.to(embedding.dtype) @ with_total
    total = sums[:, -1:].clamp(min=1.0)
    return torch.cat([sums[:, :-1] / total, total.log()], 1)


class StatisticEncoder(GaussianEncoder):
    """Gaussian encoder of a modality whose decoder is linear in ``z`` through feature
    embeddings, reading the counts only through the statistic that decoder makes sufficient.

    With ``logits = z U^T + b(s)`` and ``mu = N softmax(logits)`` (a Poisson, i.e.
    multinomial, likelihood; :class:`~sclatent.nn.linked.EmbeddingDecoder` with ``U`` its
    scaled embeddings), ``log p(x | z) = sum_f x_f logits_f - N logsumexp(logits) + const``
    depends on ``x`` only through ``t = x U`` and ``N = sum_f x_f``: the exact posterior is a
    function of ``(t / N, N)``, ``d + 1`` numbers instead of ``n_features``. This encoder is an
    MLP on :func:`embedding_statistic` of the counts under the embeddings it is given, which
    are shared with the decoder (and, through feature links, tied to the other modality's):
    cells of two modalities then reach the latent space through features already aligned.

    Parameters
    ----------
    n_latent
        Latent dimension (= embedding dimension).
    **kwargs
        ``n_hidden``, ``n_layers``, ``categorical``, ``n_continuous``, ``dropout_rate`` and
        ``input_dropout`` of :class:`GaussianEncoder`; the input dropout drops nonzero
        counts (dense: entries) before the statistic is formed.
    """

    def __init__(self, n_latent: int, **kwargs):
        super().__init__(n_latent + 1, n_latent, **kwargs)

    def forward(
        self, x: torch.Tensor | SparseRows, cov: Covariates | None = None, embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` of raw counts ``x`` under the ``(n_features, n_latent)`` embeddings."""
        if embedding is None:
            raise ValueError("a StatisticEncoder reads its counts through feature embeddings: pass embedding=.")
        return self._gaussian(self.body(embedding_statistic(self._dropped(x), embedding), cov))

"""Feature embeddings shared across two modalities through prior links, and their decoders.

With peak-gene links, GLUE's idea: every feature has an embedding in the latent space and
a modality's decoder is linear in it, ``logit_f(z) = scale_f * <z, v_f> + bias_f(s)``.
A gene's embedding is free; a peak's is the link-weighted mean of its genes' embeddings
plus a residual of its own (pulled towards zero). A cell state ``z`` that makes gene
``g`` expressed therefore makes the peaks linked to ``g`` accessible, whichever modality
the cell was measured in, which is what lets RNA-only and ATAC-only cells land in the same
place with no paired cell.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import Covariates
from .mlp import CategoryEmbedding

__all__ = ["EmbeddingDecoder", "LinkedFeatureEmbeddings"]


class LinkedFeatureEmbeddings(nn.Module):
    """Latent-space embeddings of a source modality's features (genes) and a target's (peaks).

    ``v_source`` is a free ``(n_source, d)`` parameter; ``v_target = residual + L v_source``
    with ``L`` the ``(n_target, n_source)`` link weights, each linked target feature's row
    normalized to sum 1 (unlinked target features have only their residual).

    Parameters
    ----------
    n_latent
        Embedding (= latent) dimension.
    n_source, n_target
        Numbers of source and target features.
    links
        ``(2, nnz)`` long tensor of (source, target) index pairs.
    weights
        ``(nnz,)`` non-negative weights of the pairs.
    """

    def __init__(self, n_latent: int, n_source: int, n_target: int, links: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        links = torch.as_tensor(links, dtype=torch.long)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if links.dim() != 2 or links.shape[0] != 2 or links.shape[1] != weights.shape[0]:
            raise ValueError(f"links must be (2, nnz) index pairs with one weight each; got {tuple(links.shape)} and {tuple(weights.shape)}.")
        if links.numel() and (links[0].max() >= n_source or links[1].max() >= n_target or links.min() < 0):
            raise ValueError("links index features outside the modalities' feature counts.")
        if (weights < 0).any() or not torch.isfinite(weights).all():
            raise ValueError("link weights must be finite and non-negative.")
        keep = weights > 0
        links, weights = links[:, keep], weights[keep]
        per_target = torch.zeros(n_target).index_add_(0, links[1], weights)
        self.register_buffer("link_source", links[0].contiguous())
        self.register_buffer("link_target", links[1].contiguous())
        self.register_buffer("link_weight", weights / per_target[links[1]])
        self.register_buffer("linked", per_target > 0)
        self.source = nn.Parameter(torch.randn(n_source, n_latent) * n_latent**-0.5)
        self.residual = nn.Parameter(torch.zeros(n_target, n_latent))
        with torch.no_grad():  # unlinked target features start like the source ones
            self.residual[~self.linked] = torch.randn(int((~self.linked).sum()), n_latent) * n_latent**-0.5
        self.n_source, self.n_target = n_source, n_target

    @property
    def n_links(self) -> int:
        """Number of (source, target) pairs with a positive weight."""
        return int(self.link_weight.numel())

    def target(self) -> torch.Tensor:
        """``(n_target, d)`` target embeddings: residual plus the link-weighted source embeddings."""
        gathered = self.source.index_select(0, self.link_source) * self.link_weight[:, None]
        return self.residual.index_add(0, self.link_target, gathered)

    def forward(self, role: str) -> torch.Tensor:
        """The embeddings of ``"source"`` or ``"target"`` features."""
        if role == "source":
            return self.source
        if role == "target":
            return self.target()
        raise ValueError(f"role must be 'source' or 'target', got {role!r}.")

    def residual_penalty(self) -> torch.Tensor:
        """Mean squared norm of the linked target features' residuals (their departure from the links)."""
        n_linked = self.linked.sum()
        # a masked sum, not an indexed copy (whose backward scatters into a zero tensor of the residuals' size)
        return (self.residual.square().sum(-1) * self.linked).sum() / n_linked.clamp(min=1)


class EmbeddingDecoder(nn.Module):
    """``z, s -> log rho`` with ``rho = softmax(scale * z V^T + bias + bias_s)`` (linear in ``z``).

    The feature embeddings ``V`` are not this module's: they are passed to :meth:`forward`
    (the owner of the shared :class:`LinkedFeatureEmbeddings` computes them).

    Parameters
    ----------
    n_latent, n_out
        Latent dimension and number of features.
    categorical, n_continuous
        Covariates: a per-feature bias for each category, a per-feature slope per continuous one.
    zero_inflation
        Also output zero-inflation logits, linear in ``z`` too (for ``"zinb"``).
    """

    def __init__(
        self,
        n_latent: int,
        n_out: int,
        categorical: Mapping[str, int] | None = None,
        n_continuous: int = 0,
        zero_inflation: bool = False,
    ):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.covariate_names = tuple(categorical or {})
        self.covariate_bias = nn.ModuleList(CategoryEmbedding(n, n_out) for n in (categorical or {}).values())
        for emb in self.covariate_bias:
            nn.init.zeros_(emb.weight)
        if n_continuous:
            self.continuous = nn.Parameter(torch.zeros(n_continuous, n_out))
        else:  # an empty buffer, not a parameter: DDP needs every parameter to get a gradient
            self.register_buffer("continuous", torch.zeros(0, n_out))
        self.zi_logits = nn.Linear(n_latent, n_out) if zero_inflation else None

    def scaled(self, embedding: torch.Tensor) -> torch.Tensor:
        """``U = scale * V``, ``(n_out, d)``: the logits are ``z U^T`` plus the biases."""
        return embedding * self.log_scale.exp()[:, None]

    def forward(
        self, z: torch.Tensor, cov: Covariates | None, embedding: torch.Tensor, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(log_rho, zi_logits)`` given the ``(n_out, d)`` feature embeddings; ``log_rho``
        is a log-softmax over the last axis (the logits before it with ``normalize=False``)."""
        # the scale goes into the (n_out, d) embeddings and the biases into one offset, gathered
        # per cell from (categories, n_out) tables that already hold the shared bias; the product
        # accumulates onto it (addmm): one pass over the cells x features logits, forward and backward
        u = self.scaled(embedding)
        offset = self.bias
        if cov is not None:
            for i, (name, emb) in enumerate(zip(self.covariate_names, self.covariate_bias)):
                table = emb.table + self.bias if i == 0 else emb.table
                rows = F.embedding(cov.code(name), table)
                offset = rows if i == 0 else offset + rows
            if self.continuous.shape[0]:
                offset = offset + cov.continuous @ self.continuous
        if z.dim() == 2 and not torch.is_autocast_enabled(z.device.type):
            logits = torch.addmm(offset, z, u.t())
        else:  # samples axis, or autocast (the product in low precision, the logits in full precision)
            logits = (z @ u.t()).to(self.bias.dtype) + offset
        zi = self.zi_logits(z).to(self.bias.dtype) if self.zi_logits is not None else None
        return (torch.log_softmax(logits, dim=-1) if normalize else logits), zi

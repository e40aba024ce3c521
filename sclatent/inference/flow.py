"""Flow posteriors: a diagonal Gaussian pushed through invertible affine coupling layers.

``z_0 ~ N(mean, exp(logvar))`` (the product of experts' fused Gaussian), then
``z = f_K(... f_1(z_0))`` with RealNVP-style affine couplings (Dinh et al. 2017): each
layer keeps half of the latent dimensions fixed and scales and shifts the other half by
functions of the fixed half and of a per-cell *context*, the base Gaussian's parameters
``(mean, logvar)``. The density is exact,
``log q(z) = log N(z_0 | mean, exp(logvar)) - sum_k log |det J_k|``, and each layer
inverts in closed form, so ``log q`` of any point is one inverse pass.

The flow sits after the fusion, not on each expert: the product of Gaussian experts
stays closed-form, and every subset of modalities (one expert, both, the prior alone)
gets the same flow, conditioned on its own fused Gaussian. Its last layers start at zero,
so an untrained flow is the identity and the posterior starts as the diagonal one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .gaussian import GaussianPosterior, gaussian_kl_to_standard, standard_normal_log_prob

__all__ = ["AffineCoupling", "CouplingFlow", "FlowPosterior"]

#: bound on each layer's log-scale (a soft ``tanh`` clamp), so no layer can blow up a draw
LOG_SCALE_BOUND = 3.0


class AffineCoupling(nn.Module):
    """One affine coupling layer: ``z_free * exp(s) + t`` with ``(s, t) = net(z_fixed, context)``.

    Parameters
    ----------
    fixed
        ``(d,)`` boolean mask of the dimensions this layer leaves unchanged (and reads).
    n_context
        Width of the per-cell context.
    n_hidden
        Width of the hidden layer of ``net``.
    """

    def __init__(self, fixed: torch.Tensor, n_context: int, n_hidden: int = 64):
        super().__init__()
        d = fixed.numel()
        self.register_buffer("fixed", fixed.to(torch.get_default_dtype()))
        self.net = nn.Sequential(nn.Linear(d + n_context, n_hidden), nn.SiLU(), nn.Linear(n_hidden, 2 * d))
        nn.init.zeros_(self.net[-1].weight)  # the identity at initialization
        nn.init.zeros_(self.net[-1].bias)

    def _log_scale_shift(self, z_fixed: torch.Tensor, context: torch.Tensor, frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([z_fixed, context], -1)
        if frozen:  # the same function, its weights cut from the graph
            raw_scale, shift = functional_call(self.net, {k: v.detach() for k, v in self.net.named_parameters()}, (x,)).chunk(2, -1)
        else:
            raw_scale, shift = self.net(x).chunk(2, -1)
        free = 1.0 - self.fixed
        log_scale = LOG_SCALE_BOUND * torch.tanh(raw_scale / LOG_SCALE_BOUND)
        return log_scale * free, shift * free

    def forward(self, z: torch.Tensor, context: torch.Tensor, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(z), log |det df/dz|)``: ``(..., d)`` and ``(...)``; ``frozen``: no gradient
        reaches the layer's weights (it still flows through ``z`` and ``context``)."""
        log_scale, shift = self._log_scale_shift(z * self.fixed, context, frozen)
        return z * log_scale.exp() + shift, log_scale.sum(-1)

    def inverse(self, y: torch.Tensor, context: torch.Tensor, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f^-1(y), log |det df/dz|)`` at ``z = f^-1(y)``: the fixed half of ``y`` is that of ``z``."""
        log_scale, shift = self._log_scale_shift(y * self.fixed, context, frozen)
        return (y - shift) * (-log_scale).exp(), log_scale.sum(-1)


class CouplingFlow(nn.Module):
    """``n_flows`` affine couplings over ``n_latent`` dimensions, conditioned on ``(mean, logvar)``.

    Successive layers alternate which dimensions they fix (even/odd positions, then the
    first/second half), so that after a few layers every dimension has been moved as a
    function of every other.

    Parameters
    ----------
    n_latent
        Latent dimension (at least 2).
    n_flows
        Number of coupling layers.
    n_hidden
        Hidden width of each layer's network.
    """

    def __init__(self, n_latent: int, n_flows: int = 4, n_hidden: int = 64):
        super().__init__()
        if n_latent < 2:
            raise ValueError(f"a coupling flow needs n_latent >= 2, got {n_latent}.")
        if n_flows < 1:
            raise ValueError(f"n_flows must be >= 1, got {n_flows}.")
        position = torch.arange(n_latent)
        masks = []
        for k in range(n_flows):
            pattern = position % 2 == 0 if (k // 2) % 2 == 0 else position < n_latent // 2
            masks.append(pattern if k % 2 == 0 else ~pattern)
        self.layers = nn.ModuleList([AffineCoupling(mask, 2 * n_latent, n_hidden) for mask in masks])

    @staticmethod
    def _context(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        context = torch.cat([mean, logvar], -1)
        return context.expand(*z.shape[:-1], context.shape[-1])  # over leading sample axes

    def forward(self, z0: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log |det dz/dz0|)`` for base draws ``z0`` (``(..., n, d)``) of ``N(mean, exp(logvar))``;
        ``frozen``: no gradient reaches the flow's weights."""
        context = self._context(z0, mean, logvar)
        log_det = torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
        z = z0
        for layer in self.layers:
            z, ld = layer(z, context, frozen)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z0, log |det dz/dz0|)``: the base point that maps to ``z`` and the forward
        log-determinant there; ``frozen``: no gradient reaches the flow's weights."""
        context = self._context(z, mean, logvar)
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z, context, frozen)
            log_det = log_det + ld
        return z, log_det


@dataclass(frozen=True)
class FlowPosterior:
    """``q(z)``: the Gaussian ``base`` pushed through ``flow`` (see the module docstring).

    It has the interface of :class:`~sclatent.inference.GaussianPosterior`: ``mean`` and
    ``logvar`` are the base's (the per-cell parameters that refinement moves), draws and
    densities are the flow's.

    Parameters
    ----------
    base
        The fused diagonal Gaussian.
    flow
        The coupling layers (shared by all cells).
    frozen_flow
        If true, the flow is a fixed map for everything computed with this posterior: no
        gradient reaches its weights, nor the base parameters through the flow's
        conditioning on them; gradients reach the base parameters through the base
        Gaussian only (its draws and density). For a term that should fit the encoders to
        the family without reshaping it, such as the sleep term.
    """

    base: GaussianPosterior
    flow: CouplingFlow
    frozen_flow: bool = False

    @property
    def mean(self) -> torch.Tensor:
        """The base Gaussian's mean, ``(n, d)``."""
        return self.base.mean

    @property
    def logvar(self) -> torch.Tensor:
        """The base Gaussian's log-variance, ``(n, d)``."""
        return self.base.logvar

    def _conditioning(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base parameters the flow is conditioned on (cut from the graph when frozen)."""
        if self.frozen_flow:
            return self.base.mean.detach(), self.base.logvar.detach()
        return self.base.mean, self.base.logvar

    @property
    def location(self) -> torch.Tensor:
        """The point that stands for the cell in embeddings: the image of the base mean
        through the flow, ``(n, d)``. Deterministic, and the median of every latent
        coordinate when the flow is monotone in it; close to the posterior mean for a
        flow near the identity (the flow's draws are centred on it)."""
        return self.flow(self.base.mean, *self._conditioning(), self.frozen_flow)[0]

    def from_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """Draws made of standard-normal noise ``eps`` (``(..., n, d)``), as for the Gaussian."""
        return self.flow(self.base.from_noise(eps), *self._conditioning(), self.frozen_flow)[0]

    def sample(self, n_samples: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized draw: ``(n, d)``, or ``(n_samples, n, d)`` when ``n_samples`` is given."""
        shape = self.mean.shape if n_samples is None else (n_samples, *self.mean.shape)
        return self.from_noise(torch.randn(shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log q(z)`` (``z`` may carry leading sample dims), through the inverse flow."""
        z0, log_det = self.flow.inverse(z, *self._conditioning(), self.frozen_flow)
        return self.base.log_prob(z0) - log_det

    def kl_estimate(self, z: torch.Tensor) -> torch.Tensor:
        """``log q(z) - log N(z | 0, I)`` per draw, ``z.shape[:-1]``: the one-sample
        Monte-Carlo KL (no closed form exists for a flow)."""
        return self.log_prob(z) - standard_normal_log_prob(z)

    def sample_and_kl(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One reparameterized draw ``(n, d)`` and its KL estimate ``(n,)``, from one forward
        pass (no inverse)."""
        z0 = self.base.sample(generator=generator)
        z, log_det = self.flow(z0, *self._conditioning(), self.frozen_flow)
        return z, self.base.log_prob(z0) - log_det - standard_normal_log_prob(z)

    def marginal_kl_to_standard(self, generator: torch.Generator | None = None, n_samples: int = 64) -> torch.Tensor:
        """Per-dimension KL to ``N(0, 1)`` of each marginal's moment-matched Gaussian
        (mean and variance of ``n_samples`` draws), ``(n, d)``: an activity measure; the
        flow's marginals are not Gaussian, so it is not the exact marginal KL."""
        z = self.sample(n_samples, generator)
        return gaussian_kl_to_standard(z.mean(0), z.var(0).clamp_min(1e-12).log())

    def replace(self, mean: torch.Tensor, logvar: torch.Tensor) -> FlowPosterior:
        """The member of the same family (same flow) with these base parameters."""
        return FlowPosterior(GaussianPosterior(mean, logvar), self.flow, self.frozen_flow)

    def select(self, rows: torch.Tensor) -> FlowPosterior:
        """The posteriors of the cells at ``rows``."""
        return FlowPosterior(self.base.select(rows), self.flow, self.frozen_flow)

    def detach(self) -> FlowPosterior:
        """The same posterior with its base parameters cut from the autograd graph (the
        flow's weights are module parameters and stay as they are)."""
        return FlowPosterior(self.base.detach(), self.flow, self.frozen_flow)

"""Diagonal Gaussian posteriors: sampling, densities and the KL to the standard normal prior."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GaussianPosterior", "gaussian_kl_to_standard", "gaussian_log_prob", "standard_normal_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class GaussianPosterior:
    """``q(z) = N(mean, exp(logvar))`` per cell, diagonal.

    Parameters
    ----------
    mean
        ``(n_cells, n_latent)``.
    logvar
        ``(n_cells, n_latent)``.
    """

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, n_samples: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized draw: ``(n, d)``, or ``(n_samples, n, d)`` when ``n_samples`` is given."""
        shape = self.mean.shape if n_samples is None else (n_samples, *self.mean.shape)
        return self.from_noise(torch.randn(shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype))

    def from_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """``mean + eps * std``: the draws made of standard-normal noise ``eps`` (``(..., n, d)``);
        the same ``eps`` for two posteriors gives common random numbers."""
        return self.mean + eps * (0.5 * self.logvar).exp()

    def kl_to_standard(self) -> torch.Tensor:
        """Per-dimension KL ``KL(q || N(0, I))``, shape ``(n, d)``."""
        return gaussian_kl_to_standard(self.mean, self.logvar)

    @property
    def location(self) -> torch.Tensor:
        """The point that stands for the cell in embeddings: the mean, ``(n, d)``."""
        return self.mean

    def kl_estimate(self, z: torch.Tensor) -> torch.Tensor:
        """``KL(q || N(0, I))`` as the ELBO uses it for draws ``z`` (``(..., n, d)``): the
        closed form, exact, broadcast to ``z.shape[:-1]``."""
        return self.kl_to_standard().sum(-1).expand(z.shape[:-1])

    def sample_and_kl(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One reparameterized draw ``(n, d)`` and the KL term ``(n,)`` the ELBO pairs with it."""
        z = self.sample(generator=generator)
        return z, self.kl_estimate(z)

    def marginal_kl_to_standard(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """KL of each latent dimension's marginal to ``N(0, 1)``, ``(n, d)``: exact here
        (a diagonal Gaussian's marginals are its factors)."""
        return self.kl_to_standard()

    def replace(self, mean: torch.Tensor, logvar: torch.Tensor) -> GaussianPosterior:
        """The member of the same family with these parameters."""
        return GaussianPosterior(mean, logvar)

    def select(self, rows: torch.Tensor) -> GaussianPosterior:
        """The posteriors of the cells at ``rows``."""
        return self.replace(self.mean.index_select(0, rows), self.logvar.index_select(0, rows))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log q(z)`` summed over latent dims; ``z`` may carry leading sample dims."""
        return gaussian_log_prob(z, self.mean, self.logvar)

    def detach(self) -> GaussianPosterior:
        """The same posterior, cut from the autograd graph."""
        return GaussianPosterior(self.mean.detach(), self.logvar.detach())


def gaussian_kl_to_standard(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean, exp(logvar)) || N(0, 1))``."""
    return 0.5 * (mean.square() + logvar.exp() - logvar - 1.0)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``log N(z | mean, exp(logvar))`` summed over the last axis."""
    return -0.5 * (((z - mean).square() * (-logvar).exp()) + logvar + _LOG_2PI).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z | 0, I)`` summed over the last axis."""
    return -0.5 * (z.square() + _LOG_2PI).sum(-1)

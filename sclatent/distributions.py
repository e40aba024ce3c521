"""Count likelihoods used by the decoders.

Each likelihood is a small class with ``log_prob``, ``sample`` and ``mean``, in the
spirit of :mod:`torch.distributions`, but parameterized on the log scale (``log_mu``)
because the decoders produce log-proportions and the log scale is both cheaper and
numerically safer. ``log_prob`` returns the exact log-probability mass, normalizing
constants included, elementwise (same shape as ``x``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "Bernoulli",
    "CountLikelihood",
    "NegativeBinomial",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "LIKELIHOODS",
]


class CountLikelihood:
    """Base class: a distribution over non-negative counts, batched elementwise."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class Poisson(CountLikelihood):
    """Poisson distribution with rate ``exp(log_mu)``.

    Parameters
    ----------
    log_mu
        Log of the rate.
    """

    def __init__(self, log_mu: torch.Tensor):
        self.log_mu = log_mu

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mu.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log Poisson(x | mu)``."""
        return x * self.log_mu - self.log_mu.exp() - torch.lgamma(x + 1.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one count per element."""
        return torch.poisson(self.mean, generator=generator)


class NegativeBinomial(CountLikelihood):
    """Negative binomial with mean ``mu = exp(log_mu)`` and inverse dispersion ``theta``.

    ``Var = mu + mu**2 / theta``. This is ``scipy.stats.nbinom(n=theta, p=theta/(theta+mu))``.

    Parameters
    ----------
    log_mu
        Log of the mean.
    log_theta
        Log of the inverse dispersion, broadcastable against ``log_mu``.
    """

    def __init__(self, log_mu: torch.Tensor, log_theta: torch.Tensor):
        self.log_mu = log_mu
        self.log_theta = log_theta

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mu.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log NB(x | mu, theta)``."""
        theta = self.log_theta.exp()
        log_theta_mu = torch.logaddexp(self.log_theta, self.log_mu)
        return (
            torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1.0)
            + theta * (self.log_theta - log_theta_mu)
            + x * (self.log_mu - log_theta_mu)
        )

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one count per element through the Gamma-Poisson mixture."""
        theta = self.log_theta.exp().expand_as(self.log_mu)
        rate = torch._standard_gamma(theta) * (self.log_mu - self.log_theta).exp()
        return torch.poisson(rate, generator=generator)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """Zero-inflated negative binomial.

    With probability ``pi = sigmoid(zi_logits)`` the count is a structural zero,
    otherwise it follows :class:`NegativeBinomial`.

    Parameters
    ----------
    log_mu
        Log of the negative-binomial mean.
    log_theta
        Log of the inverse dispersion.
    zi_logits
        Logits of the zero-inflation probability.
    """

    def __init__(self, log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor):
        super().__init__(log_mu, log_theta)
        self.zi_logits = zi_logits

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.zi_logits) * self.log_mu.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log ZINB(x | mu, theta, pi)``."""
        nb = super().log_prob(x)
        log_pi = -F.softplus(-self.zi_logits)  # log sigmoid(z)
        log_one_minus_pi = -F.softplus(self.zi_logits)
        zero = torch.logaddexp(log_pi, log_one_minus_pi + nb)
        return torch.where(x == 0, zero, log_one_minus_pi + nb)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one count per element."""
        counts = super().sample(generator)
        pi = torch.sigmoid(self.zi_logits).expand_as(counts)
        structural_zero = torch.rand(counts.shape, generator=generator, device=counts.device) < pi
        return counts.masked_fill(structural_zero, 0.0)


class Bernoulli(CountLikelihood):
    """Bernoulli on binarized counts ``1[x > 0]`` with a complementary log-log link.

    ``P(x > 0) = 1 - exp(-mu)``: the probability that a Poisson count with mean
    ``mu = exp(log_mu)`` is nonzero. This keeps the size-factor parameterization
    (``mu = library * rho``) shared with the count likelihoods.

    Parameters
    ----------
    log_mu
        Log of the underlying Poisson mean.
    """

    def __init__(self, log_mu: torch.Tensor):
        self.log_mu = log_mu

    @property
    def mean(self) -> torch.Tensor:
        return -torch.expm1(-self.log_mu.exp())

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log Bernoulli(1[x > 0] | 1 - exp(-mu))``."""
        mu = self.log_mu.exp()
        log_p = torch.log(-torch.expm1(-mu.clamp_min(1e-12)))
        return torch.where(x > 0, log_p, -mu)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one 0/1 value per element."""
        return torch.bernoulli(self.mean, generator=generator)


LIKELIHOODS = ("nb", "zinb", "poisson", "bernoulli")

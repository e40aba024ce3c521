"""Count likelihoods used by the decoders.

Each likelihood is a small class with ``log_prob``, ``sample`` and ``mean``, in the
spirit of :mod:`torch.distributions`, but parameterized on the log scale (``log_mu``)
because the decoders produce log-proportions and the log scale is both cheaper and
numerically safer. ``log_prob`` returns the exact log-probability mass, normalizing
constants included, elementwise (same shape as ``x``).

Single-cell counts are mostly zeros, so :meth:`CountLikelihood.sum_log_prob_sparse`
computes the per-cell total exactly from the nonzero entries alone:
``sum_g log p(x_g) = sum_g log p(0) + sum_{x_g > 0} [log p(x_g) - log p(0)]``. The first
sum has a cheap closed form (no ``lgamma``); the expensive terms run on the nonzeros only.
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
    """Base class: a distribution over non-negative counts, batched elementwise.

    Subclasses hold parameters of shape ``(..., n_cells, n_features)`` (or broadcastable
    to it) and implement ``log_prob``, ``log_prob_zero``, ``take``, ``mean`` and ``sample``.
    """

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def log_prob_zero(self) -> torch.Tensor:  # pragma: no cover - interface
        """Elementwise ``log p(0)``, cheaper than ``log_prob(zeros)``."""
        raise NotImplementedError

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> CountLikelihood:  # pragma: no cover
        """The distribution restricted to entries ``(rows[i], cols[i])``: parameters ``(..., nnz)``."""
        raise NotImplementedError

    def sum_log_prob_sparse(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Per-cell ``sum_g log p(x_g)`` for counts given by their nonzero entries.

        Parameters
        ----------
        rows, cols, values
            Coordinates and values of the nonzero counts (COO); every other entry is 0.

        Returns
        -------
        torch.Tensor
            ``(..., n_cells)``, equal to ``log_prob(x).sum(-1)`` for the dense ``x``.
        """
        total = self.log_prob_zero().sum(-1)
        nz = self.take(rows, cols)
        return total.index_add(-1, rows, nz.log_prob(values) - nz.log_prob_zero())

    @property
    def mean(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _take(param: torch.Tensor, shape: torch.Size, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return param.expand(shape)[..., rows, cols]


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

    def log_prob_zero(self) -> torch.Tensor:
        """Elementwise ``log p(0) = -mu``."""
        return -self.log_mu.exp()

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> Poisson:
        """Restriction to entries ``(rows, cols)``."""
        return Poisson(self.log_mu[..., rows, cols])

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

    def log_prob_zero(self) -> torch.Tensor:
        """Elementwise ``log p(0) = -theta * log(1 + mu / theta)``."""
        return -self.log_theta.exp() * F.softplus(self.log_mu - self.log_theta)

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> NegativeBinomial:
        """Restriction to entries ``(rows, cols)``."""
        shape = self.log_mu.shape
        return NegativeBinomial(self.log_mu[..., rows, cols], _take(self.log_theta, shape, rows, cols))

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

    def log_prob_zero(self) -> torch.Tensor:
        """Elementwise ``log(pi + (1 - pi) NB(0))``."""
        return torch.logaddexp(-F.softplus(-self.zi_logits), -F.softplus(self.zi_logits) + super().log_prob_zero())

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> ZeroInflatedNegativeBinomial:
        """Restriction to entries ``(rows, cols)``."""
        shape = self.log_mu.shape
        return ZeroInflatedNegativeBinomial(
            self.log_mu[..., rows, cols], _take(self.log_theta, shape, rows, cols), _take(self.zi_logits, shape, rows, cols)
        )

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

    def log_prob_zero(self) -> torch.Tensor:
        """Elementwise ``log P(x = 0) = -mu``."""
        return -self.log_mu.exp()

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> Bernoulli:
        """Restriction to entries ``(rows, cols)``."""
        return Bernoulli(self.log_mu[..., rows, cols])

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one 0/1 value per element."""
        return torch.bernoulli(self.mean, generator=generator)


LIKELIHOODS = ("nb", "zinb", "poisson", "bernoulli")

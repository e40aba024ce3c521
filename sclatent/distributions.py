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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Bernoulli",
    "CountLikelihood",
    "LIKELIHOODS",
    "LikelihoodKind",
    "NegativeBinomial",
    "Poisson",
    "ZeroInflated",
    "ZeroInflatedNegativeBinomial",
    "likelihood_kind",
]


class CountLikelihood:
    """Base class: a distribution over non-negative counts, batched elementwise.

    Subclasses hold parameters of shape ``(..., n_cells, n_features)`` (or broadcastable
    to it) and implement ``log_prob``, ``log_prob_zero``, ``take``, ``mean`` and ``sample``.
    """

    #: Whether :meth:`sum_log_prob_sparse` reads the dense counts when it gets them (the
    #: data layer builds a batch's dense block only for likelihoods that do)
    uses_dense_counts: bool = False

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def log_prob_zero(self) -> torch.Tensor:  # pragma: no cover - interface
        """Elementwise ``log p(0)``, cheaper than ``log_prob(zeros)``."""
        raise NotImplementedError

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> CountLikelihood:  # pragma: no cover
        """The distribution restricted to entries ``(rows[i], cols[i])``: parameters ``(..., nnz)``."""
        raise NotImplementedError

    def sum_log_prob_sparse(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        values: torch.Tensor,
        log_factorial: torch.Tensor | None = None,
        dense: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-cell ``sum_g log p(x_g)`` for counts given by their nonzero entries.

        Parameters
        ----------
        rows, cols, values
            Coordinates and values of the nonzero counts (COO); every other entry is 0.
        log_factorial
            Optional ``(n_cells,)`` precomputed ``sum_g lgamma(x_g + 1)`` of each cell (the
            data-only constant of the count likelihoods); computed from ``values`` if absent.
        dense
            Optional: the same counts as a dense ``(n_cells, n_features)`` tensor, which
            subclasses may use when the batch is dense enough that it is cheaper.

        Returns
        -------
        torch.Tensor
            ``(..., n_cells)``, equal to ``log_prob(x).sum(-1)`` for the dense ``x``.
        """
        total = self.log_prob_zero().sum(-1)
        nz = self.take(rows, cols)
        return total.index_add(-1, rows, nz.log_prob(values) - nz.log_prob_zero())

    def sample_nonzero(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw of 2-D ``(n, G)`` parameters as its nonzero entries ``(rows, cols, values)``,
        sorted by row, then column. Subclasses with a cheaper sparse sampler override this."""
        x = self.sample(generator)
        rows, cols = x.nonzero(as_tuple=True)
        return rows, cols, x[rows, cols]

    @property
    def mean(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def release_mean(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The mean, for a caller that is done with this likelihood: subclasses may then build
        it in their own buffers (without autograd), after which the object is spent; with
        ``out``, written into that tensor (of the mean's shape) and returned."""
        mean = self.mean
        return mean if out is None else out.copy_(mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _take(param: torch.Tensor, shape: torch.Size, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``param`` broadcast to ``shape`` (``(..., n, g)``), read at entries ``(rows, cols)``: ``(..., nnz)``.

    Flat ``index_select`` instead of 2-D advanced indexing (several times faster on the CPU,
    forward and backward), and no materialized broadcast for per-feature parameters.
    """
    n, g = shape[-2], shape[-1]
    if param.dim() >= 2 and param.shape[-2] == 1:  # one row shared by every cell
        return param.select(-2, 0).expand(*shape[:-2], g).index_select(-1, cols)
    flat = rows * g + cols
    return param.expand(shape).reshape(*shape[:-2], n * g).index_select(-1, flat)


def _row_sums(total: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``total`` (``(..., n)``) plus the sums of ``values`` (``(..., nnz)``) per row index.

    ``rows`` is sorted (CSR order) in every batch sclatent builds; then a segment sum is
    used, ~1.6x faster than ``index_add`` (forward and backward) on the CPU. The order is
    checked on the CPU, where the check costs no synchronization; on an accelerator the
    sorted order is relied on (checking would stall the device every step).
    """
    n = total.shape[-1]
    if values.dim() == 1 and rows.numel() and (rows.device.type != "cpu" or bool((rows[1:] >= rows[:-1]).all())):
        lengths = torch.bincount(rows, minlength=n)
        return total + torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True)
    return total.index_add(-1, rows, values.expand(*total.shape[:-1], -1))


def _sum_log_factorial(rows: torch.Tensor, values: torch.Tensor, n_cells: int, log_factorial: torch.Tensor | None) -> torch.Tensor:
    """``(n_cells,)`` per-cell ``sum lgamma(x + 1)`` (the precomputed one when given)."""
    if log_factorial is not None:
        return log_factorial
    return torch.zeros(n_cells, dtype=values.dtype, device=values.device).index_add(0, rows, torch.lgamma(values + 1.0))


class _SoftmaxMean:
    """Mixin of the likelihoods that can be built from a decoder's logits, ``mu =
    exp(log_shift) * softmax(logits)``: ``log_mu`` is materialized only on first use."""

    _log_mu: torch.Tensor | None = None
    _logits: torch.Tensor | None = None
    _log_shift: torch.Tensor | None = None

    def _set_logits(self, logits: torch.Tensor, log_shift: torch.Tensor):
        self._logits, self._log_shift = logits, log_shift
        return self

    @property
    def log_mu(self) -> torch.Tensor:
        """Log of the mean (computed from the logits once, when built from them)."""
        if self._log_mu is None:
            if self._logits is None:
                raise RuntimeError("This likelihood's mean was released (release_mean): it cannot be used again.")
            self._log_mu = torch.log_softmax(self._logits, dim=-1) + self._log_shift
        return self._log_mu

    @property
    def mean(self) -> torch.Tensor:
        """``mu``; from the logits in one softmax pass when ``log_mu`` was not needed."""
        if self._log_mu is None and self._logits is not None:
            mu = torch.softmax(self._logits, dim=-1)
            scale = self._log_shift.exp()
            return mu * scale if torch.is_grad_enabled() else mu.mul_(scale)  # without autograd: in place, no second array
        return self.log_mu.exp()

    def release_mean(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``mu``, without autograd made in place of the logits (no new array of their size:
        about half the time of a softmax into fresh memory), or into ``out`` (a contiguous
        tensor of the logits' shape and dtype, e.g. rows of a larger result); the likelihood
        is spent after. At library size 1 (``log_shift`` all zero) the proportions are not
        multiplied by one."""
        logits = self._logits
        if self._log_mu is not None or logits is None or torch.is_grad_enabled() or logits._base is not None or not logits.is_contiguous():
            mean = self.mean
            return mean if out is None else out.copy_(mean)
        if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device or not out.is_contiguous()):
            raise ValueError(
                f"out must be a contiguous {logits.dtype} tensor of shape {tuple(logits.shape)} on {logits.device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}."
            )
        self._logits = None
        mu = torch.softmax(logits, dim=-1, out=logits if out is None else out)
        shift = self._log_shift
        return mu.mul_(shift.exp()) if bool(shift.any()) else mu


class Poisson(_SoftmaxMean, CountLikelihood):
    """Poisson distribution with rate ``exp(log_mu)``.

    Parameters
    ----------
    log_mu
        Log of the rate.
    mean_total
        Optional per-cell ``sum_g mu_g`` when it is known without summing, e.g. the
        library size when ``mu = library * softmax(...)``; it is a constant of the model
        then (its gradient is exactly zero), and the sparse total skips a dense pass.
    """

    def __init__(self, log_mu: torch.Tensor | None, mean_total: torch.Tensor | None = None):
        self._log_mu = log_mu
        self.mean_total = mean_total
        self._proportions = None  # exp(logits - row max), once the sparse log-likelihood made them

    @classmethod
    def from_logits(cls, logits: torch.Tensor, log_shift: torch.Tensor, mean_total: torch.Tensor) -> Poisson:
        """``mu = exp(log_shift) * softmax(logits)`` (``log_shift``: the log library size,
        ``(n, 1)``; ``mean_total``: its exponent, ``(n,)``), normalized lazily.

        :meth:`sum_log_prob_sparse` then never materializes ``log_softmax(logits)``: it
        needs the logits at the nonzero counts and one log-sum-exp per cell (forward), and
        one dense pass for the softmax (backward), which at 100k peaks is most of what a
        training step costs besides the decoder's matrix products. ``log_mu`` is computed
        (once) only when something else asks for it.
        """
        return cls(None, mean_total)._set_logits(logits, log_shift)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise ``log Poisson(x | mu)``."""
        return x * self.log_mu - self.log_mu.exp() - torch.lgamma(x + 1.0)

    def log_prob_zero(self) -> torch.Tensor:
        """Elementwise ``log p(0) = -mu``."""
        return -self.log_mu.exp()

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> Poisson:
        """Restriction to entries ``(rows, cols)``."""
        return Poisson(_take(self.log_mu, self.log_mu.shape, rows, cols))

    def sum_log_prob_sparse(self, rows, cols, values, log_factorial=None, dense=None) -> torch.Tensor:
        """Per-cell total: ``-sum_g mu_g + sum_{x>0} x log mu - sum lgamma(x + 1)``."""
        if self._log_mu is None and self._logits is not None and self._logits.dim() == 2 and values.dim() == 1:
            n = self._logits.shape[0]
            kept = {}
            total = _SoftmaxCountTerm.apply(self._logits, rows, cols, values, kept)  # sum_{x>0} x log softmax
            self._proportions = kept["weights"]  # exp(logits - row max), which sample_nonzero draws from
            shift = self._log_shift.reshape(n)
            total = total + torch.zeros_like(shift).index_add(0, rows, values) * shift - self.mean_total.expand(n)
            return total - _sum_log_factorial(rows, values, n, log_factorial)
        log_mu = self.log_mu
        total = -log_mu.exp().sum(-1) if self.mean_total is None else -self.mean_total.expand(log_mu.shape[:-1])
        total = _row_sums(total, rows, values * _take(log_mu, log_mu.shape, rows, cols))
        return total - _sum_log_factorial(rows, values, log_mu.shape[-2], log_factorial)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one count per element."""
        return torch.poisson(self.mean, generator=generator)

    def sample_nonzero(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw of a 2-D ``(n, G)`` Poisson, returned as its nonzero entries.

        Each row's total ``N ~ Poisson(sum_g mu_g)`` is drawn, then its ``N`` events are
        placed on the features by multinomial sampling with probabilities ``mu / sum mu``:
        the same distribution as :meth:`sample` (independent Poissons), at a cost of
        ``O(n (G + max N))`` instead of one Poisson draw per element, which is what makes
        sampling 100k sparse peaks cheap.

        Returns
        -------
        rows, cols, values
            COO entries with ``values > 0``, sorted by row, then column.
        """
        with torch.no_grad():
            if self._log_mu is None and self._logits is not None and self.mean_total is not None:
                # built from logits: the multinomial needs the proportions only up to a factor per
                # row, exp(logits - rowmax), one pass into one new array (no log-softmax, no shift)
                logits = self._logits
                if logits.dim() != 2:
                    raise ValueError(f"sample_nonzero needs 2-D (cells, features) logits, got shape {tuple(logits.shape)}.")
                mu = self._proportions  # already made by the log-likelihood's forward pass
                if mu is None:
                    mu = torch.sub(logits, logits.amax(-1, keepdim=True)).exp_()
                total = self.mean_total.expand(logits.shape[0]).to(mu.dtype)
            else:
                mu = self.log_mu.exp()
                if mu.dim() != 2:
                    raise ValueError(f"sample_nonzero needs a 2-D (cells, features) rate, got shape {tuple(mu.shape)}.")
                total = mu.sum(-1) if self.mean_total is None else self.mean_total.expand(mu.shape[0]).to(mu.dtype)
        n, g = mu.shape
        n_events = torch.poisson(total, generator=generator).long()
        k = int(n_events.max()) if n else 0
        if k == 0:
            empty = torch.zeros(0, dtype=torch.long, device=mu.device)
            return empty, empty, torch.zeros(0, dtype=mu.dtype, device=mu.device)
        draws = torch.multinomial(mu, k, replacement=True, generator=generator)
        keep = torch.arange(k, device=mu.device) < n_events[:, None]
        rows = torch.arange(n, device=mu.device)[:, None].expand(n, k)[keep]
        key, counts = torch.unique(rows * g + draws[keep], return_counts=True)
        return key // g, key % g, counts.to(mu.dtype)


class _SoftmaxCountTerm(torch.autograd.Function):
    """Per row ``r``: ``sum_{(r, c) nonzero} x * log_softmax(logits)[r, c]``, with its gradient,
    without a dense ``log_softmax``: the forward pass exponentiates once (kept for the
    backward pass, which is ``x - (sum_c x) * softmax``) and gathers the nonzero entries."""

    @staticmethod
    def forward(ctx, logits, rows, cols, values, kept=None):
        n, g = logits.shape
        peak = logits.detach().amax(dim=-1)
        weights = torch.sub(logits, peak[:, None]).exp_()  # the one exponentiation
        norm = weights.sum(-1)
        lse = peak + norm.log()
        flat = rows * g + cols
        picked = logits.reshape(-1).index_select(0, flat) - lse.index_select(0, rows)
        out = torch.zeros(n, dtype=logits.dtype, device=logits.device).index_add_(0, rows, values * picked)
        ctx.save_for_backward(weights, norm, rows, flat, values)
        if kept is not None:  # the caller may draw from these proportions (read only: backward needs them)
            kept["weights"] = weights
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weights, norm, rows, flat, values = ctx.saved_tensors
        n = weights.shape[0]
        x_total = torch.zeros(n, dtype=weights.dtype, device=weights.device).index_add_(0, rows, values)
        grad = weights * (-grad_out * x_total / norm)[:, None]  # softmax = weights / norm
        grad.view(-1).index_add_(0, flat, values * grad_out.index_select(0, rows))
        return grad, None, None, None, None


class NegativeBinomial(_SoftmaxMean, CountLikelihood):
    """Negative binomial with mean ``mu = exp(log_mu)`` and inverse dispersion ``theta``.

    ``Var = mu + mu**2 / theta``. This is ``scipy.stats.nbinom(n=theta, p=theta/(theta+mu))``.

    Parameters
    ----------
    log_mu
        Log of the mean.
    log_theta
        Log of the inverse dispersion, broadcastable against ``log_mu``.
    """

    uses_dense_counts = True

    def __init__(self, log_mu: torch.Tensor | None, log_theta: torch.Tensor):
        self._log_mu = log_mu
        self.log_theta = log_theta

    @classmethod
    def from_logits(cls, logits: torch.Tensor, log_shift: torch.Tensor, log_theta: torch.Tensor) -> NegativeBinomial:
        """``mu = exp(log_shift) * softmax(logits)`` (``log_shift``: the log library size,
        ``(n, 1)``), normalized lazily.

        :meth:`sum_log_prob_sparse` then computes the log-likelihood and its gradient with
        respect to the logits in one fused pass (:class:`_NBSoftmaxTerms`: one exponential
        and one logarithm per entry, no dense ``log_softmax``); ``log_mu`` is computed
        (once) only when something else asks for it.
        """
        return cls(None, log_theta)._set_logits(logits, log_shift)

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
        return NegativeBinomial(_take(self.log_mu, shape, rows, cols), _take(self.log_theta, shape, rows, cols))

    def sum_log_prob_sparse(self, rows, cols, values, log_factorial=None, dense=None) -> torch.Tensor:
        """Per-cell total from the nonzeros, with the ``lgamma`` terms read from a table.

        With ``d = log mu - log theta`` and ``S = softplus(d)`` (so ``log(theta + mu) =
        log theta + S``): ``sum_g log p(x_g) = -sum_g theta_g S_g + sum_{x>0} [x (d - S)
        + lgamma(x + theta) - lgamma(theta)] - sum lgamma(x + 1)``. When ``theta`` is one
        value per feature, ``lgamma(v + theta_g) - lgamma(theta_g)`` for the small counts
        ``v = 1..V`` is a ``(V, n_features)`` table gathered at the nonzeros (no ``lgamma``
        or ``digamma`` over the nonzeros, forward or backward); larger or non-integer
        values take the direct formula. ``dense`` (the same counts as a dense tensor), when
        given for a batch with more than 1 in 8 entries nonzero, computes the ``x (d - S)``
        term as a dense product, cheaper than gathering that many entries. Built from logits
        (:meth:`from_logits`), the same total is one fused pass (:class:`_NBSoftmaxTerms`).
        """
        if self._log_mu is None and self._logits is not None and self._logits.dim() == 2 and values.dim() == 1 and self.log_theta.dim() == 2:
            shape = self._logits.shape
            ratio = self._lgamma_ratio(rows, cols, values, shape)
            total = _NBSoftmaxTerms.apply(
                self._logits, self._log_shift, self.log_theta, rows, cols, values, torch.is_grad_enabled()
            )
            return _row_sums(total, rows, ratio) - _sum_log_factorial(rows, values, shape[-2], log_factorial)
        shape = self.log_mu.shape
        ratio = self._lgamma_ratio(rows, cols, values, shape)
        if dense is not None and 8 * values.shape[0] > shape[-2] * shape[-1]:
            total = _row_sums(_NBDenseTerms.apply(self.log_mu, self.log_theta, dense), rows, ratio)
        else:
            d = self.log_mu - self.log_theta
            s = F.softplus(d)
            total = -(self.log_theta.exp() * s).sum(-1)
            total = _row_sums(total, rows, values * _take(d - s, shape, rows, cols) + ratio)
        return total - _sum_log_factorial(rows, values, shape[-2], log_factorial)

    _TABLE_MAX = 8

    def _lgamma_ratio(self, rows, cols, values, shape) -> torch.Tensor:
        """``lgamma(x + theta) - lgamma(theta)`` at the nonzeros, ``(..., nnz)``."""
        log_theta = self.log_theta
        if not (log_theta.dim() >= 2 and log_theta.shape[-2] == 1 and log_theta.dim() <= 2):
            theta = _take(log_theta, shape, rows, cols).exp()
            return torch.lgamma(values + theta) - torch.lgamma(theta)
        theta = log_theta.reshape(-1).exp()  # (g,)
        g, v_max = theta.shape[0], self._TABLE_MAX
        v = torch.arange(1, v_max + 1, dtype=theta.dtype, device=theta.device)
        table = (torch.lgamma(v[:, None] + theta) - torch.lgamma(theta)).reshape(-1)  # (V * g,)
        clipped = values.clamp(max=v_max)
        out = table.index_select(0, (clipped.floor().clamp(min=1).long() - 1) * g + cols)
        direct = ((values > v_max) | (values != clipped.floor())).nonzero().squeeze(-1)
        if direct.numel():  # exact formula for the rare large (or non-integer) counts
            th = theta.index_select(0, cols.index_select(0, direct))
            x = values.index_select(0, direct)
            out = out.index_copy(0, direct, torch.lgamma(x + th) - torch.lgamma(th))
        return out

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one count per element through the Gamma-Poisson mixture.

        Both draws follow ``generator`` when one is given (the global RNG is left as it was).
        """
        theta = self.log_theta.exp().expand_as(self.log_mu)
        gamma = _standard_gamma(theta, generator)
        return torch.poisson(gamma * (self.log_mu - self.log_theta).exp(), generator=generator)

    def sample_nonzero(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw of a 2-D ``(n, G)`` negative binomial, returned as its nonzero entries.

        Through its compound-Poisson form: ``NB(mu, theta)`` is the sum of
        ``K ~ Poisson(lam)``, ``lam = theta log(1 + mu / theta)``, independent
        logarithmic-series terms with parameter ``p = mu / (mu + theta)`` (the generating
        functions agree). ``K`` is drawn per element, and one logarithmic-series term (Kemp's
        algorithm, as numpy's ``logseries``) per unit of the few nonzero ``K``: the law of
        :meth:`sample` without its Gamma draw per element, which costs ~4x a Poisson draw
        and was most of a training step's sampling.

        Returns
        -------
        rows, cols, values
            COO entries with ``values > 0``, sorted by row, then column.
        """
        with torch.no_grad():
            if self._log_mu is None and self._logits is not None:  # not cached: the object may still be trained on
                log_mu = torch.log_softmax(self._logits, dim=-1) + self._log_shift
            else:
                log_mu = self.log_mu
            if log_mu.dim() != 2:
                raise ValueError(f"sample_nonzero needs a 2-D (cells, features) mean, got shape {tuple(log_mu.shape)}.")
            log_theta = self.log_theta.to(log_mu.dtype)
            log1p_ratio = torch.log1p(torch.exp(log_mu - log_theta))  # log(1 + mu / theta) = -log(1 - p)
            n_terms = torch.poisson(log1p_ratio * log_theta.exp(), generator=generator)
            rows, cols = n_terms.nonzero(as_tuple=True)  # row-major: sorted by row, then column
            counts = n_terms[rows, cols].long()
            entry = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
            g = log_mu.shape[1]
            terms = _logseries(log1p_ratio.reshape(-1).index_select(0, (rows * g + cols).index_select(0, entry)), generator)
            values = torch.zeros(rows.numel(), dtype=log_mu.dtype, device=log_mu.device).index_add_(0, entry, terms)
        return rows, cols, values


def _logseries(log1p_ratio: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One logarithmic-series draw per element, parameter ``p = 1 - exp(-log1p_ratio)``
    (Kemp's algorithm "LK", as numpy's ``Generator.logseries``): ``P(k) = -p^k / (k log(1 - p))``."""
    r = -log1p_ratio  # log(1 - p)
    p = -torch.expm1(r)
    v = 1.0 - torch.rand(r.shape, dtype=r.dtype, device=r.device, generator=generator)  # in (0, 1]
    u = torch.rand(r.shape, dtype=r.dtype, device=r.device, generator=generator)
    q = -torch.expm1(r * u)
    many = torch.floor(1.0 + torch.log(v) / torch.log(q)).clamp_(min=1.0)
    two_or_one = torch.where(v >= q, torch.ones_like(v), torch.full_like(v, 2.0))
    return torch.where(v >= p, torch.ones_like(v), torch.where(v <= q * q, many, two_or_one))


def _standard_gamma(concentration: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``Gamma(concentration, 1)`` draws; with ``generator``, reproducible from it alone.

    torch's gamma sampler takes no generator, so a seed is drawn from ``generator`` and the
    sampler runs on a forked copy of the global RNG seeded with it: the draws are a
    function of the generator's state and the caller's global RNG is untouched.
    """
    if generator is None:
        return torch._standard_gamma(concentration)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    device = concentration.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        return torch._standard_gamma(concentration)


def _sum_to_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    while t.dim() > len(shape):
        t = t.sum(0)
    dims = [i for i, k in enumerate(shape) if k == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


class _NBDenseTerms(torch.autograd.Function):
    """``sum_g [x (d - S) - theta S]`` with ``d = log mu - log theta``, ``S = softplus(d)``.

    The negative-binomial log-likelihood without its ``lgamma`` terms, over dense counts,
    with the analytic gradient ``dL/dlog mu = x - (x + theta) sigmoid(d)`` and
    ``dL/dlog theta = -dL/dlog mu - theta S``, kept from the forward pass: about half the
    elementwise passes over the ``(n, n_features)`` block that autograd would make.
    """

    @staticmethod
    def forward(ctx, log_mu, log_theta, x):
        d = log_mu - log_theta
        s = F.softplus(d)
        theta = log_theta.exp()
        x_theta = x + theta
        total = (x * d).sum(-1) - (x_theta * s).sum(-1)
        grad_mu = x - x_theta * torch.sigmoid(d)
        ctx.save_for_backward(grad_mu, theta * s if ctx.needs_input_grad[1] else None)
        ctx.theta_shape = log_theta.shape
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_mu, theta_s = ctx.saved_tensors
        g = grad_out.unsqueeze(-1)
        d_mu = grad_mu * g if ctx.needs_input_grad[0] else None
        d_theta = None
        if ctx.needs_input_grad[1]:
            d_theta = _sum_to_shape(-(grad_mu + theta_s) * g, ctx.theta_shape)
        return d_mu, d_theta, None


class _NBSoftmaxTerms(torch.autograd.Function):
    """Per cell ``sum_g [x (d - S) - theta S]`` with ``d = log mu - log theta``,
    ``S = softplus(d) = log(1 + mu / theta)`` and ``mu = exp(log_shift) * softmax(logits)``,
    for counts given as their nonzeros ``(rows, cols, values)`` (rows sorted or not).

    The negative-binomial log-likelihood without its ``lgamma`` terms, fused from the
    decoder's logits: one exponential (the softmax) and one logarithm (``log(1 + r)``) per
    entry forward, and the gradients are formed in the same pass, ``dL/dlog mu = x - (x + theta) r / (1 + r)``
    with ``r = mu / theta``, then through the softmax ``dL/dlogits = g - softmax * sum(g)``,
    and ``dL/dlog theta = -dL/dlog mu - theta S``. Autograd over ``log_softmax``, ``softplus``
    and their products makes several times the passes over the ``(n, n_features)`` block.
    Under ``torch.no_grad`` (``want_grad=False``) no gradient is formed.
    """

    @staticmethod
    def forward(ctx, logits, log_shift, log_theta, rows, cols, values, want_grad):
        n, g = logits.shape
        peak = logits.detach().amax(dim=-1, keepdim=True)
        weights = torch.sub(logits, peak).exp_()  # the one exponentiation; softmax = weights / norm
        norm = weights.sum(-1, keepdim=True)
        lse = peak + norm.log()
        theta = log_theta.exp()  # (1, g) or (n, g)
        ratio = torch.mul(weights, log_shift.exp() / norm).mul_(theta.reciprocal())  # r = mu / theta
        flat = rows * g + cols
        d_nz = (logits.reshape(-1).index_select(0, flat) - (lse - log_shift).reshape(n).index_select(0, rows)
                - _take(log_theta, (n, g), rows, cols))
        one_plus = ratio + 1.0
        sig = ratio.div_(one_plus)  # r / (1 + r) = sigmoid(d), in place of r
        s = one_plus.log_()  # the one logarithm: softplus(d), in place of 1 + r
        s_nz = s.view(-1).index_select(0, flat)
        theta_s = s.mul_(theta)
        total = torch.zeros(n, dtype=logits.dtype, device=logits.device).index_add_(0, rows, values * (d_nz - s_nz))
        total = total - theta_s.sum(-1)
        need_logits, need_shift, need_theta = (want_grad and k for k in ctx.needs_input_grad[:3])
        grad_logits = grad_shift = grad_theta = None
        if need_logits or need_shift or need_theta:
            # dL/dlog mu: -theta r / (1 + r) everywhere, + x / (1 + r) at the nonzeros
            sig_nz = sig.view(-1).index_select(0, flat)
            grad_mu = sig.mul_(-theta)
            grad_mu.view(-1).index_add_(0, flat, values * (1.0 - sig_nz))
            grad_theta = -(grad_mu + theta_s) if need_theta else None
            grad_shift = grad_mu.sum(-1, keepdim=True)
            if need_logits:  # through the softmax
                grad_logits = grad_mu.sub_(weights.mul_(grad_shift / norm))
        ctx.save_for_backward(grad_logits, grad_shift if need_shift else None, grad_theta)
        ctx.theta_shape = log_theta.shape
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_logits, grad_shift, grad_theta = ctx.saved_tensors
        g = grad_out.unsqueeze(-1)
        d_logits = grad_logits * g if grad_logits is not None else None
        d_shift = grad_shift * g if grad_shift is not None else None
        d_theta = _sum_to_shape(grad_theta * g, ctx.theta_shape) if grad_theta is not None else None
        return d_logits, d_shift, d_theta, None, None, None, None


class ZeroInflated(CountLikelihood):
    """Zero inflation of any base count likelihood.

    With probability ``pi = sigmoid(zi_logits)`` the count is a structural zero, otherwise
    it follows ``base``: ``p(0) = pi + (1 - pi) p_base(0)``, ``p(x) = (1 - pi) p_base(x)``
    for ``x > 0``. The per-cell sparse total uses the generic nonzeros identity of
    :class:`CountLikelihood` (a base's own shortcut does not hold for the mixture).

    Parameters
    ----------
    base
        The count likelihood being inflated (:class:`NegativeBinomial`, :class:`Poisson`, ...).
    zi_logits
        Logits of the zero-inflation probability, broadcastable against the base's parameters.
    """

    def __init__(self, base: CountLikelihood, zi_logits: torch.Tensor):
        self.base = base
        self.zi_logits = zi_logits

    @property
    def log_mu(self) -> torch.Tensor:
        """Log-mean of the base likelihood."""
        return self.base.log_mu

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.zi_logits) * self.base.mean

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise log-probability of the mixture."""
        base = self.base.log_prob(x)
        log_pi = -F.softplus(-self.zi_logits)  # log sigmoid(z)
        log_one_minus_pi = -F.softplus(self.zi_logits)
        zero = torch.logaddexp(log_pi, log_one_minus_pi + base)
        return torch.where(x == 0, zero, log_one_minus_pi + base)

    def log_prob_zero(self) -> torch.Tensor:
        """Elementwise ``log(pi + (1 - pi) p_base(0))``."""
        return torch.logaddexp(-F.softplus(-self.zi_logits), -F.softplus(self.zi_logits) + self.base.log_prob_zero())

    def take(self, rows: torch.Tensor, cols: torch.Tensor) -> ZeroInflated:
        """Restriction to entries ``(rows, cols)``."""
        return ZeroInflated(self.base.take(rows, cols), _take(self.zi_logits, self.base.log_mu.shape, rows, cols))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one count per element."""
        counts = self.base.sample(generator)
        pi = torch.sigmoid(self.zi_logits).expand_as(counts)
        structural_zero = torch.rand(counts.shape, generator=generator, device=counts.device) < pi
        return counts.masked_fill(structural_zero, 0.0)


def ZeroInflatedNegativeBinomial(log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor) -> ZeroInflated:
    """Zero-inflated negative binomial: ``ZeroInflated(NegativeBinomial(log_mu, log_theta), zi_logits)``."""
    return ZeroInflated(NegativeBinomial(log_mu, log_theta), zi_logits)


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
        return Bernoulli(_take(self.log_mu, self.log_mu.shape, rows, cols))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw one 0/1 value per element."""
        return torch.bernoulli(self.mean, generator=generator)


@dataclass(frozen=True)
class LikelihoodKind:
    """How a likelihood name is built from a decoder's outputs.

    Parameters
    ----------
    base
        The count likelihood class.
    dispersion
        The base takes a learned inverse dispersion (``log_theta``).
    zero_inflated
        Wrapped in :class:`ZeroInflated` with logits from the decoder.
    """

    base: type
    dispersion: bool = False
    zero_inflated: bool = False

    @property
    def uses_dense_counts(self) -> bool:
        """Whether the likelihood's sparse total reads a dense block of counts."""
        return not self.zero_inflated and self.base.uses_dense_counts

    def build(
        self,
        log_mu: torch.Tensor,
        log_theta: torch.Tensor | None = None,
        zi_logits: torch.Tensor | None = None,
        mean_total: torch.Tensor | None = None,
    ) -> CountLikelihood:
        """The likelihood object for decoder outputs ``log_mu`` (and the optional parameters).

        ``mean_total`` (the known per-cell ``sum_g mu_g``) is used by bases that can skip a
        dense pass with it (:class:`Poisson`).
        """
        if self.dispersion:
            dist = self.base(log_mu, log_theta)
        elif self.base is Poisson:
            dist = Poisson(log_mu, mean_total=mean_total)
        else:
            dist = self.base(log_mu)
        return ZeroInflated(dist, zi_logits) if self.zero_inflated else dist


#: Every likelihood a modality can use, by the name users pass (``"nb"``, ...).
LIKELIHOODS: dict[str, LikelihoodKind] = {
    "nb": LikelihoodKind(NegativeBinomial, dispersion=True),
    "zinb": LikelihoodKind(NegativeBinomial, dispersion=True, zero_inflated=True),
    "poisson": LikelihoodKind(Poisson),
    "zip": LikelihoodKind(Poisson, zero_inflated=True),
    "bernoulli": LikelihoodKind(Bernoulli),
}


def likelihood_kind(name: str, where: str = "") -> LikelihoodKind:
    """The :data:`LIKELIHOODS` entry ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return LIKELIHOODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown likelihood {name!r}{where}; choose one of {sorted(LIKELIHOODS)}.") from None

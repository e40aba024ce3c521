"""Amortized and semi-amortized inference against a model whose posterior is known exactly.

Linear-Gaussian model: ``z ~ N(0, I_d)``, ``x | z ~ N(A z, sigma_x^2 I_p)`` with known ``A``.
The exact posterior is Gaussian with precision ``P = A^T A / sigma_x^2 + I`` and mean
``(A^T A + sigma_x^2 I)^-1 A^T x`` (the prior variance is 1). Within the diagonal Gaussian
family the ELBO is maximized by the same mean and by the variances ``1 / P_jj`` (the
diagonal of the precision, not of the covariance). The encoder, the ELBO estimator, its
reparameterization gradients and the refinement must all find these values; none of this
depends on count likelihoods.
"""

from __future__ import annotations

import math

import pytest
import torch

from sclatent.inference import GaussianPosterior, gaussian_log_prob, refine_posterior
from sclatent.nn import GaussianEncoder

D, P, SIGMA_X = 3, 8, 0.5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead on shared CPUs


class LinearGaussian:
    """Data and closed-form posterior of the linear-Gaussian model."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(P, D, generator=g)
        z = torch.randn(n, D, generator=g)
        self.x = z @ self.A.T + SIGMA_X * torch.randn(n, P, generator=g)
        ata = self.A.T @ self.A
        self.mean = torch.linalg.solve(ata + SIGMA_X**2 * torch.eye(D), self.A.T @ self.x.T).T
        precision = ata / SIGMA_X**2 + torch.eye(D)
        self.var = 1.0 / torch.diagonal(precision)  # optimal *diagonal* q
        self.sd = self.var.sqrt()

    def log_likelihood(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log N(x | A z, sigma_x^2 I)``, ``z`` with optional leading sample axes."""
        return gaussian_log_prob(x, z @ self.A.T, torch.full_like(x, 2.0 * math.log(SIGMA_X)))

    def elbo(self, x: torch.Tensor, n_samples: int = 1):
        """Reparameterized Monte-Carlo ELBO per cell, in the form refine_posterior expects."""

        def fn(q: GaussianPosterior, generator: torch.Generator | None) -> torch.Tensor:
            z = q.sample(n_samples, generator)
            return self.log_likelihood(z, x).mean(0) - q.kl_to_standard().sum(-1)

        return fn

    def exact_elbo(self, x: torch.Tensor):
        """Closed-form ELBO per cell (no sampling noise)."""
        ata_diag = (self.A * self.A).sum(0)

        def fn(q: GaussianPosterior, generator: torch.Generator | None) -> torch.Tensor:
            resid = (x - q.mean @ self.A.T).square().sum(-1) + (q.logvar.exp() * ata_diag).sum(-1)
            rec = -0.5 * P * math.log(2 * math.pi * SIGMA_X**2) - 0.5 * resid / SIGMA_X**2
            return rec - q.kl_to_standard().sum(-1)

        return fn

    def mean_error(self, mean: torch.Tensor) -> float:
        """RMS error of a posterior mean, in units of the exact posterior standard deviation."""
        return float(((mean - self.mean) / self.sd).square().mean().sqrt())


def poor_start(n: int) -> GaussianPosterior:
    """Prior-like mean and a variance ~100x too large: far from the posterior."""
    return GaussianPosterior(torch.zeros(n, D), torch.full((n, D), 1.0))


def test_monte_carlo_elbo_is_unbiased_and_maximal_at_exact_posterior():
    lg = LinearGaussian(64)
    q = GaussianPosterior(lg.mean + 0.3, torch.log(lg.var).expand(64, D) + 0.5)
    g = torch.Generator().manual_seed(0)
    z = q.sample(20000, g)
    draws = lg.log_likelihood(z, lg.x) - q.kl_to_standard().sum(-1)  # one-sample ELBOs, (20000, 64)
    exact = lg.exact_elbo(lg.x)(q, None)
    standard_error = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - exact).abs() < 5 * standard_error).all()
    optimum = GaussianPosterior(lg.mean, torch.log(lg.var).expand(64, D))
    assert (lg.exact_elbo(lg.x)(optimum, None) > exact).all()


def test_refinement_of_exact_elbo_converges_to_exact_posterior():
    lg = LinearGaussian(128)
    q = refine_posterior(lg.exact_elbo(lg.x), poor_start(128), 600, lr=0.05)
    q = refine_posterior(lg.exact_elbo(lg.x), q, 400, lr=0.005)
    assert lg.mean_error(q.mean) < 1e-2
    assert torch.allclose(q.logvar.exp() / lg.var, torch.ones(128, D), atol=1e-2)


def test_refinement_of_monte_carlo_elbo_converges_from_poor_start():
    lg = LinearGaussian(256)
    g = torch.Generator().manual_seed(1)
    q = poor_start(256)
    assert lg.mean_error(q.mean) > 3.0
    for steps, lr in ((400, 0.05), (300, 0.01), (200, 0.002)):  # a decaying step size beats the noise
        q = refine_posterior(lg.elbo(lg.x, n_samples=8), q, steps, lr, g)
    err = ((q.mean - lg.mean) / lg.sd).abs()
    ratio = q.logvar.exp() / lg.var
    assert float(err.square().mean().sqrt()) < 0.1
    assert float(err.max()) < 0.4
    assert 0.8 < float(ratio.min()) and float(ratio.max()) < 1.25
    assert abs(float(ratio.mean()) - 1.0) < 0.05


def test_trained_encoder_approaches_exact_posterior_and_refinement_closes_the_gap():
    lg = LinearGaussian(2048)
    torch.manual_seed(0)
    encoder = GaussianEncoder(P, D, n_hidden=128, n_layers=1, dropout_rate=0.0)
    with torch.no_grad():
        untrained_error = lg.mean_error(encoder(lg.x)[0])
    steps = 800
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):  # maximize the ELBO with the exact decoder fixed
        idx = torch.randint(0, len(lg.x), (256,), generator=g)
        q = GaussianPosterior(*encoder(lg.x[idx]))
        loss = -lg.elbo(lg.x[idx], n_samples=2)(q, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        amortized = GaussianPosterior(*encoder(lg.x))
    error = lg.mean_error(amortized.mean)
    assert untrained_error > 3.0
    assert error < 0.5  # within half a posterior sd (RMS) of the exact mean
    r2 = 1 - (amortized.mean - lg.mean).square().sum() / (lg.mean - lg.mean.mean(0)).square().sum()
    assert float(r2) > 0.99
    ratio = (amortized.logvar.exp() / lg.var).mean(0)
    assert torch.allclose(ratio, torch.ones(D), atol=0.15)

    # semi-amortized: refining the encoder's answer removes most of the remaining error
    # and never lowers the (exact) ELBO on average: the amortization gap is >= 0
    cells = slice(0, 256)
    x = lg.x[cells]
    start = GaussianPosterior(amortized.mean[cells], amortized.logvar[cells])
    refined = refine_posterior(lg.elbo(x, n_samples=8), start, 100, lr=0.01, generator=torch.Generator().manual_seed(2))
    exact = lg.exact_elbo(x)
    gap = exact(refined, None) - exact(start, None)
    assert float(gap.mean()) > 0
    mean_err = lambda m: float(((m - lg.mean[cells]) / lg.sd).square().mean().sqrt())  # noqa: E731
    assert mean_err(refined.mean) < 0.5 * mean_err(start.mean)


def test_batched_refinement_equals_per_cell_refinement():
    lg = LinearGaussian(32)
    start = poor_start(32)
    together = refine_posterior(lg.exact_elbo(lg.x), start, 50, lr=0.05)
    for i in (0, 7, 31):
        alone = refine_posterior(
            lg.exact_elbo(lg.x[i : i + 1]), GaussianPosterior(start.mean[i : i + 1], start.logvar[i : i + 1]), 50, lr=0.05
        )
        assert torch.allclose(alone.mean, together.mean[i : i + 1], atol=1e-5)
        assert torch.allclose(alone.logvar, together.logvar[i : i + 1], atol=1e-5)


def test_refinement_is_deterministic_under_a_seed():
    lg = LinearGaussian(16)
    run = lambda seed: refine_posterior(lg.elbo(lg.x), poor_start(16), 20, 0.05, torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)
    assert not torch.equal(a.mean, c.mean)


def test_zero_steps_returns_start_and_negative_steps_raise():
    lg = LinearGaussian(8)
    start = GaussianPosterior(torch.randn(8, D, requires_grad=True), torch.zeros(8, D, requires_grad=True))
    out = refine_posterior(lg.elbo(lg.x), start, 0)
    assert torch.equal(out.mean, start.mean) and torch.equal(out.logvar, start.logvar)
    assert not out.mean.requires_grad and not out.logvar.requires_grad
    with pytest.raises(ValueError, match="refine_steps"):
        refine_posterior(lg.elbo(lg.x), start, -1)


def test_refinement_leaves_weights_and_start_untouched():
    lg = LinearGaussian(32)
    torch.manual_seed(0)
    decoder = torch.nn.Linear(D, P, bias=False)  # a learnable decoder, frozen during refinement
    with torch.no_grad():
        decoder.weight.copy_(lg.A)
    encoder = GaussianEncoder(P, D, n_hidden=16, dropout_rate=0.0)
    before = {k: v.clone() for k, v in [*decoder.state_dict().items(), *encoder.state_dict().items()]}
    start = GaussianPosterior(*encoder(lg.x))  # carries a graph back into the encoder
    start_values = (start.mean.detach().clone(), start.logvar.detach().clone())

    def elbo(q, gen):
        z = q.sample(generator=gen)
        x_hat = decoder(z)
        return gaussian_log_prob(lg.x, x_hat, torch.full_like(lg.x, 2 * math.log(SIGMA_X))) - q.kl_to_standard().sum(-1)

    refined = refine_posterior(elbo, start, 25, 0.05, torch.Generator().manual_seed(0))
    after = {k: v for k, v in [*decoder.state_dict().items(), *encoder.state_dict().items()]}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in [*decoder.parameters(), *encoder.parameters()])
    assert torch.equal(start.mean.detach(), start_values[0]) and torch.equal(start.logvar.detach(), start_values[1])
    assert not refined.mean.requires_grad and not refined.logvar.requires_grad
    assert not torch.equal(refined.mean, start_values[0])


def test_refinement_never_leaves_a_cell_worse_than_it_started_beyond_monte_carlo_error():
    """From the best member of the family, noisy steps at a high rate can only do harm:
    plain refinement leaves most cells worse, monotone refinement falls back for them."""
    lg = LinearGaussian(512)
    start = GaussianPosterior(lg.mean.clone(), torch.log(lg.var).expand(512, D).clone())
    exact = lg.exact_elbo(lg.x)
    before = exact(start, None)
    plain = refine_posterior(lg.elbo(lg.x), start, 30, lr=0.3, generator=torch.Generator().manual_seed(0), keep_best=False)
    monotone = refine_posterior(lg.elbo(lg.x), start, 30, lr=0.3, generator=torch.Generator().manual_seed(0))
    loss_plain, loss_monotone = before - exact(plain, None), before - exact(monotone, None)
    assert (loss_plain > 0.05).float().mean() > 0.5  # the noise really harms the plain iterate
    assert (loss_monotone > 0.05).float().mean() < 0.05  # only cells within the test's error remain worse
    assert float(loss_monotone.mean()) < 0.1 * float(loss_plain.mean())
    # from a poor start the refined posterior is kept: the fallback costs nothing there
    poor = poor_start(512)
    kept = refine_posterior(lg.elbo(lg.x, n_samples=8), poor, 200, lr=0.05, generator=torch.Generator().manual_seed(1))
    assert (exact(kept, None) > exact(poor, None)).all()


def test_shared_parameters_are_fitted_jointly_with_the_posteriors():
    """An offset shared by all cells (like a new batch's embedding row), learnt with their posteriors."""
    lg = LinearGaussian(512)
    shift = torch.linspace(-2.0, 2.0, P)
    x = lg.x + shift
    offset = torch.zeros(P, requires_grad=True)
    exact = lg.exact_elbo(x)

    def elbo(q: GaussianPosterior, generator: torch.Generator | None) -> torch.Tensor:
        return lg.exact_elbo(x - offset)(q, generator)

    trace: list[float] = []
    q = refine_posterior(elbo, poor_start(512), 800, lr=0.05, keep_best=False, shared=[offset], trace=trace)
    assert len(trace) == 800 and trace[-1] > trace[0]
    assert torch.allclose(offset.detach(), shift, atol=0.15), offset
    assert offset.grad is None  # gradients are not left behind
    assert (elbo(q, None) > exact(q, None)).all()  # the fitted offset explains the data better than none
    with pytest.raises(ValueError, match="keep_best=False"):
        refine_posterior(elbo, poor_start(4), 2, shared=[offset])

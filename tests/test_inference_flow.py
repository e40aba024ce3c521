"""The flow posterior against autograd and against a model whose posterior is known exactly.

The coupling flow's log-determinant must equal ``log |det J|`` of the Jacobian autograd
computes; its inverse must undo it; its density must be the change of variables. On the
linear-Gaussian model (``z ~ N(0, I)``, ``x | z ~ N(A z, sigma^2 I)``) the exact posterior
is a full-covariance Gaussian, which no diagonal Gaussian can match; a flow posterior
fitted on the ELBO must get closer to it, covariance included.
"""

from __future__ import annotations

import math

import pytest
import torch

from sclatent.inference import CouplingFlow, FlowPosterior, GaussianPosterior, gaussian_log_prob, standard_normal_log_prob

D, P, SIGMA_X = 3, 8, 0.5

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_flow(d: int, n_flows: int = 4, seed: int = 0) -> CouplingFlow:
    """A flow far from the identity (its zero-initialized output layers given random weights)."""
    torch.manual_seed(seed)
    flow = CouplingFlow(d, n_flows, n_hidden=16).double()
    with torch.no_grad():
        for layer in flow.layers:
            layer.net[-1].weight.normal_(0, 0.5)
            layer.net[-1].bias.normal_(0, 0.5)
    return flow


def test_log_determinant_matches_the_autograd_jacobian():
    d = 4
    flow = _random_flow(d)
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(6, d, generator=g, dtype=torch.float64), torch.randn(6, d, generator=g, dtype=torch.float64)
    z0 = torch.randn(6, d, generator=g, dtype=torch.float64)
    z, log_det = flow(z0, mean, logvar)
    for i in range(6):
        jac = torch.autograd.functional.jacobian(lambda x: flow(x[None], mean[i : i + 1], logvar[i : i + 1])[0][0], z0[i])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0  # affine couplings with positive scales preserve orientation
        assert torch.allclose(log_det[i], logabs, atol=1e-10)
    assert log_det.abs().max() > 0.1  # the test flow is not the identity


def test_inverse_undoes_the_flow_and_density_is_the_change_of_variables():
    d = 5
    flow = _random_flow(d, n_flows=3)
    g = torch.Generator().manual_seed(2)
    base = GaussianPosterior(torch.randn(7, d, generator=g, dtype=torch.float64), torch.randn(7, d, generator=g, dtype=torch.float64) - 1)
    q = FlowPosterior(base, flow)
    eps = torch.randn(11, 7, d, generator=g, dtype=torch.float64)  # leading sample axis
    z0 = base.from_noise(eps)
    z = q.from_noise(eps)
    back, log_det_inverse = flow.inverse(z, base.mean, base.logvar)
    _, log_det = flow(z0, base.mean, base.logvar)
    assert torch.allclose(back, z0, atol=1e-10)
    assert torch.allclose(log_det_inverse, log_det, atol=1e-10)
    assert torch.allclose(q.log_prob(z), base.log_prob(z0) - log_det, atol=1e-10)
    # sample_and_kl (forward only) and kl_estimate (through the inverse) agree on the same draw
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    z1, kl1 = q.sample_and_kl(g1)
    z2 = q.sample(generator=g2)
    assert torch.allclose(z1, z2) and torch.allclose(kl1, q.kl_estimate(z2), atol=1e-10)
    assert torch.allclose(kl1, q.log_prob(z1) - standard_normal_log_prob(z1), atol=1e-10)


def test_flow_density_integrates_to_one():
    """The density through the inverse integrates to 1 over a fine grid (d = 2)."""
    flow = _random_flow(2, n_flows=4, seed=5)
    q = FlowPosterior(GaussianPosterior(torch.tensor([[0.3, -0.2]], dtype=torch.float64), torch.tensor([[-0.5, 0.2]], dtype=torch.float64)), flow)
    grid = torch.linspace(-12, 12, 801, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 2)
    density = q.log_prob(zz).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(density.detach()) - 1.0) < 1e-3


def test_an_untrained_flow_is_the_diagonal_gaussian():
    flow = CouplingFlow(6, 4).double()
    g = torch.Generator().manual_seed(4)
    base = GaussianPosterior(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64))
    q = FlowPosterior(base, flow)
    eps = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    z = q.from_noise(eps)
    assert torch.equal(z, base.from_noise(eps))
    assert torch.allclose(q.log_prob(z), base.log_prob(z))
    assert torch.allclose(q.kl_estimate(z), base.log_prob(z) - standard_normal_log_prob(z))
    assert torch.equal(q.location, base.mean)


def test_a_frozen_flow_is_a_fixed_map_the_same_density_with_gradient_through_the_base_only():
    flow = _random_flow(D)
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(4, D, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = (0.3 * torch.randn(4, D, generator=g, dtype=torch.float64)).requires_grad_()
    z = torch.randn(2, 4, D, generator=g, dtype=torch.float64)

    def value(q: FlowPosterior) -> torch.Tensor:
        return q.log_prob(z).sum() + q.from_noise(z).square().sum() + q.location.sum() + q.sample_and_kl(torch.Generator().manual_seed(1))[1].sum()

    q = FlowPosterior(GaussianPosterior(mean, logvar), flow)
    frozen = FlowPosterior(GaussianPosterior(mean, logvar), flow, frozen_flow=True)
    assert frozen.select(torch.tensor([0, 2])).frozen_flow and frozen.detach().frozen_flow and frozen.replace(mean, logvar).frozen_flow
    trained = value(q)
    trained.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in flow.parameters())
    grad_trained = mean.grad.clone()
    flow.zero_grad(set_to_none=True)
    mean.grad = logvar.grad = None
    fixed = value(frozen)
    fixed.backward()
    assert torch.equal(trained.detach(), fixed.detach())  # the same function
    assert all(p.grad is None for p in flow.parameters())  # the weights untouched
    got = (mean.grad.clone(), logvar.grad.clone())
    # the gradient of a flow conditioned on constants: what the base Gaussian alone passes on
    mean.grad = logvar.grad = None
    constant = (mean.detach(), logvar.detach())
    z0, log_det = flow.inverse(z, *constant)
    eps = torch.randn(4, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zs, ld = flow(mean + eps * (0.5 * logvar).exp(), *constant)
    expected = (
        (gaussian_log_prob(z0, mean, logvar) - log_det).sum() + flow(mean + z * (0.5 * logvar).exp(), *constant)[0].square().sum()
        + flow(mean, *constant)[0].sum() + (gaussian_log_prob(mean + eps * (0.5 * logvar).exp(), mean, logvar) - ld - standard_normal_log_prob(zs)).sum()
    )
    expected.backward()
    assert torch.allclose(got[0], mean.grad) and torch.allclose(got[1], logvar.grad)
    assert not torch.allclose(got[0], grad_trained)  # the conditioning's share is gone


def test_flow_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_latent >= 2"):
        CouplingFlow(1)
    with pytest.raises(ValueError, match="n_flows must be >= 1"):
        CouplingFlow(4, 0)


class LinearGaussian:
    """Data, exact posterior and exact evidence of the linear-Gaussian model."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        mixing = torch.tensor([[1.0, 0.9, 0.9], [0.0, 0.45, 0.2], [0.0, 0.0, 0.4]], dtype=torch.float64)
        self.A = torch.randn(P, D, generator=g, dtype=torch.float64) @ mixing  # correlated columns: a correlated posterior
        z = torch.randn(n, D, generator=g, dtype=torch.float64)
        self.x = z @ self.A.T + SIGMA_X * torch.randn(n, P, generator=g, dtype=torch.float64)
        self.precision = self.A.T @ self.A / SIGMA_X**2 + torch.eye(D, dtype=torch.float64)
        self.cov = torch.linalg.inv(self.precision)
        self.mean = (self.cov @ self.A.T @ self.x.T).T / SIGMA_X**2
        marginal = torch.distributions.MultivariateNormal(
            torch.zeros(P, dtype=torch.float64), self.A @ self.A.T + SIGMA_X**2 * torch.eye(P, dtype=torch.float64)
        )
        self.log_evidence = marginal.log_prob(self.x)

    def log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(self.x, z @ self.A.T, torch.full_like(self.x, 2.0 * math.log(SIGMA_X)))

    def diagonal_kl(self) -> float:
        """``KL(q*_diag || p(z | x))`` of the best diagonal Gaussian (exact mean, variances
        ``1 / P_jj``): ``0.5 (sum_j log P_jj - log det P)``, the same for every cell."""
        return float(0.5 * (torch.log(torch.diagonal(self.precision)).sum() - torch.logdet(self.precision)))


def test_flow_posterior_matches_the_exact_linear_gaussian_posterior_better_than_the_diagonal_family():
    model = LinearGaussian(n=32)
    kl_diagonal = model.diagonal_kl()
    assert kl_diagonal > 0.1  # the exact posterior is far enough from diagonal for the test to mean something
    torch.manual_seed(0)
    flow = CouplingFlow(D, n_flows=4, n_hidden=32).double()
    mean = torch.zeros(32, D, dtype=torch.float64, requires_grad=True)
    logvar = torch.zeros(32, D, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([mean, logvar, *flow.parameters()], lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        q = FlowPosterior(GaussianPosterior(mean, logvar), flow)
        z = q.sample(16, g)
        elbo = (model.log_likelihood(z) - q.kl_estimate(z)).mean()
        optimizer.zero_grad()
        (-elbo).backward()
        optimizer.step()
    with torch.no_grad():
        q = FlowPosterior(GaussianPosterior(mean, logvar), flow)
        z = q.sample(4000, g)
        kl_flow = model.log_evidence - (model.log_likelihood(z) - q.kl_estimate(z)).mean(0)  # = KL(q || p(z | x)) per cell
        # covariance of each cell's draws against the exact one, and the diagonal family's best error
        centred = z - z.mean(0)
        cov = torch.einsum("kni,knj->nij", centred, centred) / (z.shape[0] - 1)
        cov_error = (cov - model.cov).norm(dim=(1, 2)).mean() / model.cov.norm()
        diag_error = (torch.diag(1.0 / torch.diagonal(model.precision)) - model.cov).norm() / model.cov.norm()
        mean_error = (z.mean(0) - model.mean).norm(dim=1).mean() / model.mean.norm(dim=1).mean()
    assert float(kl_flow.mean()) < 0.5 * kl_diagonal, (float(kl_flow.mean()), kl_diagonal)
    assert float(cov_error) < 0.5 * float(diag_error), (float(cov_error), float(diag_error))
    assert float(mean_error) < 0.05

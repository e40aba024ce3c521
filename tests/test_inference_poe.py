"""Product of experts and the Gaussian helpers against closed forms and torch.distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from sclatent.inference import (
    GaussianPosterior,
    gaussian_kl_to_standard,
    gaussian_log_prob,
    importance_log_weights,
    importance_ratios,
    log_mean_exp,
    mean_stderr,
    poe,
    standard_normal_log_prob,
)


def _numpy_poe(means: np.ndarray, logvars: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``1/s^2 = 1 + sum_m w_m / s_m^2``, ``mu = s^2 sum_m w_m mu_m / s_m^2`` (prior N(0, 1) included)."""
    w = mask.T[:, :, None]
    prec = np.where(w > 0, np.exp(-logvars), 0.0)
    total = 1.0 + prec.sum(0)
    return (prec * means).sum(0) / total, -np.log(total)


def test_poe_matches_closed_form():
    rng = np.random.default_rng(0)
    n_experts, n_cells, d = 3, 40, 5
    means = rng.normal(0, 3, size=(n_experts, n_cells, d))
    logvars = rng.uniform(-6, 4, size=(n_experts, n_cells, d))
    mask = (rng.random((n_cells, n_experts)) < 0.6).astype(np.float64)
    mask[0] = 0  # no expert
    mask[1] = 1  # all experts
    mean, logvar = poe(torch.as_tensor(means), torch.as_tensor(logvars), torch.as_tensor(mask))
    ref_mean, ref_logvar = _numpy_poe(means, logvars, mask)
    assert mean.shape == logvar.shape == (n_cells, d)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logvar.numpy(), ref_logvar, rtol=1e-12, atol=1e-12)
    # the fused posterior is never wider than the prior, and narrower than every present expert
    assert (logvar.numpy() <= 1e-12).all()
    present = np.broadcast_to(mask.T[:, :, None] > 0, logvars.shape)
    assert (np.broadcast_to(logvar.numpy(), logvars.shape)[present] < logvars[present]).all()


def test_single_expert_is_precision_weighted_with_prior():
    mu = torch.tensor([[[2.0, -1.0, 0.5]]], dtype=torch.float64)
    logvar = torch.log(torch.tensor([[[0.25, 4.0, 1.0]]], dtype=torch.float64))
    mean, lv = poe(mu, logvar, torch.ones(1, 1, dtype=torch.float64))
    var = logvar.exp()[0]
    # N(mu, s^2) * N(0, 1): precision 1 + 1/s^2, mean (mu / s^2) / (1 + 1/s^2) = mu / (1 + s^2)
    np.testing.assert_allclose(mean.numpy(), (mu[0] / (1 + var)).numpy(), rtol=1e-14)
    np.testing.assert_allclose(lv.exp().numpy(), (var / (1 + var)).numpy(), rtol=1e-14)
    np.testing.assert_allclose(mean.numpy(), [[1.6, -0.2, 0.25]], rtol=1e-14)


def test_cell_without_experts_gets_the_prior():
    rng = np.random.default_rng(1)
    means = torch.as_tensor(rng.normal(size=(2, 3, 4)))
    logvars = torch.as_tensor(rng.normal(size=(2, 3, 4)))
    mask = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    mean, logvar = poe(means, logvars, mask)
    for cell in (0, 2):
        assert torch.equal(mean[cell], torch.zeros(4, dtype=torch.float64))
        assert torch.equal(logvar[cell], torch.zeros(4, dtype=torch.float64))
    assert not torch.allclose(mean[1], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad_mean,bad_logvar", [(1e30, -1000.0), (-1e30, 1000.0), (3e37, -88.0), (0.0, -1e6)])
def test_masked_expert_is_ignored_whatever_its_values(dtype, bad_mean, bad_logvar):
    """An absent modality's encoder output is garbage (it saw zeros): it must not matter at all."""
    rng = np.random.default_rng(2)
    good_mean = torch.as_tensor(rng.normal(size=(1, 5, 3)), dtype=dtype)
    good_logvar = torch.as_tensor(rng.normal(size=(1, 5, 3)), dtype=dtype)
    means = torch.cat([good_mean, torch.full((1, 5, 3), bad_mean, dtype=dtype)])
    logvars = torch.cat([good_logvar, torch.full((1, 5, 3), bad_logvar, dtype=dtype)])
    mask = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 0.0]], dtype=dtype)
    mean, logvar = poe(means, logvars, mask)
    ref_mean, ref_logvar = poe(good_mean, good_logvar, mask[:, :1])
    assert torch.isfinite(mean).all() and torch.isfinite(logvar).all()
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0)
    torch.testing.assert_close(logvar, ref_logvar, rtol=0, atol=0)
    # and gradients into the absent expert are zero (not NaN)
    means.requires_grad_(True)
    logvars.requires_grad_(True)
    m, lv = poe(means, logvars, mask)
    (m.sum() + lv.sum()).backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(logvars.grad).all()
    assert torch.equal(means.grad[1], torch.zeros_like(means.grad[1]))
    assert torch.equal(logvars.grad[1], torch.zeros_like(logvars.grad[1]))


def test_poe_rejects_misshapen_input():
    m = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="n_experts, n_cells, n_latent"):
        poe(m, torch.zeros(2, 3, 5), torch.ones(3, 2))
    with pytest.raises(ValueError, match="mask must be"):
        poe(m, m, torch.ones(2, 3))


def test_kl_to_standard_matches_torch_distributions():
    rng = np.random.default_rng(3)
    mean = torch.as_tensor(rng.normal(0, 2, size=(50, 6)))
    logvar = torch.as_tensor(rng.uniform(-10, 6, size=(50, 6)))
    ours = gaussian_kl_to_standard(mean, logvar)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    assert (ours >= 0).all()
    assert torch.equal(gaussian_kl_to_standard(torch.zeros(3), torch.zeros(3)), torch.zeros(3))
    torch.testing.assert_close(GaussianPosterior(mean, logvar).kl_to_standard(), ref, rtol=1e-10, atol=1e-10)


def test_gaussian_log_prob_matches_torch_normal():
    rng = np.random.default_rng(4)
    mean = torch.as_tensor(rng.normal(size=(7, 3)))
    logvar = torch.as_tensor(rng.uniform(-4, 3, size=(7, 3)))
    z = torch.as_tensor(rng.normal(0, 3, size=(11, 7, 3)))  # a leading sample axis
    ours = gaussian_log_prob(z, mean, logvar)
    ref = Normal(mean, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    assert ours.shape == (11, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(GaussianPosterior(mean, logvar).log_prob(z), ref, rtol=1e-12, atol=1e-10)
    std_ref = Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(standard_normal_log_prob(z), std_ref, rtol=1e-12, atol=1e-10)


def test_posterior_samples_have_the_posterior_moments():
    mean = torch.tensor([[1.0, -2.0], [0.0, 5.0]], dtype=torch.float64)
    logvar = torch.log(torch.tensor([[0.25, 4.0], [1.0, 0.01]], dtype=torch.float64))
    q = GaussianPosterior(mean, logvar)
    z = q.sample(100_000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (100_000, 2, 2)
    sd = (0.5 * logvar).exp()
    assert ((z.mean(0) - mean).abs() < 5 * sd / math.sqrt(100_000)).all()
    torch.testing.assert_close(z.var(0), logvar.exp(), rtol=0.02, atol=0)
    # reproducible with a seeded generator
    a = q.sample(generator=torch.Generator().manual_seed(7))
    b = q.sample(generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_log_mean_exp_is_stable_and_exact():
    w = torch.tensor([[1000.0, -1000.0], [1001.0, -1001.0], [999.0, -999.0]], dtype=torch.float64)
    out = log_mean_exp(w, dim=0)
    ref = w.max(0).values + torch.log(torch.exp(w - w.max(0).values).mean(0))
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-12)
    assert torch.isfinite(out).all()
    x = torch.as_tensor(np.random.default_rng(5).normal(size=(4, 6)))
    torch.testing.assert_close(log_mean_exp(x, dim=1), torch.log(torch.exp(x).mean(1)), rtol=1e-12, atol=1e-12)


def test_importance_log_weights_are_the_log_density_ratio():
    q = GaussianPosterior(torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[-0.4, 0.3]], dtype=torch.float64))
    z = q.sample(5, generator=torch.Generator().manual_seed(0))
    log_lik = torch.arange(5.0, dtype=torch.float64)[:, None]
    q_dist = Normal(q.mean, (0.5 * q.logvar).exp())
    want = log_lik + Normal(0.0, 1.0).log_prob(z).sum(-1) - q_dist.log_prob(z).sum(-1)
    torch.testing.assert_close(importance_log_weights(log_lik, z, q), want)


def test_importance_ratios_give_the_delta_method_stderr_of_log_mean_exp():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(400, 3)) * np.array([0.1, 0.5, 1.0]) + np.array([0.0, 800.0, -800.0])  # offsets: stability
    ratios = importance_ratios(torch.as_tensor(w), dim=0)
    torch.testing.assert_close(ratios.mean(0), torch.ones(3, dtype=torch.float64))
    centred = np.exp(w - w.max(0))
    want = centred.std(0, ddof=1) / np.sqrt(400) / centred.mean(0)  # SE(mean w) / mean w
    np.testing.assert_allclose(mean_stderr(ratios).numpy(), want, rtol=1e-10)
    softmax = centred / centred.sum(0)
    np.testing.assert_allclose(want, np.sqrt((400 * (softmax**2).sum(0) - 1) / 399), rtol=1e-10)
    # calibrated: over repeated estimates, log_mean_exp scatters by about the reported error
    reps = torch.as_tensor(rng.normal(scale=0.5, size=(2000, 400)))
    estimates = log_mean_exp(reps, dim=1)
    reported = mean_stderr(importance_ratios(reps, dim=1), dim=1)
    assert abs(float(estimates.std()) / float(reported.mean()) - 1.0) < 0.1
    with pytest.raises(ValueError, match="at least 2 draws"):
        mean_stderr(torch.zeros(1, 3))

"""Count likelihoods against scipy.stats, in float64, over a grid of counts and parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
import scipy.special
from scipy.special import expit

from sclatent.distributions import Bernoulli, NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

COUNTS = np.array([0, 1, 2, 3, 7, 20, 100, 1_000, 25_000], dtype=np.float64)
MUS = np.array([1e-4, 0.05, 0.7, 3.0, 40.0, 900.0, 2e4])
THETAS = np.array([0.02, 0.3, 1.0, 5.0, 80.0, 1e4])
ZI_LOGITS = np.array([-6.0, -1.0, 0.0, 2.5])


def _grid(*axes):
    """Full Cartesian grid of the axes, each flattened to 1-d."""
    mesh = np.meshgrid(*axes, indexing="ij")
    return [m.ravel() for m in mesh]


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


# ------------------------------------------------------------------ log_prob vs scipy
def test_poisson_log_prob_matches_scipy():
    x, mu = _grid(COUNTS, MUS)
    ours = Poisson(t(np.log(mu))).log_prob(t(x)).numpy()
    ref = stats.poisson.logpmf(x, mu)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-8)
    assert ours.dtype == np.float64


def test_negative_binomial_log_prob_matches_scipy():
    x, mu, theta = _grid(COUNTS, MUS, THETAS)
    ours = NegativeBinomial(t(np.log(mu)), t(np.log(theta))).log_prob(t(x)).numpy()
    ref = stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-7)


def test_negative_binomial_approaches_poisson_for_large_theta():
    x, mu = _grid(COUNTS[:7], MUS[:5])
    nb = NegativeBinomial(t(np.log(mu)), t(np.full_like(mu, np.log(1e8)))).log_prob(t(x)).numpy()
    np.testing.assert_allclose(nb, stats.poisson.logpmf(x, mu), atol=1e-4)


def test_zinb_log_prob_matches_mixture_of_scipy_nbinom():
    x, mu, theta, zi = _grid(COUNTS, MUS, THETAS, ZI_LOGITS)
    ours = ZeroInflatedNegativeBinomial(t(np.log(mu)), t(np.log(theta)), t(zi)).log_prob(t(x)).numpy()
    pi = expit(zi)
    p = theta / (theta + mu)
    # pi * 1[x = 0] + (1 - pi) * NB(x), on the log scale to keep tiny probabilities finite
    ref = np.where(
        x == 0,
        np.log(pi + (1 - pi) * stats.nbinom.pmf(0, n=theta, p=p)),
        np.log1p(-pi) + stats.nbinom.logpmf(x, n=theta, p=p),
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-7)
    # the zero probability is never below the structural-zero probability
    assert (np.exp(ours[x == 0]) >= pi[x == 0] - 1e-12).all()


def test_zinb_with_no_inflation_equals_nb():
    x, mu, theta = _grid(COUNTS, MUS, THETAS)
    # pi = sigmoid(-1e5): log pi = -1e5 is far below every log NB(0) of the grid
    zinb = ZeroInflatedNegativeBinomial(t(np.log(mu)), t(np.log(theta)), t(np.full_like(mu, -1e5)))
    nb = NegativeBinomial(t(np.log(mu)), t(np.log(theta)))
    np.testing.assert_allclose(zinb.log_prob(t(x)).numpy(), nb.log_prob(t(x)).numpy(), rtol=1e-12, atol=1e-12)


def test_bernoulli_log_prob_matches_scipy():
    mus = np.array([1e-6, 1e-3, 0.05, 0.7, 3.0, 20.0])
    x, mu = _grid(COUNTS, mus)
    ours = Bernoulli(t(np.log(mu))).log_prob(t(x)).numpy()
    ref = stats.bernoulli.logpmf((x > 0).astype(int), -np.expm1(-mu))
    # scipy forms log(1 - p) from p = 1 - exp(-mu) and loses ~1e-9 relative at mu = 20
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-12)
    exact = np.where(x > 0, np.log(-np.expm1(-mu)), -mu)
    np.testing.assert_allclose(ours, exact, rtol=1e-12, atol=1e-15)
    # a count of 5 and a count of 1 are the same event
    d = Bernoulli(t(np.log(mus)))
    np.testing.assert_array_equal(d.log_prob(t(np.full_like(mus, 5.0))).numpy(), d.log_prob(t(np.ones_like(mus))).numpy())


def test_bernoulli_is_finite_for_extreme_rates():
    d = Bernoulli(t(np.log([1e-30, 1e3])))
    lp0 = d.log_prob(t([0.0, 0.0])).numpy()
    lp1 = d.log_prob(t([1.0, 1.0])).numpy()
    np.testing.assert_allclose(lp0, [-1e-30, -1e3])  # log P(0) = -mu, exactly, even where P(0) underflows
    assert np.isfinite(lp1).all()
    np.testing.assert_allclose(lp1[1], 0.0, atol=1e-12)


@pytest.mark.parametrize("mu", [0.3, 8.0])
def test_probabilities_sum_to_one(mu):
    x = t(np.arange(0, 2000))
    lm = t(np.full(2000, np.log(mu)))
    for dist in (
        Poisson(lm),
        NegativeBinomial(lm, t(np.full(2000, np.log(0.7)))),
        ZeroInflatedNegativeBinomial(lm, t(np.full(2000, np.log(0.7))), t(np.full(2000, 0.4))),
    ):
        total = torch.logsumexp(dist.log_prob(x), 0).exp().item()
        assert total == pytest.approx(1.0, abs=1e-9), type(dist).__name__
    b = Bernoulli(t([np.log(mu)] * 2))
    assert torch.logsumexp(b.log_prob(t([0.0, 1.0])), 0).exp().item() == pytest.approx(1.0, abs=1e-12)


def test_log_prob_broadcasts_feature_wise_theta():
    """``log_theta`` of shape (1, G) against ``log_mu`` of shape (k, n, G), as in the module."""
    rng = np.random.default_rng(0)
    log_mu = rng.normal(1.0, 1.5, size=(3, 4, 5))
    log_theta = rng.normal(0.0, 1.0, size=(1, 5))
    x = rng.poisson(np.exp(log_mu)).astype(np.float64)
    ours = NegativeBinomial(t(log_mu), t(log_theta)).log_prob(t(x)).numpy()
    theta = np.exp(np.broadcast_to(log_theta, log_mu.shape))
    ref = stats.nbinom.logpmf(x, n=theta, p=theta / (theta + np.exp(log_mu)))
    assert ours.shape == (3, 4, 5)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- means
def test_means_match_scipy():
    mu, theta, zi = _grid(MUS, THETAS, ZI_LOGITS)
    lm, lt, z = t(np.log(mu)), t(np.log(theta)), t(zi)
    p = theta / (theta + mu)
    np.testing.assert_allclose(Poisson(lm).mean.numpy(), stats.poisson.mean(mu), rtol=1e-12)
    # scipy's theta * (1 - p) / p loses precision when mu << theta: compare at 1e-6
    np.testing.assert_allclose(NegativeBinomial(lm, lt).mean.numpy(), stats.nbinom.mean(theta, p), rtol=1e-6)
    np.testing.assert_allclose(NegativeBinomial(lm, lt).mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(
        ZeroInflatedNegativeBinomial(lm, lt, z).mean.numpy(), (1 - expit(zi)) * stats.nbinom.mean(theta, p), rtol=1e-6
    )
    np.testing.assert_allclose(Bernoulli(lm).mean.numpy(), stats.bernoulli.mean(-np.expm1(-mu)), rtol=1e-9)


# ----------------------------------------------------------------------- sample means
N_DRAWS = 200_000
SAMPLE_MUS = np.array([0.2, 3.0, 50.0])
SAMPLE_THETAS = np.array([0.5, 4.0])


def _check_sample_mean(dist, mean: np.ndarray, var: np.ndarray) -> None:
    torch.manual_seed(0)  # the Gamma draws of the NB use the global generator
    draws = dist.sample(generator=torch.Generator().manual_seed(1)).numpy()
    assert draws.shape == (N_DRAWS, len(mean))
    assert (draws >= 0).all() and (draws == np.round(draws)).all()
    se = np.sqrt(var / N_DRAWS)
    z = np.abs(draws.mean(0) - mean) / se
    assert (z < 5.0).all(), f"sample means {draws.mean(0)} vs {mean} (z = {z})"
    np.testing.assert_allclose(draws.var(0), var, rtol=0.1)


def test_poisson_sample_mean():
    lm = t(np.log(SAMPLE_MUS)).expand(N_DRAWS, -1).clone()
    d = Poisson(lm)
    _check_sample_mean(d, d.mean[0].numpy(), SAMPLE_MUS)


def test_negative_binomial_sample_mean():
    mu, theta = _grid(SAMPLE_MUS, SAMPLE_THETAS)
    d = NegativeBinomial(t(np.log(mu)).expand(N_DRAWS, -1).clone(), t(np.log(theta)))
    _check_sample_mean(d, d.mean[0].numpy(), stats.nbinom.var(theta, theta / (theta + mu)))


def test_zinb_sample_mean():
    mu, theta = _grid(SAMPLE_MUS, SAMPLE_THETAS)
    zi = np.full_like(mu, 0.5)
    pi = expit(zi)
    d = ZeroInflatedNegativeBinomial(t(np.log(mu)).expand(N_DRAWS, -1).clone(), t(np.log(theta)), t(zi))
    nb_var = mu + mu**2 / theta
    var = (1 - pi) * (nb_var + mu**2) - ((1 - pi) * mu) ** 2
    _check_sample_mean(d, d.mean[0].numpy(), var)
    np.testing.assert_allclose(d.mean[0].numpy(), (1 - pi) * mu, rtol=1e-12)


def test_bernoulli_sample_mean():
    mus = np.array([0.01, 0.2, 3.0])
    p = -np.expm1(-mus)
    d = Bernoulli(t(np.log(mus)).expand(N_DRAWS, -1).clone())
    _check_sample_mean(d, d.mean[0].numpy(), p * (1 - p))


# ------------------------------------------------------- sparse (nonzeros-only) totals
@pytest.mark.parametrize("kind", ["poisson", "nb", "nb-per-cell-theta", "zinb", "bernoulli"])
def test_sum_log_prob_sparse_equals_dense_sum(kind):
    """The per-cell total computed from the nonzero entries equals the dense sum."""
    rng = np.random.default_rng(3)
    k, n, g = 2, 6, 9
    log_mu = rng.normal(0.0, 1.5, size=(k, n, g))
    x = rng.poisson(np.exp(log_mu[0])) * (rng.random((n, g)) < 0.5)
    x[2] = 0  # a cell without any nonzero count
    x[0, :3] = [17, 40, 250]  # counts beyond the NB lgamma table take the direct formula
    log_theta = rng.normal(0.0, 1.0, size=(n, g) if kind == "nb-per-cell-theta" else (1, g))
    zi = rng.normal(0.0, 1.0, size=(k, n, g))
    dist = {
        "poisson": lambda: Poisson(t(log_mu)),
        "nb": lambda: NegativeBinomial(t(log_mu), t(log_theta)),
        "nb-per-cell-theta": lambda: NegativeBinomial(t(log_mu), t(log_theta)),
        "zinb": lambda: ZeroInflatedNegativeBinomial(t(log_mu), t(log_theta), t(zi)),
        "bernoulli": lambda: Bernoulli(t(log_mu)),
    }[kind]()
    if not hasattr(dist, "sum_log_prob_sparse"):
        pytest.skip("this version of sclatent has no sparse likelihood path")
    rows, cols = np.nonzero(x)
    sparse = dist.sum_log_prob_sparse(
        torch.as_tensor(rows), torch.as_tensor(cols), t(x[rows, cols])
    ).numpy()
    dense = dist.log_prob(t(x.astype(np.float64))).sum(-1).numpy()
    assert sparse.shape == (k, n)
    np.testing.assert_allclose(sparse, dense, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(dist.log_prob_zero().numpy(), dist.log_prob(t(np.zeros((n, g)))).numpy(), atol=1e-10)


@pytest.mark.parametrize("with_dense", [False, True])
@pytest.mark.parametrize("kind", ["poisson", "nb", "nb-per-cell-theta"])
def test_sum_log_prob_sparse_gradients_and_log_factorial(kind, with_dense):
    """Same value and gradients as the dense sum on every code path (gathered nonzeros, dense
    product for dense-enough batches, per-cell dispersion), with a precomputed sum lgamma(x + 1)."""
    rng = np.random.default_rng(4)
    n, g = 5, 30
    x = rng.negative_binomial(2, 0.3, size=(n, g)) * (rng.random((n, g)) < 0.4)
    x[1, 0] = 100
    log_mu = torch.tensor(rng.normal(0.5, 1.0, size=(n, g)), requires_grad=True)
    log_theta = torch.tensor(rng.normal(0.0, 1.0, size=(n if kind == "nb-per-cell-theta" else 1, g)), requires_grad=True)

    def make():
        return Poisson(log_mu) if kind == "poisson" else NegativeBinomial(log_mu, log_theta)

    rows, cols = (torch.as_tensor(a) for a in np.nonzero(x))
    values = t(x[np.nonzero(x)].astype(np.float64))
    weights = t(rng.normal(size=n))
    dense = make().log_prob(t(x.astype(np.float64))).sum(-1)
    (dense * weights).sum().backward()
    grads = [p.grad.clone() for p in (log_mu, log_theta) if p.grad is not None]
    for p in (log_mu, log_theta):
        p.grad = None
    log_fact = t(scipy.special.gammaln(x + 1.0).sum(1))
    dense_x = t(x.astype(np.float64)) if with_dense else None
    sparse = make().sum_log_prob_sparse(rows, cols, values, log_factorial=log_fact, dense=dense_x)
    (sparse * weights).sum().backward()
    np.testing.assert_allclose(sparse.detach().numpy(), dense.detach().numpy(), rtol=1e-10)
    for expected, p in zip(grads, [p for p in (log_mu, log_theta) if p.grad is not None]):
        np.testing.assert_allclose(p.grad.numpy(), expected.numpy(), rtol=1e-8, atol=1e-10)


def test_poisson_with_known_mean_total_matches_dense_sum_and_gradient():
    """With mu = library * softmax(logits), sum_g mu_g is the library: value and gradient unchanged."""
    rng = np.random.default_rng(5)
    x = rng.poisson(0.5, size=(4, 12))
    logits = torch.tensor(rng.normal(size=(4, 12)), requires_grad=True)
    log_lib = t(np.log([3.0, 10.0, 1.0, 7.0]))
    weights = t(rng.normal(size=4))
    dense = Poisson(torch.log_softmax(logits, -1) + log_lib[:, None]).log_prob(t(x.astype(np.float64))).sum(-1)
    (dense * weights).sum().backward()
    expected = logits.grad.clone()
    logits.grad = None
    rows, cols = (torch.as_tensor(a) for a in np.nonzero(x))
    d = Poisson(torch.log_softmax(logits, -1) + log_lib[:, None], mean_total=log_lib.exp())
    sparse = d.sum_log_prob_sparse(rows, cols, t(x[np.nonzero(x)].astype(np.float64)))
    (sparse * weights).sum().backward()
    np.testing.assert_allclose(sparse.detach().numpy(), dense.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(logits.grad.numpy(), expected.numpy(), atol=1e-10)


@pytest.mark.parametrize("built_from", ["log_mu", "log_mu_and_total", "logits"])
def test_poisson_sample_nonzero_has_poisson_moments_and_sorted_coo(built_from):
    """The sparse sampler (row total, then multinomial placement) draws independent Poissons,
    also from a decoder's logits (unnormalized proportions, no log-softmax)."""
    torch.manual_seed(0)
    n, g, reps = 6, 40, 4000
    logits = 3.0 * torch.randn(n, g)
    log_rho = torch.log_softmax(logits, -1)
    library = torch.tensor([3.0, 10.0, 0.5, 25.0, 1.0, 7.0])
    if built_from == "logits":
        dist = Poisson.from_logits(logits, library.log()[:, None], library)
    else:
        dist = Poisson(log_rho + library.log()[:, None], mean_total=library if built_from == "log_mu_and_total" else None)
    gen = torch.Generator().manual_seed(1)
    draws = torch.zeros(reps, n, g)
    for r in range(reps):
        rows, cols, values = dist.sample_nonzero(gen)
        assert bool((values > 0).all())
        key = rows * g + cols
        assert bool((key[1:] > key[:-1]).all())  # sorted by row, then column, no duplicates
        draws[r, rows, cols] = values
    mu = dist.mean
    se = (mu / reps).sqrt()
    assert float(((draws.mean(0) - mu).abs() / se).max()) < 5.0
    var = draws.var(0)
    big = mu > 0.5
    np.testing.assert_allclose(var[big].numpy(), mu[big].numpy(), rtol=0.25)  # Poisson: variance = mean
    # the same law as the dense sampler: P(x = 0) = exp(-mu)
    np.testing.assert_allclose((draws == 0).float().mean(0).numpy(), torch.exp(-mu).numpy(), atol=0.03)


def test_sample_nonzero_default_is_the_dense_draw_as_coo():
    """Likelihoods without a sparse sampler return exactly their dense draw's nonzeros."""
    dist = ZeroInflatedNegativeBinomial(torch.randn(5, 30), torch.zeros(1, 30), torch.randn(5, 30))
    torch.manual_seed(3)
    dense = dist.sample()
    torch.manual_seed(3)
    rows, cols, values = dist.sample_nonzero()
    rebuilt = torch.zeros_like(dense)
    rebuilt[rows, cols] = values
    torch.testing.assert_close(rebuilt, dense)
    assert bool((values > 0).all()) and bool(((rows * 30 + cols).diff() > 0).all())


def test_logseries_draws_follow_scipys_logser():
    """Kemp's algorithm, vectorized: the frequencies of k = 1..8 match scipy's pmf, for a small and a large p."""
    from sclatent.distributions import _logseries

    gen = torch.Generator().manual_seed(0)
    n = 200_000
    for p in (0.05, 0.6, 0.97):
        draws = _logseries(torch.full((n,), -np.log1p(-p), dtype=torch.float64), gen).numpy()
        assert draws.min() >= 1 and np.all(draws == np.floor(draws))
        k = np.arange(1, 9)
        freq = (draws[:, None] == k).mean(0)
        pmf = stats.logser.pmf(k, p)
        np.testing.assert_array_less(np.abs(freq - pmf), 5 * np.sqrt(pmf * (1 - pmf) / n) + 1e-4)


@pytest.mark.parametrize("built_from", ["log_mu", "logits", "per_cell_theta"])
def test_negative_binomial_sample_nonzero_follows_scipys_nbinom(built_from):
    """The compound-Poisson sparse sampler draws the negative binomial of the dense one:
    P(x = k) for k = 0..6 against scipy.stats.nbinom, over means from 0.02 to 80 and
    inverse dispersions from 0.2 to 50, as sorted COO with no zero."""
    torch.manual_seed(0)
    n, g, reps = 4, 6, 6000
    logits = torch.tensor([[-4.0, -1.0, 0.0, 1.0, 2.0, 3.0]]).expand(n, g) + 0.5 * torch.randn(n, g)
    library = torch.tensor([5.0, 40.0, 120.0, 2.0])
    log_theta = torch.log(torch.tensor([0.2, 1.0, 5.0, 50.0, 2.0, 0.5]))[None, :]
    if built_from == "per_cell_theta":
        log_theta = log_theta + torch.linspace(-1.0, 1.0, n)[:, None]
    if built_from == "logits":
        dist = NegativeBinomial.from_logits(logits, library.log()[:, None], log_theta)
    else:
        dist = NegativeBinomial(torch.log_softmax(logits, -1) + library.log()[:, None], log_theta)
    gen = torch.Generator().manual_seed(1)
    draws = torch.zeros(reps, n, g, dtype=torch.float64)
    for r in range(reps):
        rows, cols, values = dist.sample_nonzero(gen)
        assert bool((values > 0).all()) and bool((values == values.floor()).all())
        key = rows * g + cols
        assert bool((key[1:] > key[:-1]).all())  # sorted by row, then column, no duplicates
        draws[r, rows, cols] = values.double()
    mu = dist.mean.double().numpy()
    theta = np.broadcast_to(log_theta.exp().double().numpy(), mu.shape)
    for k in range(7):
        pmf = stats.nbinom.pmf(k, theta, theta / (theta + mu))
        freq = (draws == k).double().mean(0).numpy()
        np.testing.assert_array_less(np.abs(freq - pmf), 5 * np.sqrt(pmf * (1 - pmf) / reps) + 2e-3)
    mean = draws.mean(0).numpy()
    sd = np.sqrt((mu + mu**2 / theta) / reps)
    assert np.max(np.abs(mean - mu) / sd) < 5.0


# ------------------------------------------------------------------ the likelihood table and zero inflation
def test_every_likelihood_name_builds_its_class_from_decoder_outputs():
    from sclatent.distributions import LIKELIHOODS, ZeroInflated, likelihood_kind

    log_mu, log_theta, zi = t(np.log([[0.5, 2.0]])), t(np.log([[3.0, 3.0]])), t([[0.2, -1.0]])
    expected = {"nb": NegativeBinomial, "zinb": ZeroInflated, "poisson": Poisson, "zip": ZeroInflated, "bernoulli": Bernoulli}
    assert set(LIKELIHOODS) == set(expected)
    for name, cls in expected.items():
        dist = likelihood_kind(name).build(log_mu, log_theta, zi)
        assert type(dist) is cls, name
    assert isinstance(likelihood_kind("zip").build(log_mu, zi_logits=zi).base, Poisson)
    with pytest.raises(ValueError, match=r"Unknown likelihood 'gaussian'.*choose one of"):
        likelihood_kind("gaussian")


def test_zero_inflated_poisson_matches_mixture_of_scipy_poisson():
    from sclatent.distributions import ZeroInflated

    x, mu, zi = _grid(COUNTS, MUS, ZI_LOGITS)
    ours = ZeroInflated(Poisson(t(np.log(mu))), t(zi)).log_prob(t(x)).numpy()
    pi = expit(zi)
    ref = np.where(x == 0, np.logaddexp(np.log(pi), np.log1p(-pi) + stats.poisson.logpmf(0, mu)), np.log1p(-pi) + stats.poisson.logpmf(x, mu))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-8)
    # the sparse per-cell total (generic nonzeros identity) equals the dense sum
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.4, size=(6, 30)).astype(np.float64)
    dist = ZeroInflated(Poisson(t(rng.normal(-1, 1, (6, 30)))), t(rng.normal(0, 1, (6, 30))))
    rows, cols = np.nonzero(counts)
    sparse = dist.sum_log_prob_sparse(torch.as_tensor(rows), torch.as_tensor(cols), t(counts[rows, cols]))
    np.testing.assert_allclose(sparse.numpy(), dist.log_prob(t(counts)).sum(-1).numpy(), rtol=1e-10)


@pytest.mark.parametrize("name", ["nb", "zinb", "poisson", "zip", "bernoulli"])
def test_samplers_follow_the_generator_and_leave_the_global_rng_alone(name):
    from sclatent.distributions import likelihood_kind

    log_mu = t(np.log(np.full((40, 30), 2.0)))
    dist = likelihood_kind(name).build(log_mu, t(np.zeros((1, 30))), t(np.zeros((40, 30))))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = dist.sample(torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), before), "sampling with a generator moved the global RNG"
    torch.manual_seed(999)  # a different global state must not change the draws
    b = dist.sample(torch.Generator().manual_seed(5))
    c = dist.sample(torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------- Poisson of softmax proportions
def _sparse_counts(n: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen, dtype=torch.float64) * 0.6, generator=gen)
    rows, cols = x.nonzero(as_tuple=True)
    return x, rows, cols, x[rows, cols]


def test_poisson_from_logits_equals_the_materialized_softmax_poisson_value_and_gradient():


    n, g = 7, 50
    x, rows, cols, values = _sparse_counts(n, g, 0)
    logits = torch.randn(n, g, dtype=torch.float64, requires_grad=True)
    log_lib = torch.log(torch.rand(n, 1, dtype=torch.float64) * 50 + 5)
    lazy = Poisson.from_logits(logits, log_lib, mean_total=log_lib.squeeze(-1).exp())
    got = lazy.sum_log_prob_sparse(rows, cols, values)
    assert lazy._log_mu is None  # never materialized
    log_mu = torch.log_softmax(logits, -1) + log_lib
    expected = torch.as_tensor(stats.poisson.logpmf(x.numpy(), log_mu.exp().detach().numpy()).sum(1))
    torch.testing.assert_close(got.detach(), expected)
    (g_lazy,) = torch.autograd.grad((got * torch.arange(1.0, n + 1, dtype=torch.float64)).sum(), logits)
    direct = Poisson(log_mu).log_prob(x).sum(-1)
    (g_direct,) = torch.autograd.grad((direct * torch.arange(1.0, n + 1, dtype=torch.float64)).sum(), logits)
    torch.testing.assert_close(g_lazy, g_direct)
    # everything else reads the lazily built log_mu
    torch.testing.assert_close(lazy.mean.detach(), log_mu.exp().detach())


def test_softmax_count_term_passes_gradcheck():
    from sclatent.distributions import _SoftmaxCountTerm

    _, rows, cols, values = _sparse_counts(4, 9, 1)
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: _SoftmaxCountTerm.apply(l, rows, cols, values), (logits,))


@pytest.mark.parametrize("theta_rows", [1, 7])
def test_negative_binomial_from_logits_matches_scipy_and_autograd(theta_rows):
    # the fused log-likelihood from the decoder's logits: value against scipy, gradients (logits,
    # log library, log theta per feature or per cell) against autograd of the elementwise formula
    n, g = 7, 50
    x, rows, cols, values = _sparse_counts(n, g, 2)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(n, g, dtype=torch.float64, generator=gen, requires_grad=True)
    log_lib = torch.log(torch.rand(n, 1, dtype=torch.float64, generator=gen) * 50 + 5).requires_grad_(True)
    log_theta = torch.randn(theta_rows, g, dtype=torch.float64, generator=gen, requires_grad=True)
    lazy = NegativeBinomial.from_logits(logits, log_lib, log_theta)
    got = lazy.sum_log_prob_sparse(rows, cols, values)
    assert lazy._log_mu is None  # never materialized
    log_mu = torch.log_softmax(logits, -1) + log_lib
    mu, theta = log_mu.exp().detach().numpy(), log_theta.exp().detach().expand(n, g).numpy()
    expected = torch.as_tensor(stats.nbinom.logpmf(x.numpy(), theta, theta / (theta + mu)).sum(1))
    torch.testing.assert_close(got.detach(), expected)
    weights = torch.arange(1.0, n + 1, dtype=torch.float64)
    fused = torch.autograd.grad((got * weights).sum(), (logits, log_lib, log_theta))
    direct = torch.autograd.grad((NegativeBinomial(log_mu, log_theta).log_prob(x).sum(-1) * weights).sum(), (logits, log_lib, log_theta))
    for a, b in zip(fused, direct):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # no gradient buffers built, the same value
        torch.testing.assert_close(NegativeBinomial.from_logits(logits, log_lib, log_theta).sum_log_prob_sparse(rows, cols, values), expected)
    torch.testing.assert_close(lazy.mean.detach(), log_mu.exp().detach())


def test_negative_binomial_softmax_terms_pass_gradcheck():
    from sclatent.distributions import _NBSoftmaxTerms

    _, rows, cols, values = _sparse_counts(4, 9, 4)
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    log_lib = torch.full((4, 1), 2.0, dtype=torch.float64, requires_grad=True)
    log_theta = torch.randn(1, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda l, s, t: _NBSoftmaxTerms.apply(l, s, t, rows, cols, values, True), (logits, log_lib, log_theta)
    )


@pytest.mark.parametrize("kind", ["poisson", "nb"])
def test_released_mean_is_the_mean_made_in_the_logits_buffer(kind):
    """``release_mean`` without autograd: the same values as ``mean`` (softmax times library),
    written over the logits (no new array), and the spent likelihood refuses further use; with
    autograd it is ``mean`` and leaves the logits alone."""
    n, g = 6, 40
    logits = torch.randn(n, g, dtype=torch.float64)
    log_lib = torch.log(torch.rand(n, 1, dtype=torch.float64) * 50 + 5)

    def build(lg):
        if kind == "poisson":
            return Poisson.from_logits(lg, log_lib, mean_total=log_lib.squeeze(-1).exp())
        return NegativeBinomial.from_logits(lg, log_lib, torch.zeros(n, g, dtype=torch.float64))

    expected = torch.softmax(logits, -1) * log_lib.exp()
    torch.testing.assert_close(build(logits.clone()).mean, expected)
    buffer = logits.clone()
    spent = build(buffer)
    with torch.no_grad():
        released = spent.release_mean()
    torch.testing.assert_close(released, expected)
    assert released.data_ptr() == buffer.data_ptr()
    x, rows, cols, values = _sparse_counts(n, g, 1)
    with pytest.raises(RuntimeError, match="released"):
        spent.sum_log_prob_sparse(rows, cols, values)
    with pytest.raises(RuntimeError, match="released"):
        spent.mean
    tracked = logits.clone().requires_grad_(True)
    kept = build(tracked).release_mean()
    torch.testing.assert_close(kept.detach(), expected)
    torch.testing.assert_close(tracked.detach(), logits)


@pytest.mark.parametrize("kind", ["poisson", "nb"])
def test_released_mean_into_rows_of_a_larger_result(kind):
    """``release_mean(out=...)`` writes the proportions into the given rows (the logits left
    as they are); at library size 1 they sum to one per cell; a wrong ``out`` is refused."""
    n, g = 5, 30
    logits = torch.randn(n, g)
    log_lib = torch.zeros(n, 1)

    def build(lg):
        if kind == "poisson":
            return Poisson.from_logits(lg, log_lib, mean_total=log_lib.squeeze(-1).exp())
        return NegativeBinomial.from_logits(lg, log_lib, torch.zeros(n, g))

    result = torch.full((n + 3, g), -1.0)
    buffer = logits.clone()
    with torch.no_grad():
        written = build(buffer).release_mean(out=result[2 : 2 + n])
    assert written.data_ptr() == result[2].data_ptr()
    torch.testing.assert_close(result[2 : 2 + n], torch.softmax(logits, -1))
    torch.testing.assert_close(result[2 : 2 + n].sum(-1), torch.ones(n))
    assert (result[:2] == -1).all() and (result[2 + n :] == -1).all()
    torch.testing.assert_close(buffer, logits)
    with torch.no_grad(), pytest.raises(ValueError, match="out must be a contiguous"):
        build(logits.clone()).release_mean(out=torch.empty(n, g + 1))


def test_released_mean_into_a_tensor_for_a_likelihood_without_logits():
    """The base ``release_mean(out=...)`` (zero-inflated NB from its mean): the mean, written into ``out``."""
    log_mu = torch.randn(4, 7)
    likelihood = ZeroInflatedNegativeBinomial(log_mu, torch.zeros(1, 7), torch.randn(4, 7))
    out = torch.empty(4, 7)
    with torch.no_grad():
        written = likelihood.release_mean(out=out)
    assert written.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, likelihood.mean)


def test_poisson_draws_after_the_sparse_log_likelihood_reuse_its_proportions_unchanged():
    """sample_nonzero after sum_log_prob_sparse draws from the forward pass's proportions: the
    same draws as a fresh likelihood from the same logits, and the gradient is untouched."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50, requires_grad=True)
    library = torch.tensor([10.0, 3.0, 40.0, 1.0, 8.0])
    rows, cols, values = Poisson.from_logits(logits.detach(), library.log()[:, None], library).sample_nonzero(torch.Generator().manual_seed(2))
    used = Poisson.from_logits(logits, library.log()[:, None], library)
    ll = used.sum_log_prob_sparse(rows, cols, values)
    assert used._proportions is not None
    drawn = used.sample_nonzero(torch.Generator().manual_seed(7))
    fresh = Poisson.from_logits(logits.detach(), library.log()[:, None], library).sample_nonzero(torch.Generator().manual_seed(7))
    for a, b in zip(drawn, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ll.sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    Poisson.from_logits(reference, library.log()[:, None], library).sum_log_prob_sparse(rows, cols, values).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad)

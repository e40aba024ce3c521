"""The learned refiner (iterative amortized inference) on the linear-Gaussian model, whose
best diagonal posterior is known in closed form (see ``test_inference_refine.py``)."""

from __future__ import annotations

import pytest
import torch
from test_inference_refine import D, LinearGaussian

from sclatent.inference import GaussianPosterior, refine_posterior
from sclatent.inference.learned import LearnedRefiner, unrolled_elbos

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder_like_start(lg: LinearGaussian, seed: int) -> GaussianPosterior:
    """What an imperfect encoder gives: means shrunk towards 0 and off by noise, variances too wide."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.6 * lg.mean + 0.3 * lg.sd * torch.randn(lg.mean.shape, generator=g)
    return GaussianPosterior(mean, torch.log(lg.var).expand_as(mean) + 1.0)


def _train(refiner: LearnedRefiner, steps: int, iterations: int = 300) -> None:
    optimizer = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for i in range(iterations):
        lg = LinearGaussian(256, seed=100 + i % 20)  # fresh data every few iterations
        loss = -unrolled_elbos(lg.elbo(lg.x), _encoder_like_start(lg, i), refiner, steps, g).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_trained_refiner_closes_most_of_the_gap_in_three_steps_where_adam_does_not():
    torch.manual_seed(0)
    refiner = LearnedRefiner(D, n_hidden=64)
    _train(refiner, steps=3)
    lg = LinearGaussian(512, seed=7)  # cells it never saw
    exact = lg.exact_elbo(lg.x)
    start = _encoder_like_start(lg, 99)
    best = GaussianPosterior(lg.mean, torch.log(lg.var).expand_as(lg.mean))
    gap = exact(best, None) - exact(start, None)
    assert float(gap.mean()) > 1.0  # the start is clearly suboptimal
    g = torch.Generator().manual_seed(1)
    learned = refine_posterior(lg.elbo(lg.x), start, 3, generator=g, refiner=refiner)
    adam = refine_posterior(lg.elbo(lg.x), start, 3, lr=0.05, generator=g)
    closed_learned = float((exact(learned, None) - exact(start, None)).mean() / gap.mean())
    closed_adam = float((exact(adam, None) - exact(start, None)).mean() / gap.mean())
    assert closed_learned > 0.8, closed_learned
    assert closed_learned > closed_adam + 0.3, (closed_learned, closed_adam)


def test_an_untrained_refiner_changes_nothing_and_learned_refinement_is_monotone():
    lg = LinearGaussian(64)
    start = _encoder_like_start(lg, 0)
    refiner = LearnedRefiner(D)
    q = refine_posterior(lg.elbo(lg.x), start, 4, refiner=refiner)
    assert torch.equal(q.mean, start.mean) and torch.allclose(q.logvar, start.logvar)
    # a refiner that makes things worse: the monotone choice keeps the start for every cell it harms
    with torch.no_grad():
        refiner.net[-1].bias.fill_(3.0)
    exact = lg.exact_elbo(lg.x)
    q = refine_posterior(lg.elbo(lg.x), start, 2, refiner=refiner)
    assert (exact(q, None) >= exact(start, None) - 1e-6).all()
    assert torch.equal(q.mean, start.mean)


def test_unrolled_elbos_reach_only_the_refiners_weights():
    lg = LinearGaussian(32)
    refiner = LearnedRefiner(D)
    start = _encoder_like_start(lg, 0)
    values = unrolled_elbos(lg.elbo(lg.x), start, refiner, 3, torch.Generator().manual_seed(0))
    assert values.shape == (3, 32)
    (-values.mean()).backward()
    assert all(p.grad is not None for p in refiner.parameters())
    assert refiner.net[-1].weight.grad.abs().sum() > 0


def test_a_learned_refiner_refuses_shared_parameters():
    lg = LinearGaussian(8)
    with pytest.raises(ValueError, match="learned refiner"):
        refine_posterior(lg.elbo(lg.x), _encoder_like_start(lg, 0), 2, keep_best=False, shared=[torch.zeros(1, requires_grad=True)], refiner=LearnedRefiner(D))

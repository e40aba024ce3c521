"""The learned refiner (iterative amortized inference) on the linear-Gaussian model, whose
best diagonal posterior is known in closed form (see ``test_inference_refine.py``)."""

from __future__ import annotations

import pytest
import torch
from test_inference_refine import D, LinearGaussian

from sclatent.inference import GaussianPosterior, refine_posterior
from sclatent.inference.learned import LearnedRefiner, jittered_starts, unrolled_elbos

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoder_like_start(lg: LinearGaussian, seed: int) -> GaussianPosterior:
    """What an imperfect encoder gives: means shrunk towards 0 and off by noise, variances too wide."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.6 * lg.mean + 0.3 * lg.sd * torch.randn(lg.mean.shape, generator=g)
    return GaussianPosterior(mean, torch.log(lg.var).expand_as(mean) + 1.0)


def _train(refiner: LearnedRefiner, steps: int, iterations: int = 300, start_jitter: float = 0.0) -> None:
    optimizer = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for i in range(iterations):
        lg = LinearGaussian(256, seed=100 + i % 20)  # fresh data every few iterations
        start = jittered_starts(_encoder_like_start(lg, i), start_jitter, g)
        loss = -unrolled_elbos(lg.elbo(lg.x), start, refiner, steps, g).mean()
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


def test_jittered_starts_move_about_half_the_means_by_the_scale_in_standard_deviations():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(4000, D, generator=g)
    logvar = torch.randn(4000, D, generator=g)
    start = GaussianPosterior(mean, logvar)
    assert jittered_starts(start, 0.0, g) is start
    moved = jittered_starts(start, 2.0, g)
    assert torch.equal(moved.logvar, logvar)
    shift = (moved.mean - mean) / (0.5 * logvar).exp()  # in posterior standard deviations
    rows = (shift != 0).any(1)
    assert abs(float(rows.float().mean()) - 0.5) < 0.03  # about half the cells, the others untouched
    assert torch.equal(moved.mean[~rows], mean[~rows])
    assert abs(float(shift[rows].mean())) < 0.05 and abs(float(shift[rows].std()) - 2.0) < 0.05


def test_a_refiner_trained_from_jittered_starts_corrects_far_off_starts_better():
    torch.manual_seed(0)
    plain, jittered = LearnedRefiner(D, n_hidden=64), LearnedRefiner(D, n_hidden=64)
    _train(plain, steps=3)
    torch.manual_seed(0)
    _train(jittered, steps=3, start_jitter=3.0)
    lg = LinearGaussian(512, seed=7)
    exact = lg.exact_elbo(lg.x)
    near = _encoder_like_start(lg, 99)
    g = torch.Generator().manual_seed(5)  # an encoder much worse than the one trained on: a shifted cell
    far = GaussianPosterior(near.mean + 4.0 * lg.sd * torch.randn(near.mean.shape, generator=g), near.logvar)
    best = GaussianPosterior(lg.mean, torch.log(lg.var).expand_as(lg.mean))

    def closed(refiner: LearnedRefiner, start: GaussianPosterior) -> float:
        q = refine_posterior(lg.elbo(lg.x), start, 3, generator=torch.Generator().manual_seed(1), refiner=refiner)
        return float((exact(q, None) - exact(start, None)).mean() / (exact(best, None) - exact(start, None)).mean())

    left_jittered, left_plain = 1.0 - closed(jittered, far), 1.0 - closed(plain, far)  # the gap each leaves
    assert left_jittered < 0.6 * left_plain, (left_jittered, left_plain)
    assert closed(jittered, near) > 0.7  # and still corrects the usual start


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

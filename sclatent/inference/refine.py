"""Semi-amortized refinement: per-cell gradient ascent on the ELBO from the encoder's guess."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .gaussian import GaussianPosterior
from .learned import LearnedRefiner, refine_learned

__all__ = ["REFINE_METHODS", "refine_posterior"]

#: values of ``refine_method``: Adam steps, or updates of a :class:`~sclatent.inference.LearnedRefiner`
REFINE_METHODS = ("adam", "learned")


def refine_posterior(
    elbo: Callable[[GaussianPosterior, torch.Generator | None], torch.Tensor],
    start: GaussianPosterior,
    steps: int,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    keep_best: bool = True,
    eval_samples: int = 32,
    shared: Sequence[torch.Tensor] = (),
    trace: list[float] | None = None,
    refiner: LearnedRefiner | None = None,
) -> GaussianPosterior:
    """Improve ``q(z) = N(mean, exp(logvar))`` of every cell with ``steps`` Adam steps on its ELBO.

    ``start`` may be any posterior family with per-cell ``mean`` and ``logvar`` and a
    ``replace(mean, logvar)`` (a :class:`~sclatent.inference.FlowPosterior` refines its
    base Gaussian under its fixed flow).

    The per-cell ELBOs are independent given the (frozen) decoder, and Adam is an
    elementwise optimizer, so one batched optimizer over all cells is exactly one
    optimizer per cell. Only ``mean`` and ``logvar`` receive gradients: network weights
    are left untouched and no gradient flows back into the starting posterior.

    **Monotone** (``keep_best=True``): the starting posterior and the last iterate are scored
    on the same ``eval_samples`` noise draws (common random numbers, so the comparison of
    two nearby posteriors is far less noisy than either score), and a cell whose refined
    ELBO scores lower keeps its starting posterior. No cell thus ends worse than it started
    under that evaluation, and an independent estimate can find it worse only by
    Monte-Carlo error; noisy Adam steps at a high learning rate otherwise leave many cells
    worse (``tests/test_inference_refine.py``). Only these two candidates are compared:
    the best of many iterates under one noise draw would favour whichever suited the noise.
    The evaluation costs ``2 * eval_samples`` ELBO forward passes per call.

    Parameters
    ----------
    elbo
        ``elbo(posterior, generator) -> (n_cells,)`` one-sample reparameterized ELBO per cell.
    start
        The encoder's (or the product of experts') posterior.
    steps
        Number of gradient steps; ``0`` returns ``start`` unchanged.
    lr
        Adam learning rate.
    generator
        Random generator for the reparameterization noise of the steps (for determinism).
    keep_best
        Fall back to the start for cells that refinement made worse (see above), rather
        than always returning the last iterate.
    eval_samples
        Noise draws of the fixed evaluation.
    shared
        Tensors (leaf parameters) that the same Adam steps also move, on the sum of the
        cells' ELBOs: e.g. the embedding rows of a new batch, fitted jointly with the cells'
        posteriors. Their gradients are left cleared. Monotonicity is then not defined (the
        ELBO itself changes), so use ``keep_best=False`` with them.
    trace
        When given, the mean ELBO per cell at each step is appended to it.
    refiner
        A trained :class:`~sclatent.inference.LearnedRefiner`: take ``steps`` of its learned
        updates instead of Adam steps (``lr`` is then unused; iterative amortized
        inference, :mod:`sclatent.inference.learned`). The monotone choice is the same.

    Returns
    -------
    GaussianPosterior
        The refined posterior, detached from any graph.
    """
    if steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {steps}.")
    if steps == 0:
        return start.detach()
    if shared and keep_best:
        raise ValueError("keep_best=True compares ELBOs under one decoder; with shared parameters pass keep_best=False.")
    if refiner is not None and (shared or trace is not None):
        raise ValueError("a learned refiner updates posteriors only: shared= and trace= need Adam steps (refiner=None).")
    shared = list(shared)
    fixed_seed = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    if refiner is not None:
        mean, logvar = refine_learned(elbo, start, refiner, steps, generator)
    else:
        mean, logvar = _adam_steps(elbo, start, steps, lr, generator, shared, trace)
    if keep_best:
        mean, logvar = _keep_better(elbo, start, mean, logvar, fixed_seed, eval_samples)
    return start.replace(mean, logvar.clamp(-12.0, 8.0))


def _adam_steps(elbo, start, steps: int, lr: float, generator, shared: list[torch.Tensor], trace) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Adam steps on the cells' posteriors (and ``shared``): the final ``(mean, logvar)``, detached."""
    mean = start.mean.detach().clone().requires_grad_(True)
    logvar = start.logvar.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mean, logvar, *shared], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            per_cell = elbo(start.replace(mean, logvar.clamp(-12.0, 8.0)), generator)
            grads = torch.autograd.grad(-per_cell.sum(), [mean, logvar, *shared])
            for tensor, grad in zip([mean, logvar, *shared], grads):
                tensor.grad = grad
            optimizer.step()
            if trace is not None:
                trace.append(float(per_cell.detach().mean()))
    for tensor in shared:
        tensor.grad = None
    return mean.detach(), logvar.detach()


def _keep_better(elbo, start, mean: torch.Tensor, logvar: torch.Tensor, fixed_seed: int, eval_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The refined ``(mean, logvar)``, but the start's for cells whose refined posterior
    scores lower on the same ``eval_samples`` noise draws (the monotone guarantee)."""
    scorer = torch.Generator(device=start.mean.device)

    def draws(m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        """``(eval_samples, n)`` one-sample ELBOs under the fixed noise."""
        scorer.manual_seed(fixed_seed)  # the same noise for both candidates
        with torch.no_grad():
            q = start.replace(m, lv.clamp(-12.0, 8.0))
            return torch.stack([elbo(q, scorer) for _ in range(eval_samples)])

    diff = draws(mean, logvar) - draws(start.mean.detach(), start.logvar.detach())  # paired, per draw
    worse = diff.mean(0) < 0  # refined scores lower on the same noise: keep the start
    mean = torch.where(worse[..., None], start.mean.detach(), mean)
    logvar = torch.where(worse[..., None], start.logvar.detach(), logvar)
    return mean, logvar

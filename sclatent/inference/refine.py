"""Semi-amortized refinement: per-cell gradient ascent on the ELBO from the encoder's guess."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .gaussian import GaussianPosterior

__all__ = ["refine_posterior"]


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
    shared = list(shared)
    mean = start.mean.detach().clone().requires_grad_(True)
    logvar = start.logvar.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mean, logvar, *shared], lr=lr)
    fixed_seed = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    scorer = torch.Generator(device=start.mean.device)

    def draws(m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        """``(eval_samples, n)`` one-sample ELBOs under the fixed noise."""
        scorer.manual_seed(fixed_seed)  # the same noise for both candidates
        with torch.no_grad():
            q = start.replace(m, lv.clamp(-12.0, 8.0))
            return torch.stack([elbo(q, scorer) for _ in range(eval_samples)])

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
    mean, logvar = mean.detach(), logvar.detach()
    if keep_best:
        diff = draws(mean, logvar) - draws(start.mean.detach(), start.logvar.detach())  # paired, per draw
        worse = diff.mean(0) < 0  # refined scores lower on the same noise: keep the start
        mean = torch.where(worse[..., None], start.mean.detach(), mean)
        logvar = torch.where(worse[..., None], start.logvar.detach(), logvar)
    return start.replace(mean, logvar.clamp(-12.0, 8.0))

"""Semi-amortized refinement: per-cell gradient ascent on the ELBO from the encoder's guess."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .gaussian import GaussianPosterior

__all__ = ["refine_posterior"]


def refine_posterior(
    elbo: Callable[[GaussianPosterior, torch.Generator | None], torch.Tensor],
    start: GaussianPosterior,
    steps: int,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
) -> GaussianPosterior:
    """Improve ``q(z) = N(mean, exp(logvar))`` of every cell with ``steps`` Adam steps on its ELBO.

    The per-cell ELBOs are independent given the (frozen) decoder, and Adam is an
    elementwise optimizer, so one batched optimizer over all cells is exactly one
    optimizer per cell. Only ``mean`` and ``logvar`` receive gradients: network weights
    are left untouched and no gradient flows back into the starting posterior.

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
        Random generator for the reparameterization noise (for determinism).

    Returns
    -------
    GaussianPosterior
        The refined posterior, detached from any graph.
    """
    if steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {steps}.")
    if steps == 0:
        return start.detach()
    mean = start.mean.detach().clone().requires_grad_(True)
    logvar = start.logvar.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mean, logvar], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = -elbo(GaussianPosterior(mean, logvar.clamp(-12.0, 8.0)), generator).sum()
            mean.grad, logvar.grad = torch.autograd.grad(loss, [mean, logvar])
            optimizer.step()
    return GaussianPosterior(mean.detach(), logvar.detach().clamp(-12.0, 8.0))

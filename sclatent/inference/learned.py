"""Iterative amortized inference: a learned network turns the ELBO's gradient into posterior updates.

Marino, Yue & Mandt (2018): instead of many small gradient steps, a small network maps
each cell's current posterior parameters and the gradient of its ELBO with respect to them
to an update, ``(mean, logvar) <- (mean, logvar) + net(mean, logvar, g_mean, g_logvar)``.
It is trained on the training cells to maximize the ELBO of its iterates with the encoder
and decoder frozen (:func:`unrolled_elbos`), and then reaches in a few steps what plain
gradient steps reach in many. A step costs what an Adam step costs (one forward and
backward of the decoder for the gradient) plus the network's few small matrix products.

The gradients enter the network squashed, ``sign(g) log(1 + |g|)``: their scale differs by
orders of magnitude between cells (a count likelihood's gradient grows with depth), and
the squash keeps the network's inputs of order one without a per-batch statistic, so a
cell's update does not depend on which other cells share its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LearnedRefiner", "jittered_starts", "refine_learned", "unrolled_elbos"]

Elbo = Callable[[object, torch.Generator | None], torch.Tensor]
LOGVAR_RANGE = (-12.0, 8.0)


def _squash(g: torch.Tensor) -> torch.Tensor:
    return torch.sign(g) * torch.log1p(g.abs())


class LearnedRefiner(nn.Module):
    """The update network: posterior parameters and ELBO gradients -> new parameters.

    Its inputs per cell are ``mean``, ``logvar``, the gradients of the one-sample ELBO
    with respect to both (noisy; the one for ``logvar`` carries the curvature that sets the
    variance), the gradient of the ELBO at a point mass on the mean (``log p(x, z)`` at
    ``z = mean``: noise-free) and that gradient times the variance (a Newton-like step, in
    units of ``z``); gradients are squashed (module docstring).

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_hidden
        Width of its two hidden layers.
    """

    def __init__(self, n_latent: int, n_hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6 * n_latent, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden), nn.SiLU(), nn.Linear(n_hidden, 2 * n_latent)
        )
        nn.init.zeros_(self.net[-1].weight)  # an untrained refiner leaves the posterior as it is
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, mean: torch.Tensor, logvar: torch.Tensor, gradients: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """One update of every cell's ``(mean, logvar)``, ``(n, d)`` each, from
        ``gradients = (grad mean, grad logvar, grad mean at the point mass)``."""
        grad_mean, grad_logvar, grad_point = gradients
        newton = (logvar.clamp(*LOGVAR_RANGE).exp() * grad_point).clamp(-10.0, 10.0)
        features = torch.cat([mean, logvar, _squash(grad_mean), _squash(grad_logvar), _squash(grad_point), newton], -1)
        delta_mean, delta_logvar = self.net(features).chunk(2, -1)
        return mean + delta_mean, logvar + delta_logvar


def jittered_starts(start, scale: float, generator: torch.Generator | None = None):
    """Training starts for the refiner: about half of the cells (each with probability 1/2)
    get their posterior mean moved by ``scale`` posterior standard deviations per latent
    coordinate, ``mean + scale * eps * std`` with ``eps ~ N(0, I)``; the others, and every
    log-variance, stay the encoder's. ``scale=0`` returns ``start`` itself.

    Trained only from the encoder's posteriors, the refiner sees the small errors the
    encoder makes on cells like its training cells; on cells it was not trained on (a new
    technology) the encoder's errors are larger, and there the refiner closed less of the
    gap. Starts moved away teach it larger corrections; the unmoved half keeps the usual
    case in every batch.
    """
    if scale == 0:
        return start
    mean = start.mean
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    moved = (torch.rand(mean.shape[0], 1, generator=generator, device=mean.device) < 0.5).to(mean.dtype)
    return start.replace(mean + moved * scale * eps * (0.5 * start.logvar).exp(), start.logvar)


def _elbo_and_gradients(elbo: Elbo, start, mean: torch.Tensor, logvar: torch.Tensor, generator, keep_graph: bool):
    """The per-cell one-sample ELBO at ``(mean, logvar)`` and the refiner's gradient inputs
    (detached): its gradients with respect to both, and the gradient with respect to the
    mean of the ELBO of a point mass there (the smallest variance refinement allows)."""
    if not mean.requires_grad:  # the first iterate is a constant: make it a leaf to differentiate at
        mean, logvar = mean.requires_grad_(True), logvar.requires_grad_(True)
    per_cell = elbo(start.replace(mean, logvar.clamp(*LOGVAR_RANGE)), generator)
    grad_mean, grad_logvar = torch.autograd.grad(per_cell.sum(), [mean, logvar], retain_graph=keep_graph)
    point = mean.detach().requires_grad_(True)
    at_point = elbo(start.replace(point, torch.full_like(logvar, LOGVAR_RANGE[0]).detach()), generator)
    (grad_point,) = torch.autograd.grad(at_point.sum(), [point])
    return per_cell, (grad_mean.detach(), grad_logvar.detach(), grad_point.detach())


def unrolled_elbos(elbo: Elbo, start, refiner: LearnedRefiner, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ELBOs of the refiner's iterates ``1..steps`` from ``start``, ``(steps, n)``, with the
    graph from the refiner's weights kept: ``-unrolled_elbos(...).mean()`` is its training loss.

    The gradients fed to the refiner are inputs (detached), as in Marino et al.; the
    training signal reaches the refiner's weights through the iterates it produced.
    """
    mean, logvar = start.mean.detach().clone(), start.logvar.detach().clone()
    values = []
    with torch.enable_grad():
        for t in range(steps + 1):
            if t < steps:
                per_cell, gradients = _elbo_and_gradients(elbo, start, mean, logvar, generator, keep_graph=t > 0)
            else:  # the last iterate is only scored
                per_cell = elbo(start.replace(mean, logvar.clamp(*LOGVAR_RANGE)), generator)
            if t > 0:
                values.append(per_cell)
            if t < steps:
                mean, logvar = refiner(mean, logvar, gradients)
    return torch.stack(values)


def refine_learned(
    elbo: Elbo,
    start,
    refiner: LearnedRefiner,
    steps: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` learned updates of every cell's posterior from ``start``: the final
    ``(mean, logvar)``, detached (the caller applies the monotone choice, see
    :func:`~sclatent.inference.refine_posterior`)."""
    mean, logvar = start.mean.detach().clone(), start.logvar.detach().clone()
    for _ in range(steps):
        with torch.enable_grad():
            _, gradients = _elbo_and_gradients(elbo, start, mean.detach(), logvar.detach(), generator, keep_graph=False)
        with torch.no_grad():
            mean, logvar = refiner(mean, logvar, gradients)
    return mean.detach(), logvar.detach()

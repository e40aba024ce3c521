"""Product of Gaussian experts with the standard-normal prior as an expert."""

from __future__ import annotations

import torch

__all__ = ["poe"]


def poe(means: torch.Tensor, logvars: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse diagonal Gaussian experts, the prior ``N(0, I)`` included.

    ``1/sigma^2 = 1 + sum_m mask_m / sigma_m^2`` and
    ``mu = sigma^2 * sum_m mask_m * mu_m / sigma_m^2``.

    Parameters
    ----------
    means
        ``(n_experts, n_cells, n_latent)`` expert means.
    logvars
        ``(n_experts, n_cells, n_latent)`` expert log-variances.
    mask
        ``(n_cells, n_experts)``, 1 where the cell has that expert's modality, 0 where not.
        A cell with no expert gets the prior.

    Returns
    -------
    mean, logvar
        ``(n_cells, n_latent)`` each.
    """
    if means.shape != logvars.shape or means.dim() != 3:
        raise ValueError(f"means and logvars must both be (n_experts, n_cells, n_latent); got {tuple(means.shape)} and {tuple(logvars.shape)}.")
    if mask.shape != means.shape[1::-1]:
        raise ValueError(f"mask must be (n_cells, n_experts) = {tuple(means.shape[1::-1])}; got {tuple(mask.shape)}.")
    weight = mask.t().unsqueeze(-1).to(means.dtype)  # (M, n, 1)
    precision = (-logvars.masked_fill(weight == 0, 0.0)).exp() * weight  # exactly 0 for absent experts, whatever their values
    total_precision = 1.0 + precision.sum(0)
    mean = (precision * means.masked_fill(weight == 0, 0.0)).sum(0) / total_precision
    return mean, -torch.log(total_precision)

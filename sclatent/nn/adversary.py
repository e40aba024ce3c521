"""A modality discriminator behind a gradient-reversal layer (adversarial alignment).

The discriminator learns to tell from a latent sample which modality a single-modality cell
was measured in; the reversal layer hands the encoders the opposite gradient, so that with
one optimizer the encoders learn to make RNA-only and ATAC-only cells indistinguishable in
the latent space (the aggregate posteriors match), as in GLUE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModalityDiscriminator", "reverse_gradient"]


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward."""
    return _ReverseGradient.apply(x, scale)


class ModalityDiscriminator(nn.Module):
    """MLP ``z -> logits`` over modalities, trained with cross-entropy.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_modalities
        Number of classes.
    n_hidden, n_layers
        Size of the network (LeakyReLU, dropout 0.2, as GLUE's discriminator).
    """

    def __init__(self, n_latent: int, n_modalities: int, n_hidden: int = 128, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_latent
        for _ in range(n_layers):
            layers += [nn.Linear(width, n_hidden), nn.LeakyReLU(0.2), nn.Dropout(0.2)]
            width = n_hidden
        layers.append(nn.Linear(width, n_modalities))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(n, n_modalities)`` logits."""
        return self.net(z)

    def adversarial_loss(self, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Per-cell cross-entropy of the modality given ``z``, with the gradient into ``z`` reversed.

        Minimizing it trains the discriminator and, through the reversal, pushes whatever
        produced ``z`` to confuse it. Classes are weighted to balance them in the batch.
        """
        logits = self(reverse_gradient(z))
        counts = torch.bincount(modality, minlength=logits.shape[1]).to(z.dtype)
        present = (counts > 0).sum()
        weight = (modality.numel() / (present * counts.clamp_min(1)))[modality]
        return F.cross_entropy(logits, modality, reduction="none") * weight

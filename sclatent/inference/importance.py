"""Helpers for importance-weighted estimates of ``log p(x)``."""

from __future__ import annotations

import math

import torch

__all__ = ["log_mean_exp"]


def log_mean_exp(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(w)))`` along ``dim``, computed stably."""
    return torch.logsumexp(log_weights, dim=dim) - math.log(log_weights.shape[dim])

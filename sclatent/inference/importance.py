"""Helpers for importance-weighted estimates of ``log p(x)`` and their Monte-Carlo error."""

from __future__ import annotations

import math

import torch

from .gaussian import GaussianPosterior, standard_normal_log_prob

__all__ = ["importance_log_weights", "importance_ratios", "log_mean_exp", "mean_stderr"]


def log_mean_exp(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log(mean(exp(w)))`` along ``dim``, computed stably."""
    return torch.logsumexp(log_weights, dim=dim) - math.log(log_weights.shape[dim])


def importance_log_weights(log_likelihood: torch.Tensor, z: torch.Tensor, q: GaussianPosterior) -> torch.Tensor:
    """``log p(x | z) + log p(z) - log q(z)`` per draw, prior ``N(0, I)``; ``z`` is ``(k, n, d)``
    drawn from ``q`` and ``log_likelihood`` its ``(k, n)`` values of ``log p(x | z)``."""
    return log_likelihood + standard_normal_log_prob(z) - q.log_prob(z)


def importance_ratios(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``w_k / mean(w)`` along ``dim`` (mean 1), computed stably.

    To first order (delta method), ``log_mean_exp(log_weights) - log p = mean(ratios) - 1``:
    the ratios are the per-draw terms of the log estimate, so :func:`mean_stderr` of them
    is its Monte-Carlo standard error, ``sqrt((K sum_k w~_k^2 - 1) / (K - 1))`` for
    self-normalized weights ``w~``, and of a difference with another mean over the same
    draws it is :func:`mean_stderr` of the difference of their per-draw terms.
    """
    return log_weights.shape[dim] * torch.softmax(log_weights, dim=dim)


def mean_stderr(draws: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Monte-Carlo standard error of the mean along ``dim`` of i.i.d. draws:
    ``std(draws, ddof=1) / sqrt(K)`` (needs ``K >= 2`` draws)."""
    k = draws.shape[dim]
    if k < 2:
        raise ValueError(f"a standard error needs at least 2 draws, got {k}.")
    return draws.std(dim=dim, correction=1) / math.sqrt(k)

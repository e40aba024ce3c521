"""Inference: product-of-experts fusion, Gaussian helpers, importance weighting, refinement."""

from .gaussian import GaussianPosterior, gaussian_kl_to_standard, gaussian_log_prob, standard_normal_log_prob
from .importance import importance_log_weights, importance_ratios, log_mean_exp, mean_stderr
from .poe import poe
from .refine import refine_posterior

__all__ = [
    "GaussianPosterior",
    "gaussian_kl_to_standard",
    "gaussian_log_prob",
    "importance_log_weights",
    "importance_ratios",
    "log_mean_exp",
    "mean_stderr",
    "poe",
    "refine_posterior",
    "standard_normal_log_prob",
]

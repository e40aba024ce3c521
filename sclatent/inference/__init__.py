"""Inference: product-of-experts fusion, Gaussian and flow posteriors, importance weighting, refinement."""

from .gaussian import GaussianPosterior, gaussian_kl_to_standard, gaussian_log_prob, standard_normal_log_prob
from .flow import AffineCoupling, CouplingFlow, FlowPosterior
from .importance import importance_log_weights, importance_ratios, log_mean_exp, mean_stderr
from .poe import poe
from .refine import refine_posterior

__all__ = [
    "AffineCoupling",
    "CouplingFlow",
    "FlowPosterior",
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

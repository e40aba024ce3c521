"""Torch building blocks: MLPs with covariate injection, encoders, decoders.

Nothing in this subpackage knows about AnnData: modules take tensors and return tensors.
"""

from .decoder import CountDecoder
from .encoder import GaussianEncoder, StatisticEncoder
from ..batch import Covariates
from .mlp import CovariateMLP, SparseRows

__all__ = ["CountDecoder", "CovariateMLP", "Covariates", "GaussianEncoder", "SparseRows", "StatisticEncoder"]

"""sclatent: deep generative models of single-cell RNA and ATAC in one shared latent space."""

__version__ = "0.1.0"

from . import data, datasets, distributions, inference, modalities, nn, pl, tools  # noqa: E402
from .config import InferenceConfig, TrainConfig  # noqa: E402
from .model import SCLatent  # noqa: E402

__all__ = [
    "InferenceConfig",
    "SCLatent",
    "TrainConfig",
    "__version__",
    "data",
    "datasets",
    "distributions",
    "inference",
    "modalities",
    "nn",
    "pl",
    "tools",
]

"""Tools that work on model outputs: latent-space and imputation metrics."""

from .metrics import foscttm, foscttm_per_cell, knn_transfer_accuracy, pearson_cellwise, pearson_genewise

__all__ = ["foscttm", "foscttm_per_cell", "knn_transfer_accuracy", "pearson_cellwise", "pearson_genewise"]

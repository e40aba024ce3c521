"""Data layer: the registry, device-resident tensors, index batches, and MuData helpers."""

from .registry import DataRegistry, ModalityRegistry
from .sampler import IndexBatches
from .tensors import CellTensors, ModalityMatrix
from .multiome import organize_multiome

__all__ = ["CellTensors", "DataRegistry", "IndexBatches", "ModalityMatrix", "ModalityRegistry"]

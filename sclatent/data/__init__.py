"""Data layer: the registry, device-resident tensors, index batches, and MuData helpers."""

from .registry import DataRegistry, ModalityRegistry
from .sampler import IndexBatches
from .tensors import CellTensors, ModalityMatrix
from .genomic import add_gene_coordinates, link_peaks_to_genes, parse_regions, read_gene_annotation
from .multiome import organize_multiome
from .zarr_store import open_zarr

__all__ = [
    "CellTensors",
    "DataRegistry",
    "IndexBatches",
    "ModalityMatrix",
    "ModalityRegistry",
    "add_gene_coordinates",
    "link_peaks_to_genes",
    "open_zarr",
    "organize_multiome",
    "parse_regions",
    "read_gene_annotation",
]

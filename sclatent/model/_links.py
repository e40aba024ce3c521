"""Feature links between an ``rna`` and an ``atac`` modality: chosen at setup, read at model build.

``setup_mudata(feature_links=...)`` records where the links are (a ``mdata.varp`` key) and
which modalities they join; the model reads the gene x peak block from there into a
:class:`~sclatent.module.FeatureLinks` in the registry's feature order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.genomic import FEATURE_LINKS_KEY
from ..data.genomic import _global_positions as modality_var_positions
from ..data.registry import DataRegistry
from ..module import FeatureLinks

__all__ = ["GIVEN_LINKS_KEY", "feature_links_setup", "links_from_state", "read_feature_links"]

#: Where ``setup_mudata(feature_links=<matrix>)`` stores a matrix it is given.
GIVEN_LINKS_KEY = "feature_links"


def _global_positions(mdata, key: str, names) -> np.ndarray:
    """Position in ``mdata.var`` of each of ``names`` (features of ``mdata.mod[key]``)."""
    local = pd.Index(map(str, mdata.mod[key].var_names)).get_indexer(list(names))
    if (local < 0).any():
        raise ValueError(f"mdata.mod[{key!r}] lacks features the setup recorded; run setup_mudata again.")
    return modality_var_positions(mdata, key)[local]


def _linked_pair(modalities: list[tuple[str, str, str | None]]) -> tuple[str, str]:
    rna = [k for k, kind, _ in modalities if kind == "rna"]
    atac = [k for k, kind, _ in modalities if kind == "atac"]
    if len(rna) != 1 or len(atac) != 1:
        raise ValueError(
            f"feature_links join one modality of kind 'rna' and one of kind 'atac'; the setup has rna {rna} and atac {atac}."
        )
    return rna[0], atac[0]


def feature_links_setup(mdata, feature_links, modalities: list[tuple[str, str, str | None]]) -> dict | None:
    """Check ``feature_links`` of ``setup_mudata`` and return the registry's record of them.

    ``True`` reads ``mdata.varp["peak_gene_links"]`` (written by
    :func:`sclatent.data.link_peaks_to_genes`), a string another ``varp`` key, and a
    genes x peaks matrix (rows in ``mdata.mod[rna].var_names`` order, columns in the ATAC
    modality's) is stored in ``mdata.varp["feature_links"]`` (which must not exist yet).
    """
    if feature_links is None or feature_links is False:
        return None
    source, target = _linked_pair(modalities)
    if feature_links is True or isinstance(feature_links, str):
        key = FEATURE_LINKS_KEY if feature_links is True else feature_links
        if key not in mdata.varp:
            raise ValueError(
                f"mdata.varp has no {key!r} (it has {list(mdata.varp.keys())}). Build the links first with "
                f"sclatent.data.link_peaks_to_genes(mdata, annotation=..., rna={source!r}, atac={target!r}), "
                "or pass the genes x peaks matrix as feature_links=."
            )
    else:
        matrix = sp.csr_matrix(feature_links.to_numpy() if isinstance(feature_links, pd.DataFrame) else feature_links)
        shape = (mdata.mod[source].n_vars, mdata.mod[target].n_vars)
        if matrix.shape != shape:
            raise ValueError(
                f"feature_links has shape {matrix.shape}; it must be genes x peaks, {shape} "
                f"(mdata.mod[{source!r}].n_vars x mdata.mod[{target!r}].n_vars)."
            )
        if matrix.nnz and (not np.isfinite(matrix.data).all() or (matrix.data < 0).any()):
            raise ValueError("feature_links must hold finite, non-negative weights.")
        if matrix.count_nonzero() == 0:
            raise ValueError("feature_links links no gene to any peak (the matrix is all zeros).")
        key = GIVEN_LINKS_KEY
        if key in mdata.varp:
            raise ValueError(
                f"mdata.varp[{key!r}] exists already; setup_mudata will not overwrite it. Pass feature_links={key!r} to "
                f"use it, or delete it first (del mdata.varp[{key!r}])."
            )
        rows, cols = _global_positions(mdata, source, mdata.mod[source].var_names), _global_positions(mdata, target, mdata.mod[target].var_names)
        coo = matrix.tocoo()
        block = sp.csr_matrix((coo.data, (rows[coo.row], cols[coo.col])), shape=(mdata.n_vars, mdata.n_vars))
        mdata.varp[key] = (block + block.T).tocsr()
    record = {"key": key, "source": source, "target": target}
    return record


def _block(mdata, record: dict, registry: DataRegistry) -> sp.coo_matrix:
    key, source, target = record["key"], record["source"], record["target"]
    stored = mdata.varp[key]
    if stored.shape != (mdata.n_vars, mdata.n_vars):
        raise ValueError(f"mdata.varp[{key!r}] has shape {stored.shape}, not mdata.n_vars x mdata.n_vars.")
    rows = _global_positions(mdata, source, registry.modality(source).var_names)
    cols = _global_positions(mdata, target, registry.modality(target).var_names)
    return sp.csr_matrix(stored)[rows][:, cols].tocoo()


def read_feature_links(mdata, registry: DataRegistry, record: dict | None = None) -> FeatureLinks | None:
    """The links recorded in ``registry`` as :class:`~sclatent.module.FeatureLinks` (``None`` without)."""
    record = record or registry.feature_links
    if not record:
        return None
    key = record["key"]
    if key not in mdata.varp:
        raise ValueError(
            f"The setup uses feature links from mdata.varp[{key!r}], which is gone; build them again "
            "(sclatent.data.link_peaks_to_genes) or run setup_mudata without feature_links."
        )
    block = _block(mdata, record, registry)
    if block.nnz == 0:
        raise ValueError(
            f"mdata.varp[{key!r}] links no gene of {record['source']!r} to a peak of {record['target']!r}; check the "
            "gene positions and the genome assembly (sclatent.data.link_peaks_to_genes warns about a mismatch)."
        )
    pairs = torch.as_tensor(np.stack([block.row, block.col]).astype(np.int64))
    return FeatureLinks(record["source"], record["target"], pairs, torch.as_tensor(block.data, dtype=torch.float32))


def links_from_state(record: dict, state: dict[str, torch.Tensor]) -> FeatureLinks:
    """The links of a saved model, from its weights (their normalized weights, which normalize to themselves)."""
    pairs = torch.stack([state["feature_embeddings.link_source"], state["feature_embeddings.link_target"]])
    return FeatureLinks(record["source"], record["target"], pairs, state["feature_embeddings.link_weight"].float())

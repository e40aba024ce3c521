"""AnnData zarr stores opened with their count matrices left on disk."""

from __future__ import annotations

import os

__all__ = ["open_zarr"]


def open_zarr(path: str | os.PathLike):
    """Open an AnnData zarr store (``adata.write_zarr(path)``) with its sparse matrices on disk.

    ``anndata`` reads zarr stores into memory only (``backed="r"`` is for ``.h5ad``); this
    returns an :class:`~anndata.AnnData` whose ``obs``, ``var``, ``obsm``, ``uns`` (and any
    dense matrix) are in memory and whose sparse ``X`` and layers are anndata's on-disk
    sparse datasets. :class:`~sclatent.SCLatent` reads such matrices a batch at a time, as
    it reads a backed ``.h5ad`` (``SCLatent(adata)`` and ``train()`` as usual; results are
    written into the returned object, never into the store, which is opened read-only).

    Parameters
    ----------
    path
        The ``.zarr`` directory of an AnnData.

    Returns
    -------
    anndata.AnnData
        The data, with on-disk sparse matrices.

    Raises
    ------
    ValueError
        When ``path`` is not an AnnData zarr store.
    """
    import anndata as ad
    import zarr

    if not os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)!r} is not a zarr store (a directory written by adata.write_zarr).")
    root = zarr.open_group(os.fspath(path), mode="r")
    if root.attrs.get("encoding-type") != "anndata":
        raise ValueError(f"{os.fspath(path)!r} is not an AnnData zarr store (its encoding-type is {root.attrs.get('encoding-type')!r}).")

    def element(key: str):
        node = root[key]
        if node.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
            return ad.io.sparse_dataset(node)  # on disk
        return ad.io.read_elem(node)

    parts = {key: element(key) for key in ("X", "obs", "var") if key in root}
    for key in ("obsm", "varm", "obsp", "varp", "uns"):
        if key in root:
            parts[key] = ad.io.read_elem(root[key])
    if "layers" in root:
        parts["layers"] = {name: element(f"layers/{name}") for name in root["layers"].keys()}
    return ad.AnnData(**parts)

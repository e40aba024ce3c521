"""AnnData and MuData zarr stores opened with their count matrices left on disk."""

from __future__ import annotations

import os

__all__ = ["open_zarr"]


def _open_anndata_group(group):
    """One AnnData zarr group: sparse ``X`` and layers as anndata's on-disk sparse datasets,
    everything else read into memory."""
    import anndata as ad

    def element(key: str):
        node = group[key]
        if node.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
            return ad.io.sparse_dataset(node)  # on disk
        return ad.io.read_elem(node)

    parts = {key: element(key) for key in ("X", "obs", "var") if key in group}
    for key in ("obsm", "varm", "obsp", "varp", "uns"):
        if key in group:
            parts[key] = ad.io.read_elem(group[key])
    if "layers" in group:
        parts["layers"] = {name: element(f"layers/{name}") for name in group["layers"].keys()}
    return ad.AnnData(**parts)


def _open_mudata_group(root, where: str):
    """A MuData zarr store: each modality as by :func:`_open_anndata_group`, the MuData's own
    ``obs``, ``obsm``, ``varm``, ``obsp``, ``varp`` and ``uns`` read into memory."""
    import anndata as ad
    import mudata as md

    group = root["mod"]
    order = list(group.attrs.get("mod-order", [])) or list(group.keys())
    data = md.MuData({name: _open_anndata_group(group[name]) for name in order})
    if "obs" in root:
        obs = ad.io.read_elem(root["obs"])
        if not obs.index.equals(data.obs_names):
            raise ValueError(
                f"{where}: the cells of the stored MuData are not in the order its modalities give; open it in memory "
                "with `mudata.read_zarr(path)` instead."
            )
        data.obs = obs
    for key in ("obsm", "varm", "obsp", "varp"):
        if key in root:
            for name, value in ad.io.read_elem(root[key]).items():
                getattr(data, key)[name] = value
    if "uns" in root:
        data.uns = ad.io.read_elem(root["uns"])
    return data


def open_zarr(path: str | os.PathLike):
    """Open an AnnData or MuData zarr store (``write_zarr(path)``) with its sparse matrices on disk.

    ``anndata`` and ``mudata`` read zarr stores into memory only (``backed=`` is for HDF5
    files); this returns an :class:`~anndata.AnnData` (or a :class:`~mudata.MuData` of them)
    whose ``obs``, ``var``, ``obsm``, ``uns`` (and any dense matrix) are in memory and whose
    sparse ``X`` and layers are anndata's on-disk sparse datasets. :class:`~sclatent.SCLatent`
    reads such matrices a batch at a time, as it reads a backed ``.h5ad``/``.h5mu``
    (``SCLatent(data)`` and ``train()`` as usual; results are written into the returned
    object, never into the store, which is opened read-only).

    Parameters
    ----------
    path
        The ``.zarr`` directory of an AnnData or a MuData.

    Returns
    -------
    anndata.AnnData or mudata.MuData
        The data, with on-disk sparse matrices.

    Raises
    ------
    ValueError
        When ``path`` is not an AnnData or MuData zarr store.
    """
    import zarr

    where = repr(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"{where} is not a zarr store (a directory written by adata.write_zarr or mdata.write_zarr).")
    root = zarr.open_group(os.fspath(path), mode="r")
    kind = root.attrs.get("encoding-type")
    if kind == "anndata":
        return _open_anndata_group(root)
    if kind == "MuData" and "mod" in root:
        return _open_mudata_group(root, where)
    raise ValueError(f"{where} is not an AnnData or MuData zarr store (its encoding-type is {kind!r}).")

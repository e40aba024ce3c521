"""Assemble paired and unpaired RNA + ATAC cells into one MuData for ``setup_mudata``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = ["organize_multiome"]


def _check_anndata(adata, what: str):
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"{what} must be an AnnData, got {type(adata).__name__}.")
    if adata.obs_names.has_duplicates:
        raise ValueError(f"{what}.obs_names has duplicates; make them unique with `.obs_names_make_unique()`.")
    if adata.var_names.has_duplicates:
        raise ValueError(f"{what}.var_names has duplicates; make them unique with `.var_names_make_unique()`.")
    return adata


def _align_features(adata, reference: pd.Index, what: str, reference_what: str):
    """``adata`` with its columns in the order of ``reference``; raise if the sets differ."""
    names = pd.Index(adata.var_names.astype(str))
    if names.equals(reference):
        return adata
    missing = reference.difference(names, sort=False)
    extra = names.difference(reference, sort=False)
    if len(missing) or len(extra):
        parts = []
        if len(missing):
            parts.append(f"lacks {len(missing)} of them (e.g. {list(missing[:5])})")
        if len(extra):
            parts.append(f"has {len(extra)} others (e.g. {list(extra[:5])})")
        raise ValueError(
            f"{what} has {len(names)} features and {reference_what} has {len(reference)}; {what} "
            + " and ".join(parts)
            + ". Features are matched by name: subset both to the same features first, e.g. "
            "`common = a.var_names.intersection(b.var_names); a = a[:, common]; b = b[:, common]`."
        )
    return adata[:, reference.to_numpy()]


def _paired_parts(paired, rna_mod: str, atac_mod: str):
    if isinstance(paired, tuple | list):
        if len(paired) != 2:
            raise ValueError(f"paired must be a MuData or a pair (adata_rna, adata_atac); got a sequence of {len(paired)}.")
        rna, atac = paired
        obs = None
    elif hasattr(paired, "mod") and isinstance(paired.mod, Mapping):
        missing = [m for m in (rna_mod, atac_mod) if m not in paired.mod]
        if missing:
            raise ValueError(f"paired MuData has no modality {missing}; it has {list(paired.mod.keys())}. Pass rna_mod=/atac_mod=.")
        rna, atac = paired.mod[rna_mod], paired.mod[atac_mod]
        obs = paired.obs
    else:
        raise TypeError(f"paired must be a MuData or a pair (adata_rna, adata_atac); got {type(paired).__name__}.")
    rna = _check_anndata(rna, "paired RNA")
    atac = _check_anndata(atac, "paired ATAC")
    rna_cells, atac_cells = pd.Index(rna.obs_names.astype(str)), pd.Index(atac.obs_names.astype(str))
    if not rna_cells.equals(atac_cells):
        only_rna, only_atac = rna_cells.difference(atac_cells), atac_cells.difference(rna_cells)
        if len(only_rna) or len(only_atac):
            raise ValueError(
                f"The paired RNA and ATAC do not hold the same cells: {len(only_rna)} only in RNA "
                f"(e.g. {list(only_rna[:3])}), {len(only_atac)} only in ATAC (e.g. {list(only_atac[:3])}). "
                "Pass unpaired cells as rna=... / atac=... instead."
            )
        atac = atac[rna_cells.to_numpy()]
    # cell annotations: the RNA's, then the ATAC's columns it lacks, then the MuData's own
    # (unprefixed) columns, which win; "rna:..."-style copies pulled from the modalities are skipped
    cell_obs = rna.obs.copy()
    for col in atac.obs.columns.difference(cell_obs.columns, sort=False):
        cell_obs[col] = atac.obs[col].to_numpy()
    if obs is not None:
        prefixes = tuple(f"{m}:" for m in paired.mod)
        for col in obs.columns:
            if not str(col).startswith(prefixes):
                cell_obs[col] = obs.loc[rna_cells.to_numpy(), col].to_numpy()
    return rna, atac, cell_obs


def organize_multiome(
    paired=None,
    rna=None,
    atac=None,
    *,
    rna_mod: str = "rna",
    atac_mod: str = "atac",
    modality_key: str = "modalities",
):
    """Build one MuData from paired multiome cells plus RNA-only and ATAC-only cells.

    The result has modalities ``"rna"`` and ``"atac"``; a cell belongs to a modality's
    AnnData exactly when it was measured in it, which is how
    :meth:`sclatent.SCLatent.setup_mudata` tells paired from unpaired cells (never from
    zero counts). Features are matched by name: the RNA-only and ATAC-only data may list
    the paired data's features in another order (they are reordered), but not a
    different set (a ``ValueError`` says which features differ). Matrices keep their
    type (sparse stays sparse); ``X`` and the layers common to all parts are kept.

    Parameters
    ----------
    paired
        Cells measured in both modalities: a MuData with modalities ``rna_mod`` and
        ``atac_mod`` holding the same cells, or a pair ``(adata_rna, adata_atac)``.
    rna
        AnnData of RNA-only cells (genes as in ``paired``'s RNA).
    atac
        AnnData of ATAC-only cells (regions as in ``paired``'s ATAC).
    rna_mod, atac_mod
        Modality names in ``paired`` when it is a MuData.
    modality_key
        Name of the ``obs`` column recording each cell's modalities (``"rna+atac"``,
        ``"rna"`` or ``"atac"``); pass it as ``setup_mudata(..., modality_key=...)`` to
        have it checked against membership, or ignore it.

    Returns
    -------
    mudata.MuData
        Cells ordered paired, then RNA-only, then ATAC-only; ``obs`` holds the cell
        annotations of each input (outer-joined columns) and ``modality_key``.

    Examples
    --------
    >>> mdata = sclatent.data.organize_multiome(paired=multiome, rna=scrna, atac=scatac)
    >>> sclatent.SCLatent.setup_mudata(mdata, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    """
    import anndata as ad
    import mudata as md

    if paired is None and rna is None and atac is None:
        raise ValueError("organize_multiome needs at least one of paired=, rna=, atac=.")
    rna_parts, atac_parts, obs_parts, kinds = [], [], [], []
    rna_ref = atac_ref = None
    if paired is not None:
        p_rna, p_atac, p_obs = _paired_parts(paired, rna_mod, atac_mod)
        rna_ref, atac_ref = pd.Index(p_rna.var_names.astype(str)), pd.Index(p_atac.var_names.astype(str))
        rna_parts.append(p_rna)
        atac_parts.append(p_atac)
        obs_parts.append(p_obs)
        kinds.append(np.full(p_rna.n_obs, "rna+atac", dtype=object))
    if rna is not None:
        rna = _check_anndata(rna, "rna")
        if rna_ref is None:
            rna_ref = pd.Index(rna.var_names.astype(str))
        rna = _align_features(rna, rna_ref, "rna (RNA-only cells)", "the paired RNA")
        rna_parts.append(rna)
        obs_parts.append(rna.obs)
        kinds.append(np.full(rna.n_obs, "rna", dtype=object))
    if atac is not None:
        atac = _check_anndata(atac, "atac")
        if atac_ref is None:
            atac_ref = pd.Index(atac.var_names.astype(str))
        atac = _align_features(atac, atac_ref, "atac (ATAC-only cells)", "the paired ATAC")
        atac_parts.append(atac)
        obs_parts.append(atac.obs)
        kinds.append(np.full(atac.n_obs, "atac", dtype=object))

    names = pd.Index(np.concatenate([np.asarray(o.index.astype(str)) for o in obs_parts]))
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()
        raise ValueError(
            f"{len(dup)} cell name(s) occur in more than one input (e.g. {list(dup[:5])}). Cells measured in both "
            "modalities belong in paired=; otherwise make the names unique, e.g. by adding a suffix per input."
        )

    def concat(parts):
        if len(parts) == 1:
            return parts[0].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.concat(parts, join="inner", merge="same", uns_merge="first")

    mods = {}
    if rna_parts:
        mods["rna"] = concat(rna_parts)
    if atac_parts:
        mods["atac"] = concat(atac_parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = pd.concat([o.copy() for o in obs_parts], axis=0, join="outer")
    obs.index = names
    obs[modality_key] = pd.Categorical(np.concatenate(kinds), categories=["rna+atac", "rna", "atac"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData(mods)
    mdata.obs = obs.loc[mdata.obs_names]
    return mdata

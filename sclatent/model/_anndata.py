"""Validation of AnnData/MuData input, the registry they are described by, and their tensors.

This file and :mod:`sclatent.model._model` are the only places that read AnnData/MuData.
Nothing here writes to the user's matrices: validation reads a sample of the stored
values and row sums, conversions copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .. import __version__
from ..data.registry import REGISTRY_UNS_KEY, DataRegistry, ModalityRegistry
from ..data.tensors import CellTensors, ModalityMatrix
from ..nn import Covariates

__all__ = ["build_registry", "check_counts", "read_tensors", "registry_of", "var_names_hash"]

#: How many stored values are checked for being non-negative integers.
VALUE_SAMPLE_SIZE = 1_000_000


def var_names_hash(names: Sequence[str]) -> str:
    """SHA-256 of the newline-joined feature names."""
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def _is_mudata(data) -> bool:
    return hasattr(data, "mod") and isinstance(getattr(data, "mod"), Mapping)


def _counts_matrix(adata, layer: str | None, where: str):
    if layer is None:
        if adata.X is None:
            raise ValueError(f"{where}.X is empty (None). Pass layer='...' naming the layer that holds raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"{where}.layers has no {layer!r}; available layers: {list(adata.layers.keys())}. Pass layer=None to use .X.")
    return adata.layers[layer]


def _counts_hint(adata, layer: str | None) -> str:
    hints = []
    if layer != "counts" and "counts" in adata.layers:
        hints.append("pass layer='counts' (adata.layers['counts'] exists)")
    if getattr(adata, "raw", None) is not None and layer is None:
        hints.append("use adata.raw.to_adata() if .raw holds the raw counts")
    return (" Did you mean to " + " or ".join(hints) + "?") if hints else " sclatent needs raw, unnormalized counts."


def check_counts(matrix, where: str, hint: str = "", allow_zero_cells: bool = False) -> np.ndarray:
    """Validate a count matrix without modifying it; return the per-cell totals.

    Checks (raising ``ValueError`` naming the problem and the fix): an empty matrix,
    NaN or infinite values (through the row sums, so every value is covered), negative
    or non-integer values (on a sample of at most ``VALUE_SAMPLE_SIZE`` stored values,
    vectorized), and cells with zero total counts unless ``allow_zero_cells``.

    Parameters
    ----------
    matrix
        Dense array, or CSR/CSC sparse matrix.
    where
        Name of the matrix for messages, e.g. ``"adata.X"``.
    hint
        Extra advice appended to value errors.
    allow_zero_cells
        Accept cells whose total is zero.

    Returns
    -------
    numpy.ndarray
        Total counts per cell (float64).
    """
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{where} is empty (shape {matrix.shape}); it needs at least one cell and one feature.")
    if sp.issparse(matrix):
        values = matrix.data
    else:
        values = np.asarray(matrix)
        values = values.reshape(-1) if values.flags.c_contiguous or values.flags.f_contiguous else values.ravel()
    if values.size:
        rng = np.random.default_rng(0)
        sample = values if values.size <= VALUE_SAMPLE_SIZE else values[rng.integers(0, values.size, VALUE_SAMPLE_SIZE)]
        sample = np.asarray(sample, dtype=np.float64)
        finite = np.isfinite(sample)
        if not finite.all():
            raise ValueError(f"{where} contains NaN or infinite values. Remove or fix those entries; sclatent needs raw counts.")
        if (sample < 0).any():
            raise ValueError(f"{where} contains negative values, so it is not raw counts.{hint}")
        if (sample != np.round(sample)).any():
            raise ValueError(f"{where} contains non-integer values, so it looks normalized or log-transformed.{hint}")
    totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    if not np.isfinite(totals).all():
        raise ValueError(f"{where} contains NaN or infinite values. Remove or fix those entries; sclatent needs raw counts.")
    if (totals < 0).any():
        raise ValueError(f"{where} contains negative values, so it is not raw counts.{hint}")
    if not allow_zero_cells:
        n_zero = int((totals == 0).sum())
        if n_zero:
            raise ValueError(
                f"{where} has {n_zero} cell(s) with zero total counts; they carry no information and break the "
                "size factor. Drop them first, e.g. `sc.pp.filter_cells(adata, min_counts=1)` "
                "or `adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()`."
            )
    return totals


def _categories(obs: pd.DataFrame, key: str, where: str) -> tuple[str, ...]:
    col = obs[key]
    if col.isna().any():
        raise ValueError(f"{where}.obs[{key!r}] has {int(col.isna().sum())} missing value(s). Fill them (e.g. with 'unknown') or drop those cells.")
    if isinstance(col.dtype, pd.CategoricalDtype):
        return tuple(str(c) for c in col.cat.categories)
    return tuple(sorted(map(str, pd.unique(col.astype(str)))))


def _check_keys(obs: pd.DataFrame, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise ValueError(f"{where}.obs has no column(s) {missing}; available columns: {list(obs.columns)}.")


def _check_continuous(obs: pd.DataFrame, key: str, where: str) -> None:
    values = pd.to_numeric(obs[key], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{where}.obs[{key!r}] must be numeric without NaN/inf; {int((~np.isfinite(values)).sum())} value(s) are not.")


def _observed_from_key(obs: pd.DataFrame, key: str, names: Sequence[str], where: str) -> np.ndarray:
    values = obs[key].astype(str).to_numpy()
    out = np.zeros((len(values), len(names)), dtype=bool)
    parts = [set(v.replace(",", "+").split("+")) for v in values]
    unknown = set().union(*parts) - set(names) if parts else set()
    if unknown:
        raise ValueError(f"{where}.obs[{key!r}] names modalities {sorted(unknown)} that are not among {list(names)}; use values like 'rna+atac', 'rna', 'atac'.")
    for j, n in enumerate(names):
        out[:, j] = [n in p for p in parts]
    return out


def build_registry(
    data,
    modalities: Mapping[str, str] | None = None,
    layers: Mapping[str, str | None] | str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    size_factor_key: str | None = None,
    modality_key: str | None = None,
) -> DataRegistry:
    """Validate ``data`` and describe it as a :class:`DataRegistry` (see ``SCLatent.setup_*``)."""
    is_mu = _is_mudata(data)
    where = "mdata" if is_mu else "adata"
    cat_keys = tuple(categorical_covariate_keys or ())
    cont_keys = tuple(continuous_covariate_keys or ())
    keys = [k for k in (batch_key, labels_key, size_factor_key, modality_key) if k] + list(cat_keys) + list(cont_keys)
    _check_keys(data.obs, keys, where)
    if is_mu:
        if not modalities:
            raise ValueError(f"setup_mudata needs modalities, e.g. {{'rna': 'rna', 'atac': 'atac'}}; mdata.mod has {list(data.mod.keys())}.")
        missing = [v for v in modalities.values() if v not in data.mod]
        if missing:
            raise ValueError(f"mdata.mod has no {missing}; it has {list(data.mod.keys())}.")
        layer_of = dict(layers) if isinstance(layers, Mapping) else {name: layers for name in modalities}
    else:
        modalities = {"rna": None}
        layer_of = {"rna": layers if not isinstance(layers, Mapping) else layers.get("rna")}
    mods = []
    for name, mod_key in modalities.items():
        adata = data.mod[mod_key] if is_mu else data
        w = f"mdata.mod[{mod_key!r}]" if is_mu else "adata"
        if adata.obs_names.has_duplicates:
            raise ValueError(f"{w}.obs_names has duplicates; make them unique with `.obs_names_make_unique()`.")
        if adata.var_names.has_duplicates:
            raise ValueError(f"{w}.var_names has duplicates; make them unique with `.var_names_make_unique()`.")
        layer = layer_of.get(name)
        matrix = _counts_matrix(adata, layer, w)
        where_m = w + (f".layers[{layer!r}]" if layer else ".X")
        totals = check_counts(matrix, where_m, _counts_hint(adata, layer), allow_zero_cells=is_mu)
        if is_mu and not (totals > 0).any():
            raise ValueError(f"{where_m} has no counts at all (every cell sums to 0); check the layer and the modality.")
        names = tuple(map(str, adata.var_names))
        mods.append(ModalityRegistry(name, mod_key, layer, names, var_names_hash(names)))
    categories = {k: _categories(data.obs, k, where) for k in (batch_key, labels_key, *cat_keys) if k}
    for k in cont_keys:
        _check_continuous(data.obs, k, where)
    if size_factor_key:
        _check_continuous(data.obs, size_factor_key, where)
        if (pd.to_numeric(data.obs[size_factor_key]).to_numpy() <= 0).any():
            raise ValueError(f"{where}.obs[{size_factor_key!r}] must be strictly positive size factors.")
    registry = DataRegistry(
        kind="mudata" if is_mu else "anndata",
        modalities=tuple(mods),
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=cat_keys,
        continuous_covariate_keys=cont_keys,
        categories=categories,
        modality_key=modality_key,
        package_version=__version__,
    )
    if is_mu:  # the cell-level checks need the registry: run them now, before anything trains
        read_tensors(data, registry)
    return registry


def registry_of(data) -> DataRegistry:
    """The registry stored by ``setup_anndata``/``setup_mudata`` in ``data.uns``."""
    if REGISTRY_UNS_KEY not in data.uns:
        kind = "setup_mudata(mdata, modalities=...)" if _is_mudata(data) else "setup_anndata(adata, ...)"
        raise ValueError(f"This data has not been set up for sclatent. Call sclatent.SCLatent.{kind} first.")
    return DataRegistry.from_json(str(data.uns[REGISTRY_UNS_KEY]))


def _aligned_matrix(adata, mod: ModalityRegistry, where: str):
    """Counts of ``adata`` with columns in the registry's feature order (a view or a copy)."""
    names = pd.Index(map(str, adata.var_names))
    matrix = _counts_matrix(adata, mod.layer, where)
    if len(names) == mod.n_features and var_names_hash(names) == mod.var_names_hash:
        return matrix
    expected = pd.Index(mod.var_names)
    missing = expected.difference(names)
    if len(missing):
        raise ValueError(
            f"{where} lacks {len(missing)} of the model's {mod.n_features} features of modality {mod.name!r} "
            f"(e.g. {list(missing[:5])}). Subset or reindex the data to the features the model was trained on."
        )
    pos = names.get_indexer(expected)
    return matrix[:, pos]


def _codes(obs: pd.DataFrame, key: str, categories: Sequence[str], where: str) -> np.ndarray:
    col = obs[key]
    if col.isna().any():
        raise ValueError(f"{where}.obs[{key!r}] has {int(col.isna().sum())} missing value(s). Fill or drop them.")
    values = col.astype(str).to_numpy()
    codes = pd.Categorical(values, categories=list(categories)).codes
    if (codes < 0).any():
        unknown = sorted(set(values[codes < 0]))
        raise ValueError(
            f"{where}.obs[{key!r}] has categories the model has not seen: {unknown[:10]}; known: {list(categories)}. "
            "Map them to known categories or train a model that includes them."
        )
    return codes.astype(np.int64)


def read_tensors(data, registry: DataRegistry) -> tuple[CellTensors, pd.Index]:
    """Convert ``data`` to :class:`CellTensors` in the order of its ``obs_names``.

    Works for the data the registry was made from and for new data with the same
    features (in any column order) and known categories.
    """
    is_mu = _is_mudata(data)
    where = "mdata" if is_mu else "adata"
    if (registry.kind == "mudata") != is_mu:
        raise ValueError(f"This model was set up on {registry.kind}; got a {'MuData' if is_mu else 'AnnData'}.")
    obs_names = pd.Index(map(str, data.obs_names))
    if obs_names.has_duplicates:
        raise ValueError(f"{where}.obs_names has duplicates; make them unique with `.obs_names_make_unique()`.")
    n = len(obs_names)
    if n == 0:
        raise ValueError(f"{where} has no cells.")
    names = [m.name for m in registry.modalities]
    observed = np.zeros((n, len(names)), dtype=bool)
    totals = np.zeros((n, len(names)))
    counts = {}
    for j, mod in enumerate(registry.modalities):
        adata = data.mod[mod.mod_key] if is_mu else data
        w = f"mdata.mod[{mod.mod_key!r}]" if is_mu else "adata"
        if is_mu and mod.mod_key not in data.mod:
            raise ValueError(f"mdata.mod has no {mod.mod_key!r}, which the model needs; it has {list(data.mod.keys())}.")
        matrix = _aligned_matrix(adata, mod, w)
        if is_mu:
            pos = obs_names.get_indexer(pd.Index(map(str, adata.obs_names)))
            if (pos < 0).any():
                raise ValueError(f"{w} has cells that are not in mdata.obs_names; call mdata.update() first.")
            observed[pos, j] = True
            # a modality may hold no cells in new data (e.g. RNA-only cells for imputing ATAC)
            sub_totals = check_counts(matrix, w, allow_zero_cells=True) if matrix.shape[0] else np.zeros(0)
            totals[pos, j] = sub_totals
            if sp.issparse(matrix):
                scatter = sp.csr_matrix((np.ones(len(pos)), (pos, np.arange(len(pos)))), shape=(n, matrix.shape[0]))
                matrix = scatter @ sp.csr_matrix(matrix)
            else:
                full = np.zeros((n, matrix.shape[1]), dtype=np.float32)
                full[pos] = np.asarray(matrix)
                matrix = full
        else:
            observed[:, j] = True
            totals[:, j] = check_counts(matrix, w, _counts_hint(adata, mod.layer))
        counts[mod.name] = ModalityMatrix(matrix)
    if is_mu and registry.modality_key:
        listed = _observed_from_key(data.obs, registry.modality_key, names, where)
        extra = listed & ~observed
        if extra.any():
            raise ValueError(
                f"{where}.obs[{registry.modality_key!r}] lists a modality for {int(extra.any(1).sum())} cell(s) "
                "that are not in that modality's AnnData."
            )
        observed = listed
    if is_mu:
        none = ~observed.any(1)
        if none.any():
            raise ValueError(
                f"{int(none.sum())} cell(s) of mdata are in none of the modalities {names} "
                f"(e.g. {list(obs_names[none][:5])}). Drop them: mdata = mdata[mdata.obs_names.isin(...)]."
            )
        empty = ((totals * observed).sum(1) == 0)
        if empty.any():
            raise ValueError(
                f"{int(empty.sum())} cell(s) have zero counts in every modality they were measured in; drop them first."
            )
    library = np.where(observed, np.maximum(totals, 1.0), 1.0)
    if registry.size_factor_key:
        sf = pd.to_numeric(data.obs[registry.size_factor_key]).to_numpy(dtype=np.float64)
        if not np.isfinite(sf).all() or (sf <= 0).any():
            raise ValueError(f"{where}.obs[{registry.size_factor_key!r}] must be finite, strictly positive size factors.")
        library[:, 0] = sf
    cat = [_codes(data.obs, k, registry.categories[k], where) for k in registry.categorical_keys]
    cont = [pd.to_numeric(data.obs[k]).to_numpy(dtype=np.float32) for k in registry.continuous_covariate_keys]
    for k, v in zip(registry.continuous_covariate_keys, cont):
        if not np.isfinite(v).all():
            raise ValueError(f"{where}.obs[{k!r}] must be numeric without NaN/inf.")
    tensors = CellTensors(
        counts=counts,
        observed=torch.as_tensor(observed, dtype=torch.float32),
        log_library=torch.as_tensor(np.log(library), dtype=torch.float32),
        covariates=Covariates(
            torch.as_tensor(np.stack(cat, 1) if cat else np.zeros((n, 0), dtype=np.int64)),
            torch.as_tensor(np.stack(cont, 1) if cont else np.zeros((n, 0), dtype=np.float32)),
        ),
    )
    return tensors, obs_names

"""AnnData/MuData -> tensors: count checks, feature alignment, covariate codes, one conversion.

The model layer's only reader of matrices. Nothing here writes to the user's data:
validation reads the stored values and row sums, conversions copy. :func:`read_tensors`
keeps the result of the conversion that ``setup_anndata``/``setup_mudata`` ran (to check
the data) for the model built next on the same, unchanged object, so each matrix is read
and checked once.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..batch import Covariates
from ..data.registry import REGISTRY_UNS_KEY, DataRegistry, ModalityRegistry
from ..data.tensors import BackedMatrix, CellTensors, ModalityMatrix

__all__ = ["backed_source", "check_counts", "check_backed", "disk_source", "counts_hint", "counts_matrix", "is_mudata", "read_tensors", "registry_of", "var_names_hash"]

#: Stored values checked per vectorized step (bounds the temporary memory of the check).
VALUE_CHUNK = 1 << 22


def var_names_hash(names: Sequence[str]) -> str:
    """SHA-256 of the newline-joined feature names."""
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def is_mudata(data) -> bool:
    return hasattr(data, "mod") and isinstance(getattr(data, "mod"), Mapping)


def counts_matrix(adata, layer: str | None, where: str):
    if layer is None:
        if adata.X is None:
            raise ValueError(f"{where}.X is empty (None). Pass layer='...' naming the layer that holds raw counts.")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(f"{where}.layers has no {layer!r}; available layers: {list(adata.layers.keys())}. Pass layer=None to use .X.")
    return adata.layers[layer]


def counts_hint(adata, layer: str | None) -> str:
    hints = []
    if layer != "counts" and "counts" in adata.layers:
        hints.append("pass layer='counts' (adata.layers['counts'] exists)")
    if getattr(adata, "raw", None) is not None and layer is None:
        hints.append("use adata.raw.to_adata() if .raw holds the raw counts")
    return (" Did you mean to " + " or ".join(hints) + "?") if hints else " sclatent needs raw, unnormalized counts."


def _check_values(values: np.ndarray, where: str, hint: str) -> None:
    """Every value finite, non-negative and integer; ``values`` is read in chunks, never modified."""
    if values.dtype == bool:
        return
    integer = np.issubdtype(values.dtype, np.integer)
    if integer and np.issubdtype(values.dtype, np.unsignedinteger):
        return
    for start in range(0, values.size, VALUE_CHUNK):
        chunk = values[start : start + VALUE_CHUNK]
        if integer:
            bad = chunk < 0
        else:
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(chunk) | (chunk < 0) | (chunk != np.floor(chunk))
        if bad.any():
            first = chunk[np.flatnonzero(bad)[0]]
            n_bad = int(bad.sum())
            if not np.isfinite(first):
                raise ValueError(f"{where} contains NaN or infinite values. Remove or fix those entries; sclatent needs raw counts.")
            if first < 0:
                raise ValueError(f"{where} contains negative values ({n_bad} or more, e.g. {first}), so it is not raw counts.{hint}")
            raise ValueError(
                f"{where} contains non-integer values ({n_bad} or more, e.g. {first}), so it looks normalized or "
                f"log-transformed.{hint}"
            )


def check_counts(matrix, where: str, hint: str = "", allow_zero_cells: bool = False) -> np.ndarray:
    """Validate a count matrix without modifying it; return the per-cell totals.

    Checks (raising ``ValueError`` naming the problem and the fix): an empty matrix; NaN,
    infinite, negative or non-integer values (every stored value, in chunks of
    ``VALUE_CHUNK`` values, see :func:`_check_values`); cells with zero total counts unless
    ``allow_zero_cells``.

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
    if not sp.issparse(matrix):
        matrix = np.asarray(matrix)  # no copy for an ndarray
    values = matrix.data if sp.issparse(matrix) else matrix.reshape(-1, order="A")  # a view, never a copy of the user's
    _check_values(values, where, hint)
    totals = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()  # float64: float16 sums would overflow
    if not allow_zero_cells:
        n_zero = int((totals == 0).sum())
        if n_zero:
            raise ValueError(
                f"{where} has {n_zero} cell(s) with zero total counts; they carry no information and break the "
                "size factor. Drop them first, e.g. `sc.pp.filter_cells(adata, min_counts=1)` "
                "or `adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()`."
            )
    return totals


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


def backed_source(matrix, where: str):
    """The HDF5 object behind a matrix of a backed (``backed="r"``) AnnData, or ``None`` for
    a matrix in memory. A CSR group or a dense dataset is read in row spans; CSC (a column
    per read) is refused with the way out."""
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(matrix, CSRDataset):
        return matrix.group
    if isinstance(matrix, CSCDataset):
        raise ValueError(
            f"{where} is stored on disk as CSC (by column), so reading a batch of cells would read every column. "
            "Rewrite the file with CSR counts, e.g. `a = anndata.read_h5ad(path); a.X = a.X.tocsr(); a.write_h5ad(path)`, "
            "or load it into memory: `adata = adata.to_memory()`."
        )
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py comes with anndata
        return None
    return matrix if isinstance(matrix, h5py.Dataset) else None


def disk_source(adata, matrix, where: str):
    """The on-disk object behind ``matrix`` of ``adata`` (see :func:`backed_source`), or
    ``None`` for a matrix in memory: the matrices of a backed ``.h5ad``/``.h5mu``, and
    on-disk sparse datasets in an AnnData held in memory (a zarr store opened with
    :func:`sclatent.data.open_zarr`)."""
    from anndata.abc import CSCDataset, CSRDataset

    if getattr(adata, "is_view", False):
        return None
    if getattr(adata, "isbacked", False) or isinstance(matrix, (CSRDataset, CSCDataset)):
        return backed_source(matrix, where)
    return None


def check_backed(data, where: str) -> None:
    """Refuse backed (``backed="r"``) data whose matrices cannot be read in row spans (see
    :func:`backed_source`); backed CSR and dense matrices are read from disk per batch."""
    parts = [(f"{where}.mod[{k!r}]", a) for k, a in data.mod.items()] if is_mudata(data) else [(where, data)]
    for w, adata in parts:
        disk_source(adata, adata.X, f"{w}.X")


def _scan_backed(source, where: str, hint: str, column_map: np.ndarray | None, allow_zero_cells: bool) -> tuple[np.ndarray, np.ndarray]:
    """One chunked pass over an on-disk matrix: checks every value (see :func:`check_counts`)
    and returns each cell's total and ``sum lgamma(x + 1)`` over the model's features."""
    from scipy.special import gammaln

    dense = not hasattr(source, "keys")
    n = source.shape[0] if dense else source["indptr"].shape[0] - 1
    if n == 0:
        raise ValueError(f"{where} is empty; it needs at least one cell.")
    totals, log_fact = np.zeros(n), np.zeros(n)
    if dense:
        step = max(1, VALUE_CHUNK // max(1, source.shape[1]))
        for a in range(0, n, step):
            block = np.asarray(source[a : a + step])
            if column_map is not None:
                block = block[:, column_map >= 0]
            _check_values(block.reshape(-1), where, hint)
            block = block.astype(np.float64)
            totals[a : a + step] = block.sum(1)
            log_fact[a : a + step] = gammaln(block + 1.0).sum(1)
    else:
        indptr = np.asarray(source["indptr"][:], dtype=np.int64)
        indices, data = source["indices"], source["data"]
        a = 0
        while a < n:  # rows holding about VALUE_CHUNK stored values at a time
            b = int(np.searchsorted(indptr, indptr[a] + VALUE_CHUNK, side="right")) - 1
            b = min(n, max(b, a + 1))
            lo, hi = int(indptr[a]), int(indptr[b])
            values = np.asarray(data[lo:hi])
            _check_values(values, where, hint)
            values = values.astype(np.float64)
            if column_map is not None:
                values = np.where(column_map[np.asarray(indices[lo:hi], dtype=np.int64)] >= 0, values, 0.0)
            row = np.repeat(np.arange(b - a), np.diff(indptr[a : b + 1]))
            totals[a:b] = np.bincount(row, weights=values, minlength=b - a)
            log_fact[a:b] = np.bincount(row, weights=gammaln(values + 1.0), minlength=b - a)
            a = b
    if not allow_zero_cells and (totals == 0).any():
        raise ValueError(
            f"{where} has {int((totals == 0).sum())} cell(s) with zero total counts; they carry no information and break "
            "the size factor. Drop them first (write a file without them, or load it with `.to_memory()` and filter)."
        )
    return totals, log_fact


def _column_map(adata, mod: ModalityRegistry, where: str, max_missing: float = 0.0) -> np.ndarray | None:
    """Column of ``adata`` -> position among the model's features (-1: not a model feature);
    ``None`` when the columns are the model's features in order. Up to ``max_missing`` of
    the model's features may be absent (read as zeros, with a warning)."""
    names = pd.Index(map(str, adata.var_names))
    if len(names) == mod.n_features and var_names_hash(names) == mod.var_names_hash:
        return None
    expected = pd.Index(mod.var_names)
    missing = expected.difference(names)
    if len(missing) > max_missing * mod.n_features:
        allowed = f" (at most {max_missing:.0%} may be missing)" if max_missing else ""
        raise ValueError(
            f"{where} lacks {len(missing)} of the model's {mod.n_features} features of modality {mod.name!r} "
            f"(e.g. {list(missing[:5])}){allowed}. Subset or reindex the data to the features the model was trained on."
        )
    if len(missing):
        warnings.warn(
            f"{where} lacks {len(missing)} of the model's {mod.n_features} features of modality {mod.name!r} "
            f"({len(missing) / mod.n_features:.1%}, e.g. {list(missing[:5])}); they are read as zero counts.",
            UserWarning,
            stacklevel=4,
        )
    return expected.get_indexer(names).astype(np.int64)


def registry_of(data) -> DataRegistry:
    """The registry stored by ``setup_anndata``/``setup_mudata`` in ``data.uns``."""
    if REGISTRY_UNS_KEY not in data.uns:
        kind = "setup_mudata(mdata, modalities=...)" if is_mudata(data) else "setup_anndata(adata, ...)"
        raise ValueError(f"This data has not been set up for sclatent. Call sclatent.SCLatent.{kind} first.")
    return DataRegistry.from_json(str(data.uns[REGISTRY_UNS_KEY]))


def _aligned_matrix(adata, mod: ModalityRegistry, where: str, max_missing: float = 0.0):
    """Counts of ``adata`` with columns in the registry's feature order (a view or a copy;
    features it lacks, when allowed, are zero columns)."""
    matrix = counts_matrix(adata, mod.layer, where)
    column_map = _column_map(adata, mod, where, max_missing)
    if column_map is None:
        return matrix
    kept = np.flatnonzero(column_map >= 0)
    if len(kept) == mod.n_features:
        pos = np.empty(mod.n_features, dtype=np.int64)
        pos[column_map[kept]] = kept  # model feature -> column of adata
        return matrix[:, pos]
    # some model features are missing: a 0/1 selection matrix places the columns there are
    select = sp.csr_matrix((np.ones(len(kept)), (kept, column_map[kept])), shape=(matrix.shape[1], mod.n_features))
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix) @ select
    return np.asarray(select.T @ np.asarray(matrix).T).T


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


#: id(data) -> (weak reference to data, registry JSON, fingerprint, tensors, obs_names) of
#: its last conversion (AnnData is unhashable; the entry goes when the data object does)
_CONVERTED: dict[int, tuple] = {}


def _fingerprint(data, registry: DataRegistry) -> tuple:
    """What must be unchanged for a kept conversion to hold: the matrices (identity, shape,
    storage) and the ``obs`` names and columns the registry reads (hashed)."""
    parts = []
    for mod in registry.modalities:
        adata = data.mod.get(mod.mod_key) if is_mudata(data) else data
        if adata is None:
            return ()
        matrix = adata.X if mod.layer is None else adata.layers.get(mod.layer)
        storage = matrix.data if sp.issparse(matrix) else matrix
        pointer = storage.__array_interface__["data"][0] if isinstance(storage, np.ndarray) else id(storage)
        parts.append((id(adata), id(matrix), getattr(matrix, "shape", None), getattr(matrix, "nnz", None), pointer,
                      int(pd.util.hash_pandas_object(pd.Index(adata.obs_names), index=False).sum())))
    obs = data.obs[[k for k in registry.obs_keys if k in data.obs]].copy()
    obs.index = pd.Index(map(str, data.obs_names))
    parts.append(int(pd.util.hash_pandas_object(obs.astype(str), index=True).sum()))
    return tuple(parts)


def read_tensors(data, registry: DataRegistry, keep: bool = False) -> tuple[CellTensors, pd.Index]:
    """Convert ``data`` to :class:`CellTensors` in the order of its ``obs_names``.

    Works for the data the registry was made from and for new data with the same
    features (in any column order) and known categories.

    Parameters
    ----------
    data
        AnnData or MuData.
    registry
        How to read it.
    keep
        Keep the result for the next call on the same object with the same registry (the
        setup functions do, so that the model built next does not read and check every
        matrix again). A kept result is used once, and only while the matrices and the
        ``obs`` columns read are the same objects with the same content hash.
    """
    key = registry.to_json()
    kept = _CONVERTED.pop(id(data), None)
    if kept is not None and kept[0]() is data and kept[1] == key and kept[2] == _fingerprint(data, registry):
        return kept[3], kept[4]
    tensors, obs_names = _convert(data, registry)
    if keep:
        _CONVERTED[id(data)] = (weakref.ref(data), key, _fingerprint(data, registry), tensors, obs_names)
        weakref.finalize(data, _CONVERTED.pop, id(data), None)
    return tensors, obs_names


def _convert(data, registry: DataRegistry) -> tuple[CellTensors, pd.Index]:
    is_mu = is_mudata(data)
    where = "mdata" if is_mu else "adata"
    if (registry.kind == "mudata") != is_mu:
        raise ValueError(f"This model was set up on {registry.kind}; got a {'MuData' if is_mu else 'AnnData'}.")
    check_backed(data, where)
    missing = [k for k in registry.obs_keys if k not in data.obs.columns]
    if missing:
        raise ValueError(
            f"{where}.obs lacks the column(s) {missing} that this model was set up with (batch and covariates are "
            f"read by name); it has {list(data.obs.columns)}. Add them, with categories the model knows."
        )
    obs_names = pd.Index(map(str, data.obs_names))
    if obs_names.has_duplicates:
        raise ValueError(f"{where}.obs_names has duplicates; make them unique with `.obs_names_make_unique()`.")
    n = len(obs_names)
    if n == 0:
        raise ValueError(f"{where} is empty (shape {tuple(data.shape)}); it needs at least one cell.")
    names = [m.name for m in registry.modalities]
    observed = np.zeros((n, len(names)), dtype=bool)
    totals = np.zeros((n, len(names)))
    counts = {}
    for j, mod in enumerate(registry.modalities):
        if is_mu and mod.mod_key not in data.mod:
            # new data without this modality (e.g. an ATAC-only query of a paired model): no cell has it
            if not any(m.mod_key in data.mod for m in registry.modalities):
                raise ValueError(f"mdata.mod has none of the model's modalities {names}; it has {list(data.mod.keys())}.")
            counts[mod.name] = ModalityMatrix(sp.csr_matrix((n, mod.n_features), dtype=np.float32))
            continue
        adata = data.mod[mod.mod_key] if is_mu else data
        w = f"mdata.mod[{mod.mod_key!r}]" if is_mu else "adata"
        where_m = w + (f".layers[{mod.layer!r}]" if mod.layer else ".X")
        source = disk_source(adata, counts_matrix(adata, mod.layer, w), where_m)
        if source is not None:  # on disk: the per-cell constants from one chunked pass, the counts read per batch
            column_map = _column_map(adata, mod, w, registry.max_missing_features)
            sub_totals, sub_log_fact = _scan_backed(source, where_m, counts_hint(adata, mod.layer), column_map, allow_zero_cells=is_mu)
            if is_mu:
                pos = obs_names.get_indexer(pd.Index(map(str, adata.obs_names)))
                if (pos < 0).any():
                    raise ValueError(f"{w} has cells that are not in mdata.obs_names; call mdata.update() first.")
                if not (sub_totals > 0).any():
                    raise ValueError(f"{where_m} has no counts at all (every cell sums to 0); check the layer and the modality.")
                row_of_cell = np.full(n, -1, dtype=np.int64)
                row_of_cell[pos] = np.arange(len(pos))
                log_fact = np.zeros(n)
                log_fact[pos] = sub_log_fact
                observed[pos, j] = True
                totals[pos, j] = sub_totals
            else:
                row_of_cell, log_fact = None, sub_log_fact
                observed[:, j] = True
                totals[:, j] = sub_totals
            counts[mod.name] = BackedMatrix(
                source, mod.n_features, torch.as_tensor(log_fact.astype(np.float32)), row_of_cell, column_map
            )
            continue
        matrix = _aligned_matrix(adata, mod, w, registry.max_missing_features)
        if is_mu:
            pos = obs_names.get_indexer(pd.Index(map(str, adata.obs_names)))
            if (pos < 0).any():
                raise ValueError(f"{w} has cells that are not in mdata.obs_names; call mdata.update() first.")
            observed[pos, j] = True
            # a modality may hold no cells in new data (e.g. RNA-only cells for imputing ATAC)
            sub_totals = check_counts(matrix, where_m, counts_hint(adata, mod.layer), allow_zero_cells=True) if matrix.shape[0] else np.zeros(0)
            if matrix.shape[0] and not (sub_totals > 0).any():
                raise ValueError(f"{where_m} has no counts at all (every cell sums to 0); check the layer and the modality.")
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
            totals[:, j] = check_counts(matrix, where_m, counts_hint(adata, mod.layer))
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
    cat = {k: torch.as_tensor(_codes(data.obs, k, registry.categories[k], where)) for k in registry.categorical_keys}
    cont = [pd.to_numeric(data.obs[k]).to_numpy(dtype=np.float32) for k in registry.continuous_covariate_keys]
    for k, v in zip(registry.continuous_covariate_keys, cont):
        if not np.isfinite(v).all():
            raise ValueError(f"{where}.obs[{k!r}] must be numeric without NaN/inf.")
    tensors = CellTensors(
        counts=counts,
        observed=torch.as_tensor(observed, dtype=torch.float32),
        log_library=torch.as_tensor(np.log(library), dtype=torch.float32),
        covariates=Covariates(
            cat,
            torch.as_tensor(np.stack(cont, 1) if cont else np.zeros((n, 0), dtype=np.float32)),
            tuple(registry.continuous_covariate_keys),
        ),
    )
    return tensors, obs_names

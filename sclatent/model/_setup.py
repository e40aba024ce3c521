"""``setup_anndata`` / ``setup_mudata``: read the user's description of the data, check it, record it.

The modalities of a MuData are given as ``mdata.mod`` key -> kind (``{"gex": "rna",
"peaks": "atac"}``) or key -> spec (``{"gex": {"kind": "rna", "layer": "counts"}}``);
an AnnData is one modality of kind ``"rna"`` unless ``modality_kind`` says otherwise.
The registry is written to ``.uns["_sclatent"]`` as JSON; the data are converted (and so
checked) once, and that conversion is kept for the model built next.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from .. import __version__
from ..data.registry import REGISTRY_UNS_KEY, DataRegistry, ModalityRegistry
from ..modalities import KINDS
from ..modalities import modality_kind as kind_of
from ._convert import check_backed, counts_matrix, is_mudata, read_tensors, var_names_hash
from ._links import feature_links_setup, read_feature_links

__all__ = ["SetupMethods", "build_registry", "parse_modalities"]

_SPEC_KEYS = {"kind", "layer"}


#: A float column with more distinct values than this is taken for a continuous covariate.
MAX_FLOAT_CATEGORIES = 32


def _categories(obs: pd.DataFrame, key: str, where: str) -> tuple[str, ...]:
    col = obs[key]
    if col.isna().any():
        raise ValueError(f"{where}.obs[{key!r}] has {int(col.isna().sum())} missing value(s). Fill them (e.g. with 'unknown') or drop those cells.")
    if isinstance(col.dtype, pd.CategoricalDtype):
        return tuple(str(c) for c in col.cat.categories)
    if pd.api.types.is_float_dtype(col.dtype) and col.nunique() > MAX_FLOAT_CATEGORIES:
        raise ValueError(
            f"{where}.obs[{key!r}] is a float column with {col.nunique()} distinct values: it looks continuous, and as a "
            "category each value would become its own batch. Pass it as continuous_covariate_keys=[...], or, if it "
            f"really labels batches, convert it first: {where}.obs[{key!r}] = {where}.obs[{key!r}].astype(str)."
        )
    return tuple(sorted(map(str, pd.unique(col.astype(str)))))


def _check_keys(obs: pd.DataFrame, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise ValueError(f"{where}.obs has no column(s) {missing}; available columns: {list(obs.columns)}.")


def _check_continuous(obs: pd.DataFrame, key: str, where: str) -> None:
    values = pd.to_numeric(obs[key], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{where}.obs[{key!r}] must be numeric without NaN/inf; {int((~np.isfinite(values)).sum())} value(s) are not.")


def parse_modalities(mdata, modalities, layers) -> list[tuple[str, str, str | None]]:
    """``[(mod_key, kind, layer), ...]`` from the ``modalities`` and ``layers`` of ``setup_mudata``.

    Accepted forms, per entry: ``mod_key: kind``; ``mod_key: {"kind": ..., "layer": ...}``;
    and, deprecated, the earlier ``kind_name: mod_key`` (e.g. ``{"rna": "gex"}``), which
    warns and is read as ``{"gex": "rna"}``.
    """
    available = list(mdata.mod.keys())
    if not isinstance(modalities, Mapping) or not modalities:
        raise ValueError(
            "setup_mudata needs modalities as mdata.mod key -> kind, e.g. {'gex': 'rna', 'peaks': 'atac'}; "
            f"mdata.mod has {available}; kinds are {sorted(KINDS)}."
        )
    out = []
    for key, value in modalities.items():
        layer = layers.get(key) if isinstance(layers, Mapping) else layers
        if isinstance(value, Mapping):
            unknown = set(value) - _SPEC_KEYS
            if unknown:
                raise ValueError(f"modalities[{key!r}] has unknown field(s) {sorted(unknown)}; a spec has {sorted(_SPEC_KEYS)}.")
            if "kind" not in value:
                raise ValueError(f"modalities[{key!r}] needs a 'kind', one of {sorted(KINDS)}.")
            kind, layer = value["kind"], value.get("layer", layer)
        elif key in mdata.mod and value in KINDS:
            kind = value
        elif value in mdata.mod and key in KINDS:  # the earlier form: kind-named model modality -> mod key
            warnings.warn(
                f"modalities={{{key!r}: {value!r}}} names the model modality first; this form is deprecated. "
                f"Write mdata.mod key -> kind: modalities={{{value!r}: {key!r}}}. The modality is called {value!r}.",
                DeprecationWarning,
                stacklevel=4,
            )
            key, kind = value, key
            if isinstance(layers, Mapping) and layer is None:
                layer = layers.get(value)
        else:
            if key not in mdata.mod:
                raise ValueError(f"mdata.mod has no {key!r}; it has {available}. Give modalities as mdata.mod key -> kind.")
            raise ValueError(f"Unknown modality kind {value!r} for mdata.mod[{key!r}]; choose one of {sorted(KINDS)}.")
        kind_of(kind, f" for mdata.mod[{key!r}]")
        if key not in mdata.mod:
            raise ValueError(f"mdata.mod has no {key!r}; it has {available}.")
        if any(k == key for k, _, _ in out):
            raise ValueError(f"mdata.mod[{key!r}] is given twice in modalities.")
        out.append((key, kind, layer))
    return out


def build_registry(
    data,
    modalities: list[tuple[str, str, str | None]],
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    size_factor_key: str | None = None,
    modality_key: str | None = None,
) -> DataRegistry:
    """Check the structure of ``data`` and describe it as a :class:`DataRegistry`.

    Parameters
    ----------
    data
        AnnData or MuData.
    modalities
        ``[(name, kind, layer), ...]``; for a MuData ``name`` is the ``mdata.mod`` key.
    batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys, size_factor_key, modality_key
        ``obs`` columns, see :meth:`SetupMethods.setup_anndata` / :meth:`SetupMethods.setup_mudata`.
    """
    is_mu = is_mudata(data)
    where = "mdata" if is_mu else "adata"
    check_backed(data, where)
    cat_keys = tuple(categorical_covariate_keys or ())
    cont_keys = tuple(continuous_covariate_keys or ())
    keys = [k for k in (batch_key, labels_key, size_factor_key, modality_key) if k] + list(cat_keys) + list(cont_keys)
    _check_keys(data.obs, keys, where)
    mods = []
    for name, kind, layer in modalities:
        adata = data.mod[name] if is_mu else data
        w = f"mdata.mod[{name!r}]" if is_mu else "adata"
        if adata.obs_names.has_duplicates:
            raise ValueError(f"{w}.obs_names has duplicates; make them unique with `.obs_names_make_unique()`.")
        if adata.var_names.has_duplicates:
            raise ValueError(f"{w}.var_names has duplicates; make them unique with `.var_names_make_unique()`.")
        counts_matrix(adata, layer, w)  # the layer exists
        names = tuple(map(str, adata.var_names))
        mods.append(ModalityRegistry(name, kind, name if is_mu else None, layer, names, var_names_hash(names)))
    categories = {k: _categories(data.obs, k, where) for k in (batch_key, *cat_keys) if k}
    for k in cont_keys:
        _check_continuous(data.obs, k, where)
    if size_factor_key:
        _check_continuous(data.obs, size_factor_key, where)
        if (pd.to_numeric(data.obs[size_factor_key]).to_numpy() <= 0).any():
            raise ValueError(f"{where}.obs[{size_factor_key!r}] must be strictly positive size factors.")
    return DataRegistry(
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


def _record(data, registry: DataRegistry) -> None:
    """Convert once (every count and cell-level check runs here), keep it, then write the registry."""
    read_tensors(data, registry, keep=True)
    data.uns[REGISTRY_UNS_KEY] = registry.to_json()


class SetupMethods:
    """The ``setup_*`` class methods of :class:`~sclatent.SCLatent`."""

    @classmethod
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        size_factor_key: str | None = None,
        modality_kind: str = "rna",
    ) -> None:
        """Validate an AnnData of raw counts and record how to read it.

        The data are checked before anything trains (raw non-negative integer counts, no
        NaN/inf, no empty cells, obs keys present, covariates without missing values) and
        a JSON registry is written to ``adata.uns["_sclatent"]``. ``X`` and the layers are
        never modified.

        Parameters
        ----------
        adata
            Cells by features.
        layer
            Layer with raw counts; ``None`` uses ``adata.X``.
        batch_key
            ``obs`` column with the batch; injected into the decoder to remove batch effects.
        labels_key
            ``obs`` column with cell labels (recorded with the model; not used in training).
        categorical_covariate_keys, continuous_covariate_keys
            Further ``obs`` columns used as covariates.
        size_factor_key
            ``obs`` column with size factors to use instead of the observed library size.
        modality_kind
            Kind of the data (:data:`sclatent.modalities.KINDS`): ``"rna"`` (default),
            ``"atac"``, ``"protein"`` or ``"counts"``. The modality is named after it.
        """
        kind_of(modality_kind)
        registry = build_registry(
            adata, [(modality_kind, modality_kind, layer)], batch_key, labels_key,
            categorical_covariate_keys, continuous_covariate_keys, size_factor_key,
        )
        _record(adata, registry)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        modalities: Mapping[str, str | Mapping[str, str]],
        layers: Mapping[str, str | None] | str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        modality_key: str | None = None,
        feature_links: bool | str | object | None = None,
    ) -> None:
        """Validate a MuData of raw counts (paired and/or unpaired cells) and record how to read it.

        A cell has a modality when it is among the cells of ``mdata.mod[...]`` of that
        modality (or, with ``modality_key``, when that ``obs`` column lists it), never
        because of its counts: a measured cell with zero counts is still measured.

        Parameters
        ----------
        mdata
            MuData whose ``obs_names`` are the union of the modalities' cells.
        modalities
            ``mdata.mod`` key -> kind, e.g. ``{"gex": "rna", "peaks": "atac"}``, or key ->
            spec, e.g. ``{"gex": {"kind": "rna", "layer": "counts"}}``. Kinds are
            :data:`sclatent.modalities.KINDS` (``"rna"``, ``"atac"``, ``"protein"``,
            ``"counts"``); the kind, not the key, decides the likelihood and outputs. The
            model calls each modality by its key. (``{"rna": "gex"}``, kind first, is the
            deprecated earlier form.)
        layers
            Layer with raw counts per ``mdata.mod`` key (or one name for all); ``None``
            uses ``X``. A spec's ``"layer"`` takes precedence.
        batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys
            Columns of ``mdata.obs``, as in :meth:`setup_anndata`.
        modality_key
            Optional ``mdata.obs`` column listing each cell's modalities (``"gex+peaks"``,
            ``"gex"``, ``"peaks"``); it may only remove modalities that membership implies.
        feature_links
            Prior links between the genes of the ``rna`` modality and the peaks of the
            ``atac`` one, which let the model align cells measured in only one of them
            (with no paired cell at all). ``True`` uses ``mdata.varp["peak_gene_links"]``
            as written by :func:`sclatent.data.link_peaks_to_genes`; a string names another
            ``mdata.varp`` key; a genes x peaks matrix (sparse or dense, rows and columns
            in the modalities' ``var_names`` order) is stored in
            ``mdata.varp["feature_links"]``, which must not exist yet. ``None`` (default):
            no links.

        Examples
        --------
        >>> sclatent.data.link_peaks_to_genes(mdata, annotation="mm10_tss.bed")
        >>> sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"}, feature_links=True)
        """
        if not is_mudata(mdata):
            raise ValueError(f"setup_mudata needs a MuData, got {type(mdata).__name__}; use setup_anndata for an AnnData.")
        parsed = parse_modalities(mdata, modalities, layers)
        registry = build_registry(
            mdata, parsed, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys, None, modality_key
        )
        if feature_links is not None and feature_links is not False:
            record = feature_links_setup(mdata, feature_links, parsed)
            registry = replace(registry, feature_links=record)
            read_feature_links(mdata, registry)  # the links are readable and join some genes to some peaks
        _record(mdata, registry)

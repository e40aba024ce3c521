"""The data setup as one frozen, JSON-serializable dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["DataRegistry", "ModalityRegistry", "REGISTRY_UNS_KEY", "REGISTRY_FORMAT_VERSION"]

REGISTRY_UNS_KEY = "_sclatent"
REGISTRY_FORMAT_VERSION = 2
# version 1 had no modality kinds: the names "rna" and "atac" stood for them


def _migrate_v1(d: dict) -> dict:
    """Version 1 -> 2: give every modality the kind its name implied in version 1."""
    d = dict(d)
    d["modalities"] = [{**m, "kind": m["name"] if m["name"] in ("rna", "atac") else "counts"} for m in d["modalities"]]
    d["format_version"] = 2
    return d


@dataclass(frozen=True)
class ModalityRegistry:
    """One modality of the data setup.

    Parameters
    ----------
    name
        Modality name used by the model: the ``mdata.mod`` key (the kind for an AnnData).
    kind
        The modality kind (:data:`sclatent.modalities.KINDS`), which decides its behaviour.
    mod_key
        Key in ``mdata.mod`` (``None`` for an AnnData).
    layer
        Layer holding raw counts (``None`` for ``X``).
    var_names
        Feature names, in order.
    var_names_hash
        SHA-256 of the newline-joined feature names.
    """

    name: str
    kind: str
    mod_key: str | None
    layer: str | None
    var_names: tuple[str, ...]
    var_names_hash: str

    @property
    def n_features(self) -> int:
        """Number of features."""
        return len(self.var_names)


@dataclass(frozen=True)
class DataRegistry:
    """Everything the model needs to turn an AnnData/MuData into tensors again.

    Parameters
    ----------
    kind
        ``"anndata"`` or ``"mudata"``.
    modalities
        The modalities, in model order.
    batch_key, labels_key, size_factor_key
        Column names in ``obs`` (or ``None``).
    categorical_covariate_keys, continuous_covariate_keys
        Extra covariates in ``obs``.
    categories
        Column -> ordered list of categories, for the batch, the labels and every
        categorical covariate.
    modality_key
        Optional ``obs`` column of a MuData whose value lists the modalities a cell was
        measured in (overrides membership).
    feature_links
        ``{"key": varp key, "source": rna modality, "target": atac modality}`` when the
        setup uses gene-peak links (``setup_mudata(feature_links=...)``), else ``None``.
    max_missing_features
        Fraction of a modality's features that data may lack (they are read as zeros,
        with a warning); 0 unless the model was mapped onto a reference
        (:meth:`~sclatent.SCLatent.load_query_data`).
    package_version
        Version of sclatent that wrote the registry.
    """

    kind: str
    modalities: tuple[ModalityRegistry, ...]
    batch_key: str | None = None
    labels_key: str | None = None
    size_factor_key: str | None = None
    categorical_covariate_keys: tuple[str, ...] = ()
    continuous_covariate_keys: tuple[str, ...] = ()
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    modality_key: str | None = None
    feature_links: dict[str, str] | None = None
    max_missing_features: float = 0.0
    package_version: str = ""
    format_version: int = REGISTRY_FORMAT_VERSION

    @property
    def categorical_keys(self) -> tuple[str, ...]:
        """Every categorical covariate the decoders get, by name: the batch, then the others."""
        return ((self.batch_key,) if self.batch_key else ()) + tuple(self.categorical_covariate_keys)

    @property
    def n_categories(self) -> dict[str, int]:
        """Categorical covariate name -> number of categories, in :attr:`categorical_keys` order."""
        return {k: len(self.categories[k]) for k in self.categorical_keys}

    @property
    def obs_keys(self) -> tuple[str, ...]:
        """Every ``obs`` column a conversion reads: covariates, size factors, the modality column."""
        keys = (*self.categorical_keys, *self.continuous_covariate_keys, self.size_factor_key, self.modality_key)
        return tuple(k for k in keys if k)

    def modality(self, name: str) -> ModalityRegistry:
        """The modality called ``name``; raises ``KeyError`` listing the known ones."""
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"No modality {name!r}; this model has {[m.name for m in self.modalities]}.")

    def to_dict(self) -> dict:
        """Plain dict of JSON types (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> DataRegistry:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        version = int(d.get("format_version", 0))
        if version == 1:
            d, version = _migrate_v1(d), 2
        if version != REGISTRY_FORMAT_VERSION:
            raise ValueError(
                f"This registry has format version {version}; this sclatent reads version {REGISTRY_FORMAT_VERSION}. "
                "Run setup_anndata/setup_mudata again with this version of sclatent."
            )
        d["modalities"] = tuple(
            ModalityRegistry(**{**m, "var_names": tuple(m["var_names"])}) for m in d["modalities"]
        )
        d["categorical_covariate_keys"] = tuple(d.get("categorical_covariate_keys", ()))
        d["continuous_covariate_keys"] = tuple(d.get("continuous_covariate_keys", ()))
        d["categories"] = {k: tuple(v) for k, v in d.get("categories", {}).items()}
        return cls(**d)

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> DataRegistry:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

"""Query mapping: a trained reference model applied to new data with new batches (scArches-style).

:meth:`QueryMethods.load_query_data` builds the query model: the reference's weights, its
features (the query's genes aligned by name, a few missing ones read as zeros) and its
categories plus the query's new ones. Each covariate embedding keeps the reference rows
fixed and gets trainable rows for the new categories
(:class:`~sclatent.nn.mlp.CategoryEmbedding`); every other weight is frozen unless named in
``fine_tune``. The new rows are then fitted either by :meth:`~sclatent.SCLatent.train`
(a training loop over the query) or by :meth:`QueryMethods.map_by_refinement` (no
training loop: the query cells' posteriors and the new rows are fitted together on the
ELBO, the reference weights frozen).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace

import pandas as pd
import torch

from ..data.registry import REGISTRY_UNS_KEY
from ..inference import refine_posterior
from ..module import Posterior
from ._convert import is_mudata
from ._links import links_from_state

__all__ = ["QueryMethods", "DEFAULT_MAX_MISSING_FEATURES"]

#: Fraction of a modality's features a query may lack (read as zeros, with a warning).
DEFAULT_MAX_MISSING_FEATURES = 0.2


def _query_categories(data, registry, where: str) -> dict[str, tuple[str, ...]]:
    """The reference's categories, then the query's new ones (in order of appearance)."""
    categories = dict(registry.categories)
    for key in registry.categorical_keys:
        if key not in data.obs.columns:
            raise ValueError(
                f"{where}.obs lacks the column {key!r} that the reference was set up with (its "
                f"{'batch' if key == registry.batch_key else 'covariate'}); the query needs it, e.g. "
                f"{where}.obs[{key!r}] = 'query_batch'."
            )
        col = data.obs[key]
        if col.isna().any():
            raise ValueError(
                f"{where}.obs[{key!r}] has {int(col.isna().sum())} missing value(s) (NaN). Give every query cell a "
                f"category, e.g. {where}.obs[{key!r}] = {where}.obs[{key!r}].astype(str).fillna('query')."
            )
        known = list(registry.categories[key])
        new = [c for c in pd.unique(col.astype(str)) if c not in set(known)]
        categories[key] = tuple(known + new)
    return categories


class QueryMethods:
    """Query mapping for :class:`~sclatent.SCLatent`."""

    @classmethod
    def load_query_data(
        cls,
        adata,
        reference,
        fine_tune: Sequence[str] = (),
        max_missing_features: float = DEFAULT_MAX_MISSING_FEATURES,
    ):
        """A model for new data (a query) built on a trained reference model.

        The query gets the reference's weights and features. Its batches (and other
        categorical covariates) may be new: they get new embedding rows, which are the
        only trainable weights unless ``fine_tune`` names more. Fit them with
        :meth:`~sclatent.SCLatent.train` or, with no training loop, with
        :meth:`map_by_refinement`. The query model saves and loads like any other.

        Parameters
        ----------
        adata
            The query: an AnnData (MuData) of the reference's kind, with raw counts in the
            reference's layer and the reference's ``obs`` covariate columns. Its features are
            matched by name to the reference's (any order; extra ones are ignored). Its
            ``uns["_sclatent"]`` is set to the query's setup; nothing else is written.
        reference
            A trained :class:`~sclatent.SCLatent`, or the directory it was saved to.
        fine_tune
            Also train these parts: ``"encoders"`` and/or ``"decoders"``.
        max_missing_features
            Fraction of a modality's reference features the query may lack: they are read
            as zero counts, with a warning; more is an error.

        Returns
        -------
        SCLatent
            The query model (reference weights, new categories' rows at the mean of the
            reference's).

        Raises
        ------
        ValueError
            For a query of the wrong kind, missing ``obs`` columns, NaN categories, or
            too many missing features (each message says what to change).
        """
        ref_registry, ref_init_args, ref_module, ref_trained = _reference_parts(reference)
        if not ref_trained:
            warnings.warn("The reference model has not been trained; mapping onto it gives untrained latents.", UserWarning, stacklevel=2)
        if not 0.0 <= float(max_missing_features) < 1.0:
            raise ValueError(f"max_missing_features must be in [0, 1), got {max_missing_features}.")
        where = "mdata" if is_mudata(adata) else "adata"
        if (ref_registry.kind == "mudata") != is_mudata(adata):
            raise ValueError(
                f"The reference was set up on {ref_registry.kind}; the query is a {'MuData' if is_mudata(adata) else 'AnnData'}. "
                "Pass the query in the same container (for a one-modality query of a MuData reference, a MuData with that "
                "modality: e.g. sclatent.data.organize_multiome(rna=query_rna))."
            )
        registry = replace(
            ref_registry,
            categories=_query_categories(adata, ref_registry, where),
            max_missing_features=float(max_missing_features),
        )
        # the reference's categories are the fixed rows (for a mapped reference: all of its rows)
        init_args = dict(ref_init_args, reference_categories=dict(ref_registry.n_categories), fine_tune=list(fine_tune))
        # the query's weights: the reference's, its embeddings given the query's categories
        module = copy.deepcopy(ref_module)
        module.extend_categories(registry.n_categories)
        adata.uns[REGISTRY_UNS_KEY] = registry.to_json()
        obj = cls.__new__(cls)
        links = links_from_state(ref_registry.feature_links, ref_module.state_dict()) if ref_registry.feature_links else None
        obj._initialize(registry, init_args, adata, links=links)
        obj.module.load_state_dict(module.state_dict())
        obj.module.to(next(ref_module.parameters()).device).eval()
        obj.is_trained = ref_trained
        return obj

    def map_by_refinement(self, steps: int = 100, lr: float = 0.05, batch_size: int = 1024, seed: int = 0) -> pd.DataFrame:
        """Map the query without a training loop: fit the new categories' rows and every
        query cell's posterior together on the ELBO, all reference weights frozen.

        Each batch of cells starts from the encoder's posteriors; ``steps`` Adam steps then
        move the cells' Gaussian parameters and the new embedding rows (shared by all
        batches) on the cells' ELBO (KL weight 1). The fitted rows stay in the model;
        embed the cells with ``get_latent_representation(refine_steps=...)``, which refines
        each posterior against the decoder with those rows.

        Parameters
        ----------
        steps
            Adam steps per batch of cells.
        lr
            Adam learning rate.
        batch_size
            Cells per batch.
        seed
            Seed of the reparameterization noise.

        Returns
        -------
        pandas.DataFrame
            Per batch of cells: ``cells``, ``elbo_start`` and ``elbo_end`` (mean ELBO per
            cell, one sample, before and after), ``seconds``.
        """
        import time

        rows = [layer.weight for layer in self.module.modules() if getattr(layer, "n_frozen", 0) and layer.weight.numel()]
        if not rows:
            raise ValueError(
                "map_by_refinement fits the rows of new categories, and this model has none: it was not made by "
                "load_query_data, or the query has no new batch. Use get_latent_representation(refine_steps=...) instead."
            )
        module = self.module
        module.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        report = []
        for idx in torch.arange(self._tensors.n_cells).split(batch_size):
            t0 = time.perf_counter()
            batch = self._tensors.batch(idx, module.dense_count_modalities).to(self.device)
            with torch.no_grad():
                q = module.inference(batch)

            def cell_elbo(posterior: Posterior, g: torch.Generator | None) -> torch.Tensor:
                rec, kl = module.elbo(batch, posterior, generator=g)  # the decoder's new rows get gradients
                return rec - kl

            elbos: list[float] = []
            refine_posterior(cell_elbo, q, steps, lr, generator=gen, keep_best=False, shared=rows, trace=elbos)
            report.append({"cells": len(idx), "elbo_start": elbos[0], "elbo_end": elbos[-1], "seconds": time.perf_counter() - t0})
        self.is_trained = True
        return pd.DataFrame(report)


def _reference_parts(reference):
    """``(registry, init_args, module, is_trained)`` of a reference model or of the directory
    it was saved to (read without any data)."""
    from ._model import SCLatent, build_module, read_saved_model

    if isinstance(reference, SCLatent):
        return reference.registry, reference.init_args, reference.module, reference.is_trained
    if not isinstance(reference, (str, os.PathLike)):
        raise TypeError(f"reference must be a trained SCLatent or the directory it was saved to, got {type(reference).__name__}.")
    saved = read_saved_model(reference)
    registry, init_args = saved.registry, saved.init_args
    module = build_module(registry, init_args, saved.links)
    module.load_state_dict(saved.state)
    return registry, init_args, module, bool(saved.manifest.get("is_trained"))

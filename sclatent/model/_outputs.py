"""What a trained model gives back per cell: latents, denoised counts, accessibility, bounds.

:class:`OutputMethods` is mixed into :class:`~sclatent.SCLatent`. Every method takes the
inference options of :class:`~sclatent.config.InferenceConfig` as keywords
(``batch_size``, ``refine_steps``, ``refine_lr``, ``n_samples``, ``seed``), and ``adata=``
for new cells with the model's features.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..batch import CellBatch
from ..config import InferenceConfig
from ..data.tensors import CellTensors
from ..modalities import modality_kind
from ..module import Posterior
from ._convert import read_tensors

__all__ = ["OutputMethods", "available_memory", "check_fits_in_memory"]


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``,
    else the free physical pages), or ``None`` when the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(n_bytes: int, what: str, method: str, fraction: float = 0.8) -> None:
    """Refuse a dense result that would take more than ``fraction`` of the available memory,
    saying how to ask for less (fewer features or cells, or the chunk iterator)."""
    free = available_memory()
    if free is not None and n_bytes > fraction * free:
        accessibility = "accessibility" in method
        iterator = "iter_accessibility_estimates" if accessibility else "iter_normalized_expression"
        subset = "region_list" if accessibility else "gene_list"
        raise MemoryError(
            f"{method}: {what} as float32 (with the layer asked for) is {n_bytes / 2**30:.1f} GiB, more than "
            f"{fraction:.0%} of the {free / 2**30:.1f} GiB of memory available. Ask for fewer features "
            f"({subset}=[...]) or fewer cells (adata=adata[...]), or read the result a chunk of cells at a time "
            f"with model.{iterator}(..., chunk_size=...)."
        )


class OutputMethods:
    """Output methods of :class:`~sclatent.SCLatent` (reads ``self.module``, ``self.registry``,
    ``self.data``, ``self._tensors`` and ``self._obs_names``)."""

    # ------------------------------------------------------------- plumbing
    @property
    def adata(self):
        """The AnnData/MuData the model was created (or loaded) with."""
        return self.data

    @property
    def device(self) -> torch.device:
        """Device of the model's weights (inference runs there)."""
        return next(self.module.parameters()).device

    def _tensors_for(self, adata) -> tuple[CellTensors, pd.Index]:
        if adata is None or adata is self.data:
            return self._tensors, self._obs_names
        return read_tensors(adata, self.registry)

    def _batches(self, tensors: CellTensors, batch_size: int) -> Iterator[CellBatch]:
        self.module.eval()
        device = self.device
        for idx in torch.arange(tensors.n_cells).split(batch_size):
            yield tensors.batch(idx, self.module.dense_count_modalities).to(device)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _modality_names(self) -> list[str]:
        return [m.name for m in self.registry.modalities]

    def _modality_mask(self, modality: str | Sequence[str] | None) -> torch.Tensor | None:
        if modality is None:
            return None
        wanted = [modality] if isinstance(modality, str) else list(modality)
        names = self._modality_names()
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"Unknown modality {unknown}; this model has {names}.")
        return torch.tensor([float(nm in wanted) for nm in names], device=self.device)

    def _modality_serving(self, modality: str | None, output: str, method: str) -> str:
        """The modality an output method serves: the one named, else the first (in model
        order) whose kind has that ``output`` (``"expression"``/``"accessibility"``)."""
        if modality is not None:
            self.registry.modality(modality)
            return modality
        serving = [m.name for m in self.registry.modalities if modality_kind(m.kind).output == output]
        if not serving:
            kinds = {m.name: m.kind for m in self.registry.modalities}
            raise ValueError(f"{method}: no modality of this model has a kind that gives {output} (modalities and kinds: {kinds}); pass modality=....")
        return serving[0]

    def _posterior(
        self, batch: CellBatch, use: torch.Tensor | None, options: InferenceConfig, generator: torch.Generator
    ) -> tuple[Posterior, torch.Tensor]:
        observed = batch.observed if use is None else batch.observed * use
        if use is not None and bool((observed.sum(1) == 0).any()):
            n_missing = int((observed.sum(1) == 0).sum())
            raise ValueError(
                f"{n_missing} cell(s) in this batch have none of the requested modalities; their posterior would be the "
                "prior. Restrict to cells that have them (see model.observed_modalities())."
            )
        with torch.no_grad():
            q = self.module.inference(batch, use)
        if options.refine_steps:
            q = self.module.refine(batch, q, options.refine_steps, options.refine_lr, observed, generator, method=options.refine_method)
        return q, observed

    def _per_cell(
        self, adata, options: InferenceConfig, fn: Callable[[CellBatch, torch.Generator], torch.Tensor]
    ) -> tuple[np.ndarray, pd.Index]:
        tensors, obs_names = self._tensors_for(adata)
        gen = self._generator(options.seed)
        with torch.no_grad():  # refinement enables gradients where it needs them
            out = [fn(batch, gen) for batch in self._batches(tensors, options.batch_size)]
        return torch.cat(out).cpu().numpy(), obs_names

    # ------------------------------------------------------------- latents
    def observed_modalities(self, adata=None) -> pd.DataFrame:
        """Which modalities each cell has: boolean DataFrame indexed by ``obs_names``."""
        tensors, obs_names = self._tensors_for(adata)
        return pd.DataFrame(tensors.observed.numpy().astype(bool), index=obs_names, columns=self._modality_names())

    def get_latent_representation(
        self,
        adata=None,
        modality: str | Sequence[str] | None = None,
        give_mean: bool = True,
        key_added: str | None = None,
        return_dist: bool = False,
        **options,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation of every cell, in the order of ``obs_names``.

        Parameters
        ----------
        adata
            AnnData/MuData with the model's features (new cells allowed); ``None`` for the
            training data.
        modality
            ``None`` fuses every observed modality (product of experts); a name (or list)
            uses only those experts (with the prior), e.g. ``"rna"``.
        give_mean
            The posterior's location (``True``): its mean for the diagonal posterior, the
            image of the base mean through the flow for ``posterior="flow"``; or one sample.
        key_added
            If given, also write the result (with ``return_dist``: the means) to
            ``adata.obsm[key_added]``.
        return_dist
            Return the posterior's mean and variance per latent coordinate instead (as
            scvi-tools does; ``give_mean`` is then unused): how certain each cell's place
            is. Diagonal posterior only (a flow posterior's variance has no closed form:
            draw samples with ``give_mean=False``).
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`): ``batch_size``,
            ``refine_steps`` / ``refine_lr`` (semi-amortized refinement of each cell's
            posterior), ``seed``.

        Returns
        -------
        numpy.ndarray or tuple of numpy.ndarray
            ``(n_cells, n_latent)``; with ``return_dist``, ``(means, variances)``, each that shape.
        """
        opts = InferenceConfig.of(options, "get_latent_representation")
        use = self._modality_mask(modality)
        if return_dist and self.module.posterior_flow is not None:
            raise ValueError(
                "return_dist=True needs posterior='diagonal': a flow posterior's variance has no closed form; "
                "draw samples with give_mean=False instead."
            )

        def fn(batch, gen):
            q, _ = self._posterior(batch, use, opts, gen)
            if return_dist:
                return torch.cat([q.mean, q.logvar.exp()], dim=1)
            return q.location if give_mean else q.sample(generator=gen)

        latent, _ = self._per_cell(adata, opts, fn)
        if return_dist:
            n_latent = self.module.n_latent
            latent, variance = latent[:, :n_latent], latent[:, n_latent:]
        if key_added:
            (self.data if adata is None else adata).obsm[key_added] = latent
        return (latent, variance) if return_dist else latent

    # ------------------------------------------------------------- decoded features
    def _decoder_setup(self, modality: str, transform_batch, features: Sequence[str] | None) -> tuple[int, int | None, list[str], np.ndarray | None]:
        """``(position of modality, batch code or None, all feature names, positions of features or None)``."""
        j = self._modality_names().index(modality)
        batch_code = None
        if transform_batch is not None:
            key = self.registry.batch_key
            if not key:
                raise ValueError("transform_batch needs a model set up with batch_key.")
            cats = list(self.registry.categories[key])
            if str(transform_batch) not in cats:
                raise ValueError(f"transform_batch={transform_batch!r} is not a batch of this model; batches: {cats}.")
            batch_code = cats.index(str(transform_batch))
        all_features = list(self.registry.modality(modality).var_names)
        pos = None
        if features is not None:
            pos = pd.Index(all_features).get_indexer(list(features))
            if (pos < 0).any():
                missing = [n for n, p in zip(features, pos) if p < 0]
                raise ValueError(f"{len(missing)} requested feature(s) are not in modality {modality!r}: {missing[:5]}.")
        return j, batch_code, all_features, pos

    def _decoded_batches(
        self, tensors: CellTensors, modality: str, library_size: float, transform_batch, features: Sequence[str] | None,
        opts: InferenceConfig, nonzero_probability: bool, batch_size: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Decoded means (or ``P(x > 0)``) of ``modality`` at a common library size, one
        float32 ``(cells, features)`` block per batch of ``batch_size`` cells."""
        j, batch_code, _, pos = self._decoder_setup(modality, transform_batch, features)
        gen = self._generator(opts.seed)
        cols = None if pos is None else torch.as_tensor(pos, device=self.device)
        for batch in self._batches(tensors, batch_size or opts.batch_size):
            q, _ = self._posterior(batch, None, opts, gen)
            if batch_code is not None:
                batch.covariates = batch.covariates.replace(self.registry.batch_key, batch_code)
            batch.log_library[:, j] = float(np.log(library_size))  # a copy made by tensors.batch(), not user data
            with torch.no_grad():
                z = q.location if opts.n_samples == 1 else q.sample(opts.n_samples, gen)
                dist = self.module.generative(z, batch, modalities=(modality,))[modality]
                value = 1.0 - dist.log_prob_zero().exp() if nonzero_probability else dist.mean
                value = value.mean(0) if opts.n_samples > 1 else value
                if cols is not None:
                    value = value.index_select(-1, cols)
            yield value.to(torch.float32).cpu().numpy()

    def _decoded_frame(
        self, adata, modality: str, library_size: float, transform_batch, features: Sequence[str] | None,
        key_added: str | None, opts: InferenceConfig, nonzero_probability: bool, method: str,
    ) -> pd.DataFrame:
        """The decoded values of every cell as one DataFrame, filled batch by batch into one
        float32 array (and, with ``key_added``, the full matrix into that layer, likewise)."""
        tensors, obs_names = self._tensors_for(adata)
        _, _, all_features, pos = self._decoder_setup(modality, transform_batch, features)
        columns = all_features if pos is None else [all_features[p] for p in pos]
        n_layer = 0
        if key_added:
            target = self._layer_target(self.data if adata is None else adata, modality)
            rows = pd.Index(obs_names).get_indexer(target.obs_names.astype(str))
            if (rows < 0).any():
                raise ValueError(f"layers[{key_added!r}]: cells of the modality's AnnData are missing from the data's obs_names.")
            var_pos = pd.Index(all_features).get_indexer(target.var_names.astype(str))
            n_layer = len(rows) * target.n_vars
            slot = np.full(len(obs_names), -1, dtype=np.int64)  # cell -> row of the layer
            slot[rows] = np.arange(len(rows))
        check_fits_in_memory(4 * (len(obs_names) * len(columns) + n_layer), f"{len(obs_names)} cells x {len(columns)} features", method)
        values = np.empty((len(obs_names), len(columns)), dtype=np.float32)
        layer = np.zeros((len(rows), target.n_vars), dtype=np.float32) if key_added else None
        start = 0
        # with key_added every feature is decoded (for the layer) and the requested ones taken from it
        for block in self._decoded_batches(
            tensors, modality, library_size, transform_batch, None if key_added else features, opts, nonzero_probability
        ):
            stop = start + len(block)
            if key_added:
                values[start:stop] = block if pos is None else block[:, pos]
                into = slot[start:stop]
                keep = into >= 0
                layer[into[keep]] = np.where(var_pos >= 0, block[keep][:, np.clip(var_pos, 0, None)], 0.0)
            else:
                values[start:stop] = block
            start = stop
        if key_added:
            target.layers[key_added] = layer
        return pd.DataFrame(values, index=obs_names, columns=columns, copy=False)

    def _layer_target(self, adata, modality: str):
        return adata.mod[self.registry.modality(modality).mod_key] if self.registry.kind == "mudata" else adata

    def _iter_decoded(
        self, adata, modality: str, library_size: float, transform_batch, features, chunk_size: int,
        opts: InferenceConfig, nonzero_probability: bool,
    ) -> Iterator[pd.DataFrame]:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        tensors, obs_names = self._tensors_for(adata)
        _, _, all_features, pos = self._decoder_setup(modality, transform_batch, features)
        columns = all_features if pos is None else [all_features[p] for p in pos]
        chunk_size = int(chunk_size)
        batch_size = min(opts.batch_size, chunk_size)
        pending, n_pending, start = [], 0, 0
        for block in self._decoded_batches(tensors, modality, library_size, transform_batch, features, opts, nonzero_probability, batch_size):
            pending.append(block)
            n_pending += len(block)
            while n_pending >= chunk_size or (start + n_pending == len(obs_names) and n_pending):
                joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                take = min(chunk_size, n_pending)
                yield pd.DataFrame(joined[:take], index=obs_names[start : start + take], columns=columns, copy=False)
                start, n_pending = start + take, n_pending - take
                pending = [joined[take:]] if n_pending else []

    def get_normalized_expression(
        self,
        adata=None,
        modality: str | None = None,
        library_size: float = 1e4,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        key_added: str | None = None,
        **options,
    ) -> pd.DataFrame:
        """Denoised expression ``library_size * rho(z, s)`` for every cell.

        Cells without the modality (e.g. ATAC-only cells) get it imputed through the shared
        latent space.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        modality
            Which modality to decode; ``None`` picks the first modality (in model order)
            of an expression kind (``"rna"``, ``"protein"``, ``"counts"``).
        library_size
            Scale of the output (counts per cell).
        transform_batch
            Decode every cell as if from this batch (batch-corrected expression).
        gene_list
            Subset of features to return.
        key_added
            If given, also write the full matrix to ``layers[key_added]`` (for MuData, of
            ``mdata.mod[modality]``, for the cells it holds).
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`); ``n_samples=1``
            decodes the posterior mean, more averages over posterior samples.

        Returns
        -------
        pandas.DataFrame
            Cells (``obs_names``) by features.
        """
        opts = InferenceConfig.of(options, "get_normalized_expression", batch_size=512)
        modality = self._modality_serving(modality, "expression", "get_normalized_expression")
        return self._decoded_frame(
            adata, modality, library_size, transform_batch, gene_list, key_added, opts, False, "get_normalized_expression"
        )

    def iter_normalized_expression(
        self,
        adata=None,
        modality: str | None = None,
        chunk_size: int = 10_000,
        library_size: float = 1e4,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        **options,
    ) -> Iterator[pd.DataFrame]:
        """:meth:`get_normalized_expression` a chunk of cells at a time, in ``obs_names`` order.

        For results too large to hold at once (many cells times many features): each chunk
        is decoded when it is asked for, so memory holds one chunk.

        Parameters
        ----------
        chunk_size
            Cells per chunk.
        adata, modality, library_size, transform_batch, gene_list, **options
            As in :meth:`get_normalized_expression`.

        Yields
        ------
        pandas.DataFrame
            ``chunk_size`` cells (fewer in the last chunk) by features.
        """
        opts = InferenceConfig.of(options, "iter_normalized_expression", batch_size=512)
        modality = self._modality_serving(modality, "expression", "iter_normalized_expression")
        return self._iter_decoded(adata, modality, library_size, transform_batch, gene_list, chunk_size, opts, False)

    def get_accessibility_estimates(
        self,
        adata=None,
        modality: str | None = None,
        region_list: Sequence[str] | None = None,
        library_size: float | None = None,
        transform_batch: str | None = None,
        key_added: str | None = None,
        **options,
    ) -> pd.DataFrame:
        """Probability that each region is accessible (nonzero) in each cell.

        ``P(x > 0)`` under the modality's likelihood at a common library size, for every
        cell, RNA-only cells included (imputed through the shared latent space).

        Parameters
        ----------
        adata
            MuData (``None`` for the training data).
        modality
            The accessibility modality; ``None`` picks the first modality of kind ``"atac"``.
        region_list
            Subset of regions to return.
        library_size
            Total counts to evaluate at; ``None`` uses the median total of the cells that
            were measured in this modality in the training data.
        transform_batch, key_added
            As in :meth:`get_normalized_expression`.
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`).

        Returns
        -------
        pandas.DataFrame
            Cells by regions, values in [0, 1].
        """
        opts = InferenceConfig.of(options, "get_accessibility_estimates", batch_size=512)
        modality = self._modality_serving(modality, "accessibility", "get_accessibility_estimates")
        if library_size is None:
            library_size = self.median_library_size(modality)
        return self._decoded_frame(
            adata, modality, library_size, transform_batch, region_list, key_added, opts, True, "get_accessibility_estimates"
        )

    def iter_accessibility_estimates(
        self,
        adata=None,
        modality: str | None = None,
        chunk_size: int = 10_000,
        region_list: Sequence[str] | None = None,
        library_size: float | None = None,
        transform_batch: str | None = None,
        **options,
    ) -> Iterator[pd.DataFrame]:
        """:meth:`get_accessibility_estimates` a chunk of cells at a time, in ``obs_names`` order.

        Parameters
        ----------
        chunk_size
            Cells per chunk.
        adata, modality, region_list, library_size, transform_batch, **options
            As in :meth:`get_accessibility_estimates`.

        Yields
        ------
        pandas.DataFrame
            ``chunk_size`` cells (fewer in the last chunk) by regions, values in [0, 1].
        """
        opts = InferenceConfig.of(options, "iter_accessibility_estimates", batch_size=512)
        modality = self._modality_serving(modality, "accessibility", "iter_accessibility_estimates")
        if library_size is None:
            library_size = self.median_library_size(modality)
        return self._iter_decoded(adata, modality, library_size, transform_batch, region_list, chunk_size, opts, True)

    def median_library_size(self, modality: str) -> float:
        """Median total counts of the training cells measured in ``modality``."""
        j = self._modality_names().index(modality)
        has = self._tensors.observed[:, j] > 0
        return float(self._tensors.log_library[has, j].exp().median())

    # ------------------------------------------------------------- bounds
    def get_elbo(self, adata=None, return_mean: bool = True, **options) -> float | pd.Series:
        """Evidence lower bound per cell (higher is better), KL weight 1.

        ``E_q[log p(x | z)] - KL(q(z | x) || p(z))`` of the fused posterior over each
        cell's observed modalities, with all normalizing constants (so it bounds
        ``log p(x)``), estimated with ``n_samples`` reparameterized samples (the KL in
        closed form for the diagonal posterior, on the same samples for a flow).

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        return_mean
            Return the mean over cells (float) or the per-cell Series.
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`): ``n_samples``
            Monte-Carlo samples of the reconstruction term, ``refine_steps`` to score the
            refined posterior, ``batch_size``, ``seed``.
        """
        opts = InferenceConfig.of(options, "get_elbo")

        def fn(batch, gen):
            q, observed = self._posterior(batch, None, opts, gen)
            with torch.no_grad():
                z = q.sample(opts.n_samples, gen)
                return (self.module.log_likelihood(z, batch, observed) - q.kl_estimate(z)).mean(0)

        values, obs_names = self._per_cell(adata, opts, fn)
        return float(values.mean()) if return_mean else pd.Series(values, index=obs_names, name="elbo")

    def get_reconstruction_error(self, adata=None, **options) -> dict[str, float]:
        """Mean negative log-likelihood per cell, ``-E_q[log p(x_m | z)]``, per modality and in total.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`).

        Returns
        -------
        dict
            ``{"reconstruction_loss": total, "reconstruction_loss_<modality>": ...}``,
            averaged over cells (over the cells measured in that modality for the
            per-modality terms).
        """
        opts = InferenceConfig.of(options, "get_reconstruction_error")
        names = self._modality_names()
        masks = [self._modality_mask(n) for n in names]

        measured = []

        def fn(batch, gen):
            q, observed = self._posterior(batch, None, opts, gen)
            measured.append(observed.cpu() > 0)
            with torch.no_grad():
                z = q.sample(opts.n_samples, gen)
                # the model's own (sparse) likelihood path, one modality at a time
                return torch.stack([-self.module.log_likelihood(z, batch, observed * m).mean(0) for m in masks], 1)

        per_cell, _ = self._per_cell(adata, opts, fn)
        observed = torch.cat(measured).numpy()
        out = {"reconstruction_loss": float(per_cell.sum(1).mean())}
        if len(names) > 1:
            for j, n in enumerate(names):
                has = observed[:, j]
                out[f"reconstruction_loss_{n}"] = float(per_cell[has, j].mean()) if has.any() else float("nan")
        return out

    def get_marginal_ll(
        self, adata=None, n_mc_samples: int = 1000, return_mean: bool = True, **options
    ) -> float | pd.Series:
        """Importance-sampled ``log p(x)`` per cell (higher is better).

        ``log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x)`` with ``K = n_mc_samples`` draws
        from the encoder's posterior (the estimator scvi-tools uses, so values compare
        directly), or from the refined posterior with ``refine_steps > 0``, a better
        proposal and so a tighter estimate.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        n_mc_samples
            Importance samples per cell.
        return_mean
            Mean over cells (float) or per-cell Series.
        **options
            Inference options (:class:`~sclatent.config.InferenceConfig`); samples are
            processed in chunks that bound memory.
        """
        opts = InferenceConfig.of(options, "get_marginal_ll", batch_size=256)
        n_features = sum(m.n_features for m in self.module.modalities)

        def fn(batch, gen):
            q, observed = self._posterior(batch, None, opts, gen)
            chunk = max(1, 2**24 // (batch.n_cells * n_features))
            return self.module.marginal_log_likelihood(batch, q, n_mc_samples, observed, chunk=chunk, generator=gen)

        values, obs_names = self._per_cell(adata, opts, fn)
        return float(values.mean()) if return_mean else pd.Series(values, index=obs_names, name="marginal_ll")

"""The user-facing model class: the only code that turns AnnData/MuData into tensors and back."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..data.registry import REGISTRY_UNS_KEY, DataRegistry
from ..data.tensors import CellTensors
from ..inference import GaussianPosterior
from ..module import CellBatch, ModalitySpec, SCLatentModule
from . import _anndata
from ._io import read_model_dir, write_model_dir

__all__ = ["SCLatent"]

_DISPERSION_ALIASES = {"gene": "feature", "gene-batch": "feature-batch", "feature": "feature", "feature-batch": "feature-batch"}


class SCLatent:
    """Shared-latent VAE for RNA, ATAC, or both, with a product-of-experts posterior.

    Parameters
    ----------
    adata
        An AnnData set up with :meth:`setup_anndata` (one modality, called ``"rna"``) or
        a MuData set up with :meth:`setup_mudata`.
    n_latent
        Dimension of the latent space.
    n_hidden
        Width of the hidden layers of every encoder and decoder.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout in the encoders.
    gene_likelihood
        Likelihood of the ``"rna"`` modality: ``"nb"``, ``"zinb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (one inverse dispersion per gene) or ``"gene-batch"``.
    atac_likelihood
        Likelihood of the ``"atac"`` modality: ``"poisson"``, ``"nb"`` or ``"bernoulli"``
        (binarized counts).
    likelihoods
        Likelihood per modality name, overriding the two above (for other modalities).
    feature_factor
        Modality names that get a learned per-feature factor (e.g. ``("atac",)``).
    encode_covariates
        Give the encoders the covariates too (they always go into the decoders).
    encoder_input
        ``"log1p"`` (encoders see ``log1p`` counts) or ``"normalized_log1p"`` (counts
        scaled to 10,000 per cell first, which removes sequencing depth from the input).
    input_dropout
        Fraction of input features (for sparse ATAC: of its nonzero entries) the encoders
        drop at random during training, a regularizer for encoders that overfit.
    seed
        Seed of the weight initialization.

    Examples
    --------
    >>> sclatent.SCLatent.setup_anndata(adata, batch_key="batch")
    >>> model = sclatent.SCLatent(adata, n_latent=10)
    >>> model.train()
    >>> adata.obsm["X_sclatent"] = model.get_latent_representation()
    """

    def __init__(
        self,
        adata,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: str = "nb",
        dispersion: str = "gene",
        atac_likelihood: str = "poisson",
        likelihoods: Mapping[str, str] | None = None,
        feature_factor: Sequence[str] = (),
        encode_covariates: bool = False,
        encoder_input: str = "log1p",
        input_dropout: float = 0.0,
        seed: int = 0,
    ):
        registry = _anndata.registry_of(adata)
        if dispersion not in _DISPERSION_ALIASES:
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}.")
        if _DISPERSION_ALIASES[dispersion] == "feature-batch" and not registry.batch_key:
            raise ValueError("dispersion='gene-batch' needs a batch: call setup with batch_key=... first.")
        self.init_args = dict(
            n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers, dropout_rate=dropout_rate,
            gene_likelihood=gene_likelihood, dispersion=dispersion, atac_likelihood=atac_likelihood,
            likelihoods=dict(likelihoods or {}), feature_factor=list(feature_factor),
            encode_covariates=encode_covariates, encoder_input=encoder_input, input_dropout=input_dropout, seed=seed,
        )
        self._build(registry)
        self.data = adata
        self._tensors, self._obs_names = _anndata.read_tensors(adata, registry)
        self.history = pd.DataFrame()
        self.is_trained = False
        self.train_indices = np.zeros(0, dtype=np.int64)
        self.validation_indices = np.zeros(0, dtype=np.int64)

    def _build(self, registry: DataRegistry) -> None:
        a = self.init_args
        unknown = set(a["feature_factor"]) - {m.name for m in registry.modalities}
        if unknown:
            raise ValueError(f"feature_factor names unknown modalities {sorted(unknown)}; the data has {[m.name for m in registry.modalities]}.")
        specs = []
        for m in registry.modalities:
            default = {"rna": a["gene_likelihood"], "atac": a["atac_likelihood"]}.get(m.name, "nb")
            lik = a["likelihoods"].get(m.name, default)
            disp = _DISPERSION_ALIASES[a["dispersion"]] if m.name == "rna" else "feature"
            specs.append(ModalitySpec(m.name, m.n_features, lik, disp, m.name in a["feature_factor"]))
        self.registry = registry
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a["seed"])
            self.module = SCLatentModule(
                tuple(specs),
                n_latent=a["n_latent"], n_hidden=a["n_hidden"], n_layers=a["n_layers"], dropout_rate=a["dropout_rate"],
                n_cats_per_cov=tuple(len(registry.categories[k]) for k in registry.categorical_keys),
                n_continuous=len(registry.continuous_covariate_keys), n_batch=registry.n_batch,
                encode_covariates=a["encode_covariates"], encoder_input=a.get("encoder_input", "log1p"),
                input_dropout=a.get("input_dropout", 0.0),
            )

    # ------------------------------------------------------------------ setup
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
    ) -> None:
        """Validate an AnnData of raw counts and record how to read it.

        The data are checked before anything trains (raw non-negative integer counts, no
        NaN/inf, no empty cells, obs keys present, covariates without missing values) and
        a JSON registry is written to ``adata.uns["_sclatent"]``. ``X`` and the layers are
        never modified.

        Parameters
        ----------
        adata
            Cells by genes.
        layer
            Layer with raw counts; ``None`` uses ``adata.X``.
        batch_key
            ``obs`` column with the batch; injected into the decoder to remove batch effects.
        labels_key
            ``obs`` column with cell labels (recorded, not used for training).
        categorical_covariate_keys, continuous_covariate_keys
            Further ``obs`` columns used as covariates.
        size_factor_key
            ``obs`` column with size factors to use instead of the observed library size.
        """
        registry = _anndata.build_registry(
            adata, None, layer, batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys, size_factor_key
        )
        adata.uns[REGISTRY_UNS_KEY] = registry.to_json()

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        modalities: Mapping[str, str],
        layers: Mapping[str, str | None] | str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        modality_key: str | None = None,
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
            Model modality name -> key in ``mdata.mod``, e.g. ``{"rna": "rna", "atac": "atac"}``.
            The names ``"rna"`` and ``"atac"`` pick the default likelihoods.
        layers
            Layer with raw counts per modality name (or one name for all); ``None`` uses ``X``.
        batch_key, labels_key, categorical_covariate_keys, continuous_covariate_keys
            Columns of ``mdata.obs``, as in :meth:`setup_anndata`.
        modality_key
            Optional ``mdata.obs`` column listing each cell's modalities (``"rna+atac"``,
            ``"rna"``, ``"atac"``); it may only remove modalities that membership implies.
        """
        registry = _anndata.build_registry(
            mdata, dict(modalities), layers, batch_key, labels_key, categorical_covariate_keys,
            continuous_covariate_keys, None, modality_key,
        )
        mdata.uns[REGISTRY_UNS_KEY] = registry.to_json()

    # --------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1.5e-3,
        weight_decay: float = 1e-6,
        validation_size: float = 0.1,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        lr_patience: int | None = 5,
        lr_factor: float = 0.5,
        kl_warmup_epochs: int | None = None,
        subset_weight: float = 1.0,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        sleep_weight: float | None = None,
        accelerator: str = "auto",
        devices: int | str = "auto",
        seed: int = 0,
        enable_progress_bar: bool = True,
        **trainer_kwargs,
    ) -> SCLatent:
        """Train with Lightning on CPU, one GPU or several (``strategy="ddp"``).

        Parameters
        ----------
        max_epochs
            Epoch budget; ``None`` picks ``min(400, max(20, 400 * 20000 / n_cells))``
            (printed at start). Early stopping usually ends sooner.
        batch_size
            Cells per gradient step.
        lr, weight_decay
            AdamW settings. The default learning rate (with ``lr_patience``) was chosen by
            measurement on PBMC, CellBench and MOp RNA: 1e-3 converged slowly on PBMC, 3e-3
            overfit MOp (``benchmarks/RESULTS.md``).
        validation_size
            Fraction of cells held out to monitor the ELBO (0 disables validation).
        early_stopping, early_stopping_patience
            Stop once the validation loss has not improved for this many epochs after
            KL warm-up.
        lr_patience, lr_factor
            Multiply the learning rate by ``lr_factor`` once the validation loss has not
            improved for ``lr_patience`` epochs after KL warm-up (``None`` keeps it
            constant; ignored without validation cells). With the fast initial rate this
            gets both a quick start and a fine final fit (``benchmarks/RESULTS.md``).
        kl_warmup_epochs
            Epochs over which the KL weight rises from 0 to 1; ``None`` uses a tenth of
            ``max_epochs``. It always completes: it may not exceed ``max_epochs``.
        subset_weight
            Weight of the single-modality ELBOs of paired cells (multimodal data).
        refine_steps, refine_lr
            Semi-amortized training: the decoder learns from posteriors refined by this
            many gradient steps (stop-gradient through the refinement), the encoders from
            their own ELBO. ``0`` is plain amortized training.
        sleep_weight
            Weight of the encoders' sleep-phase term: each step, counts of every modality
            are drawn from the decoders at the cells' latent samples and each modality's
            expert learns to recover the latent from them
            (:meth:`~sclatent.module.SCLatentModule.sleep_loss`). This lets unpaired
            cells train the expert of the modality they lack. ``None``: 1 for a model
            with two or more modalities, 0 (off, no extra cost) otherwise.
        accelerator, devices
            Passed to Lightning's Trainer.
        seed
            Seed of the validation split, batch order, dropout and sampling.
        enable_progress_bar
            Show a progress bar.
        **trainer_kwargs
            Any other argument of :class:`lightning.pytorch.Trainer`.

        Returns
        -------
        SCLatent
            ``self``, trained; per-epoch losses are in :attr:`history`.
        """
        from .. import train as training  # Lightning is imported only when training

        n = self._tensors.n_cells
        if max_epochs is None:
            max_epochs = training.default_max_epochs(n)
            print(f"sclatent: training for at most {max_epochs} epochs (default for {n} cells).")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        if kl_warmup_epochs is None:
            kl_warmup_epochs = max(1, max_epochs // 10)
        if not 0 <= kl_warmup_epochs <= max_epochs:
            raise ValueError(f"kl_warmup_epochs={kl_warmup_epochs} must lie in [0, max_epochs={max_epochs}] so that warm-up completes.")
        if sleep_weight is None:
            sleep_weight = 1.0 if len(self.module.modalities) > 1 else 0.0
        if sleep_weight < 0:
            raise ValueError(f"sleep_weight must be >= 0, got {sleep_weight}.")
        if not 0.0 <= validation_size < 1.0:
            raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=gen)
        n_val = int(round(validation_size * n))
        if validation_size > 0 and n_val == 0:
            n_val = 1
        self.validation_indices = np.sort(perm[:n_val].numpy())
        self.train_indices = np.sort(perm[n_val:].numpy())
        torch.manual_seed(seed)
        plan = training.TrainingPlan(
            self.module, self._tensors, torch.as_tensor(self.train_indices), torch.as_tensor(self.validation_indices),
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, kl_warmup_epochs=kl_warmup_epochs,
            subset_weight=subset_weight, refine_steps=refine_steps, refine_lr=refine_lr, sleep_weight=sleep_weight, seed=seed,
            lr_patience=lr_patience, lr_factor=lr_factor,
        )
        training.fit(
            plan, max_epochs, early_stopping=early_stopping and n_val > 0, early_stopping_patience=early_stopping_patience,
            accelerator=accelerator, devices=devices, enable_progress_bar=enable_progress_bar, **trainer_kwargs,
        )
        self.module.eval()  # stays on the training device: inference runs there too
        self.history = pd.DataFrame(plan.history).set_index("epoch") if plan.history else pd.DataFrame()
        self.is_trained = True
        return self

    # ------------------------------------------------------------- inference
    @property
    def adata(self):
        """The AnnData/MuData the model was created (or loaded) with."""
        return self.data

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _tensors_for(self, adata) -> tuple[CellTensors, pd.Index]:
        if adata is None or adata is self.data:
            return self._tensors, self._obs_names
        return _anndata.read_tensors(adata, self.registry)

    def _batches(self, tensors: CellTensors, batch_size: int) -> Iterator[CellBatch]:
        self.module.eval()
        device = self.device
        for idx in torch.arange(tensors.n_cells).split(batch_size):
            yield tensors.batch(idx).to(device)

    def _modality_mask(self, modality: str | Sequence[str] | None) -> torch.Tensor | None:
        if modality is None:
            return None
        wanted = [modality] if isinstance(modality, str) else list(modality)
        names = [m.name for m in self.registry.modalities]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"Unknown modality {unknown}; this model has {names}.")
        return torch.tensor([float(nm in wanted) for nm in names], device=self.device)

    def _posterior(
        self, batch: CellBatch, use: torch.Tensor | None, refine_steps: int, refine_lr: float, generator: torch.Generator
    ) -> tuple[GaussianPosterior, torch.Tensor]:
        observed = batch.observed if use is None else batch.observed * use
        if use is not None and bool((observed.sum(1) == 0).any()):
            n_missing = int((observed.sum(1) == 0).sum())
            raise ValueError(
                f"{n_missing} cell(s) in this batch have none of the requested modalities; their posterior would be the "
                "prior. Restrict to cells that have them (see model.observed_modalities())."
            )
        with torch.no_grad():
            q = self.module.inference(batch, use)
        if refine_steps:
            q = self.module.refine(batch, q, refine_steps, refine_lr, observed, generator)
        return q, observed

    def observed_modalities(self, adata=None) -> pd.DataFrame:
        """Which modalities each cell has: boolean DataFrame indexed by ``obs_names``."""
        tensors, obs_names = self._tensors_for(adata)
        return pd.DataFrame(tensors.observed.numpy().astype(bool), index=obs_names, columns=[m.name for m in self.registry.modalities])

    def get_latent_representation(
        self,
        adata=None,
        modality: str | Sequence[str] | None = None,
        give_mean: bool = True,
        batch_size: int = 1024,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        seed: int = 0,
        key_added: str | None = None,
    ) -> np.ndarray:
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
            Posterior mean (``True``) or one sample.
        batch_size
            Cells per forward pass (bounds memory).
        refine_steps, refine_lr
            Semi-amortized refinement: gradient steps on each cell's ELBO from the
            encoder's posterior (0 = amortized).
        seed
            Seed of the sampling and refinement noise.
        key_added
            If given, also write the result to ``adata.obsm[key_added]``.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)``.
        """
        data_ = self.data if adata is None else adata
        tensors, _ = self._tensors_for(adata)
        use = self._modality_mask(modality)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        for batch in self._batches(tensors, batch_size):
            q, _ = self._posterior(batch, use, refine_steps, refine_lr, gen)
            out.append(q.mean if give_mean else q.sample(generator=gen))
        latent = torch.cat(out).cpu().numpy()
        if key_added:
            data_.obsm[key_added] = latent
        return latent

    def _decoded(
        self, adata, modality: str, library_size: float, transform_batch, n_samples: int, batch_size: int,
        refine_steps: int, refine_lr: float, seed: int, nonzero_probability: bool,
    ) -> tuple[np.ndarray, pd.Index]:
        tensors, obs_names = self._tensors_for(adata)
        j = [m.name for m in self.registry.modalities].index(modality)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        batch_code = None
        if transform_batch is not None:
            if not self.registry.batch_key:
                raise ValueError("transform_batch needs a model set up with batch_key.")
            cats = list(self.registry.categories[self.registry.batch_key])
            if str(transform_batch) not in cats:
                raise ValueError(f"transform_batch={transform_batch!r} is not a batch of this model; batches: {cats}.")
            batch_code = cats.index(str(transform_batch))
        out = []
        for batch in self._batches(tensors, batch_size):
            q, _ = self._posterior(batch, None, refine_steps, refine_lr, gen)
            z = q.mean if n_samples == 1 else q.sample(n_samples, gen)
            if batch_code is not None:
                batch.covariates.categorical[:, 0] = batch_code  # a copy made by tensors.batch(), not user data
            batch.log_library[:, j] = float(np.log(library_size))
            with torch.no_grad():
                dist = self.module.generative(z, batch, modalities=(modality,))[modality]
                value = 1.0 - dist.log_prob(torch.zeros_like(dist.log_mu)).exp() if nonzero_probability else dist.mean
            out.append(value.mean(0) if n_samples > 1 else value)
        return torch.cat(out).cpu().numpy(), obs_names

    def _feature_subset(self, modality: str, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
        features = list(self.registry.modality(modality).var_names)
        if names is None:
            return np.arange(len(features)), features
        pos = pd.Index(features).get_indexer(list(names))
        if (pos < 0).any():
            missing = [n for n, p in zip(names, pos) if p < 0]
            raise ValueError(f"{len(missing)} requested feature(s) are not in modality {modality!r}: {missing[:5]}.")
        return pos, list(names)

    def _write_layer(self, adata, modality: str, key: str, frame: pd.DataFrame) -> None:
        target = adata.mod[self.registry.modality(modality).mod_key] if self.registry.kind == "mudata" else adata
        values = frame.reindex(index=target.obs_names.astype(str), columns=target.var_names.astype(str)).to_numpy(dtype=np.float32)
        target.layers[key] = values

    def get_normalized_expression(
        self,
        adata=None,
        modality: str = "rna",
        library_size: float = 1e4,
        transform_batch: str | None = None,
        gene_list: Sequence[str] | None = None,
        n_samples: int = 1,
        batch_size: int = 512,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        seed: int = 0,
        key_added: str | None = None,
    ) -> pd.DataFrame:
        """Denoised expression ``library_size * rho(z, s)`` for every cell.

        Cells without the modality (e.g. ATAC-only cells) get it imputed through the shared
        latent space.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        modality
            Which modality to decode.
        library_size
            Scale of the output (counts per cell).
        transform_batch
            Decode every cell as if from this batch (batch-corrected expression).
        gene_list
            Subset of features to return.
        n_samples
            ``1`` decodes the posterior mean; more averages over posterior samples.
        batch_size
            Cells per forward pass.
        refine_steps, refine_lr, seed
            Semi-amortized refinement of the posterior first; seed of the noise.
        key_added
            If given, also write the full matrix to ``layers[key_added]`` (for MuData, of
            ``mdata.mod[modality]``, for the cells it holds).

        Returns
        -------
        pandas.DataFrame
            Cells (``obs_names``) by features.
        """
        self.registry.modality(modality)
        values, obs_names = self._decoded(
            adata, modality, library_size, transform_batch, n_samples, batch_size, refine_steps, refine_lr, seed, False
        )
        pos, names = self._feature_subset(modality, gene_list)
        frame = pd.DataFrame(values, index=obs_names, columns=list(self.registry.modality(modality).var_names))
        if key_added:
            self._write_layer(self.data if adata is None else adata, modality, key_added, frame)
        return frame.iloc[:, pos] if gene_list is not None else frame

    def get_accessibility_estimates(
        self,
        adata=None,
        modality: str = "atac",
        region_list: Sequence[str] | None = None,
        library_size: float | None = None,
        transform_batch: str | None = None,
        n_samples: int = 1,
        batch_size: int = 512,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        seed: int = 0,
        key_added: str | None = None,
    ) -> pd.DataFrame:
        """Probability that each region is accessible (nonzero) in each cell.

        ``P(x > 0)`` under the ATAC likelihood at a common library size, for every cell,
        RNA-only cells included (imputed through the shared latent space).

        Parameters
        ----------
        adata
            MuData (``None`` for the training data).
        modality
            The accessibility modality.
        region_list
            Subset of regions to return.
        library_size
            Total counts to evaluate at; ``None`` uses the median total of the cells that
            were measured in this modality in the training data.
        transform_batch, n_samples, batch_size, refine_steps, refine_lr, seed, key_added
            As in :meth:`get_normalized_expression`.

        Returns
        -------
        pandas.DataFrame
            Cells by regions, values in [0, 1].
        """
        self.registry.modality(modality)
        if library_size is None:
            library_size = self.median_library_size(modality)
        values, obs_names = self._decoded(
            adata, modality, library_size, transform_batch, n_samples, batch_size, refine_steps, refine_lr, seed, True
        )
        pos, names = self._feature_subset(modality, region_list)
        frame = pd.DataFrame(values, index=obs_names, columns=list(self.registry.modality(modality).var_names))
        if key_added:
            self._write_layer(self.data if adata is None else adata, modality, key_added, frame)
        return frame.iloc[:, pos] if region_list is not None else frame

    def median_library_size(self, modality: str) -> float:
        """Median total counts of the training cells measured in ``modality``."""
        j = [m.name for m in self.registry.modalities].index(modality)
        has = self._tensors.observed[:, j] > 0
        return float(self._tensors.log_library[has, j].exp().median())

    def _per_cell(self, adata, batch_size: int, fn) -> tuple[np.ndarray, pd.Index]:
        tensors, obs_names = self._tensors_for(adata)
        out = [fn(batch) for batch in self._batches(tensors, batch_size)]
        return torch.cat(out).cpu().numpy(), obs_names

    def get_elbo(
        self,
        adata=None,
        batch_size: int = 1024,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        n_samples: int = 1,
        seed: int = 0,
        return_mean: bool = True,
    ) -> float | pd.Series:
        """Evidence lower bound per cell (higher is better), KL weight 1.

        ``E_q[log p(x | z)] - KL(q(z | x) || p(z))`` of the fused posterior over each
        cell's observed modalities, with all normalizing constants (so it bounds
        ``log p(x)``), estimated with ``n_samples`` reparameterized samples.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        batch_size
            Cells per forward pass.
        refine_steps, refine_lr
            Use the refined posterior (semi-amortized inference).
        n_samples
            Monte-Carlo samples of the reconstruction term.
        seed
            Seed of the samples.
        return_mean
            Return the mean over cells (float) or the per-cell Series.
        """
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def fn(batch: CellBatch) -> torch.Tensor:
            q, observed = self._posterior(batch, None, refine_steps, refine_lr, gen)
            return self._elbo_of(batch, q, observed, n_samples, gen)

        values, obs_names = self._per_cell(adata, batch_size, fn)
        return float(values.mean()) if return_mean else pd.Series(values, index=obs_names, name="elbo")

    @torch.no_grad()
    def _elbo_of(self, batch, q, observed, n_samples, gen) -> torch.Tensor:
        z = q.sample(n_samples, gen)
        rec = self.module.log_likelihood(z, batch, observed).mean(0)
        return rec - q.kl_to_standard().sum(-1)

    def get_reconstruction_error(
        self, adata=None, batch_size: int = 1024, seed: int = 0, refine_steps: int = 0, refine_lr: float = 0.05
    ) -> dict[str, float]:
        """Mean negative log-likelihood per cell, ``-E_q[log p(x_m | z)]``, for each modality and in total.

        Returns
        -------
        dict
            ``{"reconstruction_loss": total, "reconstruction_loss_<modality>": ...}``,
            averaged over cells (over the cells measured in that modality for the
            per-modality terms).
        """
        gen = torch.Generator(device=self.device).manual_seed(seed)
        names = [m.name for m in self.registry.modalities]
        parts = []

        def fn(batch: CellBatch) -> torch.Tensor:
            q, observed = self._posterior(batch, None, refine_steps, refine_lr, gen)
            z = q.sample(generator=gen)
            with torch.no_grad():
                dists = self.module.generative(z, batch)
                per = torch.stack([-dists[n].log_prob(batch.counts[n]).sum(-1) * observed[:, j] for j, n in enumerate(names)], 1)
            parts.append(observed.cpu())
            return per

        per_cell, _ = self._per_cell(adata, batch_size, fn)
        observed = torch.cat(parts).numpy()
        out = {"reconstruction_loss": float(per_cell.sum(1).mean())}
        if len(names) > 1:
            for j, n in enumerate(names):
                has = observed[:, j] > 0
                out[f"reconstruction_loss_{n}"] = float(per_cell[has, j].mean()) if has.any() else float("nan")
        return out

    def get_marginal_ll(
        self,
        adata=None,
        n_mc_samples: int = 1000,
        batch_size: int = 256,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        seed: int = 0,
        return_mean: bool = True,
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
        batch_size
            Cells per forward pass (samples are processed in chunks too).
        refine_steps, refine_lr
            Refine the proposal first.
        seed
            Seed of the samples.
        return_mean
            Mean over cells (float) or per-cell Series.
        """
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def fn(batch: CellBatch) -> torch.Tensor:
            q, observed = self._posterior(batch, None, refine_steps, refine_lr, gen)
            return self.module.marginal_log_likelihood(batch, q, n_mc_samples, observed, chunk=max(1, 2**24 // (batch.n_cells * sum(m.n_features for m in self.module.modalities))), generator=gen)

        values, obs_names = self._per_cell(adata, batch_size, fn)
        return float(values.mean()) if return_mean else pd.Series(values, index=obs_names, name="marginal_ll")

    # ------------------------------------------------------------ inference diagnostics
    def get_amortization_gap(
        self,
        adata=None,
        refine_steps: int = 100,
        refine_lr: float = 0.05,
        n_samples: int = 16,
        modality: str | Sequence[str] | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ):
        """Per-cell amortization gap: how much ELBO the encoder leaves on the table.

        For every cell, the encoder's (product-of-experts) posterior ``q_enc`` is refined
        by ``refine_steps`` Adam steps on that cell's ELBO with all weights frozen (the
        same refinement as ``refine_steps=`` of :meth:`get_latent_representation`), and
        both posteriors are scored:

        - ``elbo_amortized``: ``E_q_enc[log p(x | z)] - KL(q_enc || p(z))``, the bound that
          amortized inference achieves (what :meth:`get_elbo` reports);
        - ``elbo_refined``: the same for the refined posterior ``q_K``;
        - ``gap = elbo_refined - elbo_amortized`` (nats per cell).

        ``log p(x) - elbo_amortized`` (the *inference gap*, Cremer et al. 2018) splits into
        the *approximation gap* ``log p(x) - max_q ELBO(q)`` (the limit of a diagonal
        Gaussian, which no encoder can remove) and the *amortization gap*
        ``max_q ELBO(q) - elbo_amortized`` (the price of one shared encoder, which
        refinement removes). ``gap`` estimates the latter from below: it converges to it
        as ``refine_steps`` grows (compare a few values), and it is not negative apart
        from Monte-Carlo noise. For the whole inference gap, compare with
        :meth:`get_marginal_ll` (its ``refine_steps`` gives a tighter ``log p(x)``).

        Both ELBOs are estimated with the same ``n_samples`` standard-normal draws per cell
        (common random numbers, ``z = mean + eps * std``), so noise largely cancels in
        the gap. The evaluation draws come from their own generator (seeded with
        ``seed + 1``), so ``elbo_amortized`` is the same whatever ``refine_steps`` is, and
        the refinement noise is that of ``get_latent_representation(refine_steps=...,
        seed=seed)`` with the same ``batch_size``; results are deterministic for a
        given ``seed``.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data); use held-out cells to
            measure generalization of the encoder.
        refine_steps
            Adam steps of the refinement (100 is close to convergence for typical models).
        refine_lr
            Adam learning rate of the refinement.
        n_samples
            Monte-Carlo samples per cell for evaluating each ELBO.
        modality
            ``None`` uses the fused posterior and the ELBO of all observed modalities; a
            name (e.g. ``"rna"``) uses only that expert (with the prior) and that
            modality's likelihood, i.e. the gap of the RNA-only view of each cell. Every
            cell must have the modality.
        batch_size
            Cells refined together (bounds memory).
        seed
            Seed of the refinement and evaluation noise.

        Returns
        -------
        AmortizationGap
            A named tuple ``(per_cell, summary)``: ``per_cell`` is a DataFrame indexed by
            ``obs_names`` with ``elbo_amortized``, ``elbo_refined`` and ``gap``;
            ``summary`` a Series with ``mean_gap``, ``median_gap``, ``mean_elbo_amortized``,
            ``mean_elbo_refined``, ``frac_cells_improved``, ``n_cells``, the settings, and
            ``refine_seconds`` / ``ms_per_1000_cells`` (refinement wall time).

        Examples
        --------
        >>> per_cell, summary = model.get_amortization_gap(test_adata, refine_steps=100)
        >>> adata.obs["amortization_gap"] = per_cell["gap"]
        """
        import time

        from ._diagnostics import AmortizationGap, elbo_with_noise, gap_summary

        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        tensors, obs_names = self._tensors_for(adata)
        use = self._modality_mask(modality)
        gen = torch.Generator(device=self.device).manual_seed(seed)  # refinement noise, as in get_latent_representation
        eval_gen = torch.Generator(device=self.device).manual_seed(seed + 1)  # evaluation noise, independent of K
        amortized, refined, seconds = [], [], 0.0
        for batch in self._batches(tensors, batch_size):
            q, observed = self._posterior(batch, use, 0, refine_lr, gen)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            q_refined = self.module.refine(batch, q, refine_steps, refine_lr, observed, gen)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds += time.perf_counter() - t0
            eps = torch.randn((n_samples, *q.mean.shape), generator=eval_gen, device=self.device, dtype=q.mean.dtype)
            amortized.append(elbo_with_noise(self.module, batch, q, observed, eps).cpu())
            refined.append(elbo_with_noise(self.module, batch, q_refined, observed, eps).cpu())
        e0, e1 = torch.cat(amortized).double().numpy(), torch.cat(refined).double().numpy()
        per_cell = pd.DataFrame({"elbo_amortized": e0, "elbo_refined": e1, "gap": e1 - e0}, index=obs_names)
        return AmortizationGap(per_cell, gap_summary(per_cell, refine_steps, refine_lr, n_samples, seconds))

    def latent_diagnostics(
        self,
        adata=None,
        modality: str | Sequence[str] | None = None,
        threshold: float = 0.01,
        batch_size: int = 1024,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        seed: int = 0,
    ):
        """Posterior-collapse diagnostics: KL to the prior per latent dimension and active units.

        A dimension ``d`` whose posterior equals the prior for every cell
        (``KL(q(z_d | x) || N(0, 1)) = 0``) carries no information about the cell: it has
        *collapsed*. This reports, per dimension, the KL averaged over cells (closed form,
        nats) and counts the *active units*, those with mean KL above ``threshold``.

        Parameters
        ----------
        adata
            AnnData/MuData (``None`` for the training data).
        modality
            ``None`` uses the fused posterior; a name uses that expert only (e.g. to see
            which dimensions the ATAC encoder uses).
        threshold
            Mean KL (nats) above which a dimension counts as active.
        batch_size
            Cells per forward pass.
        refine_steps, refine_lr, seed
            Diagnose the refined posterior instead of the encoder's.

        Returns
        -------
        LatentDiagnostics
            A named tuple ``(per_dimension, n_active, kl)``: ``per_dimension`` is a
            DataFrame indexed ``z0, z1, ...`` with ``kl`` (mean over cells), ``active``
            (``kl > threshold``) and ``mean_variance`` (variance over cells of the
            posterior mean, Burda et al.'s activity statistic); ``n_active`` is the
            number of active dimensions; ``kl`` the mean total KL per cell, which equals
            ``per_dimension["kl"].sum()``.
        """
        from ._diagnostics import latent_summary

        tensors, _ = self._tensors_for(adata)
        use = self._modality_mask(modality)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        kls, means = [], []
        for batch in self._batches(tensors, batch_size):
            q, _ = self._posterior(batch, use, refine_steps, refine_lr, gen)
            kls.append(q.kl_to_standard().cpu())
            means.append(q.mean.cpu())
        return latent_summary(torch.cat(kls).numpy(), torch.cat(means).numpy(), threshold)

    # ------------------------------------------------------------ save / load
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save weights (safetensors) and a JSON manifest to ``dir_path``.

        The manifest holds the format name and version, the package version, the data
        registry (features, categories, keys), the init arguments and the training history.
        No pickled objects are written. Writing is atomic: on failure nothing is left behind.
        """
        manifest = {
            "package_version": __version__,
            "registry": self.registry.to_dict(),
            "init_args": self.init_args,
            "is_trained": self.is_trained,
            "history": self.history.reset_index().to_dict(orient="list") if len(self.history) else {},
        }
        write_model_dir(dir_path, manifest, self.module.state_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata) -> SCLatent:
        """Load a model saved with :meth:`save`, attached to ``adata``.

        ``adata`` must have the model's features (any column order) and only batch /
        covariate categories the model knows; anything else raises a ``ValueError``
        saying what differs. ``adata`` is not modified.
        """
        manifest, state = read_model_dir(dir_path)
        registry = DataRegistry.from_dict(manifest["registry"])
        obj = cls.__new__(cls)
        obj.init_args = manifest["init_args"]
        obj._build(registry)
        missing, unexpected = obj.module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{dir_path}: weights do not match the architecture (missing {missing}, unexpected {unexpected}).")
        obj.module.eval()
        obj.data = adata
        obj._tensors, obj._obs_names = _anndata.read_tensors(adata, registry)
        obj.history = pd.DataFrame(manifest.get("history") or {})
        if len(obj.history):
            obj.history = obj.history.set_index("epoch")
        obj.is_trained = bool(manifest.get("is_trained"))
        obj.train_indices = np.zeros(0, dtype=np.int64)
        obj.validation_indices = np.zeros(0, dtype=np.int64)
        return obj

    def __repr__(self) -> str:
        mods = ", ".join(f"{m.name}: {m.n_features} features, {m.likelihood}" for m in self.module.modalities)
        return (
            f"SCLatent({self._tensors.n_cells} cells; {mods}; n_latent={self.module.n_latent}; "
            f"trained={self.is_trained})"
        )

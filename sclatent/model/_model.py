"""The user-facing model class: builds the module from the data setup, trains it, saves it.

Its other jobs live in modules of their own and are mixed in (one level):
``_setup.py`` (``setup_anndata``/``setup_mudata``), ``_outputs.py`` (the ``get_*``
methods), ``_diagnostics.py`` (amortization gap, latent diagnostics); ``_convert.py``
turns AnnData/MuData into tensors and ``_io.py`` reads and writes model folders.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..config import TrainConfig
from ..data.registry import DataRegistry
from ..modalities import modality_kind
from ..module import FeatureLinks, ModalitySpec, SCLatentModule
from ._convert import read_tensors, registry_of, var_names_hash
from ._de import DifferentialMethods
from ._diagnostics import DiagnosticMethods
from ._io import read_model_dir, write_model_dir
from ._links import links_from_state, read_feature_links
from ._outputs import OutputMethods
from ._query import QueryMethods
from ._setup import SetupMethods

__all__ = ["SCLatent", "module_specs"]

#: Defaults of the feature-link terms, chosen by the unpaired benchmark (benchmarks/multimodal.py).
DEFAULT_N_LATENT = 10
DEFAULT_LINKED_N_LATENT = 30
DEFAULT_LINK_WEIGHT = 1.0
DEFAULT_ALIGN_WEIGHT = 20.0
#: Input dropout of the encoders of a model with feature links (``input_dropout=None``).
DEFAULT_LINKED_INPUT_DROPOUT = 0.3
#: ``linked_encoder="auto"`` reads ATAC through the feature embeddings when fewer than this
#: share of the cells with the target modality (ATAC) also have the source one (RNA).
#: Measured: better at 0 % and 10 % (5 % of the cells paired), worse at 67 % (half paired).
STATISTIC_MAX_PAIRED_SHARE = 0.25
_DISPERSIONS = {"gene": "feature", "gene-batch": "feature-batch", "feature": "feature", "feature-batch": "feature-batch"}


def module_specs(registry: DataRegistry, init_args: Mapping) -> tuple[ModalitySpec, ...]:
    """One :class:`~sclatent.module.ModalitySpec` per modality of ``registry``, from its kind.

    The likelihood is ``likelihoods[name]`` if given, else the argument the kind names
    (``gene_likelihood`` for ``"rna"``, ``atac_likelihood`` for ``"atac"``) if set, else
    the kind's default; ``dispersion`` applies to kinds with gene-level dispersion.
    """
    names = [m.name for m in registry.modalities]
    unknown = set(init_args["feature_factor"]) - set(names)
    if unknown:
        raise ValueError(f"feature_factor names unknown modalities {sorted(unknown)}; the data has {names}.")
    unknown = set(init_args["likelihoods"]) - set(names)
    if unknown:
        raise ValueError(f"likelihoods names unknown modalities {sorted(unknown)}; the data has {names}.")
    dispersion = _DISPERSIONS[init_args["dispersion"]]
    specs = []
    for m in registry.modalities:
        kind = modality_kind(m.kind)
        likelihood = init_args["likelihoods"].get(m.name) or (
            init_args.get(kind.likelihood_option) if kind.likelihood_option else None
        ) or kind.default_likelihood
        disp = dispersion if kind.gene_dispersion else "feature"
        specs.append(ModalitySpec(m.name, m.n_features, likelihood, disp, m.name in init_args["feature_factor"]))
    return tuple(specs)


def training_summary(history: pd.DataFrame, stopped_early: bool, patience: int) -> str:
    """One line saying how training went: epochs and time, why it stopped, the epoch kept.

    ``history`` is :attr:`SCLatent.history` (epochs as index, ``seconds``, ``kept`` and,
    with validation, ``validation_loss`` columns).
    """
    if not len(history):
        return "sclatent: no epoch finished; the model keeps its initial weights."
    seconds = float(history["seconds"].sum()) if "seconds" in history else float("nan")
    minutes, rest = divmod(int(round(seconds)), 60)
    took = f"{minutes} min {rest} s" if minutes else f"{rest} s"
    why = f"early stopping: no better validation loss for {patience} epochs" if stopped_early else "epoch budget reached"
    kept = history.index[history["kept"].to_numpy(bool)]
    line = f"sclatent: trained {len(history)} epochs in {took} ({why})"
    if len(kept):
        epoch = kept[0]
        line += f"; kept the weights of epoch {epoch}"
        if "validation_loss" in history and np.isfinite(history.loc[epoch, "validation_loss"]):
            line += f" (validation loss {history.loc[epoch, 'validation_loss']:.2f} per cell)"
    return line + "."


class SavedModel(NamedTuple):
    """What a model directory holds, checked: the manifest, the weights, and the registry,
    init arguments and feature links read from them."""

    manifest: dict
    state: dict[str, torch.Tensor]
    registry: DataRegistry
    init_args: dict
    links: FeatureLinks | None


def read_saved_model(dir_path: str | os.PathLike) -> SavedModel:
    """Read a directory written by :meth:`SCLatent.save` (no data needed).

    Raises
    ------
    ValueError
        When the manifest's registry or init arguments are damaged, or its feature names
        were edited (their hash does not match).
    """
    manifest, state = read_model_dir(dir_path)
    where = Path(dir_path) / "manifest.json"
    try:
        registry = DataRegistry.from_dict(manifest["registry"])
        init_args = dict(manifest["init_args"])
        links = links_from_state(registry.feature_links, state) if registry.feature_links else None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{where}: the registry or init_args are damaged or were edited ({err!r}).") from None
    for m in registry.modalities:
        if var_names_hash(m.var_names) != m.var_names_hash:
            raise ValueError(f"{where}: the feature names of modality {m.name!r} were edited (their hash does not match).")
    return SavedModel(manifest, state, registry, init_args, links)


def build_module(registry: DataRegistry, init_args: dict, links: FeatureLinks | None) -> SCLatentModule:
    """The torch module a registry and init arguments describe (weights initialized from
    ``init_args["seed"]``). A model mapped onto a reference (``init_args`` with
    ``reference_categories``) is built as the reference, then given the query's
    categories and frozen but for them (and ``init_args["fine_tune"]``)."""
    specs = module_specs(registry, init_args)
    link_weight, align_weight = init_args.get("link_weight"), init_args.get("align_weight")
    link_weight = (DEFAULT_LINK_WEIGHT if link_weight is None else link_weight) if links is not None else 0.0
    align_weight = (DEFAULT_ALIGN_WEIGHT if links is not None else 0.0) if align_weight is None else align_weight
    input_dropout = init_args.get("input_dropout", 0.0)
    input_dropout = (DEFAULT_LINKED_INPUT_DROPOUT if links is not None else 0.0) if input_dropout is None else input_dropout
    reference_categories = init_args.get("reference_categories")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_args["seed"])
        module = SCLatentModule(
            specs,
            n_latent=init_args["n_latent"], n_hidden=init_args["n_hidden"], n_layers=init_args["n_layers"],
            dropout_rate=init_args["dropout_rate"], categorical=reference_categories or registry.n_categories,
            n_continuous=len(registry.continuous_covariate_keys), batch_key=registry.batch_key,
            encode_covariates=init_args["encode_covariates"], encoder_input=init_args.get("encoder_input", "log1p"),
            input_dropout=input_dropout,
            feature_links=links, link_weight=link_weight, align_weight=align_weight,
            # the choice "auto" made for the training data; models saved before the option: features
            linked_encoder=init_args.get("linked_encoder_chosen", init_args.get("linked_encoder", "features")),
            posterior=init_args.get("posterior", "diagonal"), n_flows=init_args.get("n_flows", 4),
        )
        if init_args.get("learned_refiner"):
            module.add_refiner(init_args["learned_refiner"]["n_hidden"])
    if reference_categories:
        module.extend_categories(registry.n_categories)
        module.trainable_for_query(init_args.get("fine_tune", ()))
    return module


def choose_linked_encoder(observed: torch.Tensor, registry: DataRegistry, links: FeatureLinks) -> str:
    """What ``linked_encoder="auto"`` means for a training set: ``"auto"`` (the module's rule:
    Poisson modalities read through the feature embeddings) when fewer than
    :data:`STATISTIC_MAX_PAIRED_SHARE` of the cells with the target modality also have the
    source modality, else ``"features"``: with many paired cells the single-expert and pair
    terms teach a feature encoder more than the linear decoder's statistic holds."""
    names = [m.name for m in registry.modalities]
    source, target = observed[:, names.index(links.source)], observed[:, names.index(links.target)]
    n_target = int(target.sum())
    share = int((source & target).sum()) / n_target if n_target else 0.0
    return "auto" if share < STATISTIC_MAX_PAIRED_SHARE else "features"


class SCLatent(SetupMethods, QueryMethods, OutputMethods, DifferentialMethods, DiagnosticMethods):
    """Shared-latent VAE for RNA, ATAC, protein or any counts, with a product-of-experts posterior.

    Parameters
    ----------
    adata
        An AnnData set up with :meth:`setup_anndata` or a MuData set up with :meth:`setup_mudata`.
    n_latent
        Dimension of the latent space; ``None`` takes 10, or 30 when the setup has feature
        links (their decoders are linear in ``z``, and 10 dimensions measured clearly worse
        for unpaired integration).
    n_hidden
        Width of the hidden layers of every encoder and decoder.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout in the encoders.
    gene_likelihood
        Likelihood of modalities of kind ``"rna"``: ``"nb"`` (the kind's default when
        ``None``), ``"zinb"``, ``"poisson"`` or ``"zip"``.
    dispersion
        ``"gene"`` (one inverse dispersion per gene) or ``"gene-batch"``, for ``"rna"`` kinds.
    atac_likelihood
        Likelihood of modalities of kind ``"atac"``: ``"poisson"`` (the default when
        ``None``), ``"nb"`` or ``"bernoulli"`` (binarized counts).
    likelihoods
        Likelihood per modality name, overriding the kind's (any modality, e.g. ``{"adt": "nb"}``).
    feature_factor
        Modality names that get a learned per-feature factor (e.g. ``("peaks",)``).
    encode_covariates
        Give the encoders the covariates too (they always go into the decoders).
    encoder_input
        ``"log1p"`` (encoders see ``log1p`` counts) or ``"normalized_log1p"`` (counts
        scaled to 10,000 per cell first, which removes sequencing depth from the input).
    input_dropout
        Fraction of input features (for sparse inputs: of their nonzero entries) the
        encoders drop at random during training, a regularizer for encoders that overfit.
        ``None`` takes 0.3 with feature links (it made RNA-only and ATAC-only cells align
        better: FOSCTTM 0.215 -> 0.19 with no paired cell, ``benchmarks/RESULTS.md``
        section 6) and 0 without.
    link_weight
        With feature links (``setup_mudata(feature_links=...)``): how strongly a linked
        peak's embedding is held to its genes' (weight of the ``links`` term); ``None``
        takes 1 (its value matters little: 1 and 10 measured the same).
    align_weight
        Weight of the adversarial alignment of single-modality cells (the ``align``
        term); ``None`` takes 20 with feature links and 0 without. Much stronger
        alignment (200) collapsed cell types together in the unpaired benchmark.
    linked_encoder
        With feature links: how a linked modality's encoder reads its counts.
        ``"auto"`` (default): when fewer than a quarter of the ATAC cells are paired
        (:data:`STATISTIC_MAX_PAIRED_SHARE`), through the decoder's feature embeddings for
        a modality with a Poisson likelihood (ATAC's default), where the count-weighted
        mean of its features' embeddings and its total are a sufficient statistic of the
        linear decoder (:class:`~sclatent.nn.StatisticEncoder`), and from its features
        for the others; with more paired cells from the features for all. ``"statistic"``:
        through the embeddings for every linked modality; ``"features"``: from the
        features for all (an MLP on ``log1p`` counts, like a model without links). With
        no paired cell and with 5 % the statistic aligned better and transferred cell
        types better; with half the cells paired the features did
        (``benchmarks/RESULTS.md`` section 6). The choice is made once, on the training
        data, and saved with the model.
    posterior
        The family of each cell's posterior: ``"diagonal"`` (the product of experts'
        diagonal Gaussian) or ``"flow"``, that Gaussian pushed through ``n_flows`` affine
        coupling layers conditioned on its mean and variance (a richer family that can
        represent correlated and skewed posteriors; its KL is a Monte-Carlo estimate).
        With a flow, the latent representation is the image of the Gaussian's mean
        through the flow, and refinement moves the Gaussian under the fixed flow.
    n_flows
        Number of coupling layers of the flow posterior.
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
        n_latent: int | None = None,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: str | None = None,
        dispersion: str = "gene",
        atac_likelihood: str | None = None,
        likelihoods: Mapping[str, str] | None = None,
        feature_factor: Sequence[str] = (),
        encode_covariates: bool = False,
        encoder_input: str = "log1p",
        input_dropout: float | None = None,
        link_weight: float | None = None,
        align_weight: float | None = None,
        linked_encoder: str = "auto",
        posterior: str = "diagonal",
        n_flows: int = 4,
        seed: int = 0,
    ):
        registry = registry_of(adata)
        if n_latent is None:
            n_latent = DEFAULT_LINKED_N_LATENT if registry.feature_links else DEFAULT_N_LATENT
        init_args = dict(
            n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers, dropout_rate=dropout_rate,
            gene_likelihood=gene_likelihood, dispersion=dispersion, atac_likelihood=atac_likelihood,
            likelihoods=dict(likelihoods or {}), feature_factor=list(feature_factor),
            encode_covariates=encode_covariates, encoder_input=encoder_input, input_dropout=input_dropout,
            link_weight=link_weight, align_weight=align_weight, linked_encoder=linked_encoder,
            posterior=posterior, n_flows=n_flows, seed=seed,
        )
        self._initialize(registry, init_args, adata)

    def _initialize(self, registry: DataRegistry, init_args: dict, adata, links: FeatureLinks | None = None) -> None:
        """The one construction path, shared by ``__init__`` and :meth:`load` (which passes the
        saved ``links``; otherwise they are read from ``adata`` when the setup has them)."""
        if init_args["dispersion"] not in _DISPERSIONS:
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {init_args['dispersion']!r}.")
        if _DISPERSIONS[init_args["dispersion"]] == "feature-batch" and not registry.batch_key:
            raise ValueError("dispersion='gene-batch' needs a batch: call setup with batch_key=... first.")
        self.init_args = init_args
        self.registry = registry
        if links is None and registry.feature_links:
            links = read_feature_links(adata, registry)
        self._tensors, self._obs_names = read_tensors(adata, registry)
        if links is not None and init_args.get("linked_encoder") == "auto" and "linked_encoder_chosen" not in init_args:
            init_args["linked_encoder_chosen"] = choose_linked_encoder(self._tensors.observed_host, registry, links)
        self.module = build_module(registry, init_args, links)
        self.data = adata
        self.history = pd.DataFrame()
        self.refiner_history = pd.DataFrame()
        self.is_trained = False
        self.train_indices = np.zeros(0, dtype=np.int64)
        self.validation_indices = np.zeros(0, dtype=np.int64)

    # --------------------------------------------------------------- training
    def train(self, **kwargs) -> SCLatent:
        """Train with Lightning on CPU, one GPU or several (``strategy="ddp"``).

        Parameters
        ----------
        **kwargs
            The options of :class:`~sclatent.config.TrainConfig` (``max_epochs``,
            ``batch_size``, ``lr``, ``weight_decay``, ``validation_size``,
            ``early_stopping``, ``early_stopping_patience``, ``lr_patience``,
            ``lr_factor``, ``kl_warmup_epochs``, ``subset_weight``, ``subset_sampling``, ``pair_weight``, ``refine_steps``,
            ``refine_lr``, ``sleep_weight``, ``accelerator``, ``devices``, ``precision``, ``seed``,
            ``enable_progress_bar``, ``verbose``, ``block_size``, ``keep_weights``, ``checkpoint_dir``), documented there
            with their defaults; any other keyword goes to
            :class:`lightning.pytorch.Trainer` (``strategy="ddp"``, ``num_nodes``, ...).

        Returns
        -------
        SCLatent
            ``self``, trained, with the weights of the epoch of lowest validation loss (the
            last epoch without validation, and by default in a model with an adversary: see
            ``keep_weights``); per-epoch losses (one column per logged term,
            and ``kept`` marking the epoch whose weights the model has) are in :attr:`history`.

        Raises
        ------
        sclatent.train.TrainingDivergedError
            When an epoch's loss is not finite (NaN or infinite); the model keeps the last
            finite epoch's weights (or its initial weights) and the finished epochs' history.

        Notes
        -----
        Interrupting (Ctrl-C, ``KeyboardInterrupt``) keeps the finished epochs' history and
        the best of their weights, and warns; ``train`` then returns normally. With
        ``checkpoint_dir=`` the same call resumes the run later.

        Distributed training: ``train(strategy="ddp", devices=2)`` (``accelerator="cpu"``
        uses gloo). Lightning starts one process per device by running the script again, so
        call it from a script, not a notebook. Every process keeps a fixed shard of the
        training cells (reading only those from disk when the data are backed), and the
        epoch means, early stopping, learning-rate plateaus and the best-weights choice are
        computed over all processes' cells, identically on each. Several machines: add
        ``num_nodes=N`` and start the script on each machine, e.g. under SLURM with
        ``srun --nodes=N --ntasks-per-node=G python train.py`` or with
        ``torchrun --nnodes=N --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py``
        (see ``docs/distributed.md``). Training
        draws its randomness from ``seed`` under a forked random state: the global torch
        RNG is the same after ``train`` as before.
        """
        from .. import train as training  # Lightning is imported only when training

        n = self._tensors.n_cells
        requested, trainer_kwargs = TrainConfig.split(kwargs)
        config = requested.resolve(
            n, len(self.module.modalities), backed=self._tensors.backed, adversarial=self.module.discriminator is not None
        )
        if requested.max_epochs is None:
            print(f"sclatent: training for at most {config.max_epochs} epochs (default for {n} cells).")
        gen = torch.Generator().manual_seed(config.seed)
        perm = torch.randperm(n, generator=gen)
        n_val = int(round(config.validation_size * n))
        if config.validation_size > 0 and n_val == 0:
            n_val = 1
        if n - n_val < 1:
            raise ValueError(
                f"No cells left to train on: {n} cell(s) with validation_size={config.validation_size} hold out {n_val}. "
                "Training needs at least one training cell (and, with validation, one more); use more cells or a "
                "smaller validation_size (0 disables validation)."
            )
        validation_indices, train_indices = np.sort(perm[:n_val].numpy()), np.sort(perm[n_val:].numpy())
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the user's global random state is left as it was
            torch.manual_seed(config.seed)
            plan = training.TrainingPlan(
                self.module, self._tensors, torch.as_tensor(train_indices), torch.as_tensor(validation_indices), config
            )
            try:
                training.fit(plan, **trainer_kwargs)
            except KeyboardInterrupt:
                epoch = self._finish_training(plan, train_indices, validation_indices, config.keep_weights)
                kept = "the initial weights (no epoch finished)" if epoch is None else f"the weights of epoch {epoch}"
                warnings.warn(
                    f"Training was interrupted after {len(plan.history)} finished epoch(s); the model keeps their "
                    f"history and {kept}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self
            except training.TrainingDivergedError:
                self._finish_training(plan, train_indices, validation_indices, "last")
                raise
        self._finish_training(plan, train_indices, validation_indices, config.keep_weights)
        if config.enable_progress_bar:
            print(training_summary(self.history, plan.stopped_early, config.early_stopping_patience))
        return self

    def train_refiner(
        self,
        steps: int = 5,
        max_epochs: int = 50,
        lr: float = 1e-3,
        batch_size: int = 256,
        patience: int = 10,
        n_hidden: int = 128,
        seed: int = 0,
        start_jitter: float = 2.0,
    ) -> pd.DataFrame:
        """Train a learned refiner: iterative amortized inference (Marino et al. 2018).

        A small network learns to turn each cell's posterior parameters and the gradient
        of its ELBO into an update, so that ``refine_steps=steps, refine_method="learned"``
        in any output method reaches in a few updates what many Adam steps reach. It is
        trained after :meth:`train`, on the same training cells, to maximize the mean ELBO
        of its ``steps`` iterates from the encoder's posterior; the encoders and decoders
        stay frozen, so the model's other results do not change. The validation cells of
        :meth:`train` choose the epoch whose weights are kept and stop the training after
        ``patience`` epochs without improvement. A second call replaces the refiner.
        The refiner is saved and loaded with the model.

        Parameters
        ----------
        steps
            Number of learned updates it is trained to take (use the same at inference;
            refinement stays monotone whatever the number).
        max_epochs
            Upper bound on the epochs over the training cells.
        lr
            Adam learning rate of the refiner's weights.
        batch_size
            Cells per step.
        patience
            Epochs without a better validation loss before stopping.
        n_hidden
            Width of the refiner's two hidden layers.
        seed
            Seed of its initialization, the batch order and the noise.
        start_jitter
            About half of the training (and validation) starts have their posterior mean
            moved by this many posterior standard deviations in a random direction, so the
            refiner also learns the larger corrections that cells unlike the training cells
            need (a new technology or batch); ``0`` trains from the encoder's posteriors
            only. The default 2 was chosen on CellBench (trained on CEL-seq2, refined on
            Drop-seq) and checked on PBMC (``benchmarks/RESULTS.md`` section 3).

        Returns
        -------
        pandas.DataFrame
            Per epoch: ``train_loss`` and ``validation_loss`` (minus the mean ELBO of the
            iterates, per cell), ``seconds`` and ``kept``; also in :attr:`refiner_history`.

        Examples
        --------
        >>> model.train()
        >>> model.train_refiner(steps=5)
        >>> z = model.get_latent_representation(refine_steps=5, refine_method="learned")
        """
        from .. import train as training

        if not self.is_trained or not len(self.train_indices):
            raise ValueError("train_refiner() learns from a trained model's training cells: call model.train() first.")
        for name, value, low in (("steps", steps, 1), ("max_epochs", max_epochs, 1), ("batch_size", batch_size, 1), ("patience", patience, 1), ("n_hidden", n_hidden, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"train_refiner: {name} must be an integer >= {low}, got {value!r}.")
        if not lr > 0:
            raise ValueError(f"train_refiner: lr must be > 0, got {lr!r}.")
        if isinstance(start_jitter, bool) or not isinstance(start_jitter, (int, float)) or not (math.isfinite(start_jitter) and start_jitter >= 0):
            raise ValueError(f"train_refiner: start_jitter must be a finite number >= 0 (posterior standard deviations), got {start_jitter!r}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module.add_refiner(n_hidden).to(self.device)
            self.refiner_history = training.fit_refiner(
                self.module, self._tensors, torch.as_tensor(self.train_indices), torch.as_tensor(self.validation_indices),
                steps, max_epochs, lr, batch_size, patience, seed, self.device, float(start_jitter),
            )
        self.init_args["learned_refiner"] = {"n_hidden": n_hidden, "steps": steps}
        return self.refiner_history

    def _finish_training(self, plan, train_indices: np.ndarray, validation_indices: np.ndarray, which: str) -> int | None:
        """Keep the ``"best"`` (lowest validation loss) or ``"last"`` finished epoch's weights and
        the history of the finished epochs, with a ``kept`` column marking the epoch kept."""
        epoch = plan.restore(which)
        self.module.eval()  # stays on the training device: inference runs there too
        self.history = plan.history_frame()
        if len(self.history):
            self.history["kept"] = self.history.index == epoch
        self.train_indices, self.validation_indices = train_indices, validation_indices
        self.is_trained = epoch is not None or self.is_trained
        return epoch

    # ------------------------------------------------------------ save / load
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save weights (safetensors) and a JSON manifest to ``dir_path``.

        The manifest holds the format name and version, the package version, the data
        registry (features, kinds, categories, keys), the init arguments and the training
        history. No pickled objects are written. Writing is atomic: on failure nothing is
        left behind.
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
        saying what differs. ``adata`` is not modified. Models saved in an earlier format
        are migrated on load.
        """
        saved = read_saved_model(dir_path)
        manifest, state, registry, init_args, links = saved.manifest, saved.state, saved.registry, saved.init_args, saved.links
        where = Path(dir_path) / "manifest.json"
        obj = cls.__new__(cls)
        try:
            obj._initialize(registry, init_args, adata, links)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: init_args do not describe a model ({err!r}); the manifest is damaged or was edited.") from None
        expected = obj.module.state_dict()
        mismatched = sorted(k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape))
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if mismatched or missing or unexpected:
            raise ValueError(
                f"{dir_path}: the weights do not match the architecture in its manifest (shape differs: {mismatched[:5]}, "
                f"missing: {missing[:5]}, unexpected: {unexpected[:5]}); the manifest was edited or belongs to other weights."
            )
        obj.module.load_state_dict(state)
        obj.module.eval()
        history = pd.DataFrame(manifest.get("history") or {})
        obj.history = history.set_index("epoch") if len(history) else history
        obj.is_trained = bool(manifest.get("is_trained"))
        return obj

    def __repr__(self) -> str:
        kinds = {m.name: m.kind for m in self.registry.modalities}
        mods = ", ".join(f"{m.name} ({kinds[m.name]}): {m.n_features} features, {m.likelihood}" for m in self.module.modalities)
        return f"SCLatent({self._tensors.n_cells} cells; {mods}; n_latent={self.module.n_latent}; trained={self.is_trained})"

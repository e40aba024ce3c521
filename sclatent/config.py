"""Training and inference options: every default written once, here.

:class:`TrainConfig` is what :meth:`sclatent.SCLatent.train` takes as keywords and what
the training plan and :func:`sclatent.train.fit` read; :class:`InferenceConfig` holds the
options shared by every output method (``get_latent_representation``, ``get_elbo``, ...).
Neither imports Lightning.
"""

from __future__ import annotations

import os

import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

from .inference.refine import REFINE_METHODS
from .module import SUBSET_SAMPLING

__all__ = ["InferenceConfig", "TrainConfig", "default_max_epochs"]


def default_max_epochs(n_cells: int) -> int:
    """Epoch budget that scales inversely with the data size.

    About ``400 * 20000 / n_cells`` epochs, kept within ``[20, 400]``: 400 epochs for
    under 20k cells, 20 for a million; early stopping usually ends sooner.
    """
    return int(min(400, max(20, round(400 * 20_000 / max(n_cells, 1)))))


def _split(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_number(name: str, value, low: float, high: float | None = None, closed_high: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high if closed_high else value < high
    if not ok:
        bound = f"in [{low}, {high}{']' if closed_high else ')'}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}.")


#: default ``sleep_weight`` of a model that aligns modalities with its adversary (feature links)
LINKED_SLEEP_WEIGHT = 3.0


@dataclass(frozen=True)
class TrainConfig:
    """Options of :meth:`sclatent.SCLatent.train`.

    Parameters
    ----------
    max_epochs
        Epoch budget; ``None`` picks :func:`default_max_epochs` of the number of cells,
        ``min(400, max(20, 400 * 20000 / n_cells))`` (printed at start). Early stopping
        usually ends sooner.
    batch_size
        Cells per gradient step.
    lr, weight_decay
        AdamW settings. The default rate (with ``lr_patience``) was chosen by measurement
        on PBMC, CellBench and MOp RNA (``benchmarks/RESULTS.md``).
    validation_size
        Fraction of cells held out to monitor the loss (0 disables validation).
    early_stopping, early_stopping_patience
        Stop once the validation loss has not improved for this many epochs after KL warm-up.
    lr_patience, lr_factor
        Multiply the learning rate by ``lr_factor`` once the validation loss has not
        improved for ``lr_patience`` epochs after KL warm-up (``None`` keeps it constant;
        ignored without validation cells).
    kl_warmup_epochs
        Epochs over which the KL weight rises linearly (per step) from 0 to 1; ``None``:
        ``max(1, max_epochs // 10)``. It may not exceed ``max_epochs``.
    subset_weight
        Weight of the single-modality ELBOs of paired cells (MVAE-style).
    subset_sampling
        ``"one"`` (default): in each training step, one of each paired cell's experts is
        drawn at random and its single-modality ELBO weighted by the cell's number of
        experts, which is the same objective in expectation at half the decoding (two
        modalities); ``"all"``: every expert's term for every paired cell. The two train
        equally well on MOp half paired (``benchmarks/RESULTS.md`` section 6). Validation
        always uses ``"all"``.
    pair_weight
        Weight of the ``pair`` term: for each cell with two or more modalities, the
        symmetric KL divergence between its experts' posteriors (each with the prior), so
        that one modality alone puts a cell where both put it (0: off). ``None``: 1 with
        two or more modalities (chosen on MOp, ``benchmarks/RESULTS.md`` section 6), 0 with one.
    refine_steps, refine_lr
        Semi-amortized training: the decoder learns from posteriors refined by this many
        gradient steps (stop-gradient), the encoders from their own ELBO. 0 is amortized.
    sleep_weight
        Weight of the encoders' sleep-phase term
        (:meth:`~sclatent.module.SCLatentModule.sleep_loss`), which lets unpaired cells
        train the expert of the modality they lack. ``None``: 1 with two or more
        modalities, 3 (:data:`LINKED_SLEEP_WEIGHT`) in a model that aligns modalities with
        its adversary (feature links; chosen on MOp with zero paired cells over two seeds,
        ``benchmarks/RESULTS.md`` section 6), 0 (off, no extra cost) with one modality.
    accelerator, devices
        Passed to Lightning's ``Trainer``.
    precision
        Lightning's ``precision``: ``"32-true"`` (full precision) or ``"bf16-mixed"`` (the
        networks' matrix products in bfloat16 under autocast; posteriors, likelihoods and
        weights stay in float32). On a CPU with bfloat16 matrix units (Intel AMX) the mixed
        precision trained a 2,000-gene RNA model 1.15x faster per epoch to the same held-out
        ELBO, and RNA + ATAC with feature links no faster (``benchmarks/RESULTS.md``).
    seed
        Seed of the validation split, batch order, dropout and sampling.
    enable_progress_bar
        Show Lightning's progress bar.
    verbose
        Let Lightning print its start-up lines (accelerators found, tips) and its reason
        for stopping; off by default, so training prints only the progress bar.
    block_size
        Training cells are drawn in blocks of this many neighbouring cells (the blocks, and
        the cells within windows of four batches, are shuffled), so that data read from
        disk is read in a few sequential spans per batch. ``None``: 1 (free shuffling) for
        data in memory, 64 for data read from disk (``backed="r"``).
    keep_weights
        Which finished epoch's weights the model keeps: ``"best"`` (lowest validation loss
        among the epochs from the end of KL warm-up on) or ``"last"``. ``None``: ``"best"``, except in a model that aligns modalities with its
        adversary (feature links), which keeps the ``"last"``: the validation ELBO does not
        see how well the modalities are aligned, and the alignment keeps improving after the
        ELBO has levelled off (``benchmarks/RESULTS.md``, section 6). Without validation
        cells the last epoch is always kept.
    checkpoint_dir
        Directory where the full training state (weights, optimizer, learning-rate and
        early-stopping state, random state, history) is saved after every epoch. Calling
        ``train`` again with the same directory (and the same options) resumes that run
        where it stopped and ends with the weights an uninterrupted run would have.
    """

    max_epochs: int | None = None
    batch_size: int = 256
    lr: float = 1.5e-3
    weight_decay: float = 1e-6
    validation_size: float = 0.1
    early_stopping: bool = True
    early_stopping_patience: int = 20
    lr_patience: int | None = 5
    lr_factor: float = 0.5
    kl_warmup_epochs: int | None = None
    subset_weight: float = 1.0
    subset_sampling: str = "one"
    pair_weight: float | None = None
    refine_steps: int = 0
    refine_lr: float = 0.05
    sleep_weight: float | None = None
    accelerator: str = "auto"
    devices: int | str = "auto"
    precision: str = "32-true"
    seed: int = 0
    enable_progress_bar: bool = True
    verbose: bool = False
    block_size: int | None = None
    keep_weights: str | None = None
    checkpoint_dir: str | None = None

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
        """``(TrainConfig of the keywords it knows, the rest)``: the rest go to Lightning's ``Trainer``."""
        known, rest = _split(cls, kwargs)
        return cls(**known), rest

    def resolve(self, n_cells: int, n_modalities: int, backed: bool = False, adversarial: bool = False) -> TrainConfig:
        """A copy with every ``None`` default filled in for this data (``backed``: read from
        disk) and model (``adversarial``: it aligns modalities with an adversary), validated.

        Raises
        ------
        ValueError
            When an option is out of range, naming the option and the value.
        """
        max_epochs = default_max_epochs(n_cells) if self.max_epochs is None else self.max_epochs
        _check_int("max_epochs", max_epochs, 1)
        warmup = max(1, max_epochs // 10) if self.kl_warmup_epochs is None else self.kl_warmup_epochs
        _check_int("kl_warmup_epochs", warmup, 0)
        if warmup > max_epochs:
            raise ValueError(f"kl_warmup_epochs={warmup} must lie in [0, max_epochs={max_epochs}] so that warm-up completes.")
        default_sleep = (LINKED_SLEEP_WEIGHT if adversarial else 1.0) if n_modalities > 1 else 0.0
        sleep = default_sleep if self.sleep_weight is None else self.sleep_weight
        _check_number("sleep_weight", sleep, 0.0)
        _check_number("validation_size", self.validation_size, 0.0, 1.0)
        _check_int("batch_size", self.batch_size, 1)
        _check_number("lr", self.lr, 0.0)
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_int("early_stopping_patience", self.early_stopping_patience, 0)
        if self.lr_patience is not None:
            _check_int("lr_patience", self.lr_patience, 0)
        _check_number("lr_factor", self.lr_factor, 0.0, 1.0)
        _check_number("subset_weight", self.subset_weight, 0.0)
        if self.subset_sampling not in SUBSET_SAMPLING:
            raise ValueError(f"subset_sampling must be one of {list(SUBSET_SAMPLING)}, got {self.subset_sampling!r}.")
        pair = (1.0 if n_modalities > 1 else 0.0) if self.pair_weight is None else self.pair_weight
        _check_number("pair_weight", pair, 0.0)
        _check_int("refine_steps", self.refine_steps, 0)
        _check_int("seed", self.seed, 0)
        block = (64 if backed else 1) if self.block_size is None else self.block_size
        _check_int("block_size", block, 1)
        keep = ("last" if adversarial else "best") if self.keep_weights is None else self.keep_weights
        if keep not in ("best", "last"):
            raise ValueError(f"keep_weights must be 'best', 'last' or None, got {keep!r}.")
        checkpoint_dir = None if self.checkpoint_dir is None else os.fspath(self.checkpoint_dir)
        return replace(
            self, max_epochs=int(max_epochs), kl_warmup_epochs=int(warmup), sleep_weight=float(sleep), pair_weight=float(pair),
            block_size=int(block), keep_weights=keep, checkpoint_dir=checkpoint_dir,
        )


@dataclass(frozen=True)
class InferenceConfig:
    """Options shared by the output methods of :class:`sclatent.SCLatent`.

    Every ``get_*`` method (and ``latent_diagnostics``, ``get_amortization_gap``) takes
    these as keywords.

    Parameters
    ----------
    batch_size
        Cells per forward pass (bounds memory).
    refine_steps, refine_lr
        Semi-amortized inference: Adam steps on each cell's ELBO from the encoder's
        posterior, weights frozen (0 = the encoder's posterior).
    refine_method
        ``"adam"`` (the steps above) or ``"learned"``: ``refine_steps`` updates of the
        learned refiner trained by :meth:`~sclatent.SCLatent.train_refiner` (iterative
        amortized inference; ``refine_lr`` is unused).
    n_samples
        Monte-Carlo samples per cell where the method averages over the posterior.
    seed
        Seed of the sampling and refinement noise (results are deterministic given it).
    """

    batch_size: int = 1024
    refine_steps: int = 0
    refine_lr: float = 0.05
    refine_method: str = "adam"
    n_samples: int = 1
    seed: int = 0

    @classmethod
    def of(cls, options: dict[str, Any], method: str, **defaults) -> InferenceConfig:
        """The options a method was called with, over the method's own ``defaults``.

        Raises
        ------
        TypeError
            For a keyword that is not an inference option, listing the valid ones.
        """
        known, rest = _split(cls, options)
        if rest:
            valid = [f.name for f in fields(cls)]
            raise TypeError(f"{method}() got unexpected keyword argument(s) {sorted(rest)}; inference options are {valid}.")
        config = cls(**{**defaults, **known})
        _check_int("batch_size", config.batch_size, 1)
        _check_int("refine_steps", config.refine_steps, 0)
        _check_number("refine_lr", config.refine_lr, 0.0)
        if config.refine_method not in REFINE_METHODS:
            raise ValueError(f"refine_method must be {' or '.join(map(repr, REFINE_METHODS))}, got {config.refine_method!r}.")
        _check_int("n_samples", config.n_samples, 1)
        _check_int("seed", config.seed, 0)
        return config

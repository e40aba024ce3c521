"""Training with PyTorch Lightning: the only module of sclatent that imports Lightning.

:class:`TrainingPlan` owns the optimizer, KL warm-up, the logging of the loss terms (from
which the per-epoch history is built) and the data hooks; batches are index tensors into :class:`~sclatent.data.CellTensors` that were moved
to the training device once, at the start of fitting.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import threading
import time
import warnings

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar
from tqdm.auto import tqdm

from ._host_memory import reuse_large_host_buffers
from .config import TrainConfig, default_max_epochs
from .data import CellTensors, IndexBatches
from .module import SCLatentModule, metric_means

__all__ = ["EpochProgressBar", "TrainingDivergedError", "TrainingPlan", "WarmupAwareEarlyStopping", "default_max_epochs", "fit"]


class TrainingDivergedError(RuntimeError):
    """The loss of an epoch was not finite (NaN or infinite): training stopped.

    Attributes
    ----------
    epoch
        The epoch whose loss was not finite.
    """

    def __init__(self, epoch: int, stage: str, loss: float, lr: float):
        self.epoch = epoch
        super().__init__(
            f"Training diverged in epoch {epoch}: the {stage} loss is {loss}. Likely causes: a learning rate too "
            f"high for this data (lr={lr:g}; try train(lr={lr / 10:g})), or extreme values in the input counts or "
            "covariates."
        )


class TrainingPlan(pl.LightningModule):
    """Optimizes a :class:`~sclatent.module.SCLatentModule` on index batches.

    Every metric of the module's :class:`~sclatent.module.LossOutput` (its terms, ``loss``,
    ``reconstruction``, ``kl``; ``elbo`` from the last two) is summed over the epoch's cells on the device and
    logged once per epoch as ``"<stage>_<name>"`` (``train_loss``, ``validation_single_atac``,
    ...) with ``self.log(..., sync_dist=True)``; the per-epoch history
    (:meth:`history_frame`) is read back from what was logged. No term is special-cased.

    Parameters
    ----------
    module
        The model.
    tensors
        All cells as tensors (moved to the training device at the start of fitting).
    train_indices, validation_indices
        Cells used for each stage.
    config
        The training options, resolved (:meth:`~sclatent.config.TrainConfig.resolve`).
    """

    def __init__(
        self,
        module: SCLatentModule,
        tensors: CellTensors,
        train_indices: torch.Tensor,
        validation_indices: torch.Tensor,
        config: TrainConfig,
    ):
        super().__init__()
        if config.max_epochs is None or config.kl_warmup_epochs is None or config.sleep_weight is None:
            raise ValueError("TrainingPlan needs a resolved TrainConfig: call config.resolve(n_cells, n_modalities).")
        self.module = module
        self.tensors = tensors
        self.train_indices = train_indices
        self.validation_indices = validation_indices
        self.config = config
        self.history: list[dict[str, float]] = []
        self._sums: dict[str, tuple[tuple[str, ...], torch.Tensor]] = {}
        self._n_cells: dict[str, int] = {}
        self._epoch_start = 0.0
        # weights kept in memory: before training, after the last finished epoch, at the best validation loss
        self.initial_state = self._snapshot()
        self.last_state = self.best_state = None
        self.last_epoch = self.best_epoch = None
        self.best_loss: float | None = None
        self._validation_loss: float | None = None
        self.finished = False  # set when fit ends normally (saved: a finished run is not resumed)
        self.stopped_early = False  # set by fit when early stopping ended the run

    # ---------------------------------------------------------------- data hooks
    def _batches(self, indices: torch.Tensor, shuffle: bool) -> IndexBatches:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return IndexBatches(
            indices, self.config.batch_size, shuffle=shuffle, seed=self.config.seed, rank=rank, world_size=world,
            block_size=self.config.block_size if shuffle else 1,
        )

    def train_dataloader(self) -> IndexBatches:
        self._train_batches = self._batches(self.train_indices, shuffle=True)
        return self._train_batches

    def val_dataloader(self) -> IndexBatches | list:
        return self._batches(self.validation_indices, shuffle=False) if len(self.validation_indices) else []

    def transfer_batch_to_device(self, batch: torch.Tensor, device: torch.device, dataloader_idx: int) -> torch.Tensor:
        # the index stays on the host: the batch is built from it there (which cells have which
        # modality) and moved to the device with the counts, with no host-device synchronization
        return batch

    def on_fit_start(self) -> None:
        self.tensors = self.tensors.to(self.device)
        # a trained model is in eval mode (dropout off), and Lightning keeps the mode it finds
        self.module.train()

    # ------------------------------------------------------------------ training
    @property
    def kl_weight(self) -> float:
        """Current KL weight: linear in steps over the warm-up epochs, then 1."""
        warmup = self.config.kl_warmup_epochs
        if warmup <= 0:
            return 1.0
        world = self.trainer.world_size if self._trainer is not None else 1
        steps_per_epoch = max(1, math.ceil(len(self.train_indices) / (self.config.batch_size * world)))  # per process
        return min(1.0, self.global_step / (warmup * steps_per_epoch))

    def _accumulate(self, stage: str, out, n: int) -> None:
        """Add the batch's sums over cells of every metric to the epoch's (one device tensor, no sync)."""
        names, sums = out.cell_sums()  # the same terms in every batch of a stage (the module's contract)
        previous = self._sums.get(stage)
        self._sums[stage] = (names, sums if previous is None else previous[1] + sums)
        self._n_cells[stage] = self._n_cells.get(stage, 0) + n

    def _log_epoch(self, stage: str) -> None:
        """Log every metric's mean over the epoch's cells as ``<stage>_<name>`` (and ``<stage>_elbo``).

        Under DDP the sums and cell counts are first added over the ranks, so the means
        (and the validation loss that early stopping, the learning-rate plateau and the
        best-weights choice read) are those of all cells, the same on every rank.
        """
        entry, n = self._sums.pop(stage, None), self._n_cells.pop(stage, 0)
        if self.trainer.sanity_checking or entry is None:  # the same on every rank: shards are equally long
            return
        names, sums = entry
        if self.trainer.world_size > 1:  # sums over every rank's cells, so every rank decides alike
            total = self.trainer.strategy.reduce(torch.cat([sums, sums.new_tensor([float(n)])]), reduce_op="sum")
            sums, n = total[:-1], total[-1]
        means = metric_means(names, sums, n)
        if not bool(torch.isfinite(means["loss"])):  # one host sync per epoch
            raise TrainingDivergedError(self.current_epoch, stage, float(means["loss"]), self.config.lr)
        if stage == "validation":
            self._validation_loss = float(means["loss"])
        for name, value in means.items():
            self.log(f"{stage}_{name}", value, sync_dist=True, prog_bar=stage == "validation" and name == "loss")

    def training_step(self, idx: torch.Tensor, batch_idx: int) -> torch.Tensor:
        c = self.config
        batch = self.tensors.batch(idx, self.module.dense_count_modalities)
        out = self.module.loss(
            batch, self.kl_weight, c.subset_weight, c.refine_steps, c.refine_lr, c.sleep_weight, c.pair_weight, c.subset_sampling
        )
        self._accumulate("train", out, len(idx))
        return out.loss

    def validation_step(self, idx: torch.Tensor, batch_idx: int) -> None:
        # validation is the training objective at KL weight 1 (comparable across epochs), with
        # the single-modality ELBOs of paired cells: early stopping then also watches how well
        # each expert alone generalizes, which the fused ELBO barely shows (it leans on RNA)
        batch = self.tensors.batch(idx, self.module.dense_count_modalities)
        out = self.module.loss(batch, kl_weight=1.0, subset_weight=self.config.subset_weight, pair_weight=self.config.pair_weight)
        self._accumulate("validation", out, len(idx))

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("validation")  # before early stopping and the LR scheduler read validation_loss

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._train_batches.set_epoch(self.current_epoch)  # before the first batch is drawn

    def on_train_epoch_end(self) -> None:
        # runs after validation: the row holds both stages' epoch means
        self._log_epoch("train")
        self.log("kl_weight", self.kl_weight, sync_dist=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], sync_dist=True)
        self.log("seconds", time.perf_counter() - self._epoch_start, sync_dist=True, reduce_fx="max")
        row = {"epoch": self.current_epoch}
        row.update({k: float(v) for k, v in self.trainer.callback_metrics.items()})
        self.history.append(row)
        self._keep_weights()
        if isinstance(self.trainer.progress_bar_callback, EpochProgressBar):
            self.trainer.progress_bar_callback.show(row)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def _keep_weights(self) -> None:
        """After a finished epoch: remember its weights as the last good ones, and as the best
        ones when its validation loss is the lowest so far (without validation: the last).

        Only epochs from the end of KL warm-up on (the last warm-up epoch, whose KL weight
        reaches 1, and later) can be the best, as only they were trained on the objective
        that validation measures; early stopping and the learning-rate plateau also wait
        for warm-up. (On the shipped MOp data the validation loss was lowest at epoch 16 of
        a 40-epoch warm-up, whose latent separated cell types far worse than epoch 40's.)"""
        self.last_state, self.last_epoch = self._snapshot(), self.current_epoch
        loss = self._validation_loss
        self._validation_loss = None
        if self.current_epoch < self.config.kl_warmup_epochs - 1:
            return
        if loss is None or self.best_loss is None or loss < self.best_loss:
            self.best_state, self.best_epoch, self.best_loss = self.last_state, self.current_epoch, loss

    def restore(self, which: str) -> int | None:
        """Load the ``"best"`` or ``"last"`` finished epoch's weights into the module.

        Returns the epoch restored, or ``None`` (and the initial weights) when no epoch finished.
        """
        state, epoch = (self.best_state, self.best_epoch) if which == "best" else (self.last_state, self.last_epoch)
        if state is None and which == "best":  # stopped before warm-up ended: no epoch could be the best yet
            state, epoch = self.last_state, self.last_epoch
        self.module.load_state_dict(self.initial_state if state is None else state)
        return epoch

    # --------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add what Lightning does not keep: history, kept weights, random state, the run's identity."""
        checkpoint["sclatent"] = {
            "history": self.history,
            "initial_state": self.initial_state,
            "last_state": self.last_state,
            "last_epoch": self.last_epoch,
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "best_loss": self.best_loss,
            "rng_state": torch.get_rng_state(),
            "finished": self.finished,
            "stopped_early": self.stopped_early,
            "run": self.run_identity(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_training_state(checkpoint["sclatent"])

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`on_save_checkpoint`'s entries (the random state included)."""
        self.history = list(state["history"])
        self.initial_state, self.last_state, self.best_state = state["initial_state"], state["last_state"], state["best_state"]
        self.last_epoch, self.best_epoch, self.best_loss = state["last_epoch"], state["best_epoch"], state["best_loss"]
        self.finished = bool(state["finished"])
        self.stopped_early = bool(state.get("stopped_early", False))
        torch.set_rng_state(state["rng_state"])

    def run_identity(self) -> dict:
        """What must match for a checkpoint to continue this run: the options (progress bar
        and checkpoint directory aside) and the training and validation cells."""
        options = {k: v for k, v in vars(self.config).items() if k not in ("enable_progress_bar", "checkpoint_dir")}
        cells = torch.cat([self.train_indices.long(), torch.tensor([-1]), self.validation_indices.long()])
        return {
            "options": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in options.items()},
            "cells": hashlib.sha256(cells.numpy().tobytes()).hexdigest(),
        }

    def history_frame(self) -> pd.DataFrame:
        """Per-epoch history, indexed by epoch: a column for everything that was logged
        (``train_<term>``, ``validation_<term>``, ``kl_weight``, ``lr``, ``seconds``)."""
        return pd.DataFrame(self.history).set_index("epoch") if self.history else pd.DataFrame()

    def configure_optimizers(self):
        c = self.config
        params = [p for p in self.module.parameters() if p.requires_grad]  # a query model trains few
        if not params:
            raise ValueError(
                "No parameter of this model is trainable: a query model without new categories trains nothing. "
                "Pass fine_tune=('encoders',) to load_query_data, or map with get_latent_representation(refine_steps=...)."
            )
        # the fused kernel updates all parameters in one pass (measured ~5% of a CPU step saved)
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, fused=fused)
        if c.lr_patience is None or not len(self.validation_indices):
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=c.lr_factor, patience=c.lr_patience, min_lr=c.lr * 1e-3
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "validation_loss", "interval": "epoch"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if self.current_epoch >= self.config.kl_warmup_epochs:  # the loss still moves with the KL weight before
            scheduler.step(metric)


class EpochProgressBar(ProgressBar):
    """sclatent's progress bar: one bar over epochs (not batches), showing after each epoch
    its training and validation loss per cell and the KL weight (tqdm, on stderr; on the
    first process only under DDP). Replaces Lightning's batch-level bar."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            self._bar = tqdm(
                total=trainer.max_epochs, initial=trainer.current_epoch, desc="sclatent", unit="epoch",
                dynamic_ncols=True, leave=True,
            )

    def show(self, row: dict[str, float]) -> None:
        """Advance by one finished epoch and show its losses (``row``: a history row)."""
        if self._bar is None:
            return
        shown = {"loss": row.get("train_loss"), "val": row.get("validation_loss"), "kl_w": row.get("kl_weight")}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)
        self._bar.update(1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (it stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class WarmupAwareEarlyStopping(EarlyStopping):
    """Lightning's :class:`EarlyStopping` that does not act before KL warm-up has ended."""

    def __init__(self, warmup_epochs: int, **kwargs):
        super().__init__(check_on_train_epoch_end=False, **kwargs)  # check in on_validation_end, where warm-up is honoured
        self.warmup_epochs = warmup_epochs

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.warmup_epochs:
            return
        super().on_validation_end(trainer, pl_module)


#: File name (without ``.ckpt``) of the training state in ``checkpoint_dir``.
CHECKPOINT_NAME = "training_state"


def _checkpoint_to_resume(plan: TrainingPlan, directory: str) -> str | None:
    """The checkpoint of this run in ``directory`` (its state loaded into ``plan`` when the run
    had finished), or ``None`` when there is none; a different run's state is an error."""
    path = os.path.join(directory, CHECKPOINT_NAME + ".ckpt")
    if not os.path.exists(path):
        if os.path.isfile(directory):
            raise ValueError(f"checkpoint_dir={directory!r} is a file; pass a directory.")
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint["sclatent"]
    mine = plan.run_identity()
    if state["run"] != mine:
        theirs = state["run"]["options"]
        differ = sorted(k for k in set(theirs) | set(mine["options"]) if theirs.get(k) != mine["options"].get(k))
        what = f"options {differ} differ" if differ else "the training cells differ (other data or seed)"
        raise ValueError(
            f"checkpoint_dir={directory!r} holds the training state of a different run ({what}). "
            "Pass the same data and options to resume it, or a new directory to start a new run."
        )
    if state["finished"]:
        plan.load_state_dict(checkpoint["state_dict"])
        plan.load_training_state(state)
    return path


def fit(plan: TrainingPlan, **trainer_kwargs) -> pl.Trainer | None:
    """Run Lightning's :class:`~lightning.pytorch.Trainer` on ``plan`` with its config.

    Parameters
    ----------
    plan
        The training plan; ``plan.config`` gives the epoch budget, early stopping,
        accelerator, devices and progress bar.
    **trainer_kwargs
        Any other :class:`~lightning.pytorch.Trainer` argument (``strategy="ddp"``, ...).

    Returns
    -------
    lightning.pytorch.Trainer or None
        The trainer after fitting (``None`` when a finished run was loaded from its checkpoint).

    With ``plan.config.checkpoint_dir`` the full training state is saved there after every
    epoch (``training_state.ckpt``); when the directory already holds the state of the same
    run (same options, same cells), training resumes from it, and a run that had ended
    is not trained further (its final state is loaded and ``None`` is returned).

    Raises
    ------
    KeyboardInterrupt
        When training was interrupted (Ctrl-C); Lightning's ``SystemExit`` is turned back
        into it and the Ctrl-C handler is restored.
    ValueError
        When ``checkpoint_dir`` holds the state of a different run.
    TrainingDivergedError
        When an epoch's loss was not finite.
    """
    c = plan.config
    callbacks = list(trainer_kwargs.pop("callbacks", []) or [])
    has_validation = len(plan.validation_indices) > 0
    resume_from = None
    if c.checkpoint_dir is not None:
        resume_from = _checkpoint_to_resume(plan, c.checkpoint_dir)
        if resume_from is not None and plan.finished:
            return None  # that run had ended: its final state is loaded, nothing to train
        callbacks.append(
            ModelCheckpoint(
                dirpath=c.checkpoint_dir, filename=CHECKPOINT_NAME, monitor=None, save_top_k=1,
                save_on_train_epoch_end=True, enable_version_counter=False,
            )
        )
        trainer_kwargs["enable_checkpointing"] = True
    stopper = None
    if c.early_stopping and has_validation:
        stopper = WarmupAwareEarlyStopping(c.kl_warmup_epochs, monitor="validation_loss", patience=c.early_stopping_patience, mode="min")
        callbacks.append(stopper)
    if c.enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        callbacks.append(EpochProgressBar())
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer_kwargs.setdefault("enable_model_summary", False)
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    previous_handler = signal.getsignal(signal.SIGINT)
    quiet = _QuietLightning(not c.verbose)  # before the Trainer, which prints as it starts
    trainer = None
    try:
        trainer = pl.Trainer(
            max_epochs=c.max_epochs,
            accelerator=c.accelerator,
            devices=c.devices,
            precision=c.precision,
            callbacks=callbacks,
            enable_progress_bar=c.enable_progress_bar,
            **({} if has_validation else {"limit_val_batches": 0}),
            **trainer_kwargs,
        )
        with reuse_large_host_buffers():
            trainer.fit(plan, ckpt_path=resume_from)
        plan.stopped_early = stopper is not None and stopper.stopped_epoch > 0
        if c.checkpoint_dir is not None:  # the run ended normally: a later call does not train it further
            plan.finished = True
            trainer.save_checkpoint(os.path.join(c.checkpoint_dir, CHECKPOINT_NAME + ".ckpt"))
    except SystemExit:
        if trainer is not None and trainer.interrupted:  # Lightning turns a KeyboardInterrupt into sys.exit(1): give it back
            raise KeyboardInterrupt("training interrupted") from None
        raise
    finally:
        quiet.restore()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_handler)  # Lightning ignores Ctrl-C after an interrupt
    return trainer


class _QuietLightning:
    """Raise Lightning's loggers to WARNING while training (its start-up lines and tips are
    INFO), and put their levels back afterwards."""

    NAMES = ("lightning.pytorch", "lightning.fabric", "lightning")

    def __init__(self, active: bool):
        self.levels = {}
        self.warnings = None
        if active:
            for name in self.NAMES:
                log = logging.getLogger(name)
                self.levels[name] = log.level
                log.setLevel(max(log.level, logging.WARNING))
            # Lightning 2.6 on torch 2.13 warns about its own pytree use at every fit
            self.warnings = warnings.catch_warnings()
            self.warnings.__enter__()
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

    def restore(self) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        if self.warnings is not None:
            self.warnings.__exit__(None, None, None)


def fit_refiner(
    module: SCLatentModule,
    tensors: CellTensors,
    train_indices: torch.Tensor,
    validation_indices: torch.Tensor,
    steps: int,
    max_epochs: int,
    lr: float = 1e-3,
    batch_size: int = 256,
    patience: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    start_jitter: float = 0.0,
) -> pd.DataFrame:
    """Train ``module.refiner`` (iterative amortized inference) with every other weight frozen.

    A plain loop rather than a Lightning run: one small network on one device, nothing to
    distribute or checkpoint. Each step minimizes :meth:`SCLatentModule.refiner_loss`
    (minus the mean ELBO of the refiner's ``steps`` iterates from the encoder's posterior,
    about half of the starts moved by ``start_jitter`` posterior standard deviations) with
    Adam; gradients are taken for the refiner's weights only, so no other parameter gets a
    ``.grad``. After each epoch the same loss on the validation cells (fixed noise)
    decides: the best epoch's weights are kept, and training stops after ``patience``
    epochs without improvement.

    Returns
    -------
    pandas.DataFrame
        Per epoch: ``train_loss``, ``validation_loss`` (NaN without validation cells),
        ``seconds``, and ``kept`` marking the epoch whose weights the refiner has.
    """
    refiner = module.refiner
    params = list(refiner.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    batches = IndexBatches(train_indices, batch_size, shuffle=True, seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    module.eval()
    rows, best, best_state, since_best = [], math.inf, None, 0

    def batch_of(idx: torch.Tensor):
        return tensors.batch(idx, module.dense_count_modalities).to(device)

    for epoch in range(max_epochs):
        t0 = time.perf_counter()
        batches.set_epoch(epoch)
        total, n = 0.0, 0
        for idx in batches:
            loss = module.refiner_loss(batch_of(idx), steps, generator, start_jitter).mean()
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total, n = total + float(loss) * len(idx), n + len(idx)
        validation = math.nan
        if len(validation_indices):
            scorer = torch.Generator(device=device).manual_seed(seed + 1)  # the same noise every epoch
            with torch.no_grad():
                parts = [module.refiner_loss(batch_of(idx), steps, scorer, start_jitter) for idx in validation_indices.split(batch_size)]
            validation = float(torch.cat(parts).mean())
        score = validation if len(validation_indices) else total / n
        if not math.isfinite(score):
            raise TrainingDivergedError(epoch, "refiner", score, lr)
        if score < best:
            best, since_best = score, 0
            best_state = {k: v.detach().clone() for k, v in refiner.state_dict().items()}
        else:
            since_best += 1
        rows.append({"epoch": epoch, "train_loss": total / n, "validation_loss": validation, "seconds": time.perf_counter() - t0})
        if since_best >= patience:
            break
    refiner.load_state_dict(best_state)
    history = pd.DataFrame(rows).set_index("epoch")
    history["kept"] = history["validation_loss" if len(validation_indices) else "train_loss"] == best
    return history

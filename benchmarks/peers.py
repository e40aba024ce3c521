"""Peer baselines (scvi-tools) for the sclatent benchmarks.

This module does not import or depend on ``sclatent``. It wraps scvi-tools (checked against
1.4.2) so that the benchmark scripts can train and evaluate the reference models
side by side with sclatent, using the same data splits, the same thread budget and the same
metric conventions.

Conventions used by every number returned here
----------------------------------------------
* **Log-likelihoods and ELBOs are per cell, in nats, and higher is better.** They are means over
  cells: we ask scvi-tools for per-cell values (``return_mean=False``) and average them ourselves.
  For ``get_marginal_ll`` this matters: with ``return_mean=True``, scvi-tools 1.4.2 averages the
  per-*minibatch* means (``scvi/model/base/_vaemixin.py`` lines 176-186 via
  ``scvi/module/_vae.py`` line 744), which gives too much weight to a small last minibatch.
* **Normalising constants are included.** scvi's NB log-pmf ``log_nb_positive``
  (``scvi/distributions/_negative_binomial.py`` lines 105-141) already contains
  ``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, so ``SCVI.get_elbo`` is a true ELBO and
  ``get_marginal_ll`` a true log-likelihood estimate. No correction is added. The smoke test
  checks this against ``torch.distributions.NegativeBinomial``.
* **KL weight 1.** ``get_elbo`` returns ``-(reconstruction_loss + sum(kl_local))``, where
  ``kl_local`` is the *unweighted* KL (``scvi/module/_vae.py`` lines 552-601). So the KL-warmup
  weight used during training never enters the evaluation. The KL is analytic and the
  reconstruction term is a single-sample Monte-Carlo estimate (z ~ q(z|x)). Our wrapper can
  average several such estimates (``elbo_n_samples``).
* **Library size.** SCVI's default ``use_observed_lib_size=True`` sets the size factor to
  ``log(sum_g x_g)`` (observed). It is not a latent variable: there is no ``p(l)`` or ``q(l|x)``
  term in the ELBO (``kl_l = 0``) or in the importance sampler. The scvi numbers are therefore
  ``log p(x | l = observed library)``, the likelihood *conditional on the observed library size*.
  A model that also generates the library size is not strictly comparable unless it uses the
  same convention.

Threading: every entry point calls ``torch.set_num_threads(n_threads)`` (default 2) and sets
``scvi.settings.dl_num_workers = 0``. The data loading therefore runs in the training process,
like a single-process sclatent loop.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from typing import Any

import numpy as np

__all__ = [
    "scvi_available",
    "train_scvi",
    "evaluate_scvi",
    "ElboTraceCallback",
    "make_multivi_mudata",
    "multivi_views",
    "train_multivi",
    "multivi_latents",
    "multivi_imputation",
    "EpochTimerCallback",
]


# --------------------------------------------------------------------------------------
# availability / environment
# --------------------------------------------------------------------------------------
def scvi_available() -> bool:
    """Return True if scvi-tools (and torch/lightning) can be imported."""
    for mod in ("torch", "lightning", "scvi"):
        if importlib.util.find_spec(mod) is None:
            return False
    try:
        import scvi  # noqa: F401
    except Exception:  # pragma: no cover - broken install
        return False
    return True


def _configure(seed: int | None, n_threads: int) -> None:
    """Threading / loader / seed settings shared by all entry points."""
    import torch
    import scvi

    torch.set_num_threads(int(n_threads))
    scvi.settings.dl_num_workers = 0
    scvi.settings.dl_persistent_workers = False
    if seed is not None:
        # lightning.seed_everything: python `random`, numpy and torch RNGs
        scvi.settings.seed = int(seed)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for p in ("scvi-tools", "torch", "lightning", "anndata", "mudata", "scanpy", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "n/a"
    return out


def _kl_weight_at(epoch: int, n_epochs_kl_warmup: int | None, max_kl_weight: float = 1.0,
                  min_kl_weight: float = 0.0) -> float:
    """Mirror of ``scvi.train._trainingplans._compute_kl_weight`` (epoch-based warmup)."""
    if n_epochs_kl_warmup and epoch < n_epochs_kl_warmup:
        return (max_kl_weight - min_kl_weight) * (epoch / n_epochs_kl_warmup) + min_kl_weight
    return max_kl_weight


# --------------------------------------------------------------------------------------
# Lightning callbacks
# --------------------------------------------------------------------------------------
def _callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class _LazyCallbackMeta(type):
    """Lets the callback classes subclass lightning's Callback without importing lightning
    when this module is imported, so peers.py stays importable without scvi-tools."""

    _cache: dict = {}

    def __call__(cls, *args, **kwargs):
        real = _LazyCallbackMeta._cache.get(cls.__name__)
        if real is None:
            real = type(cls.__name__, (cls._impl, _callback_base()), {})
            _LazyCallbackMeta._cache[cls.__name__] = real
        return real(*args, **kwargs)


class _EpochTimerImpl:
    """Records wall time of the fit loop and of each training epoch (perf_counter)."""

    def __init__(self):
        self.fit_start = None
        self.fit_end = None
        self.epoch_times: list[float] = []
        self._epoch_t0 = None
        self.excluded = 0.0  # time spent in evaluation callbacks, subtracted from epoch times

    def on_train_start(self, trainer, pl_module):
        self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        # runs before the ELBO callback's hook (the timer is first in the callback list), so
        # the evaluation is not part of the epoch time
        t = time.perf_counter()
        self.epoch_times.append(t - self._epoch_t0)

    def on_train_end(self, trainer, pl_module):
        self.fit_end = time.perf_counter()

    @property
    def fit_loop_wall(self) -> float | None:
        if self.fit_start is None or self.fit_end is None:
            return None
        return self.fit_end - self.fit_start - self.excluded


class EpochTimerCallback(metaclass=_LazyCallbackMeta):
    _impl = _EpochTimerImpl


class _ElboTraceImpl:
    """Evaluates the held-out per-cell mean ELBO (KL weight 1, normalising constants included)
    at the end of every training epoch.

    Each trace entry is a dict with ``epoch`` (1-based count of completed epochs),
    ``elapsed_s`` (wall seconds since the fit loop started, *excluding* all time spent in this
    callback), ``elbo`` (held-out per-cell mean ELBO, higher is better), ``kl_weight_train``
    (the warmup KL weight used during that epoch) and ``eval_s`` (time of this evaluation).

    The module is switched to eval mode during the evaluation (so dropout is off and the
    BatchNorm running stats are used and left unchanged), then switched back. The torch, numpy
    and python RNG states are saved and restored, so the training trajectory does not depend
    on whether the trace is recorded.
    """

    def __init__(self, model, eval_adata, batch_size: int = 1024, n_samples: int = 1,
                 timer: Any | None = None, eval_seed: int = 12345):
        self.model = model
        self.batch_size = batch_size
        self.n_samples = n_samples
        self.timer = timer
        self.eval_seed = eval_seed
        # register the evaluation AnnData once (outside the timed region)
        self._adata = model._validate_anndata(eval_adata)
        self._dl = model._make_data_loader(adata=self._adata, batch_size=batch_size)
        self.trace: list[dict] = []
        self._t0 = None
        self._excluded = 0.0

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()
        self._excluded = 0.0

    def on_train_epoch_end(self, trainer, pl_module):
        import random

        import torch

        t_in = time.perf_counter()
        elapsed = t_in - self._t0 - self._excluded
        module = self.model.module
        was_training = module.training
        rng_torch = torch.get_rng_state()
        rng_np = np.random.get_state()
        rng_py = random.getstate()
        try:
            module.eval()
            torch.manual_seed(self.eval_seed)
            elbo = _elbo_per_cell(self.model, self._dl, self.n_samples).mean()
        finally:
            module.train(was_training)
            torch.set_rng_state(rng_torch)
            np.random.set_state(rng_np)
            random.setstate(rng_py)
        dt = time.perf_counter() - t_in
        self._excluded += dt
        if self.timer is not None:
            self.timer.excluded += dt
        plan = pl_module
        klw = None
        if getattr(plan, "n_epochs_kl_warmup", None) is not None or getattr(
            plan, "n_steps_kl_warmup", None
        ) is not None:
            try:
                klw = float(plan.kl_weight)
            except Exception:  # pragma: no cover
                klw = None
        self.trace.append(
            {
                "epoch": int(trainer.current_epoch) + 1,
                "elapsed_s": float(elapsed),
                "elbo": float(elbo),
                "kl_weight_train": klw,
                "eval_s": float(dt),
            }
        )


class ElboTraceCallback(metaclass=_LazyCallbackMeta):
    _impl = _ElboTraceImpl


# --------------------------------------------------------------------------------------
# SCVI
# --------------------------------------------------------------------------------------
def _elbo_per_cell(model, dataloader, n_samples: int = 1) -> np.ndarray:
    """Per-cell ELBO (higher is better), averaged over ``n_samples`` single-sample estimates.

    Uses ``SCVI.get_elbo(dataloader=..., return_mean=False)``, which returns
    ``-(reconstruction_loss + kl_z + kl_l)`` per cell with unweighted KL terms.
    """
    acc = None
    for _ in range(max(1, int(n_samples))):
        e = model.get_elbo(dataloader=dataloader, return_mean=False)
        e = e.detach().cpu().numpy().astype(np.float64)
        acc = e if acc is None else acc + e
    return acc / max(1, int(n_samples))


def train_scvi(
    adata_train,
    *,
    batch_key: str | None,
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    batch_size: int = 128,
    max_epochs: int,
    lr: float = 1e-3,
    seed: int = 0,
    eval_adata=None,
    eval_batch_size: int = 1024,
    eval_n_samples: int = 1,
    n_epochs_kl_warmup: int | None = 400,
    layer: str | None = None,
    n_threads: int = 2,
    enable_progress_bar: bool = False,
    model_kwargs: dict | None = None,
    plan_kwargs: dict | None = None,
    copy: bool = True,
) -> dict:
    """Train ``scvi.model.SCVI`` on *all* cells of ``adata_train``.

    Model: ``gene_likelihood="nb"``, ``dispersion="gene"``, ``use_observed_lib_size=True``
    (scvi default), ``dropout_rate=0.1``, BatchNorm in the encoder and decoder (scvi default),
    batch one-hot into the decoder only (``encode_covariates=False``, default).
    Training: ``train_size=1.0`` (no validation split, so every cell of ``adata_train`` is
    trained on), ``early_stopping=False``, Adam(lr, eps=0.01, weight_decay=1e-6) (the
    TrainingPlan defaults), ``batch_size`` minibatches with shuffling, last batch kept.

    KL warmup: scvi-tools' default is ``n_epochs_kl_warmup=400``. The KL(q(z)||p(z)) weight in
    epoch ``e`` (0-based) is ``e / 400`` (``scvi/train/_trainingplans.py`` lines 32-73, 156), so it
    is 0 in the first epoch and reaches 1 only from epoch 400 on. With ``max_epochs < 400``
    scvi never trains at KL weight 1 (the last epoch uses ``(max_epochs-1)/400``). The default
    ``max_epochs`` heuristic, ``min(round(20000/n_obs*400), 400)``, gives 400 epochs for any
    dataset with at most 20k cells. Pass ``n_epochs_kl_warmup=None`` to train at KL weight 1
    from the start. Evaluation always uses weight 1.

    Parameters
    ----------
    adata_train
        AnnData of raw counts (``.X`` or ``layer``). It is copied unless ``copy=False``, because
        ``setup_anndata`` writes ``_scvi_*`` columns and ``.uns`` entries.
    batch_key
        obs column with the batch, or None for a single batch.
    eval_adata
        If given, the held-out per-cell mean ELBO is recorded after each epoch by
        :class:`ElboTraceCallback`. The evaluation time is excluded from every timing we
        report (``train_wall_s`` too).

    Returns
    -------
    dict with keys ``model``, ``n_train_cells``, ``epochs``, ``batch_size``,
    ``train_wall_s`` (wall time of ``model.train(...)``, including Lightning setup/teardown,
    minus evaluation time), ``fit_loop_wall_s`` (first ``on_train_start`` to ``on_train_end``,
    minus evaluation time), ``epoch_times_s`` (list), ``cells_per_s``
    (``n_train_cells*epochs/train_wall_s``), ``cells_per_s_fit_loop``,
    ``n_epochs_kl_warmup``, ``final_train_kl_weight``, ``trace`` (list or None),
    ``versions``, ``config``.
    """
    import scvi

    _configure(seed, n_threads)
    if copy:
        adata_train = adata_train.copy()
    if eval_adata is not None and copy:
        eval_adata = eval_adata.copy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(adata_train, layer=layer, batch_key=batch_key)
        mk = dict(
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            gene_likelihood="nb",
            dispersion="gene",
        )
        mk.update(model_kwargs or {})
        model = scvi.model.SCVI(adata_train, **mk)

    timer = EpochTimerCallback()
    callbacks = [timer]
    tracer = None
    if eval_adata is not None:
        tracer = ElboTraceCallback(
            model, eval_adata, batch_size=eval_batch_size, n_samples=eval_n_samples, timer=timer
        )
        callbacks.append(tracer)

    pk = {"lr": lr, "n_epochs_kl_warmup": n_epochs_kl_warmup}
    pk.update(plan_kwargs or {})

    n_train = int(adata_train.n_obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        model.train(
            max_epochs=int(max_epochs),
            train_size=1.0,
            batch_size=int(batch_size),
            early_stopping=False,
            accelerator="cpu",
            devices=1,
            plan_kwargs=pk,
            callbacks=callbacks,
            enable_progress_bar=enable_progress_bar,
            check_val_every_n_epoch=None,
        )
        t1 = time.perf_counter()
    model.module.eval()

    wall = (t1 - t0) - timer.excluded
    fit_wall = timer.fit_loop_wall
    epochs = len(timer.epoch_times)
    out = {
        "model": model,
        "n_train_cells": n_train,
        "epochs": epochs,
        "batch_size": int(batch_size),
        "train_wall_s": float(wall),
        "fit_loop_wall_s": None if fit_wall is None else float(fit_wall),
        "epoch_times_s": [float(x) for x in timer.epoch_times],
        "cells_per_s": float(n_train * epochs / wall) if wall > 0 else float("nan"),
        "cells_per_s_fit_loop": (
            float(n_train * epochs / fit_wall) if fit_wall else float("nan")
        ),
        "n_epochs_kl_warmup": n_epochs_kl_warmup,
        "final_train_kl_weight": _kl_weight_at(epochs - 1, n_epochs_kl_warmup),
        "trace": None if tracer is None else tracer.trace,
        "versions": _versions(),
        "config": {
            "n_latent": n_latent, "n_hidden": n_hidden, "n_layers": n_layers, "lr": lr,
            "seed": seed, "batch_key": batch_key, "max_epochs": int(max_epochs),
            "n_threads": n_threads, "gene_likelihood": "nb", "dispersion": "gene",
            "use_observed_lib_size": True, "train_size": 1.0, "early_stopping": False,
            **{k: v for k, v in mk.items() if k not in ("n_latent", "n_hidden", "n_layers")},
        },
    }
    return out


def evaluate_scvi(
    model,
    adata_test,
    *,
    n_mc_samples: int = 100,
    n_mc_samples_per_pass: int | None = None,
    batch_size: int = 256,
    elbo_n_samples: int = 1,
    seed: int = 0,
    n_threads: int = 2,
    copy: bool = True,
    compute_marginal_ll: bool = True,
) -> dict:
    """Held-out metrics of a trained SCVI model, per cell, higher is better.

    Returns a dict with
      ``elbo`` (per-cell mean ELBO: KL weight 1, ``lgamma(x+1)`` included, mean of
      ``elbo_n_samples`` single-sample estimates per cell), ``elbo_per_cell`` (ndarray),
      ``marginal_ll`` (per-cell mean of ``get_marginal_ll(n_mc_samples=...)``, an importance
      sampling estimate of log p(x | observed library) with proposal q(z|x)),
      ``marginal_ll_per_cell``, ``reconstruction_ll`` (mean log p(x|z) with a single z ~ q,
      i.e. minus ``get_reconstruction_error``), ``kl_z`` (= reconstruction_ll - elbo, with
      different MC draws), ``latent`` (``get_latent_representation``, posterior means,
      shape (n_cells, n_latent)), ``n_cells``, timings.
    """
    import torch

    _configure(None, n_threads)
    if copy:
        adata_test = adata_test.copy()
    model.module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata_test = model._validate_anndata(adata_test)
        dl = model._make_data_loader(adata=adata_test, batch_size=batch_size)

        torch.manual_seed(seed)
        t = time.perf_counter()
        elbo_pc = _elbo_per_cell(model, dl, elbo_n_samples)
        t_elbo = time.perf_counter() - t

        torch.manual_seed(seed + 1)
        rec = model.get_reconstruction_error(dataloader=dl, return_mean=False)
        rec_ll = -rec["reconstruction_loss"].detach().cpu().numpy().astype(np.float64)

        mll_pc = None
        t_mll = None
        if compute_marginal_ll:
            if n_mc_samples_per_pass is None:
                n_mc_samples_per_pass = int(min(n_mc_samples, 25))
            torch.manual_seed(seed + 2)
            t = time.perf_counter()
            mll = model.get_marginal_ll(
                dataloader=dl,
                n_mc_samples=int(n_mc_samples),
                return_mean=False,
                n_mc_samples_per_pass=int(n_mc_samples_per_pass),
            )
            t_mll = time.perf_counter() - t
            mll_pc = mll.detach().cpu().numpy().astype(np.float64)

        latent = model.get_latent_representation(dataloader=dl)

    return {
        "n_cells": int(adata_test.n_obs),
        "elbo": float(elbo_pc.mean()),
        "elbo_per_cell": elbo_pc,
        "marginal_ll": None if mll_pc is None else float(mll_pc.mean()),
        "marginal_ll_per_cell": mll_pc,
        "n_mc_samples": int(n_mc_samples),
        "reconstruction_ll": float(rec_ll.mean()),
        "kl_z": float(rec_ll.mean() - elbo_pc.mean()),
        "latent": latent,
        "elbo_eval_s": t_elbo,
        "marginal_ll_eval_s": t_mll,
    }


# --------------------------------------------------------------------------------------
# MULTIVI
# --------------------------------------------------------------------------------------
def _as_csr(x):
    import scipy.sparse as sp

    return x.tocsr() if sp.issparse(x) else sp.csr_matrix(np.asarray(x))


def make_multivi_mudata(data, *, rna_mod: str = "rna", atac_mod: str = "atac",
                        batch_key: str | None = "batch", rna_layer: str | None = None,
                        atac_layer: str | None = None):
    """Build a clean MuData with exactly two modalities ``rna`` then ``atac`` (MULTIVI order),
    CSR float32 counts in ``.X``, and ``batch_key`` copied to the global ``.obs``.

    ``data`` is a MuData (with ``rna_mod``/``atac_mod``) or a tuple ``(adata_rna, adata_atac)``
    with the same obs_names. scvi-tools 1.4.2 only supports MuData for MULTIVI
    (``MULTIVI.setup_anndata`` is a stub that only raises a DeprecationWarning, see
    ``scvi/model/_multivi.py`` lines 1069-1103), so the old concatenated-AnnData route
    (``scvi.data.organize_multiome_anndatas`` + ``setup_anndata``) no longer works.
    """
    import anndata as ad
    import mudata as md
    import pandas as pd

    if isinstance(data, tuple):
        a_rna, a_atac = data
        obs_global = a_rna.obs
    else:
        a_rna, a_atac = data[rna_mod], data[atac_mod]
        obs_global = data.obs
    if not np.array_equal(np.asarray(a_rna.obs_names), np.asarray(a_atac.obs_names)):
        raise ValueError("RNA and ATAC must have identical obs_names (paired cells)")
    xr = a_rna.layers[rna_layer] if rna_layer else a_rna.X
    xa = a_atac.layers[atac_layer] if atac_layer else a_atac.X
    obs = pd.DataFrame(index=a_rna.obs_names.copy())
    if batch_key is not None:
        if batch_key in obs_global.columns:
            b = obs_global.loc[obs.index, batch_key]
        else:
            b = a_rna.obs[batch_key]
        obs[batch_key] = pd.Categorical(np.asarray(b))
    rna = ad.AnnData(X=_as_csr(xr).astype(np.float32), obs=obs.copy(),
                     var=pd.DataFrame(index=a_rna.var_names.copy()))
    atac = ad.AnnData(X=_as_csr(xa).astype(np.float32), obs=obs.copy(),
                      var=pd.DataFrame(index=a_atac.var_names.copy()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": rna, "atac": atac})
        if batch_key is not None:
            mdata.obs[batch_key] = obs[batch_key].values
    return mdata


def multivi_views(mdata) -> dict:
    """Three MuData views of the same cells, as MULTIVI sees them.

    ``paired``: both modalities. ``rna_only``: ATAC matrix replaced by zeros.
    ``atac_only``: RNA matrix replaced by zeros. In scvi-tools 1.4.2, MULTIVAE decides per cell
    which modalities were observed from the row sums: ``mask_expr = x_rna.sum(1) > 0``,
    ``mask_acc = x_atac.sum(1) > 0`` (``scvi/module/_multivae.py`` lines 602-603 and 816-817).
    A cell with an all-zero modality is an unpaired single-modality cell: that modality's
    posterior gets weight 0 in the mixture (``mix_modalities``) and its reconstruction loss is
    masked out. ``mdata`` should come from :func:`make_multivi_mudata`.
    """
    import scipy.sparse as sp

    out = {"paired": mdata}
    for name, zero_mod in (("rna_only", "atac"), ("atac_only", "rna")):
        v = mdata.copy()
        shp = v.mod[zero_mod].shape
        v.mod[zero_mod].X = sp.csr_matrix(shp, dtype=np.float32)
        out[name] = v
    return out


def _prep_for_model(mdata):
    """Add the ``_indices`` obs column that MULTIVI's registry expects on new data."""
    mdata = mdata.copy()
    mdata.obs["_indices"] = np.arange(mdata.n_obs)
    return mdata


def train_multivi(
    mdata_train,
    *,
    max_epochs: int,
    seed: int = 0,
    batch_key: str | None = "batch",
    rna_mod: str = "rna",
    atac_mod: str = "atac",
    batch_size: int = 128,
    lr: float = 1e-4,
    n_latent: int | None = None,
    n_hidden: int | None = None,
    gene_likelihood: str = "zinb",
    n_epochs_kl_warmup: int | None = 50,
    adversarial_mixing: bool = True,
    n_threads: int = 2,
    enable_progress_bar: bool = False,
    model_kwargs: dict | None = None,
) -> dict:
    """Train ``scvi.model.MULTIVI`` on all cells of a paired RNA+ATAC MuData.

    Input is MuData registered with ``MULTIVI.setup_mudata(mdata, batch_key=...,
    modalities={"rna_layer": "rna", "atac_layer": "atac"})``. ``mdata_train`` may be any
    MuData with ``rna_mod``/``atac_mod`` or an ``(adata_rna, adata_atac)`` tuple; it is
    rebuilt by :func:`make_multivi_mudata`, so the caller's object is not modified.

    Defaults follow ``MULTIVI.train`` (1.4.2): lr 1e-4, AdamW(weight_decay=1e-3, eps=1e-8),
    KL warmup over 50 epochs (weight ``e/50`` in epoch ``e``), an adversarial batch classifier
    with scale 1 (if more than one batch), ``n_hidden = min(128, int(sqrt(n_regions)))``,
    ``n_latent = int(sqrt(n_hidden))`` when None, 2 encoder and 2 decoder layers, LayerNorm, ZINB
    for RNA, and Bernoulli(p * library factor * region factor) on the binarised ATAC
    (``x > 0``). Changed here: ``train_size=1.0`` and ``early_stopping=False`` (the MULTIVI
    default is early stopping on a 10 % validation split).

    Returns dict: ``model``, ``train_wall_s``, ``fit_loop_wall_s``, ``epoch_times_s``,
    ``per_epoch_s`` (mean of ``epoch_times_s``), ``cells_per_s``, ``n_train_cells``,
    ``epochs``, ``mdata`` (the registered training MuData), ``n_latent``, ``versions``.
    """
    import scvi

    _configure(seed, n_threads)
    mdata = make_multivi_mudata(mdata_train, rna_mod=rna_mod, atac_mod=atac_mod,
                                batch_key=batch_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.MULTIVI.setup_mudata(
            mdata,
            batch_key=batch_key,
            modalities={"rna_layer": "rna", "atac_layer": "atac"},
        )
        mk = dict(n_latent=n_latent, n_hidden=n_hidden, gene_likelihood=gene_likelihood)
        mk.update(model_kwargs or {})
        model = scvi.model.MULTIVI(mdata, **mk)

    timer = EpochTimerCallback()
    n_train = int(mdata.n_obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        model.train(
            max_epochs=int(max_epochs),
            lr=lr,
            train_size=1.0,
            batch_size=int(batch_size),
            early_stopping=False,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            adversarial_mixing=adversarial_mixing,
            accelerator="cpu",
            devices=1,
            callbacks=[timer],
            enable_progress_bar=enable_progress_bar,
        )
        t1 = time.perf_counter()
    model.module.eval()
    wall = t1 - t0
    epochs = len(timer.epoch_times)
    return {
        "model": model,
        "mdata": mdata,
        "n_train_cells": n_train,
        "epochs": epochs,
        "batch_size": int(batch_size),
        "train_wall_s": float(wall),
        "fit_loop_wall_s": timer.fit_loop_wall,
        "epoch_times_s": [float(x) for x in timer.epoch_times],
        "per_epoch_s": float(np.mean(timer.epoch_times)) if epochs else float("nan"),
        "cells_per_s": float(n_train * epochs / wall) if wall > 0 else float("nan"),
        "n_latent": int(model.module.n_latent),
        "n_hidden": int(model.module.n_hidden),
        "versions": _versions(),
    }


def multivi_latents(model, test_data, *, batch_key: str | None = "batch", rna_mod: str = "rna",
                    atac_mod: str = "atac", batch_size: int = 256, check: bool = True):
    """RNA-only, ATAC-only and joint latents (posterior means) of the same held-out cells.

    ``test_data`` is a paired MuData (or ``(adata_rna, adata_atac)``). Each cell is presented
    to MULTIVI three times: with the ATAC counts zeroed (RNA-only view), with the RNA counts
    zeroed (ATAC-only view), and paired. For each view we take the *joint* latent
    (``get_latent_representation(modality="joint")``). For a single-modality view, the masked
    mixture puts all weight on the observed modality's encoder. So ``z_rna_only`` equals
    ``get_latent_representation(paired, modality="expression")``, the RNA encoder's posterior
    mean (the encoders only see their own modality), and likewise for ATAC with
    ``modality="accessibility"``. With ``check=True`` this equality is asserted (atol 1e-5).
    ``z_joint`` is the paired posterior mean: with the default ``modality_weights="equal"``
    it is the average of the two per-modality means.
    """
    mdata = make_multivi_mudata(test_data, rna_mod=rna_mod, atac_mod=atac_mod,
                                batch_key=batch_key)
    views = multivi_views(mdata)
    model.module.eval()
    zs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, v in views.items():
            zs[name] = model.get_latent_representation(
                _prep_for_model(v), modality="joint", batch_size=batch_size
            )
        if check:
            p = _prep_for_model(views["paired"])
            z_expr = model.get_latent_representation(p, modality="expression",
                                                     batch_size=batch_size)
            z_acc = model.get_latent_representation(p, modality="accessibility",
                                                    batch_size=batch_size)
            np.testing.assert_allclose(zs["rna_only"], z_expr, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(zs["atac_only"], z_acc, atol=1e-5, rtol=1e-5)
    return zs["rna_only"], zs["atac_only"], zs["paired"]


def multivi_imputation(model, test_data, *, batch_key: str | None = "batch",
                       rna_mod: str = "rna", atac_mod: str = "atac",
                       batch_size: int = 256) -> dict:
    """Cross-modal imputation on held-out paired cells, using single-modality views.

    What scvi-tools 1.4.2 offers (``scvi/model/_multivi.py``):
      * ``get_normalized_expression`` (lines 612-722): decoded ``px_scale``, i.e. per-cell
        normalised expression frequencies (rows sum to 1 over the ``n_genes`` genes), from the
        latent posterior mean (``use_z_mean=True``). On the **ATAC-only** view that latent comes
        from the ATAC encoder alone, so this is RNA imputed from ATAC. Multiply by a library
        size to get expected counts.
      * ``get_normalized_accessibility`` (lines 482-610): decoded accessibility probabilities
        ``p`` in (0, 1) (without the cell library factor and region factors by default,
        ``normalize_cells=False``, ``normalize_regions=False``). On the **RNA-only** view this
        is ATAC imputed from RNA.

    Returns dict: ``expression_from_atac`` (n_cells x n_genes, rows sum to 1),
    ``accessibility_from_rna`` (n_cells x n_regions, probabilities), and, for reference,
    ``expression_from_paired`` and ``accessibility_from_paired``.
    """
    mdata = make_multivi_mudata(test_data, rna_mod=rna_mod, atac_mod=atac_mod,
                                batch_key=batch_key)
    views = {k: _prep_for_model(v) for k, v in multivi_views(mdata).items()}
    model.module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "expression_from_atac": model.get_normalized_expression(
                views["atac_only"], return_numpy=True, batch_size=batch_size),
            "accessibility_from_rna": model.get_normalized_accessibility(
                views["rna_only"], return_numpy=True, batch_size=batch_size),
            "expression_from_paired": model.get_normalized_expression(
                views["paired"], return_numpy=True, batch_size=batch_size),
            "accessibility_from_paired": model.get_normalized_accessibility(
                views["paired"], return_numpy=True, batch_size=batch_size),
        }
    return out

"""Shared fixtures of the sclatent test suite.

Real data live in ``../shared/data`` next to the repository (CI clones the repository
with ``shared/`` beside it). Everything expensive is session-scoped: the cellbench data
are read once and ONE small model is trained once and reused by every test that needs a
trained model. Tests that modify an AnnData must work on a ``.copy()``.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

# Small models on a small, shared CPU: more threads mostly add contention.
# SCLATENT_TEST_THREADS overrides (1 is much faster on an oversubscribed machine).
torch.set_num_threads(int(os.environ.get("SCLATENT_TEST_THREADS", "2")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CELLBENCH = "cellbench_3cl_celseq2_dropseq.h5ad"
PBMC = SHARED_DATA / "pbmc4k_scdcc_top2000.h5ad"

#: Settings of the session's trained model (see ``trained_model``).
TRAIN_EPOCHS = 50
TRAIN_KL_WARMUP = TRAIN_EPOCHS // 10  # the default of SCLatent.train
N_LATENT = 10
N_GENES = 2000


def matrix_digest(matrix) -> str:
    """SHA-256 over the bytes, dtype and shape of a dense or sparse matrix (for "never modified" checks)."""
    h = hashlib.sha256()
    h.update(repr((type(matrix).__name__, matrix.shape, str(matrix.dtype))).encode())
    if sp.issparse(matrix):
        parts = (matrix.data, matrix.indices, matrix.indptr)
    else:
        parts = (np.ascontiguousarray(matrix),)
    for a in parts:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


#: for test modules on the shared PBMC file; like ``shared_data_dir``, skips (saying how to
#: fix it) only when the checkout has no ``../shared`` beside it, which CI always has
requires_pbmc = pytest.mark.skipif(
    not PBMC.exists(), reason=f"shared test data not found at {PBMC}; clone the repository with ../shared beside it"
)


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors gain nothing from more on a shared CPU."""
    with torch_threads(1):
        yield


def pbmc_subset(n_cells: int = 300, n_genes: int = 300):
    """The first ``n_cells`` PBMC cells (those with counts) on the ``n_genes`` most expressed genes."""
    import anndata as ad

    adata = ad.read_h5ad(PBMC)
    genes = np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:n_genes]
    adata = adata[:n_cells, np.sort(genes)].copy()
    return adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()


def mudata_of(mods: dict, obs):
    """A MuData of the AnnDatas ``mods`` with cell annotations ``obs`` (MuData's merge warnings silenced)."""
    import warnings

    import mudata as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData(mods)
    mdata.obs = obs.loc[mdata.obs_names].copy()
    return mdata


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` (skips the test when the checkout has no shared data beside it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}; clone the repository with ../shared beside it")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cellbench_full(shared_data_dir):
    """The full cellbench AnnData (450 cells x 15073 genes, raw counts, CSR). Do not modify: copy it."""
    import anndata as ad

    path = shared_data_dir / CELLBENCH
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return ad.read_h5ad(path)


@pytest.fixture(scope="session")
def cellbench(cellbench_full):
    """Cellbench restricted to the 2,000 most variable genes (log-normalized variance), raw counts.

    450 cells, obs ``batch`` (2 technologies) and ``cell_type`` (3 cell lines). Read-only:
    tests that modify it must take a ``.copy()`` (or use ``cellbench_copy``).
    """
    x = cellbench_full.X.tocsr().astype(np.float64)
    totals = np.asarray(x.sum(1)).ravel()
    logn = sp.diags(1e4 / totals) @ x
    logn.data = np.log1p(logn.data)
    var = np.asarray(logn.multiply(logn).mean(0)).ravel() - np.asarray(logn.mean(0)).ravel() ** 2
    keep = np.sort(np.argsort(-var, kind="stable")[:N_GENES])
    adata = cellbench_full[:, keep].copy()
    assert (np.asarray(adata.X.sum(1)).ravel() > 0).all()
    return adata


@pytest.fixture
def cellbench_copy(cellbench):
    """A fresh, modifiable copy of ``cellbench`` for one test."""
    return cellbench.copy()


@pytest.fixture(scope="session")
def trained_model(cellbench):
    """ONE small RNA model trained on cellbench, shared by the whole session.

    ``batch_key="batch"``, 10 latent dims, 50 epochs (KL warm-up 5), batch size 128,
    no early stopping (so the history has exactly 50 rows). Tests must not retrain it
    or modify ``trained_model.data``.
    """
    import sclatent

    adata = cellbench.copy()
    sclatent.SCLatent.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = sclatent.SCLatent(adata, n_latent=N_LATENT, seed=0)
    model.train(
        max_epochs=TRAIN_EPOCHS,
        batch_size=128,
        lr=5e-3,
        early_stopping=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        seed=0,
    )
    return model


@pytest.fixture(scope="session")
def trained_latent(trained_model) -> np.ndarray:
    """Posterior means of the trained model on its training cells."""
    return trained_model.get_latent_representation()


@pytest.fixture(scope="session")
def log_normalized(cellbench) -> np.ndarray:
    """Dense ``log1p(normalize_total(X, 1e4))`` of ``cellbench`` (scanpy), float64."""
    import scanpy as sc

    adata = cellbench.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return np.asarray(adata.X.toarray(), dtype=np.float64)

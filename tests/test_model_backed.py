"""Data read from disk (``backed="r"``): the same model as in memory, read per batch."""

from __future__ import annotations

import hashlib
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sclatent
from sclatent.config import TrainConfig

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md.set_options(pull_on_update=False)
        return sclatent.datasets.mop_snareseq2()


@pytest.mark.parametrize("dense", [False, True])
def test_backed_anndata_trains_exactly_like_in_memory(mop, tmp_path, dense):
    adata = mop.mod["rna"][:400].copy()
    if dense:
        adata.X = adata.X.toarray()
    adata.write_h5ad(tmp_path / "rna.h5ad")
    before = _digest(tmp_path / "rna.h5ad")
    backed = ad.read_h5ad(tmp_path / "rna.h5ad", backed="r")
    for a in (adata, backed):
        sclatent.SCLatent.setup_anndata(a, batch_key="batch")
    in_memory, on_disk = sclatent.SCLatent(adata, seed=0, n_latent=5), sclatent.SCLatent(backed, seed=0, n_latent=5)
    assert on_disk._tensors.backed and not in_memory._tensors.backed
    torch.testing.assert_close(on_disk._tensors.log_library, in_memory._tensors.log_library)
    options = dict(QUIET, max_epochs=3, batch_size=64, block_size=1)  # the same batches as in memory
    in_memory.train(**options)
    on_disk.train(**options)
    np.testing.assert_array_equal(on_disk.history["train_loss"].to_numpy(), in_memory.history["train_loss"].to_numpy())
    z = on_disk.get_latent_representation(backed, key_added="X_sclatent")
    np.testing.assert_array_equal(z, in_memory.get_latent_representation(adata))
    assert backed.obsm["X_sclatent"].shape == (400, 5)  # written back as for data in memory
    expr = on_disk.get_normalized_expression(backed, gene_list=list(adata.var_names[:5]))
    assert expr.shape == (400, 5) and np.isfinite(expr.to_numpy()).all()
    backed.file.close()
    assert _digest(tmp_path / "rna.h5ad") == before  # the file is never written to


def _tree_digest(root) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_zarr_store_is_read_from_disk_exactly_like_memory(mop, tmp_path):
    """A zarr store opened with open_zarr: counts stay on disk (read per batch), training
    and outputs equal the in-memory model's, results go into the AnnData, the store is untouched."""
    adata = mop.mod["rna"][:300].copy()
    adata.layers["counts"] = adata.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(tmp_path / "rna.zarr")
    before = _tree_digest(tmp_path / "rna.zarr")
    on_disk_data = sclatent.data.open_zarr(tmp_path / "rna.zarr")
    from anndata.abc import CSRDataset

    assert isinstance(on_disk_data.X, CSRDataset) and isinstance(on_disk_data.layers["counts"], CSRDataset)
    assert list(on_disk_data.obs_names) == list(adata.obs_names)
    for a in (adata, on_disk_data):
        sclatent.SCLatent.setup_anndata(a, batch_key="batch", layer="counts")
    in_memory, on_disk = sclatent.SCLatent(adata, seed=0, n_latent=5), sclatent.SCLatent(on_disk_data, seed=0, n_latent=5)
    assert on_disk._tensors.backed and not in_memory._tensors.backed
    options = dict(QUIET, max_epochs=2, batch_size=64, block_size=1)
    in_memory.train(**options)
    on_disk.train(**options)
    np.testing.assert_array_equal(on_disk.history["train_loss"].to_numpy(), in_memory.history["train_loss"].to_numpy())
    z = on_disk.get_latent_representation(on_disk_data, key_added="X_sclatent")
    np.testing.assert_array_equal(z, in_memory.get_latent_representation(adata))
    assert on_disk_data.obsm["X_sclatent"].shape == (300, 5)
    assert _tree_digest(tmp_path / "rna.zarr") == before
    with pytest.raises(ValueError, match="not a zarr store"):
        sclatent.data.open_zarr(tmp_path / "missing.zarr")


def test_backed_data_default_to_blocks_of_contiguous_cells():
    assert TrainConfig().resolve(1000, 1, backed=True).block_size == 64
    assert TrainConfig().resolve(1000, 1).block_size == 1
    assert TrainConfig(block_size=8).resolve(1000, 1, backed=True).block_size == 8
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        TrainConfig(block_size=0).resolve(1000, 1)


def test_backed_mudata_with_unpaired_cells_reads_what_memory_has(mop, tmp_path):
    rna, atac = mop.mod["rna"], mop.mod["atac"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = sclatent.data.organize_multiome(
            paired=(rna[:100].copy(), atac[:100].copy()), rna=rna[100:200].copy(), atac=atac[200:300].copy()
        )
        mdata.write(tmp_path / "m.h5mu")
        backed = md.read_h5mu(tmp_path / "m.h5mu", backed=True)
    for m in (mdata, backed):
        sclatent.SCLatent.setup_mudata(m, modalities={"rna": "rna", "atac": "atac"})
    mem, disk = sclatent.SCLatent(mdata, seed=0), sclatent.SCLatent(backed, seed=0)
    assert disk._tensors.backed
    torch.testing.assert_close(disk._tensors.observed, mem._tensors.observed)
    torch.testing.assert_close(disk._tensors.log_library, mem._tensors.log_library)
    idx = torch.tensor([0, 150, 250, 99, 100, 299])  # paired, RNA-only, ATAC-only cells
    a, b = mem._tensors.batch(idx), disk._tensors.batch(idx)
    for name in ("rna", "atac"):
        torch.testing.assert_close(b.counts[name], a.counts[name], rtol=0, atol=0)
        torch.testing.assert_close(b.log_factorial[name], a.log_factorial[name])
    disk.train(**QUIET, max_epochs=2)
    assert len(disk.history) == 2 and np.isfinite(disk.history["train_loss"]).all()
    acc = disk.get_accessibility_estimates(backed, region_list=list(atac.var_names[:4]))
    assert acc.shape == (300, 4)


def test_backed_csc_and_bad_values_are_refused_with_the_fix(tmp_path):
    x = sp.random(40, 10, density=0.5, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 3)
    x = x + sp.csr_matrix(np.eye(40, 10, dtype=np.float32))  # no empty cell
    csc = ad.AnnData(x.tocsc())
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match=r"stored on disk as CSC.*tocsr\(\)"):
        sclatent.SCLatent.setup_anndata(ad.read_h5ad(tmp_path / "csc.h5ad", backed="r"))
    bad = x.copy()
    bad.data[3] = 1.5
    ad.AnnData(bad).write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="non-integer values"):
        sclatent.SCLatent.setup_anndata(ad.read_h5ad(tmp_path / "bad.h5ad", backed="r"))


def test_mudata_zarr_store_with_unpaired_cells_trains_like_memory(mop, tmp_path):
    """A MuData zarr store (paired, RNA-only and ATAC-only cells, peak-gene links in varp)
    opened with open_zarr: every modality's counts on disk, the same batches, training loss
    and latents as in memory, results in the returned MuData, the store untouched."""
    from anndata.abc import CSRDataset

    rna, atac = mop.mod["rna"], mop.mod["atac"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = sclatent.data.organize_multiome(
            paired=(rna[:100].copy(), atac[:100].copy()), rna=rna[100:200].copy(), atac=atac[200:300].copy()
        )
        mdata.varp["links"] = sp.identity(mdata.n_vars, format="csr")
        mdata.uns["note"] = "kept"
        mdata.write_zarr(tmp_path / "m.zarr")
    before = _tree_digest(tmp_path / "m.zarr")
    on_disk_data = sclatent.data.open_zarr(tmp_path / "m.zarr")
    assert all(isinstance(on_disk_data.mod[k].X, CSRDataset) for k in ("rna", "atac"))
    assert list(on_disk_data.obs_names) == list(mdata.obs_names) and on_disk_data.uns["note"] == "kept"
    assert on_disk_data.varp["links"].nnz == mdata.n_vars
    for m in (mdata, on_disk_data):
        sclatent.SCLatent.setup_mudata(m, modalities={"rna": "rna", "atac": "atac"})
    mem, disk = sclatent.SCLatent(mdata, seed=0, n_latent=5), sclatent.SCLatent(on_disk_data, seed=0, n_latent=5)
    assert disk._tensors.backed and not mem._tensors.backed
    torch.testing.assert_close(disk._tensors.observed, mem._tensors.observed)
    idx = torch.tensor([0, 150, 250, 99, 100, 299])  # paired, RNA-only, ATAC-only cells
    a, b = mem._tensors.batch(idx), disk._tensors.batch(idx)
    for name in ("rna", "atac"):
        torch.testing.assert_close(b.counts[name], a.counts[name], rtol=0, atol=0)
    options = dict(QUIET, max_epochs=2, batch_size=64, block_size=1)
    mem.train(**options)
    disk.train(**options)
    np.testing.assert_array_equal(disk.history["train_loss"].to_numpy(), mem.history["train_loss"].to_numpy())
    z = disk.get_latent_representation(on_disk_data, key_added="X_sclatent")
    np.testing.assert_array_equal(z, mem.get_latent_representation(mdata))
    assert on_disk_data.obsm["X_sclatent"].shape == (300, 5)
    assert _tree_digest(tmp_path / "m.zarr") == before
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not an AnnData or MuData zarr store"):
        import zarr

        zarr.open_group(str(tmp_path / "plain"), mode="w")
        sclatent.data.open_zarr(tmp_path / "plain")

"""The data layer: row gathers from CSR storage, index batches, and the JSON registry."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import matrix_digest
from sclatent.data import CellTensors, DataRegistry, IndexBatches, ModalityMatrix, ModalityRegistry
from sclatent.data.tensors import BackedMatrix
from sclatent.data.registry import REGISTRY_FORMAT_VERSION
from sclatent.batch import Covariates


# ------------------------------------------------------------------------ ModalityMatrix
def _sparse_storage(matrix) -> ModalityMatrix:
    """A ModalityMatrix that stores CSR (forced with ``dense_limit_bytes=0`` where that option exists)."""
    if "dense_limit_bytes" in inspect.signature(ModalityMatrix).parameters:
        return ModalityMatrix(matrix, dense_limit_bytes=0)
    return ModalityMatrix(matrix)


def _dense_rows(mm: ModalityMatrix, idx) -> torch.Tensor:
    out = mm.rows(torch.as_tensor(np.ascontiguousarray(idx), dtype=torch.long))
    return out[0] if isinstance(out, tuple) else out


def _counts(n=60, g=25, density=0.15, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n, g)) * (rng.random((n, g)) < density)
    x[[i for i in (3, 10, 11) if i < n] + [n - 1]] = 0  # empty rows, the last one included
    return x.astype(np.float32)


def test_csr_rows_equal_dense_rows_for_random_and_repeated_indices():
    x = _counts()
    mm = _sparse_storage(sp.csr_matrix(x))
    assert getattr(mm, "dense", None) is None  # really the CSR path
    rng = np.random.default_rng(1)
    for idx in (
        rng.integers(0, len(x), 200),  # random, with many repeats
        np.array([5, 5, 5, 0, 5]),
        np.array([3, 7, 3, 10, 59, 11]),  # empty rows mixed in
        np.arange(len(x))[::-1],
        np.array([len(x) - 1]),
    ):
        got = _dense_rows(mm, idx)
        assert got.dtype == torch.float32 and got.shape == (len(idx), x.shape[1])
        np.testing.assert_array_equal(got.numpy(), x[idx])


def test_rows_of_an_all_empty_batch_and_of_no_cells():
    x = _counts()
    mm = _sparse_storage(sp.csr_matrix(x))
    got = _dense_rows(mm, [3, 10, 11, 3])
    assert got.shape == (4, x.shape[1]) and not got.any()
    assert _dense_rows(mm, np.zeros(0, dtype=np.int64)).shape == (0, x.shape[1])
    out = mm.rows(torch.tensor([3, 10]))
    if isinstance(out, tuple):  # the COO part of an empty batch is empty
        assert all(len(t) == 0 for t in out[1])


def test_coo_part_reconstructs_the_dense_rows():
    x = _counts()
    mm = _sparse_storage(sp.csr_matrix(x))
    idx = torch.tensor([4, 4, 0, 3, 20, 59, 1])
    out = mm.rows(idx)
    if not isinstance(out, tuple):
        pytest.skip("rows() of this version returns only the dense block")
    dense, (row, col, val) = out
    rebuilt = torch.zeros_like(dense)
    rebuilt.index_put_((row, col), val, accumulate=True)
    assert torch.equal(rebuilt, dense)
    assert (val != 0).all()
    assert int((dense != 0).sum()) == len(val)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_csr_csc_and_dense_inputs_give_identical_rows(dtype):
    x = _counts(seed=2).astype(dtype)
    idx = np.random.default_rng(3).integers(0, len(x), 80)
    ref = _dense_rows(_sparse_storage(sp.csr_matrix(x)), idx)
    for matrix in (sp.csc_matrix(x), x, np.asfortranarray(x), sp.coo_matrix(x)):
        assert torch.equal(_dense_rows(_sparse_storage(matrix), idx), ref), type(matrix).__name__
    np.testing.assert_array_equal(ref.numpy(), x[idx].astype(np.float32))


def test_unsorted_indices_explicit_zeros_and_duplicates_are_handled_and_input_untouched():
    """A non-canonical CSR (as some tools write it) gives the same rows as its dense form."""
    data = np.array([1, 0, 2, 3, 4, 5], dtype=np.float32)
    indices = np.array([2, 0, 1, 0, 2, 2], dtype=np.int32)  # row 0 unsorted; row 1 has a duplicate (2, 2)
    indptr = np.array([0, 2, 6, 6], dtype=np.int32)  # row 2 empty
    m = sp.csr_matrix((data, indices, indptr), shape=(3, 3))
    digest = matrix_digest(m)
    expected = m.toarray()  # duplicates summed: row 1 = [3, 2, 9]
    np.testing.assert_array_equal(expected[1], [3, 2, 9])
    mm = _sparse_storage(m)
    np.testing.assert_array_equal(_dense_rows(mm, [0, 1, 2, 1]).numpy(), expected[[0, 1, 2, 1]])
    assert matrix_digest(m) == digest, "ModalityMatrix modified the caller's matrix in place"


def test_modality_matrix_to_device_keeps_rows():
    x = _counts()
    mm = _sparse_storage(sp.csr_matrix(x)).to("cpu")
    np.testing.assert_array_equal(_dense_rows(mm, [1, 2, 3]).numpy(), x[[1, 2, 3]])


def test_cell_tensors_batch_gathers_every_field():
    x = _counts(n=12, g=6, density=0.6)
    tensors = CellTensors(
        counts={"rna": _sparse_storage(sp.csr_matrix(x))},
        observed=torch.ones(12, 1),
        log_library=torch.log(torch.as_tensor(x.sum(1).clip(1))).unsqueeze(1),
        covariates=Covariates({"batch": torch.arange(12) % 3}, torch.arange(12.0).unsqueeze(1), ("depth",)),
    )
    idx = torch.tensor([9, 2, 2])
    b = tensors.batch(idx)
    assert b.n_cells == 3
    np.testing.assert_array_equal(b.counts["rna"].numpy(), x[[9, 2, 2]])
    assert b.covariates.code("batch").tolist() == [0, 2, 2]
    assert b.covariates.continuous[:, 0].tolist() == [9.0, 2.0, 2.0]
    torch.testing.assert_close(b.log_library, tensors.log_library[idx])
    # the batch is a copy: editing it leaves the dataset alone
    b.covariates.code("batch")[:] = 1
    assert tensors.covariates.code("batch")[9] == 0


# ------------------------------------------------------------------------- BackedMatrix
def _h5_matrix(tmp_path, matrix, dense: bool):
    import h5py

    f = h5py.File(tmp_path / "m.h5", "w")
    if dense:
        f.create_dataset("X", data=matrix.toarray())
    else:
        g = f.create_group("X")
        g["indptr"], g["indices"], g["data"] = matrix.indptr, matrix.indices, matrix.data
    return f["X"]


@pytest.mark.parametrize("dense", [False, True])
def test_backed_rows_equal_the_in_memory_rows(tmp_path, dense):
    rng = np.random.default_rng(0)
    x = sp.random(300, 40, density=0.2, format="csr", random_state=1, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    mem = ModalityMatrix(x)
    backed = BackedMatrix(_h5_matrix(tmp_path, x, dense), 40, mem.log_factorial, gap=8)
    for idx in (torch.tensor([5, 3, 100, 101, 299, 0]), torch.as_tensor(rng.permutation(300)[:64]), torch.arange(10, 20)):
        (dm, cm), (db, cb) = mem.rows(idx), backed.rows(idx)
        torch.testing.assert_close(db, dm, rtol=0, atol=0)
        for a, b in zip(cm, cb):
            assert torch.equal(a, b)  # the same COO, rows in the order asked


def test_backed_rows_with_cells_lacking_the_modality_and_reordered_features(tmp_path):
    """A MuData modality: dataset cell -> row of the file (-1: no such cell), and the file's
    columns in another order than the model's, one of them not a model feature."""
    x = sp.random(50, 12, density=0.3, format="csr", random_state=2, dtype=np.float32)
    x.data = np.ceil(x.data * 4)
    row_of_cell = np.full(80, -1)
    cells_with = np.sort(np.random.default_rng(3).permutation(80)[:50])
    row_of_cell[cells_with] = np.arange(50)
    column_map = np.array([3, 0, 1, -1, 2, 4, 5, 6, 7, 8, 9, 10])  # file column -> model feature
    backed = BackedMatrix(_h5_matrix(tmp_path, x, False), 11, torch.zeros(80), row_of_cell, column_map)
    expected = np.zeros((80, 11), dtype=np.float32)
    keep = column_map >= 0
    expected[np.ix_(cells_with, column_map[keep])] = x.toarray()[:, keep]
    idx = torch.tensor([0, 79, 40, 41, 3, 17, 60])
    dense, (rows, cols, values) = backed.rows(idx)
    np.testing.assert_array_equal(dense.numpy(), expected[idx.numpy()])
    rebuilt = np.zeros_like(expected[idx.numpy()])
    rebuilt[rows.numpy(), cols.numpy()] = values.numpy()
    np.testing.assert_array_equal(rebuilt, expected[idx.numpy()])
    assert bool((rows[1:] >= rows[:-1]).all())  # row-sorted, as the sparse likelihood needs


def test_in_memory_storage_uses_int32_indices_where_they_fit():
    x = sp.random(100, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    mm = ModalityMatrix(x)
    assert mm.col.dtype == torch.int32 and mm.crow.dtype == torch.int32
    _, (rows, cols, _) = mm.rows(torch.arange(5))
    assert cols.dtype == torch.long  # widened per batch


# --------------------------------------------------------------------------- IndexBatches
def _epoch(batches: IndexBatches, epoch: int = 0) -> list[torch.Tensor]:
    batches.set_epoch(epoch)
    return list(iter(batches))


@pytest.mark.parametrize("block_size", [1, 7])
@pytest.mark.parametrize("n,batch_size", [(103, 10), (64, 64), (5, 128), (1, 1)])
def test_every_index_exactly_once_per_epoch(n, batch_size, block_size):
    indices = torch.arange(1000, 1000 + n)
    b = IndexBatches(indices, batch_size, shuffle=True, seed=3, block_size=block_size)
    for epoch in range(3):
        parts = _epoch(b, epoch)
        assert len(parts) == len(b) == -(-n // batch_size)
        assert all(len(p) <= batch_size for p in parts) and all(len(p) == batch_size for p in parts[:-1])
        assert torch.equal(torch.cat(parts).sort().values, indices)


def test_shuffle_changes_order_across_epochs_and_is_deterministic_for_a_seed_and_epoch():
    indices = torch.arange(500)
    a = IndexBatches(indices, 64, shuffle=True, seed=11)
    b = IndexBatches(indices, 64, shuffle=True, seed=11)
    c = IndexBatches(indices, 64, shuffle=True, seed=12)
    a_epochs = [torch.cat(_epoch(a, e)) for e in range(3)]
    b_epochs = [torch.cat(_epoch(b, e)) for e in (0, 1, 2)]
    c_first = torch.cat(_epoch(c))
    for ea, eb in zip(a_epochs, b_epochs):
        assert torch.equal(ea, eb)
    assert not torch.equal(a_epochs[0], a_epochs[1]) and not torch.equal(a_epochs[1], a_epochs[2])
    assert not torch.equal(a_epochs[0], c_first)
    assert not torch.equal(a_epochs[0], indices)  # really shuffled
    # the order is a function of the epoch alone: a resumed run (a fresh sampler at epoch 2) draws the same
    fresh = IndexBatches(indices, 64, shuffle=True, seed=11)
    assert torch.equal(torch.cat(_epoch(fresh, 2)), a_epochs[2])


def test_order_is_drawn_when_iteration_starts_not_when_the_iterator_is_made():
    b = IndexBatches(torch.arange(100), 10, shuffle=True, seed=0)
    it = iter(b)  # Lightning makes the first iterator before it sets the epoch
    b.set_epoch(4)
    assert torch.equal(torch.cat(list(it)), torch.cat(_epoch(IndexBatches(torch.arange(100), 10, shuffle=True, seed=0), 4)))


def test_no_shuffle_keeps_the_given_order():
    indices = torch.tensor([7, 3, 9, 1, 4])
    b = IndexBatches(indices, 2, shuffle=False)
    assert [p.tolist() for p in _epoch(b)] == [[7, 3], [9, 1], [4]]
    assert [p.tolist() for p in _epoch(b, 1)] == [[7, 3], [9, 1], [4]]


def _read_spans(part: torch.Tensor, gap: int) -> tuple[int, int]:
    """(number of reads, cells read) when a batch's cells are read in spans that bridge gaps <= gap."""
    values = part.sort().values
    breaks = torch.nonzero(values[1:] - values[:-1] > gap).squeeze(1)
    firsts = torch.cat([values[:1], values[breaks + 1]])
    lasts = torch.cat([values[breaks], values[-1:]])
    return len(firsts), int((lasts - firsts + 1).sum())


def test_blocks_keep_reads_contiguous_and_windows_mix_them():
    indices = torch.arange(4096)
    b = IndexBatches(indices, 256, shuffle=True, seed=1, block_size=64, window=1024)
    for epoch in range(2):
        for part in _epoch(b, epoch):
            reads, cells = _read_spans(part, 64)
            assert reads <= 16 and cells <= 1024  # the <= 16 blocks of its window, read whole
            assert reads >= 4  # and the window mixed several blocks into it
    free = IndexBatches(indices, 256, shuffle=True, seed=1)
    _, cells = _read_spans(_epoch(free)[0], 64)
    assert cells > 3000  # block_size=1: cells drawn from everywhere


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_shards_are_disjoint_fixed_and_equal_length(world_size, block_size):
    indices = torch.arange(101)
    shards, lengths = [], set()
    for rank in range(world_size):
        b = IndexBatches(indices, 8, shuffle=True, seed=5, rank=rank, world_size=world_size, block_size=block_size)
        e0, e1 = torch.cat(_epoch(b, 0)), torch.cat(_epoch(b, 1))
        assert not torch.equal(e0, e1) and set(e0.tolist()) == set(e1.tolist())  # reshuffled within its fixed shard
        lengths.add((len(e0), len(b)))
        shards.append(set(e0.tolist()))
    assert len(lengths) == 1  # every rank runs as many batches over as many cells
    n_rank, n_batches = lengths.pop()
    assert n_rank >= -(-101 // world_size) - block_size and n_batches == -(-n_rank // 8)
    assert set().union(*shards) == set(indices.tolist())  # every cell is some rank's
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not shards[i] & shards[j]  # and only one rank's


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size"):
        IndexBatches(torch.arange(4), 0)
    with pytest.raises(ValueError, match="block_size"):
        IndexBatches(torch.arange(4), 2, block_size=0)
    with pytest.raises(ValueError, match="rank"):
        IndexBatches(torch.arange(4), 2, rank=2, world_size=2)


# --------------------------------------------------------------------------- DataRegistry
def _registry() -> DataRegistry:
    names = ("g1", "g2", "g3")
    return DataRegistry(
        kind="mudata",
        modalities=(
            ModalityRegistry("rna", "rna", "rna", "counts", names, "abc"),
            ModalityRegistry("atac", "atac", "atac", None, ("chr1:1-10", "chr1:20-30"), "def"),
        ),
        batch_key="batch",
        labels_key="cell_type",
        categorical_covariate_keys=("donor",),
        continuous_covariate_keys=("pct_mito",),
        categories={"batch": ("b0", "b1"), "cell_type": ("T", "B", "NK"), "donor": ("d1",)},
        modality_key="mods",
        package_version="0.1.0",
    )


def test_registry_json_round_trip():
    reg = _registry()
    text = reg.to_json()
    assert isinstance(text, str)
    back = DataRegistry.from_json(text)
    assert back == reg
    assert back.modality("atac").var_names == ("chr1:1-10", "chr1:20-30")
    assert back.modality("rna").n_features == 3
    assert back.categorical_keys == ("batch", "donor")
    assert back.n_categories == {"batch": 2, "donor": 1}
    assert back.obs_keys == ("batch", "donor", "pct_mito", "mods")
    assert back.to_json() == text
    assert DataRegistry.from_dict(reg.to_dict()) == reg


def test_registry_of_format_1_gets_the_kinds_its_names_stood_for():
    d = _registry().to_dict()
    d["format_version"] = 1
    d["modalities"] = [{k: v for k, v in m.items() if k != "kind"} for m in d["modalities"]]
    d["modalities"].append({**d["modalities"][0], "name": "adt", "mod_key": "adt"})
    back = DataRegistry.from_dict(d)
    assert back.format_version == REGISTRY_FORMAT_VERSION
    assert [m.kind for m in back.modalities] == ["rna", "atac", "counts"]


def test_registry_rejects_other_format_versions_and_unknown_modalities():
    d = _registry().to_dict()
    d["format_version"] = REGISTRY_FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="format version"):
        DataRegistry.from_dict(d)
    with pytest.raises(KeyError, match="rna"):
        _registry().modality("protein")


def test_log_factorial_is_the_per_cell_sum_of_lgamma_x_plus_1_and_follows_batches():
    from scipy.special import gammaln

    rng = np.random.default_rng(7)
    x = rng.poisson(2.0, size=(9, 6)).astype(np.float32)
    x[[0, 7, 8]] = 0  # empty rows, trailing ones included
    m = ModalityMatrix(sp.csr_matrix(x))
    np.testing.assert_allclose(m.log_factorial.numpy(), gammaln(x + 1.0).sum(1), rtol=1e-6)
    tensors = CellTensors({"rna": m}, torch.ones(9, 1), torch.zeros(9, 1), Covariates.empty(9))
    idx = torch.tensor([8, 3, 3, 0])
    np.testing.assert_allclose(tensors.batch(idx).log_factorial["rna"].numpy(), gammaln(x[[8, 3, 3, 0]] + 1.0).sum(1), rtol=1e-6)

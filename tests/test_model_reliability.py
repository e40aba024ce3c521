"""No silent failure, nothing of the user's lost: each fault ends in a clear error or a recovered state.

Each test names the fault it covers ("item N" of the reliability list in the docstring).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

import sclatent
from sclatent import train as training
from sclatent.model import _io

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


def _counts(n: int = 120, g: int = 60, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(n, g)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.var_names = [f"g{i}" for i in range(g)]
    adata.obs["batch"] = np.where(np.arange(n) % 2, "a", "b")
    return adata


@pytest.fixture
def small():
    adata = _counts()
    sclatent.SCLatent.setup_anndata(adata, batch_key="batch")
    return adata


@pytest.fixture
def model(small):
    return sclatent.SCLatent(small, n_latent=3, n_hidden=16).train(max_epochs=3, batch_size=32, **QUIET)


# ----------------------------------------------------------------------------- saving
def test_overwrite_replaces_only_the_model_files_and_refuses_other_folders(model, tmp_path):
    """Item 1: overwrite=True never deletes the user's files."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not part of a saved model \(\['notes.txt'\]\).*never deletes"):
        model.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and sorted(os.listdir(folder)) == ["notes.txt"]
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True)
    assert sorted(os.listdir(tmp_path / "m")) == ["manifest.json", "model.safetensors"]


def _fail_on_call(monkeypatch, module, name: str, k: int):
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise OSError(f"injected failure in {name} call {k}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("target, k", [("save_file", 1), ("_sha256", 1), ("replace", 1), ("replace", 2), ("replace", 3), ("replace", 4)])
def test_a_failure_at_any_write_or_rename_step_leaves_the_previous_model(small, model, tmp_path, monkeypatch, target, k):
    """Items 6 and fault injection: fail at each step of an overwrite; the old model still loads the same."""
    path = tmp_path / "m"
    model.save(path)
    before = sclatent.SCLatent.load(path, small).get_latent_representation()
    other = sclatent.SCLatent(small, n_latent=3, n_hidden=16, seed=7)  # different weights
    module = _io.os if target == "replace" else _io
    _fail_on_call(monkeypatch, module, target, k)
    with pytest.raises(OSError, match="injected failure"):
        other.save(path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors"]  # no temporary or backup files
    np.testing.assert_array_equal(sclatent.SCLatent.load(path, small).get_latent_representation(), before)


def test_a_failed_first_save_leaves_no_folder(model, tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, _io, "save_file", 1)
    with pytest.raises(OSError):
        model.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_saved_models_follow_the_umask(model, tmp_path):
    """Item 7: folder and files get the user's umask, and an overwrite keeps the folder's mode."""
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "m")
        assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o755
        for f in ("manifest.json", "model.safetensors"):
            assert stat.S_IMODE(os.stat(tmp_path / "m" / f).st_mode) == 0o644
        os.chmod(tmp_path / "m", 0o750)
        model.save(tmp_path / "m", overwrite=True)
        assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o750
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- loading
def test_corrupted_or_non_finite_weights_are_refused(small, model, tmp_path):
    """Item 5: the manifest's checksum catches flipped bytes; non-finite weights are refused."""
    path = tmp_path / "m"
    model.save(path)
    raw = bytearray((path / "model.safetensors").read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(len(raw) // 2, len(raw), 200):
        raw[i] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the checksum"):
        sclatent.SCLatent.load(path, small)
    # NaN weights with a matching checksum (as a broken training would write them)
    model.save(path, overwrite=True)
    state = load_file(str(path / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][0] = float("nan")
    save_file(state, str(path / "model.safetensors"))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["weights_sha256"] = _io._sha256(path / "model.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"non-finite \(NaN or infinite\) weights"):
        sclatent.SCLatent.load(path, small)


def _edit(manifest: dict, how: str):
    if how == "missing key":
        del manifest["registry"]
    elif how == "unknown key":
        manifest["extra"] = 1
    elif how == "n_latent":
        manifest["init_args"]["n_latent"] = 7
    elif how == "gene list":
        manifest["registry"]["modalities"][0]["var_names"][0] = "not-a-gene"
    elif how == "init_args type":
        manifest["init_args"] = ["n_latent", 3]
    return json.dumps(manifest)


@pytest.mark.parametrize(
    "how, message",
    [
        ("garbage", "is not valid JSON"),
        ("empty", "is not valid JSON"),
        ("list", "holds a JSON list"),
        ("missing key", r"missing keys \['registry'\]"),
        ("unknown key", r"unknown keys \['extra'\]"),
        ("n_latent", "weights do not match the architecture"),
        ("gene list", "feature names of modality 'rna' were edited"),
        ("init_args type", "damaged or were edited"),
    ],
)
def test_a_malformed_manifest_gives_one_clear_error(small, model, tmp_path, how, message):
    """Item 5: garbage, empty, a list, missing/unknown keys, edited values: a ValueError naming the file."""
    path = tmp_path / "m"
    model.save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    raw = {"garbage": "{not json", "empty": "", "list": "[1, 2]"}
    text = raw[how] if how in raw else _edit(manifest, how)
    (path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        sclatent.SCLatent.load(path, small)
    assert "m" in str(err.value)


def test_new_data_without_the_batch_column_is_a_clear_error(small, model, tmp_path):
    """Item 11: a missing batch column on load or on new data names the column."""
    model.save(tmp_path / "m")
    new = small.copy()
    del new.obs["batch"]
    with pytest.raises(ValueError, match=r"obs lacks the column\(s\) \['batch'\]"):
        sclatent.SCLatent.load(tmp_path / "m", new)
    with pytest.raises(ValueError, match=r"obs lacks the column\(s\) \['batch'\]"):
        model.get_latent_representation(new)


# ----------------------------------------------------------------------------- training
def test_divergence_stops_with_an_error_and_restores_the_last_finite_weights(small):
    """Item 2: train(lr=1e3) used to return a NaN model; now it raises and the model stays usable."""
    model = sclatent.SCLatent(small, n_latent=3, n_hidden=16)
    with pytest.raises(training.TrainingDivergedError, match=r"diverged in epoch \d+.*learning rate") as err:
        model.train(max_epochs=20, lr=1e3, batch_size=32, **QUIET)
    assert len(model.history) == err.value.epoch  # the finished, finite epochs
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.module.parameters())
    assert np.isfinite(model.get_latent_representation()).all()


def test_too_few_cells_to_train_is_a_clear_error():
    """Item 4: one cell with the default validation split, or validation_size=0.999."""
    one = _counts(n=1)
    sclatent.SCLatent.setup_anndata(one)
    with pytest.raises(ValueError, match=r"No cells left to train on: 1 cell\(s\)"):
        sclatent.SCLatent(one, n_latent=2, n_hidden=8).train(max_epochs=1, **QUIET)
    many = _counts(n=100)
    sclatent.SCLatent.setup_anndata(many)
    model = sclatent.SCLatent(many, n_latent=2, n_hidden=8)
    with pytest.raises(ValueError, match="No cells left to train on"):
        model.train(max_epochs=1, validation_size=0.999, **QUIET)
    assert not model.is_trained


def test_training_leaves_the_global_random_state_alone(small):
    """Item 8: train() no longer reseeds the global torch RNG, and stays deterministic."""
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = sclatent.SCLatent(small, n_latent=3, n_hidden=16).train(max_epochs=2, batch_size=32, **QUIET)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(99)
    b = sclatent.SCLatent(small, n_latent=3, n_hidden=16).train(max_epochs=2, batch_size=32, **QUIET)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())


def test_the_best_validation_weights_are_returned(small, monkeypatch):
    """Item 9: the model keeps the weights of its lowest validation loss, and history says which epoch."""
    snapshots = {}

    class Keep(training.pl.Callback):
        def on_train_epoch_end(self, trainer, plan):
            snapshots[trainer.current_epoch] = {k: v.clone() for k, v in plan.module.state_dict().items()}

    model = sclatent.SCLatent(small, n_latent=3, n_hidden=16)
    model.train(max_epochs=12, lr=2e-2, batch_size=16, validation_size=0.3, early_stopping=False, callbacks=[Keep()], **QUIET)
    best = int(model.history["validation_loss"].idxmin())
    assert model.history["kept"].sum() == 1 and bool(model.history["kept"].loc[best])
    for k, v in model.module.state_dict().items():
        torch.testing.assert_close(v, snapshots[best][k], rtol=0, atol=0)


def test_ctrl_c_keeps_the_finished_epochs_and_returns_a_usable_model(small, monkeypatch):
    """Item 10: a KeyboardInterrupt mid-training is a warning, not a SystemExit."""
    real = training.TrainingPlan.training_step

    def interrupting(self, idx, batch_idx):
        if self.current_epoch == 2:
            raise KeyboardInterrupt
        return real(self, idx, batch_idx)

    monkeypatch.setattr(training.TrainingPlan, "training_step", interrupting)
    handler = signal.getsignal(signal.SIGINT)
    model = sclatent.SCLatent(small, n_latent=3, n_hidden=16)
    with pytest.warns(RuntimeWarning, match=r"interrupted after 2 finished epoch\(s\).*weights of epoch [01]"):
        model.train(max_epochs=10, batch_size=32, **QUIET)
    assert len(model.history) == 2 and model.is_trained and model.history["kept"].sum() == 1
    assert np.isfinite(model.get_latent_representation()).all()
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again


# ----------------------------------------------------------------------------- input checks
def test_every_stored_value_is_checked():
    """Item 3: 200 negative or fractional values among 1.5M stored values are found (the check was sampled)."""
    rng = np.random.default_rng(0)
    x = sp.random(3000, 1000, density=0.5, format="csr", random_state=0, dtype=np.float32)
    x.data = np.floor(x.data * 10) + 1
    for bad, message in ((-1.0, "negative values"), (0.5, "non-integer values")):
        adata = ad.AnnData(x.copy())
        adata.X.data[rng.choice(adata.X.nnz, 200, replace=False)] = bad
        with pytest.raises(ValueError, match=message):
            sclatent.SCLatent.setup_anndata(adata)
    adata = ad.AnnData(x.copy())
    adata.X.data[rng.integers(adata.X.nnz)] = -1  # a single one
    with pytest.raises(ValueError, match="negative values"):
        sclatent.SCLatent.setup_anndata(adata)


def test_backed_data_float16_totals_and_continuous_batch_columns(tmp_path):
    """Item 11: backed AnnData (now read from disk), float16 totals beyond its range, a float column given as batch_key."""
    adata = _counts()
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    sclatent.SCLatent.setup_anndata(backed)  # read from disk per batch (tests/test_model_backed.py)
    assert sclatent.SCLatent(backed, n_latent=2, n_hidden=8)._tensors.backed
    dense = ad.AnnData(np.full((20, 50), 2000, dtype=np.float16))  # totals 100,000 > float16's 65,504
    sclatent.SCLatent.setup_anndata(dense)
    assert np.isfinite(sclatent.SCLatent(dense, n_latent=2, n_hidden=8)._tensors.log_library.numpy()).all()
    adata.obs["depth"] = np.random.default_rng(0).random(adata.n_obs)
    with pytest.raises(ValueError, match=r"float column with 120 distinct values.*continuous_covariate_keys"):
        sclatent.SCLatent.setup_anndata(adata, batch_key="depth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sclatent.SCLatent.setup_anndata(adata, batch_key="batch", continuous_covariate_keys=["depth"])

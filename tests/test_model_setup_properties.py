"""Property-based test of setup_anndata / setup_mudata (hypothesis): random storage formats and
dtypes, random bad values at random positions, random covariates. Every case either raises a
ValueError with a message or sets up, and the input is never changed (hash-checked)."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sclatent
from conftest import matrix_digest, mudata_of

BAD_VALUES = {"nan": np.nan, "inf": np.inf, "negative": -1.0, "fraction": 0.5}


def _digest(adata) -> str:
    h = hashlib.sha256(matrix_digest(adata.X).encode())
    for key in sorted(adata.layers):
        h.update(matrix_digest(adata.layers[key]).encode())
    for frame in (adata.obs, adata.var):
        h.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
        h.update(repr(list(frame.dtypes.astype(str))).encode())
    return h.hexdigest()


@st.composite
def count_matrices(draw, n_cells: int):
    n_features = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    dense = rng.poisson(draw(st.sampled_from([0.2, 1.0, 5.0])), size=(n_cells, n_features)).astype(np.float64)
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "int32", "int64"]))
    bad = draw(st.sampled_from([None, None, *BAD_VALUES]))
    if bad is not None and not (dtype.startswith("int") and bad != "negative"):
        positions = rng.choice(dense.size, size=draw(st.integers(1, 3)), replace=True)
        dense.flat[positions] = BAD_VALUES[bad]
    fmt = "dense" if dtype == "float16" else draw(st.sampled_from(["dense", "csr", "csc"]))  # scipy has no float16
    values = dense.astype(dtype)
    return values if fmt == "dense" else (sp.csr_matrix(values) if fmt == "csr" else sp.csc_matrix(values))


@st.composite
def annotated(draw, n_cells: int):
    adata = ad.AnnData(draw(count_matrices(n_cells)))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"f{i}" for i in range(adata.n_vars)]
    return adata


def _obs(draw, n_cells: int) -> tuple[pd.DataFrame, dict]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    obs["batch"] = rng.choice(["a", "b", "c"], n_cells).astype(object)
    obs["depth"] = rng.random(n_cells)
    if draw(st.booleans()):
        obs.iloc[rng.integers(n_cells), 0] = None  # a missing batch
    if draw(st.booleans()):
        obs.iloc[rng.integers(n_cells), 1] = np.nan  # a missing continuous value
    kwargs = {}
    if draw(st.booleans()):
        kwargs["batch_key"] = draw(st.sampled_from(["batch", "depth", "absent"]))
    if draw(st.booleans()):
        kwargs["continuous_covariate_keys"] = ["depth"]
    return obs, kwargs


def _outcome(setup, data, **kwargs) -> None:
    try:
        setup(data, **kwargs)
    except ValueError as err:
        assert len(str(err)) > 20, f"an error without a useful message: {err!r}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_setup_anndata_raises_a_clear_error_or_succeeds_and_never_changes_the_input(data):
    n = data.draw(st.integers(1, 25))
    adata = data.draw(annotated(n))
    obs, kwargs = _obs(data.draw, n)
    adata.obs = obs
    before = _digest(adata)
    _outcome(sclatent.SCLatent.setup_anndata, adata, **kwargs)
    assert _digest(adata) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_setup_mudata_raises_a_clear_error_or_succeeds_and_never_changes_the_input(data):
    n = data.draw(st.integers(2, 25))
    rna, atac = data.draw(annotated(n)), data.draw(annotated(n))
    drop = data.draw(st.integers(0, n - 1))
    atac = atac[drop:].copy()  # some cells RNA-only
    obs, kwargs = _obs(data.draw, n)
    mdata = mudata_of({"gex": rna, "peaks": atac}, obs)
    before = [_digest(mdata.mod[m]) for m in ("gex", "peaks")] + [pd.util.hash_pandas_object(mdata.obs).sum()]
    _outcome(sclatent.SCLatent.setup_mudata, mdata, modalities={"gex": "rna", "peaks": "atac"}, **kwargs)
    after = [_digest(mdata.mod[m]) for m in ("gex", "peaks")] + [pd.util.hash_pandas_object(mdata.obs).sum()]
    assert after == before

"""Torch building blocks: covariate injection, encoder and decoder shapes and invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sclatent.batch import Covariates
from sclatent.nn import CountDecoder, CovariateMLP, GaussianEncoder
from sclatent.nn.mlp import CovariateLinear


def _names(n_cats: tuple[int, ...]) -> dict[str, int]:
    return {f"cov{j}": k for j, k in enumerate(n_cats)}


def _covariates(n: int, n_cats: tuple[int, ...], n_cont: int, seed: int = 0) -> Covariates:
    g = torch.Generator().manual_seed(seed)
    cat = {name: torch.randint(0, k, (n,), generator=g) for name, k in _names(n_cats).items()}
    return Covariates(cat, torch.randn(n, n_cont, generator=g), tuple(f"u{j}" for j in range(n_cont)))


@pytest.mark.parametrize("n_cats,n_cont", [((3,), 0), ((3, 2), 0), ((4, 2), 3), ((), 2), ((), 0)])
def test_covariate_linear_equals_linear_on_concatenated_one_hots(n_cats, n_cont):
    torch.manual_seed(0)
    n, n_in, n_out = 17, 6, 5
    layer = CovariateLinear(n_in, n_out, _names(n_cats), n_cont).double()
    x = torch.randn(n, n_in, dtype=torch.float64)
    cov = _covariates(n, n_cats, n_cont)
    cov = Covariates(cov.categorical, cov.continuous.double(), cov.continuous_names)
    # the equivalent plain Linear on [x, onehot(c_1), ..., onehot(c_k), u]
    w = layer.weight.T  # stored (inputs, outputs)
    blocks = [w[:, :n_in]] + [emb.weight.T for emb in layer.embeddings] + [w[:, n_in:]]
    full = torch.nn.Linear(n_in + sum(n_cats) + n_cont, n_out).double()
    with torch.no_grad():
        full.weight.copy_(torch.cat(blocks, 1))
        full.bias.copy_(layer.bias)
    onehots = [F.one_hot(cov.code(name), k).double() for name, k in _names(n_cats).items()]
    expected = full(torch.cat([x, *onehots, cov.continuous], 1))
    torch.testing.assert_close(layer(x, cov), expected, rtol=1e-12, atol=1e-12)


def test_covariates_are_looked_up_by_name_not_position():
    """The embedding of covariate "batch" reads the "batch" codes whatever the dict order of the batch."""
    torch.manual_seed(0)
    layer = CovariateLinear(4, 3, {"batch": 2, "donor": 3}, 0)
    x = torch.randn(5, 4)
    batch, donor = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([2, 0, 1, 2, 0])
    a = layer(x, Covariates({"batch": batch, "donor": donor}, torch.zeros(5, 0)))
    b = layer(x, Covariates({"donor": donor, "batch": batch}, torch.zeros(5, 0)))
    torch.testing.assert_close(a, b)
    with pytest.raises(KeyError, match="No categorical covariate 'donor'"):
        layer(x, Covariates({"batch": batch}, torch.zeros(5, 0)))


def test_covariates_change_the_output_only_through_their_categories():
    torch.manual_seed(0)
    layer = CovariateLinear(4, 3, {"batch": 2}, 0)
    x = torch.randn(1, 4).expand(2, 4)
    out = layer(x, Covariates({"batch": torch.tensor([0, 1])}, torch.zeros(2, 0)))
    torch.testing.assert_close(out[1] - out[0], layer.embeddings[0].weight[1] - layer.embeddings[0].weight[0])
    # without covariates the layer is just its Linear
    torch.testing.assert_close(layer(x, None), x @ layer.weight + layer.bias)


def test_covariate_mlp_injects_into_every_layer_or_only_the_first():
    every = CovariateMLP(8, 16, n_layers=3, categorical={"batch": 2}, inject_covariates=True)
    first = CovariateMLP(8, 16, n_layers=3, categorical={"batch": 2}, inject_covariates=False)
    assert [len(layer.embeddings) for layer in every.layers] == [1, 1, 1]
    assert [len(layer.embeddings) for layer in first.layers] == [1, 0, 0]
    with pytest.raises(ValueError, match="n_layers"):
        CovariateMLP(8, 16, n_layers=0)


def test_encoder_output_shapes_and_logvar_range():
    torch.manual_seed(0)
    enc = GaussianEncoder(30, 7, n_hidden=16, n_layers=2, categorical=_names((3,)), n_continuous=1).eval()
    x = torch.randn(12, 30) * 1e3  # extreme inputs: the log-variance must stay clamped
    mean, logvar = enc(x, _covariates(12, (3,), 1))
    assert mean.shape == logvar.shape == (12, 7)
    assert torch.isfinite(mean).all()
    assert (logvar >= -12.0).all() and (logvar <= 8.0).all()


@pytest.mark.parametrize("zero_inflation", [False, True])
def test_decoder_shapes_and_log_rho_normalized(zero_inflation):
    torch.manual_seed(0)
    dec = CountDecoder(5, 40, n_hidden=16, n_layers=2, categorical=_names((2, 3)), n_continuous=1, zero_inflation=zero_inflation)
    cov = _covariates(9, (2, 3), 1)
    log_rho, zi = dec(torch.randn(9, 5), cov)
    assert log_rho.shape == (9, 40)
    torch.testing.assert_close(torch.logsumexp(log_rho, -1), torch.zeros(9), rtol=0, atol=1e-5)
    assert (log_rho <= 0).all()
    if zero_inflation:
        assert zi.shape == (9, 40)
    else:
        assert zi is None
    # a leading sample axis with covariates broadcast over it, as SCLatentModule.generative does
    k = 4
    z = torch.randn(k, 9, 5)
    cov_k = cov.expand(k)
    log_rho_k, _ = dec(z, cov_k)
    assert log_rho_k.shape == (k, 9, 40)
    torch.testing.assert_close(torch.logsumexp(log_rho_k, -1), torch.zeros(k, 9), rtol=0, atol=1e-5)
    torch.testing.assert_close(log_rho_k[2], dec(z[2], cov)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_cats,n_cont", [((3,), 2), ((), 0)])
def test_sparse_rows_input_gives_the_dense_output_and_gradients(n_cats, n_cont):
    """The embedding-bag path for sparse input equals the dense product, values and gradients."""
    from sclatent.nn import SparseRows

    torch.manual_seed(0)
    n, n_in, n_out = 9, 40, 6
    layer = CovariateLinear(n_in, n_out, _names(n_cats), n_cont).double()
    x = torch.rand(n, n_in, dtype=torch.float64) * (torch.rand(n, n_in) < 0.1)
    x[4] = 0  # a row without any nonzero entry
    rows, cols = x.nonzero(as_tuple=True)
    sparse = SparseRows.from_coo(rows, cols, x[rows, cols], n, n_in)
    torch.testing.assert_close(sparse.to_dense(), x)
    cov = _covariates(n, n_cats, n_cont)
    cov = Covariates(cov.categorical, cov.continuous.double(), cov.continuous_names)
    weights = torch.randn(n, n_out, dtype=torch.float64)
    (layer(x, cov) * weights).sum().backward()
    expected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    out = layer(sparse, cov)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, layer(x, cov))
    for p, e in zip(layer.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_encoder_input_dropout_only_in_training_and_for_sparse_rows_too():
    from sclatent.nn import SparseRows

    torch.manual_seed(0)
    enc = GaussianEncoder(50, 3, n_hidden=8, dropout_rate=0.0, input_dropout=0.5)
    x = torch.rand(6, 50) * (torch.rand(6, 50) < 0.3)
    rows, cols = x.nonzero(as_tuple=True)
    sparse = SparseRows.from_coo(rows, cols, x[rows, cols], 6, 50)
    enc.eval()
    torch.testing.assert_close(enc(x)[0], enc(sparse)[0])
    plain = GaussianEncoder(50, 3, n_hidden=8, dropout_rate=0.0)
    plain.load_state_dict(enc.state_dict())
    plain.eval()
    torch.testing.assert_close(enc(x)[0], plain(x)[0])  # no dropout at inference
    enc.train()
    assert not torch.allclose(enc(x)[0], plain(x)[0]) and not torch.allclose(enc(sparse)[0], plain(x)[0])
    with pytest.raises(ValueError, match="input_dropout"):
        GaussianEncoder(50, 3, input_dropout=1.0)

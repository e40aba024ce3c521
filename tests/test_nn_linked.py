"""Linked feature embeddings, their linear decoders and the modality discriminator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sclatent.batch import Covariates
from sclatent.nn.adversary import ModalityDiscriminator, reverse_gradient
from sclatent.nn.linked import EmbeddingDecoder, LinkedFeatureEmbeddings

PAIRS = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 3]])  # gene 0,1 -> peak 0; gene 1 -> peak 1; gene 2 -> peak 3
WEIGHTS = torch.tensor([1.0, 3.0, 0.5, 2.0])


def test_target_embedding_is_the_normalized_link_average_plus_residual():
    torch.manual_seed(0)
    emb = LinkedFeatureEmbeddings(4, n_source=3, n_target=5, links=PAIRS, weights=WEIGHTS)
    with torch.no_grad():
        emb.residual.normal_()
    source, residual = emb.source.detach().numpy(), emb.residual.detach().numpy()
    expected = residual.copy()
    expected[0] += 0.25 * source[0] + 0.75 * source[1]  # weights 1 and 3, normalized per peak
    expected[1] += source[1]
    expected[3] += source[2]
    np.testing.assert_allclose(emb("target").detach().numpy(), expected, rtol=1e-6)
    assert emb.linked.tolist() == [True, True, False, True, False]
    np.testing.assert_allclose(float(emb.residual_penalty()), (residual[[0, 1, 3]] ** 2).sum(1).mean(), rtol=1e-6)
    assert emb.n_links == 4


def test_unlinked_target_features_start_with_free_embeddings_and_linked_ones_on_their_genes():
    emb = LinkedFeatureEmbeddings(4, n_source=3, n_target=5, links=PAIRS, weights=WEIGHTS)
    assert torch.all(emb.residual[emb.linked] == 0)
    assert torch.all(emb.residual[~emb.linked].abs().sum(1) > 0)


@pytest.mark.parametrize(
    "pairs, weights, message",
    [
        (torch.tensor([[0, 3], [0, 1]]), torch.ones(2), "outside"),
        (torch.tensor([[0, 1], [0, 1]]), torch.tensor([1.0, -1.0]), "non-negative"),
        (torch.tensor([0, 1]), torch.ones(2), "index pairs"),
    ],
)
def test_bad_links_are_refused(pairs, weights, message):
    with pytest.raises(ValueError, match=message):
        LinkedFeatureEmbeddings(2, 3, 5, pairs, weights)


def test_embedding_decoder_is_a_softmax_of_scaled_inner_products_plus_biases():
    torch.manual_seed(1)
    dec = EmbeddingDecoder(3, 6, categorical={"batch": 2})
    with torch.no_grad():
        dec.log_scale.normal_()
        dec.bias.normal_()
        dec.covariate_bias[0].weight.normal_()
    z, v = torch.randn(4, 3), torch.randn(6, 3)
    codes = torch.tensor([0, 1, 1, 0])
    log_rho, zi = dec(z, Covariates({"batch": codes}, torch.zeros(4, 0)), v)
    logits = (z @ v.T) * dec.log_scale.exp() + dec.bias + dec.covariate_bias[0].weight[codes]
    torch.testing.assert_close(log_rho, torch.log_softmax(logits, -1))
    assert zi is None


def test_gradient_reversal_flips_the_gradient_only():
    x = torch.randn(5, requires_grad=True)
    y = reverse_gradient(x, 2.0)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), -2.0))


def test_adversarial_loss_is_class_balanced_cross_entropy_and_pushes_z_to_confuse():
    torch.manual_seed(2)
    disc = ModalityDiscriminator(2, 2, n_hidden=8, n_layers=1).eval()
    z = torch.randn(6, 2, requires_grad=True)
    modality = torch.tensor([0, 0, 0, 0, 1, 1])
    loss = disc.adversarial_loss(z, modality)
    ce = torch.nn.functional.cross_entropy(disc(z), modality, reduction="none")
    weight = torch.tensor([6 / 8] * 4 + [6 / 4] * 2)  # n / (classes * count)
    torch.testing.assert_close(loss, ce * weight)
    loss.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (torch.nn.functional.cross_entropy(disc(z2), modality, reduction="none") * weight).sum().backward()
    torch.testing.assert_close(z.grad, -z2.grad)  # the encoder side ascends the discriminator's loss


# ---------------------------------------------------------------- the statistic encoder
from sclatent.distributions import Poisson  # noqa: E402
from sclatent.nn import SparseRows, StatisticEncoder  # noqa: E402
from sclatent.nn.encoder import embedding_statistic  # noqa: E402


def _sparse(x: torch.Tensor) -> SparseRows:
    rows, cols = x.nonzero(as_tuple=True)
    return SparseRows.from_coo(rows, cols, x[rows, cols], x.shape[0], x.shape[1])


def test_embedding_statistic_is_the_count_weighted_mean_embedding_and_log_total():
    torch.manual_seed(2)
    x = torch.poisson(torch.rand(5, 9) * 2.0)
    x[3] = 0.0  # an empty cell: total clamped to 1
    u = torch.randn(9, 4)
    total = x.sum(1).clamp(min=1.0)
    expected = torch.cat([(x @ u) / total[:, None], total.log()[:, None]], 1)
    for given in (x, _sparse(x)):
        torch.testing.assert_close(embedding_statistic(given, u), expected)
    np.testing.assert_allclose(embedding_statistic(x, u)[0, :4].numpy(),
                               sum(x[0, f].item() * u[f].numpy() for f in range(9)) / x[0].sum().item(), rtol=1e-5)


def test_the_statistic_is_sufficient_for_a_linear_decoder_with_a_poisson_likelihood():
    """Why the encoder may read only ``(x U / N, N)``: two count vectors with the same statistic
    have log-likelihoods under :class:`EmbeddingDecoder` + Poisson that differ by a constant
    in ``z`` for a cell of a given batch (the batch's feature biases add ``x . b_s``, the same
    for every ``z``), so the same posterior, and the encoder gives them the same posterior;
    counts with another statistic get a difference that varies with ``z``."""
    torch.manual_seed(3)
    n_features, d = 12, 3
    dec = EmbeddingDecoder(d, n_features, categorical={"batch": 2})
    with torch.no_grad():
        dec.log_scale.normal_(0, 0.3)
        dec.bias.normal_()
        dec.covariate_bias[0].weight.normal_()
    v = torch.randn(n_features, d)
    u = dec.scaled(v)
    x = torch.poisson(torch.full((n_features,), 6.0)) + 3.0
    # a move along the null space of [U, 1]^T keeps x U and the total
    basis = torch.cat([u, torch.ones(n_features, 1)], 1).detach().double()
    null = torch.linalg.svd(basis.t(), full_matrices=True).Vh[d + 1 :]  # rows orthogonal to U's columns and to 1
    step = (null.t() @ torch.randn(null.shape[0], dtype=torch.float64)).float()
    x_same = x + 2.0 * step / step.abs().max()
    assert (x_same > 0).all()
    torch.testing.assert_close(x_same @ u, x @ u, atol=1e-4, rtol=1e-5)
    x_other = x.clone()
    x_other[0] += 2.0
    x_other[1] -= 2.0  # same total, another statistic
    z = torch.randn(8, d) * 2.0
    codes = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    cov = Covariates({"batch": codes}, torch.zeros(8, 0))
    with torch.no_grad():
        log_rho, _ = dec(z, cov, v)
        log_mu = log_rho + x.sum().log()

        def log_lik(counts):
            return Poisson(log_mu).log_prob(counts.expand(8, -1)).sum(-1)

        same, other = log_lik(x) - log_lik(x_same), log_lik(x) - log_lik(x_other)
    for code in (0, 1):
        in_batch = codes == code
        assert float(same[in_batch].std()) < 1e-4 * float(same[in_batch].abs().mean() + 1)
        assert float(other[in_batch].std()) > 0.1
    enc = StatisticEncoder(d, n_hidden=8).eval()
    with torch.no_grad():
        for a, b in zip(enc(x[None], None, u), enc(x_same[None], None, u)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_statistic_encoder_needs_the_embeddings_and_drops_counts_only_in_training():
    torch.manual_seed(4)
    enc = StatisticEncoder(3, n_hidden=8, input_dropout=0.5)
    x, u = torch.poisson(torch.rand(6, 10) * 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match="embedding="):
        enc(x)
    enc.eval()
    first = enc(_sparse(x), None, u)
    torch.testing.assert_close(enc(x, None, u), first)  # dense and sparse counts alike; no dropout in eval
    enc.train()
    enc.body.dropout.p = 0.0  # only the count dropout left
    drawn = [enc(x, None, u)[0] for _ in range(2)]
    assert not torch.allclose(drawn[0], drawn[1])
    assert enc.mean.in_features == 8 and enc.body.layers[0].n_in == 4  # d + 1 inputs

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

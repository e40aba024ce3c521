"""SCLatentModule: the likelihood of partly observed cells, batch subsets, and the objective."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclatent.data import CellTensors, ModalityMatrix
from sclatent.inference import GaussianPosterior
from sclatent.module import ModalitySpec, SCLatentModule
from sclatent.batch import Covariates


def _tensors(observed: np.ndarray, seed: int = 0) -> tuple[SCLatentModule, CellTensors]:
    rng = np.random.default_rng(seed)
    n = observed.shape[0]
    rna = rng.negative_binomial(2, 0.4, size=(n, 30)) * (rng.random((n, 30)) < 0.3)
    atac = rng.poisson(0.3, size=(n, 50))
    rna[observed[:, 0] == 0] = 0
    atac[observed[:, 1] == 0] = 0
    lib = np.stack([np.log(np.maximum(rna.sum(1), 1)), np.log(np.maximum(atac.sum(1), 1))], 1) * observed
    cov = Covariates({"batch": torch.as_tensor(rng.integers(0, 2, size=n))}, torch.zeros(n, 0))
    tensors = CellTensors(
        {"rna": ModalityMatrix(sp.csr_matrix(rna)), "atac": ModalityMatrix(sp.csr_matrix(atac))},
        torch.as_tensor(observed, dtype=torch.float32), torch.as_tensor(lib, dtype=torch.float32), cov,
    )
    torch.manual_seed(seed)
    module = SCLatentModule(
        (ModalitySpec("rna", 30, "nb", "feature-batch"), ModalitySpec("atac", 50, "poisson")), n_latent=4, n_hidden=16,
        categorical={"batch": 2}, batch_key="batch",
    )
    return module, tensors


OBSERVED = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [0, 1], [1, 0], [1, 1]], dtype=np.float32)


@pytest.mark.parametrize("n_samples", [None, 3])
def test_log_likelihood_of_partly_observed_cells_equals_the_dense_masked_sum(n_samples):
    module, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.arange(len(OBSERVED)))
    z = torch.randn(len(OBSERVED), 4) if n_samples is None else torch.randn(n_samples, len(OBSERVED), 4)
    expected = sum(
        dist.log_prob(batch.counts[name]).sum(-1) * batch.observed[:, j]
        for j, (name, dist) in enumerate(module.generative(z, batch).items())
    )
    np.testing.assert_allclose(module.log_likelihood(z, batch).detach().numpy(), expected.detach().numpy(), rtol=1e-4)


def test_subset_keeps_rows_and_reindexes_nonzeros():
    module, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.tensor([6, 2, 0, 5, 3]))
    rows = torch.tensor([1, 3, 4])
    sub = batch.subset(rows, ("rna",))
    assert list(sub.counts) == ["rna"] and list(sub.nonzero) == ["rna"]
    torch.testing.assert_close(sub.counts["rna"], batch.counts["rna"][rows])
    r, c, v = sub.nonzero["rna"]
    rebuilt = torch.zeros_like(sub.counts["rna"])
    rebuilt[r, c] = v
    torch.testing.assert_close(rebuilt, sub.counts["rna"])
    assert bool((r[1:] >= r[:-1]).all())  # row order kept (the segment sums rely on it)
    torch.testing.assert_close(sub.log_factorial["rna"], batch.log_factorial["rna"][rows])
    torch.testing.assert_close(sub.covariates.code("batch"), batch.covariates.code("batch")[rows])


def test_subset_elbos_only_touch_paired_cells():
    unpaired = OBSERVED[OBSERVED.sum(1) == 1]
    module, tensors = _tensors(unpaired)
    batch = tensors.batch(torch.arange(len(unpaired)))
    module.eval()
    torch.manual_seed(1)
    out = module.loss(batch, subset_weight=1.0)
    torch.manual_seed(1)
    without = module.loss(batch, subset_weight=0.0).loss
    torch.testing.assert_close(out.loss, without)  # no paired cell: the subset terms vanish
    # ... but they are there, as zeros: every batch has the same terms (what DDP logging needs)
    assert {"single_rna", "single_atac"} <= set(out.terms)
    assert all((out.terms[t].value == 0).all() for t in ("single_rna", "single_atac"))

    module, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.arange(len(OBSERVED)))
    module.train()
    out = module.loss(batch, subset_weight=1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in module.encoders.parameters() if p.dim() > 1)


@pytest.mark.parametrize("encoder_input", ["log1p", "normalized_log1p"])
def test_sparse_encoder_input_gives_the_dense_experts(encoder_input):
    """A batch sparse enough to be encoded as SparseRows gets the same experts as its dense form."""
    from dataclasses import replace

    import sclatent.module as module_lib

    rng = np.random.default_rng(3)
    n, g = 12, 400
    atac = rng.poisson(0.005, size=(n, g))
    atac[np.arange(n), rng.integers(0, g, n)] += 1  # every cell has some counts
    assert atac.astype(bool).mean() < module_lib.SPARSE_INPUT_MAX_DENSITY
    tensors = CellTensors(
        {"atac": ModalityMatrix(sp.csr_matrix(atac))}, torch.ones(n, 1), torch.as_tensor(np.log(atac.sum(1, keepdims=True)), dtype=torch.float32),
        Covariates.empty(n),
    )
    module = SCLatentModule((ModalitySpec("atac", g, "poisson"),), n_latent=3, n_hidden=8, encoder_input=encoder_input).eval()
    batch = tensors.batch(torch.arange(n))
    assert isinstance(module._encoder_input(0, module.modalities[0], batch), module_lib.SparseRows)
    sparse_means, sparse_logvars = module.experts(batch)
    dense_means, dense_logvars = module.experts(replace(batch, nonzero={}))  # no COO: the dense path
    torch.testing.assert_close(sparse_means, dense_means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_logvars, dense_logvars, rtol=1e-5, atol=1e-5)


def test_sleep_loss_matches_its_closed_form_for_constant_experts():
    """With experts that ignore their input, E_z[-sum_m log q_m(z)] has a closed form."""
    n = 4000
    observed = np.tile(OBSERVED, (n // len(OBSERVED) + 1, 1))[:n]
    module, tensors = _tensors(observed)
    batch = tensors.batch(torch.arange(n))
    expert_mean = {"rna": torch.tensor([0.5, -1.0, 0.0, 2.0]), "atac": torch.tensor([-0.3, 0.2, 1.0, 0.0])}
    expert_logvar = {"rna": torch.tensor([0.0, -1.0, 0.5, -2.0]), "atac": torch.tensor([-0.5, 0.0, 1.0, -1.0])}
    with torch.no_grad():
        for name, enc in module.encoders.items():
            enc.mean.weight.zero_(); enc.mean.bias.copy_(expert_mean[name])
            enc.logvar.weight.zero_(); enc.logvar.bias.copy_(expert_logvar[name])
    module.eval()
    q_mean, q_logvar = torch.tensor([0.2, 0.1, -0.5, 1.0]), torch.tensor([-1.0, -0.5, 0.0, -2.0])
    q = GaussianPosterior(q_mean.expand(n, 4), q_logvar.expand(n, 4))
    torch.manual_seed(0)
    with torch.no_grad():
        got = module.sleep_loss(batch, q).mean().item()
    expected = 0.0
    for name in ("rna", "atac"):  # each expert fused with the prior N(0, 1)
        precision = 1.0 + torch.exp(-expert_logvar[name])
        mean = expert_mean[name] * torch.exp(-expert_logvar[name]) / precision
        expected += float(0.5 * (np.log(2 * np.pi) - torch.log(precision) + precision * ((q_mean - mean) ** 2 + q_logvar.exp())).sum())
    assert got == pytest.approx(expected, rel=0.02)


def test_sleep_loss_trains_only_encoders_including_the_missing_modality_expert():
    rna_only = np.array([[1, 0]] * 6 + [[1, 1]], dtype=np.float32)  # one cell lends its ATAC library
    module, tensors = _tensors(rna_only)
    batch = tensors.batch(torch.arange(len(rna_only)))
    q = module.inference(batch).detach()
    module.sleep_loss(batch, q).sum().backward()
    assert all(p.grad is None for p in module.decoders.parameters())
    assert all(p.grad is None for p in module.log_theta.parameters())
    atac_grads = [p.grad for p in module.encoders["atac"].parameters() if p.dim() > 1]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in atac_grads)

    module.zero_grad(set_to_none=True)
    only_rna = np.array([[1, 0]] * 5, dtype=np.float32)  # no cell has ATAC: its expert is skipped
    module, tensors = _tensors(only_rna)
    batch = tensors.batch(torch.arange(5))
    loss = module.sleep_loss(batch, module.inference(batch).detach())
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(p.grad is None for p in module.encoders["atac"].parameters())


def test_sleep_loss_trains_the_experts_into_a_flow_posterior_not_the_flow():
    torch.manual_seed(0)
    module = SCLatentModule(
        (ModalitySpec("rna", 30, "nb"), ModalitySpec("atac", 50, "poisson")), n_latent=4, n_hidden=16, posterior="flow", n_flows=2,
    )
    _, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.arange(len(OBSERVED)))
    with torch.no_grad():  # a flow away from the identity, so that it shapes the density
        for layer in module.posterior_flow.layers:
            layer.net[-1].weight.normal_(0, 0.3)
    module.sleep_loss(batch, module.inference(batch).detach()).sum().backward()
    assert all(p.grad is None for p in module.posterior_flow.parameters())
    for name in ("rna", "atac"):
        grads = [p.grad for p in module.encoders[name].parameters() if p.dim() > 1]
        assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    module.zero_grad(set_to_none=True)
    module.loss(batch, sleep_weight=1.0).loss.backward()  # the ELBO terms still train the flow
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.posterior_flow.parameters() if p.dim() > 1)


@pytest.mark.parametrize("reuse", [True, False])
def test_sleep_draws_from_the_fused_decoding_have_the_law_of_fresh_draws(reuse):
    """Drawn from the fused ELBO's decoding (cells that have a modality) plus a decoding of
    the cells that lack it (at a donor's library), the sleep counts have the same means as
    draws from a fresh decoding: the cell's own library where it has the modality, the
    mean library of the cells that have it where not; entries sorted by row, then column."""
    module, tensors = _tensors(OBSERVED)
    n = len(OBSERVED)
    batch = tensors.batch(torch.arange(n))
    module.eval()
    torch.manual_seed(0)
    z = torch.randn(n, 4)
    decoded = {}
    with torch.no_grad():
        module.log_likelihood(z, batch, decoded=decoded)
        gen = module.generative(z, batch)
    assert decoded["atac"][0].tolist() == [0, 2, 3, 4, 6]  # a mixed batch: only the ATAC cells were decoded
    captured = {"rna": [], "atac": []}
    original = module._counts_to_encoder_input

    def capture(m, log_library, dense=None, nonzero=None):
        captured[m.name].append(nonzero)
        return original(m, log_library, dense, nonzero)

    module._counts_to_encoder_input = capture
    q = GaussianPosterior(z, torch.full_like(z, -40.0))  # a point mass at z, for the fresh draws
    reps = 3000
    with torch.no_grad():
        for _ in range(reps):
            module.sleep_loss(batch, q, fused=(z, decoded) if reuse else None)
    for j, name in enumerate(("rna", "atac")):
        g = gen[name].mean.shape[1]
        draws = torch.zeros(reps, n, g)
        for r, (rows, cols, values) in enumerate(captured[name]):
            key = rows * g + cols
            assert bool((key[1:] > key[:-1]).all())
            draws[r, rows, cols] = values
        have = batch.observed[:, j] != 0
        donor_library = batch.log_library[have, j].exp().mean()
        expected = torch.where(have[:, None], gen[name].mean, gen[name].mean * donor_library)  # absent: library 1 there
        se = draws.std(0) / reps**0.5
        assert float(((draws.mean(0) - expected).abs() / (se + 1e-3)).max()) < 5.0
        torch.testing.assert_close(draws.mean(0).sum(1), expected.sum(1), rtol=0.05, atol=0.05)


def test_loss_adds_the_weighted_sleep_term():
    module, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.arange(len(OBSERVED)))
    module.eval()
    torch.manual_seed(2)
    base = module.loss(batch, sleep_weight=0.0)
    torch.manual_seed(2)
    with_sleep = module.loss(batch, sleep_weight=0.5)
    assert "sleep" not in base.terms and with_sleep.terms["sleep"].weight == 0.5
    torch.testing.assert_close(with_sleep.loss, base.loss + 0.5 * with_sleep.terms["sleep"].value.mean())


def test_loss_is_the_weighted_sum_of_its_named_terms():
    """fused ELBO + single-expert ELBOs of the paired cells (0 for the others) + sleep, by name."""
    module, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.arange(len(OBSERVED)))
    module.eval()
    out = module.loss(batch, kl_weight=0.3, subset_weight=0.7, sleep_weight=0.2)
    assert list(out.terms) == ["fused", "single_rna", "single_atac", "sleep"]
    assert [t.weight for t in out.terms.values()] == [1.0, 0.7, 0.7, 0.2]
    expected = sum(t.weight * t.value.mean() for t in out.terms.values())
    torch.testing.assert_close(out.loss, expected)
    unpaired = torch.as_tensor(OBSERVED.sum(1) < 2)
    for name in ("single_rna", "single_atac"):
        assert (out.terms[name].value[unpaired] == 0).all() and (out.terms[name].value[~unpaired] != 0).all()
    # the fused term at KL weight 0.3 is -(reconstruction - 0.3 kl) per cell
    torch.testing.assert_close(out.terms["fused"].value.detach(), -(out.reconstruction - 0.3 * out.kl))
    metrics = out.metrics()
    assert set(metrics) == {"loss", "reconstruction", "kl", "elbo", "fused", "single_rna", "single_atac", "sleep"}
    torch.testing.assert_close(metrics["elbo"], (out.reconstruction - out.kl).mean())
    names, sums = out.cell_sums()  # what the training plan accumulates: one tensor per batch
    for name, total in zip(names, sums):
        torch.testing.assert_close(total / len(OBSERVED), metrics[name])


def test_sampled_subset_term_is_one_experts_term_times_their_number():
    """subset_sampling="one": each paired cell carries the single-expert term of one of its
    experts (both drawn across steps) times 2, the others 0; unpaired cells 0; unbiased."""
    module, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.arange(len(OBSERVED)))
    module.eval()
    with torch.no_grad():  # near-point experts: every draw of z is the expert's mean, so terms compare exactly
        for enc in module.encoders.values():
            enc.logvar.weight.zero_()
            enc.logvar.bias.fill_(-25.0)
    full = module.loss(batch, kl_weight=0.3, subset_weight=1.0).terms
    paired = torch.as_tensor(OBSERVED.sum(1) == 2)
    counts = torch.zeros(len(OBSERVED), 2)
    for step in range(40):
        terms = module.loss(batch, kl_weight=0.3, subset_weight=1.0, subset_sampling="one").terms
        assert list(terms) == list(full)
        values = torch.stack([terms["single_rna"].value, terms["single_atac"].value], 1).detach()
        assert (values[~paired] == 0).all()
        assert ((values[paired] != 0).sum(1) == 1).all()  # one expert per paired cell
        expected = 2.0 * torch.stack([full["single_rna"].value, full["single_atac"].value], 1).detach()
        drawn = values != 0
        torch.testing.assert_close(values[drawn], expected[drawn], rtol=1e-3, atol=1e-3)
        counts += drawn
    assert (counts[paired] > 5).all()  # both experts are drawn for every paired cell
    with pytest.raises(ValueError, match="subset_sampling"):
        module.loss(batch, subset_sampling="some")


def test_batches_without_dense_blocks_give_the_same_loss_and_gradients():
    """Poisson ATAC trains from its COO nonzeros alone (no 100 MB dense block at 100k peaks)."""
    module, tensors = _tensors(OBSERVED)
    assert module.dense_count_modalities == ("rna",)  # NB reads dense counts, Poisson does not
    idx = torch.arange(len(OBSERVED))
    lean = tensors.batch(idx, module.dense_count_modalities)
    full = tensors.batch(idx)
    assert lean.counts["atac"] is None and full.counts["atac"] is not None
    losses, grads = [], []
    for batch in (lean, full):
        torch.manual_seed(3)
        module.zero_grad()
        out = module.loss(batch, sleep_weight=1.0)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({k: p.grad.clone() for k, p in module.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


def test_every_parameter_gets_a_gradient_when_a_batch_lacks_a_modality():
    """What DDP needs: a batch of RNA-only cells still puts the ATAC decoder in the graph."""
    module, tensors = _tensors(OBSERVED)
    rna_only = torch.tensor([1, 5])
    batch = tensors.batch(rna_only, module.dense_count_modalities)
    assert batch.rows.present["atac"].numel() == 0
    module.loss(batch, sleep_weight=1.0).loss.backward()
    missing = [k for k, p in module.named_parameters() if p.grad is None]
    assert not missing


def test_pair_term_is_the_symmetric_kl_between_a_paired_cells_experts():
    """The ``pair`` term: KL(q_rna||q_atac) + KL(q_atac||q_rna) of each expert with the prior,
    against torch.distributions; 0 for cells with one modality."""
    from torch.distributions import Normal, kl_divergence

    from sclatent.inference import poe

    module, tensors = _tensors(OBSERVED)
    batch = tensors.batch(torch.arange(len(OBSERVED)))
    module.eval()
    out = module.loss(batch, pair_weight=0.4)
    assert out.terms["pair"].weight == 0.4
    means, logvars = module.experts(batch)
    expected = torch.zeros(len(OBSERVED))
    for i, row in enumerate(OBSERVED):
        if row.sum() < 2:
            continue
        q = []
        for j in range(2):
            one = torch.zeros(1, 2)
            one[0, j] = 1.0
            m, lv = poe(means[:, i : i + 1], logvars[:, i : i + 1], one)
            q.append(Normal(m, (0.5 * lv).exp()))
        expected[i] = (kl_divergence(q[0], q[1]) + kl_divergence(q[1], q[0])).sum()
    torch.testing.assert_close(out.terms["pair"].value.detach(), expected)
    assert (expected[OBSERVED.sum(1) == 2] > 0).all()
    assert "pair" not in module.loss(batch).terms  # off by default
    # the term's gradient reaches the encoders only
    out.terms["pair"].value.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in module.decoders.parameters())
    assert any(p.grad is not None and p.grad.any() for p in module.encoders.parameters())


def _linked_module(linked_encoder: str, atac: str = "poisson") -> SCLatentModule:
    from sclatent.module import FeatureLinks

    links = FeatureLinks("rna", "atac", torch.tensor([[0, 1, 2, 2], [0, 1, 2, 3]]), torch.ones(4))
    torch.manual_seed(0)
    return SCLatentModule(
        (ModalitySpec("rna", 30, "nb", "feature-batch"), ModalitySpec("atac", 50, atac)), n_latent=4, n_hidden=16,
        categorical={"batch": 2}, batch_key="batch", feature_links=links, linked_encoder=linked_encoder, input_dropout=0.3,
    )


@pytest.mark.parametrize(
    "linked_encoder, atac, expected",
    [("auto", "poisson", ("atac",)), ("auto", "nb", ()), ("statistic", "poisson", ("rna", "atac")), ("features", "poisson", ())],
)
def test_linked_encoder_chooses_which_experts_read_the_feature_embeddings(linked_encoder, atac, expected):
    from sclatent.nn import StatisticEncoder

    module = _linked_module(linked_encoder, atac)
    assert module.statistic_modalities == expected
    for name, encoder in module.encoders.items():
        assert isinstance(encoder, StatisticEncoder) == (name in expected)


def test_a_statistic_expert_reads_the_decoders_embeddings_without_training_them():
    """The ATAC expert is an MLP on ``[x U / N, log N]`` with ``U`` the ATAC decoder's scaled
    embeddings (detached); the ELBO still trains the embeddings through the decoders."""
    module, tensors = _tensors(OBSERVED)
    linked = _linked_module("auto")
    linked.eval()
    batch = tensors.batch(torch.arange(len(OBSERVED)), linked.dense_count_modalities)
    means, logvars = linked.experts(batch)
    rows, cols, values = batch.nonzero["atac"]
    x = torch.zeros(len(OBSERVED), 50).index_put_((rows, cols), values)
    u = linked.decoders["atac"].scaled(linked.feature_embeddings("target")).detach()
    total = x.sum(1).clamp(min=1.0)
    statistic = torch.cat([x @ u / total[:, None], total.log()[:, None]], 1)
    h = linked.encoders["atac"].body(statistic)
    torch.testing.assert_close(means[1], linked.encoders["atac"].mean(h))
    linked.zero_grad()
    means[1].sum().backward()
    assert linked.feature_embeddings.source.grad is None and linked.feature_embeddings.residual.grad is None
    assert linked.encoders["atac"].mean.weight.grad is not None
    linked.train()
    linked.loss(batch, sleep_weight=1.0).loss.backward()
    assert linked.feature_embeddings.residual.grad.abs().sum() > 0  # through the decoder


def test_an_unknown_linked_encoder_is_refused():
    with pytest.raises(ValueError, match="linked_encoder must be one of"):
        _linked_module("embeddings")

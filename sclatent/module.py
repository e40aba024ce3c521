"""The generative model and its amortized inference as one :class:`torch.nn.Module`.

The contract follows scvi-tools' best idea: ``inference(batch) -> q(z)``,
``generative(z, batch) -> p(x | z)``, ``loss(batch) -> LossOutput``. Tensors in, tensors
out; nothing here knows about AnnData.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from .batch import CellBatch
from .distributions import CountLikelihood, NegativeBinomial, Poisson, likelihood_kind
from .inference import CouplingFlow, FlowPosterior, GaussianPosterior, importance_log_weights, log_mean_exp, poe, refine_posterior
from .inference.learned import LearnedRefiner, jittered_starts, unrolled_elbos
from .inference.refine import REFINE_METHODS
from .nn import CountDecoder, GaussianEncoder, SparseRows, StatisticEncoder
from .nn.adversary import ModalityDiscriminator
from .nn.linked import EmbeddingDecoder, LinkedFeatureEmbeddings
from .nn.mlp import CategoryEmbedding, extend_categories

#: values of ``linked_encoder`` (see :class:`SCLatentModule`)
LINKED_ENCODERS = ("features", "statistic", "auto")
#: ways of estimating the single-expert ELBOs of paired cells (``loss(subset_sampling=...)``)
SUBSET_SAMPLING = ("all", "one")

__all__ = ["CellBatch", "FeatureLinks", "LossOutput", "LossTerm", "ModalitySpec", "SCLatentModule", "metric_means"]
# encoders read a batch as sparse rows (an embedding bag) below this fraction of nonzeros:
# measured 4x faster than the dense product at 0.4 % (ATAC peaks), slower at 10 % (RNA)
SPARSE_INPUT_MAX_DENSITY = 0.02
_DISPERSIONS = {"feature", "feature-batch"}
POSTERIORS = ("diagonal", "flow")
#: a diagonal Gaussian, or one pushed through a flow (:mod:`sclatent.inference.flow`)
Posterior = GaussianPosterior | FlowPosterior


@dataclass(frozen=True)
class ModalitySpec:
    """What the module needs to know about one modality.

    Parameters
    ----------
    name
        Modality name, e.g. ``"rna"`` or ``"atac"``.
    n_features
        Number of features (genes, peaks).
    likelihood
        A name of :data:`~sclatent.distributions.LIKELIHOODS` (``"nb"``, ``"zinb"``,
        ``"poisson"``, ``"zip"``, ``"bernoulli"``).
    dispersion
        ``"feature"`` (one inverse dispersion per feature) or ``"feature-batch"``
        (per feature and batch); used by ``"nb"`` and ``"zinb"``.
    feature_factor
        Learn a per-feature multiplicative factor applied after the softmax (frees the
        expected total from the observed one; useful for binarized ATAC).
    """

    name: str
    n_features: int
    likelihood: str = "nb"
    dispersion: str = "feature"
    feature_factor: bool = False

    def __post_init__(self):
        likelihood_kind(self.likelihood, f" for modality {self.name!r}")
        if self.dispersion not in _DISPERSIONS:
            raise ValueError(f"Unknown dispersion {self.dispersion!r} for modality {self.name!r}; choose one of {sorted(_DISPERSIONS)}.")


@dataclass(frozen=True)
class FeatureLinks:
    """Prior links between the features of two modalities (e.g. genes and peaks).

    Parameters
    ----------
    source, target
        Modality names: ``pairs[0]`` indexes the source's features (genes), ``pairs[1]``
        the target's (peaks).
    pairs
        ``(2, nnz)`` integer index pairs.
    weights
        ``(nnz,)`` non-negative weights.
    """

    source: str
    target: str
    pairs: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class LossTerm:
    """One named term of the objective.

    Parameters
    ----------
    value
        ``(n,)`` per-cell contribution (to be minimized; 0 for cells the term does not
        concern), so that the batch's term is ``value.mean()``.
    weight
        Its weight in the loss.
    adversarial
        The term is one side of a min-max game (the modality discriminator, whose gradient
        is reversed into the encoders): it is optimized but not part of the objective that
        validation, early stopping and model selection monitor.
    """

    value: torch.Tensor
    weight: float = 1.0
    adversarial: bool = False


@dataclass
class LossOutput:
    """The objective of one batch as a list of named terms.

    ``loss = sum_t weight_t * terms[t].value.mean()`` is what the optimizer minimizes;
    ``objective`` is the same sum without the adversarial terms, the number validation
    and early stopping monitor (logged as ``loss``); ``reconstruction`` (log-likelihood,
    higher is better) and ``kl`` are those of the fused posterior at KL weight 1, per
    cell, detached; ``elbo = reconstruction - kl``.
    """

    terms: dict[str, LossTerm]
    reconstruction: torch.Tensor
    kl: torch.Tensor
    loss: torch.Tensor = field(init=False)
    objective: torch.Tensor = field(init=False)

    def __post_init__(self):
        weighted = {name: t.weight * t.value.mean() for name, t in self.terms.items() if t.weight}
        self.loss = sum(weighted.values())
        adversarial = [weighted[n] for n, t in self.terms.items() if t.adversarial and n in weighted]
        self.objective = self.loss - sum(adversarial) if adversarial else self.loss

    @property
    def elbo(self) -> torch.Tensor:
        """Per-cell ELBO of the fused posterior."""
        return self.reconstruction - self.kl

    def cell_sums(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """``(names, sums)``: the batch's sums over cells of the objective (as ``"loss"``,
        ``objective * n``), ``reconstruction``, ``kl`` and every term, as one detached
        tensor, so that a training step accumulates all its metrics in a single addition."""
        n = self.reconstruction.shape[0]
        per_cell = torch.stack([self.reconstruction, self.kl, *(t.value.detach() for t in self.terms.values())])
        return ("loss", "reconstruction", "kl", *self.terms), torch.cat([(self.objective.detach() * n).reshape(1), per_cell.sum(1)])

    def metrics(self) -> dict[str, torch.Tensor]:
        """Batch means (over cells) of :meth:`cell_sums`, plus ``elbo = reconstruction - kl``."""
        names, sums = self.cell_sums()
        return metric_means(names, sums, self.reconstruction.shape[0])


def metric_means(names: tuple[str, ...], sums: torch.Tensor, n_cells: int) -> dict[str, torch.Tensor]:
    """Means over ``n_cells`` of summed metrics (:meth:`LossOutput.cell_sums`), plus ``elbo``."""
    means = dict(zip(names, sums / n_cells))
    means["elbo"] = means["reconstruction"] - means["kl"]
    return means


def _statistic_is_sufficient(m: ModalitySpec) -> bool:
    """Whether a linear decoder's statistic ``(x U, N)`` is sufficient for ``m``'s likelihood (Poisson)."""
    kind = likelihood_kind(m.likelihood)
    return kind.base is Poisson and not kind.zero_inflated


class SCLatentModule(nn.Module):
    """Multimodal VAE with one encoder per modality fused by a product of experts.

    Parameters
    ----------
    modalities
        One :class:`ModalitySpec` per modality, in a fixed order.
    n_latent
        Latent dimension.
    n_hidden, n_layers
        Width and depth of every encoder and decoder.
    dropout_rate
        Dropout in the encoders.
    categorical
        Categorical covariate name -> number of categories (the batch among them).
    n_continuous
        Number of continuous covariates.
    batch_key
        Name of the categorical covariate that indexes ``"feature-batch"`` dispersions.
    encode_covariates
        Feed covariates to the encoders as well as the decoders.
    encoder_input
        ``"log1p"``: encoders see ``log1p(x)``; ``"normalized_log1p"``: they see
        ``log1p(1e4 * x / total)``, so sequencing depth (which the decoder gets as the
        size factor anyway) does not have to be explained by the latent space.
    input_dropout
        Dropout on the encoders' input features during training.
    feature_links
        Links between the features of two modalities. Their decoders become linear in
        ``z`` through shared feature embeddings (:mod:`sclatent.nn.linked`), which is
        what aligns cells measured in only one of them.
    link_weight
        Weight of the ``links`` term: the mean squared residual of a linked target
        feature's embedding from its source features' (0 leaves residuals free).
    align_weight
        Weight of the ``align`` term: an adversarial modality discriminator on the latent
        samples of single-modality cells (0: none).
    linked_encoder
        How the encoder of a linked modality reads its counts: ``"features"``, an MLP on
        the (``log1p``) features like every other encoder; ``"statistic"``, through the
        decoder's scaled feature embeddings (:class:`~sclatent.nn.StatisticEncoder`:
        ``[x U / N, log N]``, the statistic a linear decoder with a Poisson likelihood
        makes sufficient); ``"auto"``, the statistic for linked modalities with a Poisson
        likelihood (where it is exactly sufficient) and the features for the others.
        Unused without links.
    posterior
        ``"diagonal"``: the fused posterior is the product of experts' diagonal Gaussian;
        ``"flow"``: that Gaussian pushed through ``n_flows`` affine coupling layers
        conditioned on its parameters (:class:`~sclatent.inference.CouplingFlow`), the KL
        then estimated by Monte Carlo.
    n_flows
        Coupling layers of the flow posterior.
    """

    def __init__(
        self,
        modalities: tuple[ModalitySpec, ...],
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        categorical: dict[str, int] | None = None,
        n_continuous: int = 0,
        batch_key: str | None = None,
        encode_covariates: bool = False,
        encoder_input: str = "log1p",
        input_dropout: float = 0.0,
        feature_links: FeatureLinks | None = None,
        link_weight: float = 0.0,
        align_weight: float = 0.0,
        linked_encoder: str = "features",
        posterior: str = "diagonal",
        n_flows: int = 4,
    ):
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {list(POSTERIORS)}, got {posterior!r}.")
        self.posterior_flow = CouplingFlow(n_latent, n_flows) if posterior == "flow" else None
        #: the learned refiner (iterative amortized inference), added by :meth:`add_refiner`
        self.refiner: LearnedRefiner | None = None
        if encoder_input not in ("log1p", "normalized_log1p"):
            raise ValueError(f"encoder_input must be 'log1p' or 'normalized_log1p', got {encoder_input!r}.")
        self.encoder_input = encoder_input
        if not modalities:
            raise ValueError("At least one modality is required.")
        self.modalities = tuple(modalities)
        self.n_latent = n_latent
        categorical = dict(categorical or {})
        if batch_key is not None and batch_key not in categorical:
            raise ValueError(f"batch_key {batch_key!r} is not among the categorical covariates {list(categorical)}.")
        self.batch_key = batch_key
        enc_cats = categorical if encode_covariates else {}
        enc_cont = n_continuous if encode_covariates else 0
        self.link_roles = self._link_roles(feature_links)
        if linked_encoder not in LINKED_ENCODERS:
            raise ValueError(f"linked_encoder must be one of {list(LINKED_ENCODERS)}, got {linked_encoder!r}.")
        #: the modalities whose encoders read their counts through the feature embeddings
        self.statistic_modalities = tuple(
            m.name for m in self.modalities
            if m.name in self.link_roles and (linked_encoder == "statistic" or (linked_encoder == "auto" and _statistic_is_sufficient(m)))
        )
        self.encoders = nn.ModuleDict(
            {
                m.name: StatisticEncoder(
                    n_latent, n_hidden=n_hidden, n_layers=n_layers, categorical=enc_cats, n_continuous=enc_cont,
                    dropout_rate=dropout_rate, input_dropout=input_dropout,
                )
                if m.name in self.statistic_modalities
                else GaussianEncoder(m.n_features, n_latent, n_hidden, n_layers, enc_cats, enc_cont, dropout_rate, input_dropout)
                for m in self.modalities
            }
        )
        #: ``(source, target)`` modality names of the links, or ``None``.
        self.linked_modalities = None if feature_links is None else (feature_links.source, feature_links.target)
        self.feature_embeddings = None
        self._step_embeddings: dict[str, torch.Tensor] | None = None  # filled during one loss evaluation
        if feature_links is not None:
            sizes = {m.name: m.n_features for m in self.modalities}
            self.feature_embeddings = LinkedFeatureEmbeddings(
                n_latent, sizes[feature_links.source], sizes[feature_links.target], feature_links.pairs, feature_links.weights
            )
        self.decoders = nn.ModuleDict(
            {
                m.name: EmbeddingDecoder(
                    n_latent, m.n_features, categorical, n_continuous,
                    zero_inflation=likelihood_kind(m.likelihood).zero_inflated,
                )
                if m.name in self.link_roles
                else CountDecoder(
                    n_latent, m.n_features, n_hidden, n_layers, categorical, n_continuous,
                    zero_inflation=likelihood_kind(m.likelihood).zero_inflated,
                )
                for m in self.modalities
            }
        )
        self.link_weight = float(link_weight)
        self.align_weight = float(align_weight)
        if min(self.align_weight, self.link_weight) < 0:
            raise ValueError(f"align_weight and link_weight must be non-negative, got {align_weight} and {link_weight}.")
        self.discriminator = (
            ModalityDiscriminator(n_latent, len(self.modalities)) if self.align_weight > 0 and len(self.modalities) > 1 else None
        )
        self.log_theta = nn.ParameterDict()
        self.feature_factor = nn.ParameterDict()
        for m in self.modalities:
            if likelihood_kind(m.likelihood).dispersion:
                if m.dispersion == "feature-batch" and batch_key is None:
                    raise ValueError(f"modality {m.name!r} has 'feature-batch' dispersion but the module has no batch_key.")
                rows = categorical[batch_key] if m.dispersion == "feature-batch" else 1
                self.log_theta[m.name] = nn.Parameter(torch.zeros(rows, m.n_features))
            if m.feature_factor:
                self.feature_factor[m.name] = nn.Parameter(torch.zeros(m.n_features))

    # -------------------------------------------------------------- query mapping
    def extend_categories(self, n_categories: Mapping[str, int]) -> None:
        """Make room for new categories of the categorical covariates (a query's batches).

        Every covariate embedding keeps its rows fixed and gets trainable rows for the new
        categories, starting at the mean of the old ones
        (:meth:`~sclatent.nn.mlp.CategoryEmbedding.extended`); a per-batch dispersion gets
        rows at the mean of the old ones too.
        """
        extend_categories(self, n_categories)
        if self.batch_key in n_categories:
            for name, log_theta in self.log_theta.items():
                n_new = n_categories[self.batch_key] - log_theta.shape[0]
                if log_theta.shape[0] > 1 and n_new > 0:
                    rows = log_theta.detach().mean(0, keepdim=True).expand(n_new, -1)
                    self.log_theta[name] = nn.Parameter(torch.cat([log_theta.detach(), rows]))

    def trainable_for_query(self, fine_tune: Sequence[str] = ()) -> None:
        """Freeze every parameter but the new categories' embedding rows, and those of the
        parts named in ``fine_tune`` (``"encoders"``, ``"decoders"``)."""
        unknown = set(fine_tune) - {"encoders", "decoders"}
        if unknown:
            raise ValueError(f"fine_tune takes 'encoders' and/or 'decoders', got {sorted(unknown)}.")
        for p in self.parameters():
            p.requires_grad_(False)
        for layer in self.modules():
            if isinstance(layer, CategoryEmbedding) and layer.n_frozen and layer.weight.numel():
                layer.weight.requires_grad_(True)
        parts = {"encoders": [self.encoders, *([self.posterior_flow] if self.posterior_flow is not None else [])], "decoders": [self.decoders, self.log_theta, self.feature_factor]}
        if self.feature_embeddings is not None:
            parts["decoders"].append(self.feature_embeddings)
        for part in fine_tune:
            for sub in parts[part]:
                for p in sub.parameters():
                    p.requires_grad_(True)

    @property
    def modality_names(self) -> tuple[str, ...]:
        """The modalities' names, in model order (the columns of a batch's ``observed``)."""
        return tuple(m.name for m in self.modalities)

    @property
    def dense_count_modalities(self) -> tuple[str, ...]:
        """Modalities whose batches need a dense block of counts (their likelihood reads it);
        the others go by their COO nonzeros alone (an encoder input that needs a dense
        block is built from them)."""
        return tuple(m.name for m in self.modalities if likelihood_kind(m.likelihood).uses_dense_counts)

    def _link_roles(self, links: FeatureLinks | None) -> dict[str, str]:
        """Modality name -> ``"source"``/``"target"`` for the linked modalities (none without links)."""
        if links is None:
            return {}
        names = [m.name for m in self.modalities]
        for name in (links.source, links.target):
            if name not in names:
                raise ValueError(f"feature_links name modality {name!r}, which is not among {names}.")
        if links.source == links.target:
            raise ValueError("feature_links must link two different modalities.")
        return {links.source: "source", links.target: "target"}

    # ------------------------------------------------------------------ inference
    def experts(self, batch: CellBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every modality's expert on ``log1p`` counts: means and logvars, ``(M, n, d)`` each."""
        means, logvars = [], []
        for j, m in enumerate(self.modalities):
            mu, lv = self.encode(m.name, self._encoder_input(j, m, batch), batch.covariates)
            means.append(mu)
            logvars.append(lv)
        return torch.stack(means), torch.stack(logvars)

    def encode(self, name: str, x: torch.Tensor | SparseRows, cov) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert of modality ``name`` on its encoder input ``x`` (:meth:`_counts_to_encoder_input`):
        ``(mean, logvar)``. A statistic encoder reads the decoder's current scaled feature
        embeddings, detached: only the decoder's terms shape them."""
        if name not in self.statistic_modalities:
            return self.encoders[name](x, cov)
        embedding = self._feature_embedding(self.link_roles[name]).detach()
        with torch.no_grad():
            embedding = self.decoders[name].scaled(embedding)
        return self.encoders[name](x, cov, embedding)

    def _feature_embedding(self, role: str) -> torch.Tensor:
        """The shared feature embeddings of ``role`` (``"source"`` or ``"target"``); inside
        :meth:`loss` computed once per step (with autograd) and reused by every expert and
        decoder that reads them, detached where no gradient may reach them."""
        cache = self._step_embeddings
        if cache is None:
            return self.feature_embeddings(role)
        if role not in cache:
            cache[role] = self.feature_embeddings(role)
        return cache[role]

    def _encoder_input(self, j: int, m: ModalitySpec, batch: CellBatch) -> torch.Tensor | SparseRows:
        """``log1p`` of the (optionally depth-normalized) counts; as :class:`SparseRows` when
        the batch is sparser than :data:`SPARSE_INPUT_MAX_DENSITY` (ATAC), dense otherwise."""
        return self._counts_to_encoder_input(m, batch.log_library[:, j], batch.counts[m.name], batch.nonzero.get(m.name))

    def _counts_to_encoder_input(
        self,
        m: ModalitySpec,
        log_library: torch.Tensor,
        dense: torch.Tensor | None = None,
        nonzero: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | SparseRows:
        """Encoder input of counts given densely, by their (row-sorted) nonzero entries, or both
        (the raw counts for a statistic encoder, which makes its own input from them)."""
        n = log_library.shape[0]
        if m.name in self.statistic_modalities:
            if nonzero is not None:
                return SparseRows.from_coo(*nonzero, n, m.n_features)
            return dense
        scale = None if self.encoder_input == "log1p" else 1e4 * torch.exp(-log_library)
        if nonzero is not None and nonzero[2].numel() < SPARSE_INPUT_MAX_DENSITY * n * m.n_features:
            rows, cols, values = nonzero
            if scale is not None:
                values = values * scale.index_select(0, rows)
            return SparseRows.from_coo(rows, cols, torch.log1p(values), n, m.n_features)
        if dense is None:  # given by too many nonzeros for the sparse path
            rows, cols, values = nonzero
            dense = torch.zeros(n, m.n_features, dtype=values.dtype, device=values.device).index_put_((rows, cols), values)
        return torch.log1p(dense if scale is None else dense * scale[:, None])

    def posterior(self, mean: torch.Tensor, logvar: torch.Tensor, frozen_flow: bool = False) -> Posterior:
        """The posterior of this module's family with fused Gaussian ``N(mean, exp(logvar))``:
        that Gaussian, or its image through the flow (``frozen_flow``: the flow as a fixed
        map, its weights and its conditioning on the Gaussian get no gradient from it)."""
        base = GaussianPosterior(mean, logvar)
        return base if self.posterior_flow is None else FlowPosterior(base, self.posterior_flow, frozen_flow)

    def inference(self, batch: CellBatch, use: torch.Tensor | None = None) -> Posterior:
        """Fused posterior ``q(z | x)`` of the observed modalities (and the prior).

        Parameters
        ----------
        batch
            The cells.
        use
            Optional ``(n, M)`` or ``(M,)`` 0/1 mask further restricting which experts
            vote (e.g. only RNA); multiplied with ``batch.observed``.
        """
        means, logvars = self.experts(batch)
        mask = batch.observed if use is None else batch.observed * use
        return self.posterior(*poe(means, logvars, mask))

    # ----------------------------------------------------------------- generative
    def _decode(self, name: str, z: torch.Tensor, cov, detach: bool, normalize: bool = True):
        decoder = self.decoders[name]
        args = (z, cov)
        kwargs = {} if normalize else {"normalize": False}
        if name in self.link_roles:  # linear decoders of linked modalities share the feature embeddings
            embedding = self._feature_embedding(self.link_roles[name])
            args += (embedding.detach() if detach else embedding,)
        if not detach:
            return decoder(*args, **kwargs)
        params = {k: v.detach() for k, v in decoder.named_parameters()}
        return functional_call(decoder, params, args, kwargs)

    def generative(
        self, z: torch.Tensor, batch: CellBatch, modalities: tuple[str, ...] | None = None, detach_decoder: bool = False
    ) -> dict[str, CountLikelihood]:
        """``p(x_m | z, s)`` for each modality, as likelihood objects.

        ``z`` is ``(n, d)`` or ``(k, n, d)`` (``k`` samples per cell); the library size of
        modality ``m`` scales the decoded proportions. With ``detach_decoder`` no gradient
        reaches the decoder weights (used for the encoder's term in semi-amortized training).
        """
        cov = batch.covariates if z.dim() == 2 else batch.covariates.expand(z.shape[0])  # over the sample axis
        out = {}
        for j, m in enumerate(self.modalities):
            if modalities is not None and m.name not in modalities:
                continue
            kind = likelihood_kind(m.likelihood)
            # a Poisson of softmax proportions normalizes lazily (no dense log-softmax in training)
            # (so does a negative binomial: its log-likelihood is one fused pass from the logits)
            lazy = kind.base in (Poisson, NegativeBinomial) and not kind.zero_inflated and m.name not in self.feature_factor
            log_rho, zi_logits = self._decode(m.name, z, cov, detach_decoder, normalize=not lazy)
            if lazy:
                log_library = batch.log_library[:, j : j + 1]
                if kind.base is Poisson:
                    out[m.name] = Poisson.from_logits(log_rho, log_library, mean_total=log_library.squeeze(-1).exp())
                    continue
                out[m.name] = NegativeBinomial.from_logits(log_rho, log_library, self._log_theta(m.name, batch, detach_decoder))
                continue
            log_mu = log_rho + batch.log_library[:, j : j + 1]
            if m.name in self.feature_factor:
                factor = self.feature_factor[m.name]
                log_mu = log_mu + (factor.detach() if detach_decoder else factor)
            log_theta = self._log_theta(m.name, batch, detach_decoder) if kind.dispersion else None
            # without a feature factor the means sum to the library size exactly (softmax)
            total = None if m.name in self.feature_factor else batch.log_library[:, j].exp()
            out[m.name] = kind.build(log_mu, log_theta, zi_logits, mean_total=total)
        return out

    def _log_theta(self, name: str, batch: CellBatch, detach: bool) -> torch.Tensor:
        """The inverse dispersions of modality ``name`` for the cells of ``batch``: ``(1, g)``
        or, per batch, ``(n, g)``."""
        log_theta = self.log_theta[name]
        if detach:
            log_theta = log_theta.detach()
        if log_theta.shape[0] > 1:  # one row per batch
            log_theta = log_theta[batch.covariates.code(self.batch_key)]
        return log_theta

    def log_likelihood(
        self,
        z: torch.Tensor,
        batch: CellBatch,
        observed: torch.Tensor | None = None,
        detach_decoder: bool = False,
        decoded: dict[str, tuple[torch.Tensor | None, CountLikelihood]] | None = None,
    ) -> torch.Tensor:
        """``sum_m observed_m * log p(x_m | z)`` per cell: ``(n,)`` or ``(k, n)``.

        Uses the sparse form of the likelihood when the batch carries its nonzero entries.
        A ``decoded`` dict, when given, receives for each modality ``(rows, likelihood)``:
        the rows decoded (``None``: every cell) and their ``p(x_m | z)``.
        """
        given = observed is not None
        observed = batch.observed if observed is None else observed
        present_rows = None if given else batch.batch_rows(self.modality_names).present
        total = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for j, m in enumerate(self.modalities):
            weight = observed[:, j]
            if present_rows is not None:
                rows = present_rows[m.name]
            else:  # a custom mask: which cells it keeps is asked of the device
                present = weight != 0
                rows = None if bool(present.all()) else present.nonzero().squeeze(1)
            if rows is None:
                ll, dist = self._modality_log_likelihood(m.name, z, batch, detach_decoder)
                total = total + ll * weight
            else:
                # decode only the cells that have the modality; with none, decode zero cells, which
                # still puts the decoder in the graph (every parameter gets a gradient under DDP)
                sub = batch.subset(rows, (m.name,), complete=present_rows is not None)
                ll, dist = self._modality_log_likelihood(m.name, z.index_select(-2, rows), sub, detach_decoder)
                total = total.index_add(-1, rows, ll * weight.index_select(0, rows))
            if decoded is not None:
                decoded[m.name] = (rows, dist)
        return total

    def _modality_log_likelihood(
        self, name: str, z: torch.Tensor, batch: CellBatch, detach_decoder: bool
    ) -> tuple[torch.Tensor, CountLikelihood]:
        dist = self.generative(z, batch, (name,), detach_decoder)[name]
        if name in batch.nonzero:
            ll = dist.sum_log_prob_sparse(*batch.nonzero[name], log_factorial=batch.log_factorial.get(name), dense=batch.counts[name])
            return ll, dist
        return dist.log_prob(batch.counts[name]).sum(-1), dist

    # ----------------------------------------------------------------- objectives
    def elbo(
        self,
        batch: CellBatch,
        q: Posterior,
        observed: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        detach_decoder: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-sample reparameterized ``(reconstruction, kl)`` per cell for posterior ``q``
        (the KL in closed form for the diagonal family, at the draw for a flow)."""
        z, kl = q.sample_and_kl(generator)
        rec = self.log_likelihood(z, batch, observed, detach_decoder)
        return rec, kl

    def loss(
        self,
        batch: CellBatch,
        kl_weight: float = 1.0,
        subset_weight: float = 1.0,
        refine_steps: int = 0,
        refine_lr: float = 0.05,
        sleep_weight: float = 0.0,
        pair_weight: float = 0.0,
        subset_sampling: str = "all",
    ) -> LossOutput:
        """The objective as named terms: fused ELBO, single-expert ELBOs, refinement, sleep.

        - ``fused``: negative ELBO of the product-of-experts posterior over each cell's
          observed modalities, KL weighted by ``kl_weight``.
        - ``single_<modality>``: for cells with two or more modalities, the negative ELBO
          of that modality's expert alone (with the prior) explaining every observed
          modality (MVAE-style), weight ``subset_weight``; 0 for the other cells. With
          ``subset_sampling="one"`` each paired cell gets the term of one of its experts,
          drawn uniformly, times its number of experts (an unbiased estimate of their sum
          at one decoding per cell); the other experts' terms are 0 for that cell.
        - ``refined`` (``refine_steps > 0``, semi-amortized training): the decoder is
          trained on the posterior refined by ``refine_steps`` steps, the encoders on
          their own ELBO (``fused`` then does not reach the decoder; stop-gradient SA-VAE).
        - ``sleep`` (``sleep_weight > 0``): the encoders' sleep-phase term
          (:meth:`sleep_loss`), weight ``sleep_weight``.
        - ``pair`` (``pair_weight > 0``): for cells with two or more modalities, the
          symmetric KL divergence between every two of their experts' posteriors (each
          fused with the prior), weight ``pair_weight``; 0 for the other cells.

        Returns
        -------
        LossOutput
            The terms, their weighted sum ``loss`` and the fused reconstruction and KL.
        """
        # the shared feature embeddings are computed once for the whole objective (experts, decoders, sleep)
        self._step_embeddings = {} if self.feature_embeddings is not None else None
        try:
            return self._loss_terms(batch, kl_weight, subset_weight, refine_steps, refine_lr, sleep_weight, pair_weight, subset_sampling)
        finally:
            self._step_embeddings = None

    def _loss_terms(self, batch, kl_weight, subset_weight, refine_steps, refine_lr, sleep_weight, pair_weight, subset_sampling) -> LossOutput:
        means, logvars = self.experts(batch)
        q = self.posterior(*poe(means, logvars, batch.observed))
        z, kl = q.sample_and_kl()
        decoded = {} if sleep_weight > 0 else None  # the sleep term draws from the fused term's decoding
        rec = self.log_likelihood(z, batch, detach_decoder=refine_steps > 0, decoded=decoded)
        terms = {"fused": LossTerm(-(rec - kl_weight * kl))}
        if refine_steps > 0:
            # training needs the refined iterate, not the guarantee (which costs 64 forward passes)
            refined = self.refine(batch, q, refine_steps, refine_lr, keep_best=False)
            rec_refined, kl_refined = self.elbo(batch, refined)
            terms["refined"] = LossTerm(-(rec_refined - kl_weight * kl_refined))
        if subset_weight > 0 and len(self.modalities) > 1:
            # single-expert ELBOs, computed on the paired cells only (unpaired cells have one expert anyway);
            # the terms are there (zero) in a batch without paired cells, so every batch has the same terms
            paired = batch.batch_rows(self.modality_names).paired
            if paired is None:  # every cell is paired
                paired = torch.arange(batch.n_cells, device=batch.observed.device)
                sub = batch
            else:
                sub = batch.subset(paired)
            sub_means, sub_logvars = means.index_select(1, paired), logvars.index_select(1, paired)
            if subset_sampling not in SUBSET_SAMPLING:
                raise ValueError(f"subset_sampling must be one of {list(SUBSET_SAMPLING)}, got {subset_sampling!r}.")
            drawn = None
            if subset_sampling == "one" and paired.numel():
                # one expert per paired cell, uniformly among its observed ones, weighted by their number
                drawn = torch.multinomial(sub.observed, 1).squeeze(1)
                single = torch.zeros_like(sub.observed).scatter_(1, drawn[:, None], 1.0)
                rec_d, kl_d = self.elbo(sub, self.posterior(*poe(sub_means, sub_logvars, single)))
                value = -(rec_d - kl_weight * kl_d) * sub.observed.sum(1)
            for j, m in enumerate(self.modalities):
                per_cell = torch.zeros_like(rec)
                if drawn is not None:
                    per_cell = per_cell.index_add(0, paired, torch.where(drawn == j, value, torch.zeros_like(value)))
                elif subset_sampling == "all" and paired.numel():
                    single = torch.zeros_like(sub.observed)
                    single[:, j] = sub.observed[:, j]
                    rec_j, kl_j = self.elbo(sub, self.posterior(*poe(sub_means, sub_logvars, single)))
                    per_cell = per_cell.index_add(0, paired, -(rec_j - kl_weight * kl_j))
                terms[f"single_{m.name}"] = LossTerm(per_cell, subset_weight)
        if pair_weight > 0 and len(self.modalities) > 1:
            terms["pair"] = LossTerm(self.pair_divergence(batch, means, logvars), pair_weight)
        if sleep_weight > 0:
            terms["sleep"] = LossTerm(self.sleep_loss(batch, q.detach(), fused=(z.detach(), decoded)), sleep_weight)
        if self.feature_embeddings is not None and self.link_weight > 0:
            terms["links"] = LossTerm(self.feature_embeddings.residual_penalty().expand(batch.n_cells), self.link_weight)
        if self.discriminator is not None:
            terms["align"] = LossTerm(self.alignment_loss(batch, q), self.align_weight, adversarial=True)
        return LossOutput(terms, reconstruction=rec.detach(), kl=kl.detach())

    def pair_divergence(self, batch: CellBatch, means: torch.Tensor, logvars: torch.Tensor) -> torch.Tensor:
        """Per cell, the symmetric KL divergence (Jeffreys) between every two observed
        experts' Gaussian posteriors, each fused with the prior (0 for a cell with one
        modality).

        ``KL(a||b) + KL(b||a) = 0.5 * sum((v_a/v_b + v_b/v_a - 2) + (m_a - m_b)^2 (1/v_a + 1/v_b))``.
        """
        ones = torch.ones_like(batch.observed[:, :1])
        alone = [poe(means[j : j + 1], logvars[j : j + 1], ones) for j in range(len(self.modalities))]  # each with the prior
        out = torch.zeros(batch.n_cells, dtype=means.dtype, device=means.device)
        for a in range(len(alone)):
            for b in range(a + 1, len(alone)):
                (m_a, lv_a), (m_b, lv_b) = alone[a], alone[b]
                ratio = torch.exp(lv_a - lv_b)  # v_a / v_b
                jeffreys = 0.5 * ((ratio + 1.0 / ratio - 2.0) + (m_a - m_b).pow(2) * (torch.exp(-lv_a) + torch.exp(-lv_b))).sum(-1)
                both = batch.observed[:, a] * batch.observed[:, b]
                out = out + torch.where(both != 0, jeffreys, torch.zeros_like(jeffreys))  # absent experts may be anything
        return out

    def alignment_loss(self, batch: CellBatch, q: Posterior) -> torch.Tensor:
        """Per-cell adversarial term: the discriminator's cross-entropy on the modality of each
        single-modality cell from a sample of its posterior, gradient reversed into the
        encoders (0 for cells with several modalities, and for a batch with one kind of cell)."""
        rows = batch.batch_rows(self.modality_names)
        single, modality = rows.single, rows.single_modality
        out = torch.zeros(batch.n_cells, dtype=q.mean.dtype, device=q.mean.device)
        # always run the discriminator (on zero cells if need be), so that it is in every step's graph
        z = q.select(single).sample()
        loss = self.discriminator.adversarial_loss(z, modality)
        if rows.n_single_modalities < 2:  # one kind of cell: nothing to tell apart
            loss = loss * 0.0
        return out.index_add(0, single, loss)

    def sleep_loss(
        self,
        batch: CellBatch,
        q: Posterior,
        fused: tuple[torch.Tensor, Mapping[str, tuple[torch.Tensor | None, CountLikelihood]]] | None = None,
    ) -> torch.Tensor:
        """Sleep-phase loss of the encoders, per cell: ``-sum_m log q_m(z | x~_m)``.

        For every cell ``z ~ q`` (its fused posterior) and, for **every** modality ``m``
        (observed or not), counts ``x~_m ~ p(x_m | z, s)`` are drawn from the decoder; the
        expert of ``m`` alone (with the prior) is then trained to recover ``z`` from
        ``x~_m``, as in the sleep phase of the wake-sleep algorithm. Nothing here reaches the
        decoders or the posterior ``q`` (no gradient flows through the draws), nor a flow
        posterior's weights or conditioning: for a flow the experts are trained through their
        base Gaussian's density under the flow as a fixed map, so the term fits the experts
        to the family the ELBO shapes and does not reshape it (training the flow too cost
        paired MOp's fused 15-NN accuracy 0.79 -> 0.60, ``benchmarks/RESULTS.md`` section
        3). An unpaired cell thereby gives each expert of a modality it lacks a training example that is
        consistent with the shared latent space; without it those experts only ever see
        the paired cells. A cell lacking modality ``m`` borrows the library size of a random
        cell of the batch that has it; modalities no cell of the batch has are skipped.

        Parameters
        ----------
        batch
            The cells.
        q
            Their fused posterior (detached).
        fused
            Optional ``(z, decoded)`` of the fused ELBO: its draw from ``q`` and what
            :meth:`log_likelihood` decoded from it (``decoded`` argument). The counts of a
            modality are then drawn from that decoding for the cells that have it, and
            only the cells that lack it are decoded here: the same law at a fraction of
            the cost (no second decoding of a paired cell).
        """
        n = batch.n_cells
        with torch.no_grad():
            z = q.sample() if fused is None else fused[0].detach()
            log_library = batch.log_library.clone()
            present = batch.observed != 0
            rows = batch.batch_rows(self.modality_names)
            usable = []
            for j, m in enumerate(self.modalities):
                have = rows.present[m.name]
                if have is not None and have.numel() == 0:
                    continue
                usable.append(j)
                if have is not None:
                    donors = have[torch.randint(have.numel(), (n,), device=have.device)]
                    log_library[:, j] = torch.where(present[:, j], log_library[:, j], log_library[donors, j])
            libraries = CellBatch({}, batch.observed, log_library, batch.covariates)  # library sizes only
            inputs = {}
            for j in usable:
                name = self.modalities[j].name
                reused = None if fused is None else fused[1].get(name)
                if reused is None:
                    draw = self.generative(z, libraries, (name,))[name].sample_nonzero()
                else:
                    kept, dist = reused  # the cells that have the modality (None: every cell)
                    draw = dist.sample_nonzero()
                    if kept is not None:
                        absent = rows.absent[name]
                        extra = self.generative(z.index_select(0, absent), libraries.subset(absent, ()), (name,))[name]
                        draw = _concat_rows((kept, draw), (absent, extra.sample_nonzero()))
                inputs[name] = self._counts_to_encoder_input(self.modalities[j], log_library[:, j], nonzero=draw)
        total = torch.zeros(n, dtype=z.dtype, device=z.device)
        one_expert = torch.ones(n, 1, dtype=z.dtype, device=z.device)
        for j in usable:
            m = self.modalities[j]
            mean, logvar = self.encode(m.name, inputs[m.name], batch.covariates)
            # a flow (when there is one) is a fixed map here: the experts are trained into the family, not the family by them
            total = total - self.posterior(*poe(mean[None], logvar[None], one_expert), frozen_flow=True).log_prob(z)
        return total

    def _frozen_elbo(self, batch: CellBatch, observed: torch.Tensor | None):
        """``elbo(q, generator) -> (n,)``: the one-sample ELBO of the ``observed`` modalities,
        no gradient to the decoder (what refinement ascends)."""

        def cell_elbo(q: Posterior, gen: torch.Generator | None) -> torch.Tensor:
            rec, kl = self.elbo(batch, q, observed, gen, detach_decoder=True)
            return rec - kl

        return cell_elbo

    def refine(
        self,
        batch: CellBatch,
        start: Posterior,
        steps: int,
        lr: float = 0.05,
        observed: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        keep_best: bool = True,
        method: str = "adam",
    ) -> Posterior:
        """Semi-amortized refinement of ``start`` on the ELBO of the ``observed`` modalities
        (monotone unless ``keep_best=False``, see :func:`~sclatent.inference.refine_posterior`):
        ``steps`` Adam steps (``method="adam"``) or updates of the learned refiner
        (``"learned"``, :meth:`add_refiner`)."""
        if method not in REFINE_METHODS:
            raise ValueError(f"refine_method must be one of {list(REFINE_METHODS)}, got {method!r}.")
        if method == "learned" and self.refiner is None:
            raise ValueError("refine_method='learned' needs a learned refiner: train one first with model.train_refiner().")
        refiner = self.refiner if method == "learned" else None
        return refine_posterior(self._frozen_elbo(batch, observed), start, steps, lr, generator, keep_best=keep_best, refiner=refiner)

    def add_refiner(self, n_hidden: int = 128) -> LearnedRefiner:
        """Give the module a new (untrained, identity) learned refiner and return it."""
        self.refiner = LearnedRefiner(self.n_latent, n_hidden)
        return self.refiner

    def refiner_loss(
        self, batch: CellBatch, steps: int, generator: torch.Generator | None = None, start_jitter: float = 0.0
    ) -> torch.Tensor:
        """Training loss of the learned refiner on a batch, per cell ``(n,)``: minus the mean
        ELBO of its ``steps`` iterates from the encoder's posterior (about half of them moved
        by ``start_jitter`` posterior standard deviations, :func:`~sclatent.inference.learned.jittered_starts`),
        encoders and decoders frozen (only the refiner's weights are in the graph's reach)."""
        with torch.no_grad():
            start = jittered_starts(self.inference(batch), start_jitter, generator)
        return -unrolled_elbos(self._frozen_elbo(batch, None), start, self.refiner, steps, generator).mean(0)

    @torch.no_grad()
    def marginal_log_likelihood(
        self,
        batch: CellBatch,
        q: Posterior,
        n_samples: int,
        observed: torch.Tensor | None = None,
        chunk: int = 128,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Importance-sampled ``log p(x)`` per cell with proposal ``q``, ``(n,)``.

        ``log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k)``, ``z_k ~ q``; samples are drawn in
        chunks of ``chunk`` to bound memory.
        """
        log_w = []
        for start in range(0, n_samples, chunk):
            k = min(chunk, n_samples - start)
            z = q.sample(k, generator)
            log_w.append(importance_log_weights(self.log_likelihood(z, batch, observed), z, q))
        return log_mean_exp(torch.cat(log_w, 0), dim=0)


def _concat_rows(*parts: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """COO draws of disjoint row sets as one, sorted by row, then column: each part is
    ``(rows, (local_rows, cols, values))`` with ``rows`` ascending (the batch rows of the
    part's local rows) and its entries sorted by local row, then column."""
    rows = torch.cat([index[local] for index, (local, _, _) in parts])
    order = torch.argsort(rows, stable=True)  # a row's entries come from one part, in column order
    cols = torch.cat([c for _, (_, c, _) in parts])
    values = torch.cat([v for _, (_, _, v) in parts])
    return rows[order], cols[order], values[order]

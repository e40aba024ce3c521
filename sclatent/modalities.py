"""Modality kinds: where every behaviour of a modality comes from.

A modality of the data is named by the user (its ``mdata.mod`` key, e.g. ``"gex"``) and
has a *kind* from :data:`KINDS`. The kind, never the name, decides the default
likelihood, which model argument overrides it, whether gene-level dispersion options
apply, and which output method serves it (:meth:`~sclatent.SCLatent.get_normalized_expression`
or :meth:`~sclatent.SCLatent.get_accessibility_estimates`). Adding a kind is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KINDS", "ModalityKind", "modality_kind"]


@dataclass(frozen=True)
class ModalityKind:
    """What a kind of modality implies.

    Parameters
    ----------
    name
        The kind, as users write it (``"rna"``, ``"atac"``, ...).
    default_likelihood
        Likelihood used unless the model is told otherwise.
    likelihood_option
        The :class:`~sclatent.SCLatent` argument that sets the likelihood of every
        modality of this kind (``"gene_likelihood"``, ``"atac_likelihood"``), or ``None``.
    gene_dispersion
        Whether ``SCLatent(dispersion=...)`` (``"gene"`` / ``"gene-batch"``) applies.
    output
        ``"expression"`` (denoised counts, :meth:`~sclatent.SCLatent.get_normalized_expression`)
        or ``"accessibility"`` (``P(x > 0)``, :meth:`~sclatent.SCLatent.get_accessibility_estimates`).
    description
        One line for messages and docs.
    """

    name: str
    default_likelihood: str
    likelihood_option: str | None
    gene_dispersion: bool
    output: str
    description: str


#: The modality kinds sclatent knows, by name.
KINDS: dict[str, ModalityKind] = {
    k.name: k
    for k in (
        ModalityKind("rna", "nb", "gene_likelihood", True, "expression", "gene expression counts (scRNA-seq, snRNA-seq)"),
        ModalityKind("atac", "poisson", "atac_likelihood", False, "accessibility", "chromatin accessibility (peak or fragment counts)"),
        ModalityKind("protein", "nb", None, False, "expression", "antibody-derived tag counts (CITE-seq ADT)"),
        ModalityKind("counts", "nb", None, False, "expression", "any other count modality"),
    )
}


def modality_kind(kind: str, where: str = "") -> ModalityKind:
    """The :data:`KINDS` entry ``kind``; ``ValueError`` listing the kinds otherwise."""
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown modality kind {kind!r}{where}; choose one of {sorted(KINDS)}.") from None

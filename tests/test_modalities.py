"""Modality kinds: the one table where a modality's behaviour comes from."""

from __future__ import annotations

import pytest

from sclatent.distributions import LIKELIHOODS
from sclatent.modalities import KINDS, modality_kind


def test_every_kind_names_a_known_likelihood_and_output():
    assert set(KINDS) == {"rna", "atac", "protein", "counts"}
    for kind in KINDS.values():
        assert kind.default_likelihood in LIKELIHOODS
        assert kind.output in ("expression", "accessibility")
    assert modality_kind("atac").output == "accessibility" and modality_kind("atac").default_likelihood == "poisson"
    assert modality_kind("rna").gene_dispersion and not modality_kind("protein").gene_dispersion


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match=r"Unknown modality kind 'adt'.*\['atac', 'counts', 'protein', 'rna'\]"):
        modality_kind("adt")

"""TrainConfig and InferenceConfig: one source of defaults for train(), the plan and fit()."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

import sclatent
from sclatent import train as training
from sclatent.config import InferenceConfig, TrainConfig, default_max_epochs


def test_train_and_the_plan_take_their_options_from_train_config_alone():
    # no training option is spelled out (with a default) anywhere but TrainConfig
    assert list(inspect.signature(sclatent.SCLatent.train).parameters) == ["self", "kwargs"]
    assert list(inspect.signature(training.TrainingPlan.__init__).parameters)[-1] == "config"
    assert list(inspect.signature(training.fit).parameters) == ["plan", "trainer_kwargs"]
    documented = inspect.getdoc(sclatent.SCLatent.train)
    for f in fields(TrainConfig):
        assert f"``{f.name}``" in documented, f"train() does not list {f.name}"


def test_split_separates_trainer_keywords_and_resolve_fills_defaults():
    config, rest = TrainConfig.split({"lr": 1e-3, "max_epochs": 40, "gradient_clip_val": 1.0})
    assert config.lr == 1e-3 and rest == {"gradient_clip_val": 1.0}
    resolved = config.resolve(n_cells=1000, n_modalities=2)
    assert resolved.kl_warmup_epochs == 4 and resolved.sleep_weight == 1.0 and resolved.batch_size == 256
    assert TrainConfig().resolve(n_cells=1_000_000, n_modalities=1).max_epochs == default_max_epochs(1_000_000) == 20
    assert TrainConfig().resolve(n_cells=100, n_modalities=1).sleep_weight == 0.0
    # a model aligning modalities with its adversary (feature links) defaults to a stronger sleep term
    assert TrainConfig().resolve(n_cells=100, n_modalities=2, adversarial=True).sleep_weight == 3.0
    assert TrainConfig(sleep_weight=0.5).resolve(n_cells=100, n_modalities=2, adversarial=True).sleep_weight == 0.5
    assert resolved.pair_weight == 1.0 and TrainConfig().resolve(100, 1).pair_weight == 0.0
    assert TrainConfig(pair_weight=0).resolve(100, 2).pair_weight == 0.0
    # the kept weights: the best epoch's, but the last one's in a model aligned by its adversary
    assert TrainConfig().resolve(100, 2).keep_weights == "best"
    assert TrainConfig().resolve(100, 2, adversarial=True).keep_weights == "last"
    assert TrainConfig(keep_weights="best").resolve(100, 2, adversarial=True).keep_weights == "best"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_epochs": 1.5}, "max_epochs must be an integer >= 1, got 1.5"),
        ({"max_epochs": 0}, "max_epochs must be an integer >= 1"),
        ({"validation_size": 1.0}, r"validation_size must be a number in \[0.0, 1.0\)"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"sleep_weight": -1}, "sleep_weight must be a number >= 0"),
        ({"pair_weight": -0.5}, "pair_weight must be a number >= 0"),
        ({"subset_sampling": "half"}, r"subset_sampling must be one of \['all', 'one'\], got 'half'"),
        ({"max_epochs": 5, "kl_warmup_epochs": 6}, r"kl_warmup_epochs=6 must lie in \[0, max_epochs=5\]"),
        ({"keep_weights": "first"}, "keep_weights must be 'best', 'last' or None, got 'first'"),
    ],
)
def test_resolve_names_the_bad_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs).resolve(100, 1)


def test_inference_options_are_shared_and_checked():
    opts = InferenceConfig.of({"refine_steps": 3}, "get_elbo", batch_size=64)
    assert (opts.refine_steps, opts.batch_size, opts.refine_lr, opts.seed) == (3, 64, 0.05, 0)
    with pytest.raises(TypeError, match=r"get_elbo\(\) got unexpected keyword argument\(s\) \['refine_step'\]"):
        InferenceConfig.of({"refine_step": 3}, "get_elbo")
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        InferenceConfig.of({"n_samples": 0}, "get_elbo")

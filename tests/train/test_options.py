"""The options TrainConfig and OnlineConfig share (train/options.py) and the distillation-mode registry
(loss/objectives): a mode registered in one place is known to every layer, and the alpha/mode rule is one rule."""
from __future__ import annotations

import dataclasses

import pytest

from sdpo_fast.cli import build_parser
from sdpo_fast.loss.objectives import DISTILLATION_MODES, FullLogitObjective
from sdpo_fast.online.config import OnlineConfig
from sdpo_fast.train.build import objective_of
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.options import LoRAOptions, ObjectiveOptions, StepSettings


def test_both_configs_embed_the_shared_options_with_their_own_defaults():
    shared = {f.name for cls in (StepSettings, ObjectiveOptions, LoRAOptions) for f in dataclasses.fields(cls)}
    assert shared <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert shared <= {f.name for f in dataclasses.fields(OnlineConfig)}
    train, online = TrainConfig(), OnlineConfig()
    assert (train.lr, train.lora_r, train.signal_clip, train.max_grad_norm) == (2e-6, 0, None, 10.0)
    assert (online.lr, online.lora_r, online.signal_clip, online.max_grad_norm) == (5e-6, 64, "auto", None)


@pytest.mark.parametrize("config_class", [TrainConfig, OnlineConfig])
@pytest.mark.parametrize("values,message", [
    (dict(distillation_alpha=0.5), "distillation_alpha must be 1 with distillation_mode sampled_token"),
    (dict(distillation_mode="full_logits", signal_clip=2.0), "signal_clip applies to distillation_mode"),
    (dict(distillation_mode="kl"), "distillation_mode must be one of"),
    (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1)"),
    (dict(micro_batch_tokens=0), "micro_batch_tokens must be an integer >= 1"),
    (dict(teacher="frozen"), "teacher must be one of"),
])
def test_one_validation_names_the_option_in_both_configs(config_class, values, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        config_class(**values).validate()


class HalvedAlpha(FullLogitObjective):
    """A mode added as one class (built, not run, here): full_logits at half the configured alpha."""

    mode = "halved_full_logits"

    @classmethod
    def from_options(cls, *, temperature, alpha, importance_clip, backend, **other_options):
        return cls(alpha=alpha / 2, temperature=temperature, importance_clip=importance_clip, backend=backend)


def test_a_registered_mode_reaches_configs_objectives_and_the_online_cli(monkeypatch):
    monkeypatch.setitem(DISTILLATION_MODES, HalvedAlpha.mode, HalvedAlpha)
    for config in (TrainConfig(distillation_mode=HalvedAlpha.mode, distillation_alpha=0.5).validate(),
                   OnlineConfig(distillation_mode=HalvedAlpha.mode, distillation_alpha=0.5).validate()):
        objective = objective_of(config)
        assert isinstance(objective, HalvedAlpha) and objective.alpha == 0.25
    assert OnlineConfig(distillation_mode=HalvedAlpha.mode).resolved_signal_clip is None
    args = build_parser().parse_args(["online", "demo", "--distillation-mode", HalvedAlpha.mode])
    assert args.distillation_mode == HalvedAlpha.mode
    monkeypatch.delitem(DISTILLATION_MODES, HalvedAlpha.mode)
    with pytest.raises(ValueError, match="distillation_mode must be one of"):
        TrainConfig(distillation_mode=HalvedAlpha.mode).validate()

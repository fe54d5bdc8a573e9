"""`sdpo-fast online`: the CPU demo and an experiment end to end (small), and bad arguments."""
from __future__ import annotations

import csv

import pytest
import torch

from sdpo_fast.cli import main
from sdpo_fast.online.experiments import Phase, run_schedule


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--interactions", "4", "--eval-every", "2", "--eval-prompts", "3", "--update-every", "2",
                 "--max-new-tokens", "6", "--output-dir", str(out)]) == 0
    rows = _rows(out / "win_rate_curve.csv")
    assert [int(r["interactions"]) for r in rows] == [0, 2, 4]
    assert all(r["eval_persona"] == "no-emojis" for r in rows)
    assert (out / "win_rate_curve.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_config.json").is_file()
    printed = capsys.readouterr().out
    assert "interactions/s" in printed and "Tell me" not in printed  # no conversation text by default


@pytest.mark.parametrize("experiment, personas, name", [
    ("flip", "no-emojis", "preference_flip"),
    ("sequential", "no-emojis,concise-casual-beginner", "sequential_preferences")])
def test_two_phase_experiments_on_the_tiny_model(tmp_path, experiment, personas, name):
    out = tmp_path / experiment
    assert main(["online", experiment, "--persona", personas, "--interactions", "2", "--eval-every", "2",
                 "--eval-prompts", "2", "--max-new-tokens", "4", "--update-every", "2", "--lora-r", "4",
                 "--output-dir", str(out)]) == 0
    rows = _rows(out / f"{name}.csv")
    expected = {"no-emojis", "loves-emojis" if experiment == "flip" else "concise-casual-beginner"}
    assert {r["eval_persona"] for r in rows} == expected == {r["train_persona"] for r in rows}
    assert [int(r["interactions"]) for r in rows] == [0, 0, 2, 2, 4, 4]
    assert (out / f"{name}.png").is_file()


def test_curve_with_importance_clip_weights_updates_by_the_samplers_logprobs(tmp_path, monkeypatch):
    from sdpo_fast.loss.objectives import sdpo as objective_module

    calls, original = [], objective_module.sdpo_loss

    def spy(*args, **kwargs):
        calls.append((kwargs["importance_clip"], kwargs["behavior_logprobs"], args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(objective_module, "sdpo_loss", spy)
    assert main(["online", "curve", "--interactions", "2", "--eval-every", "2", "--eval-prompts", "2",
                 "--max-new-tokens", "4", "--update-every", "2", "--lora-r", "4", "--importance-clip", "1.5",
                 "--output-dir", str(tmp_path / "out")]) == 0
    assert calls and all(clip == 1.5 for clip, _, _ in calls)
    for _, behavior, targets in calls:  # the sampler's log-probs of every target token
        assert behavior.shape == targets.shape and bool((behavior < 0).all())


@pytest.mark.parametrize("argv, message", [
    (["online", "curve", "--persona", "nobody"], "--persona 'nobody' is not defined"),
    (["online", "curve", "--persona", "no-emojis,structured"], "--persona must name one persona"),
    (["online", "curve", "--interactions", "0"], "--interactions must be >= 1"),
    (["online", "curve", "--user", "openai"], "--user openai needs --user-base-url and --user-model"),
    (["online", "curve", "--judge", "hf"], "--judge hf needs --judge-model"),
    (["online", "curve", "--lora-r", "0"], "--lora-r must be >= 1"),
    (["online", "demo", "--update-every", "0"], "update_every must be an integer >= 1"),
    (["online", "curve", "--distillation-mode", "full_logits", "--signal-clip", "2"],
     "signal_clip applies to distillation_mode sampled_token only"),
    (["online", "flip", "--distillation-alpha", "0.5"], "distillation_alpha must be 1 with distillation_mode"),
    (["online", "sequential", "--teacher", "ema", "--teacher-ema-rate", "0"], "teacher_ema_rate must be"),
    (["online", "curve", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["online", "curve", "--importance-clip", "0"], "importance_clip must be a finite number > 0"),
])
def test_bad_arguments_are_reported(argv, message, tmp_path, capsys):
    assert main(argv + ["--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def _parsed_config(argv, **defaults):
    from sdpo_fast.cli import build_parser
    from sdpo_fast.cli.online import online_config

    return online_config(build_parser().parse_args(argv), **defaults)


def test_config_file_precedence_and_unknown_keys(tmp_path, capsys):
    """defaults < --preset < --config file < flags; file keys with dashes or underscores; unknown keys rejected
    with the valid ones listed, before anything is loaded."""
    path = tmp_path / "online.yaml"
    path.write_text("lr: 1e-4\nupdate-every: 3\nteacher: ema\ndistillation_mode: topk_logits\n"
                    "distillation-alpha: 0.5\nseed: 9\n")
    config = _parsed_config(["online", "curve", "--preset", "paper-personalization", "--config", str(path),
                             "--update-every", "5", "--distillation-topk", "7", "--no-distillation-add-tail"])
    assert (config.lr, config.update_every, config.teacher, config.distillation_mode, config.distillation_alpha) == \
        (1e-4, 5, "ema", "topk_logits", 0.5)
    assert (config.lora_r, config.max_new_tokens, config.seed) == (64, 258, 9)  # preset, preset, file
    assert (config.distillation_topk, config.distillation_add_tail, config.resolved_signal_clip) == (7, False, None)
    from sdpo_fast.demo import online_demo_settings

    demo = _parsed_config(["online", "demo", "--config", str(path), "--seed", "2"], **online_demo_settings(False))
    assert (demo.lora_r, demo.lr, demo.seed) == (8, 1e-4, 2)  # demo setting, file, flag
    path.write_text("learning_rate: 1e-4\n")
    out = tmp_path / "out"
    assert main(["online", "curve", "--config", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown config file key(s) ['learning_rate']" in err and "valid keys: update_every, lr" in err
    assert not out.exists()


def test_vllm_generation_without_vllm_is_reported_before_loading(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["online", "curve", "--generation", "vllm", "--output-dir", str(tmp_path)]) == 2
    assert "generation backend 'vllm' needs vLLM" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_evaluation_cadence_does_not_change_training(tmp_path):
    from peft import get_peft_model

    from sdpo_fast.online.judge import RuleJudge
    from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, lora_config
    from sdpo_fast.online.personas import get_persona
    from sdpo_fast.online.users import RuleUser
    from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

    adapters = []
    for eval_every, evaluations in ((3, [0, 4, 8, 10]), (100, [0, 10])):
        config = OnlineConfig(update_every=4, max_new_tokens=6, lora_r=4, lora_alpha=8, lr=1e-2).validate()
        torch.manual_seed(0)  # LoRA initialization
        policy = OnlinePolicy(get_peft_model(tiny_causal_lm(initializer_range=0.2), lora_config(config)),
                              tiny_tokenizer(), config)
        rows = run_schedule(policy, [Phase(get_persona("brief"), 10)], RuleUser, RuleJudge(),
                            tmp_path / str(eval_every), eval_every=eval_every, eval_prompts=["a?"], oracle=False)
        assert [r["interactions"] for r in rows] == evaluations
        assert policy.updates == 2 and len(policy.pending) == 2  # batches of 4, 4, then 2 at the phase end
        adapters.append({n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n})
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def test_unreachable_judge_keeps_completed_results(tmp_path):
    from peft import get_peft_model

    from sdpo_fast.online.loop import OnlineConfig, OnlinePolicy, lora_config
    from sdpo_fast.online.personas import get_persona
    from sdpo_fast.online.users import EndpointError, RuleUser
    from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

    class FlakyJudge:
        """Answers for the first `budget` verdicts, then fails like an unreachable endpoint."""

        def __init__(self, budget):
            self.budget = budget

        def prefer(self, persona, prompt, a, b):
            self.budget -= 1
            if self.budget < 0:
                raise EndpointError("http://127.0.0.1:9/v1/chat/completions failed after 4 attempts")
            return "tie"

    config = OnlineConfig(update_every=2, max_new_tokens=4, lora_r=4, lora_alpha=8).validate()
    policy = OnlinePolicy(get_peft_model(tiny_causal_lm(initializer_range=0.2), lora_config(config)),
                          tiny_tokenizer(), config)
    persona = get_persona("no-emojis")
    # 2 prompts x 2 orders = 4 verdicts per judging: oracle, start, 2 interactions, then the judge fails.
    with pytest.raises(EndpointError, match="stopped after 4 interactions, results so far in"):
        run_schedule(policy, [Phase(persona, 6)], RuleUser, FlakyJudge(12), tmp_path, eval_every=2,
                     eval_prompts=["a?", "b?"], name="run")
    assert [int(r["interactions"]) for r in _rows(tmp_path / "run.csv")] == [0, 2]


def test_unreachable_user_endpoint_is_one_clear_error(tmp_path, capsys):
    argv = ["online", "curve", "--user", "openai", "--user-base-url", "http://127.0.0.1:9/v1", "--user-model", "m",
            "--retries", "0", "--timeout", "1", "--interactions", "2", "--eval-every", "2", "--eval-prompts", "2",
            "--max-new-tokens", "4", "--update-every", "2", "--lora-r", "4", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "failed after 1 attempts" in err and "stopped after 0 interactions" in err
    assert (tmp_path / "win_rate_curve.csv").is_file()


def test_online_flags_come_from_online_config_and_keep_their_old_spellings():
    """Every OnlineConfig field has a flag; a flag not given leaves the config's value (signal_clip "auto"),
    --signal-clip 0 turns the clip off and --no-center is --no-center-advantages."""
    import dataclasses

    from sdpo_fast.cli import build_parser
    from sdpo_fast.online.config import OnlineConfig

    parser = build_parser()
    for name in ("demo", "curve"):
        given = parser.parse_args(["online", name] + [f"--{f.name.replace('_', '-')}=1" for f in
                                                      dataclasses.fields(OnlineConfig)
                                                      if f.type in ("int", "float")])
        assert {f.name for f in dataclasses.fields(OnlineConfig) if f.type in ("int", "float")} <= vars(given).keys()
    assert _parsed_config(["online", "demo"]).signal_clip == "auto"
    assert _parsed_config(["online", "demo", "--signal-clip", "0"]).signal_clip is None
    assert _parsed_config(["online", "demo", "--signal-clip", "1.5"]).signal_clip == 1.5
    assert _parsed_config(["online", "demo", "--no-center"]).center_advantages is False
    assert _parsed_config(["online", "demo", "--no-center-advantages"]).center_advantages is False
    assert _parsed_config(["online", "curve", "--lora-target-modules", "q_proj,v_proj"]).lora_target_modules == \
        ["q_proj", "v_proj"]

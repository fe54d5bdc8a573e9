"""`--fit`: the choice against independent simulations of the same options (never over the budget, fewer
checkpointed layers as the budget grows, options the user set kept), the JSON fields, the step-time model's
FLOPs against torch's FLOP counter, when `train` runs it, and plan refusing what train_step refuses."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sdpo_fast import cli
from sdpo_fast.kernels.gpus import GPUS
from sdpo_fast.testing import tiny_causal_lm
from sdpo_fast.train.config import TrainConfig
import sdpo_fast.train.fit as fit_module
from sdpo_fast.loss import sdpo_loss
from sdpo_fast.train.fit import (_configured, fit, grad_in_forward_of, grad_in_forward_workspace_mb, runs_fit,
                                 step_time)
from sdpo_fast.train.plan import interaction, simulate
from sdpo_fast.train.setup import resolve_device
from sdpo_fast.train.step import check_micro_batches

LAYERS = 4
FIT_KEYS = {"flags", "checkpoint_layers", "num_layers", "offload_activations", "micro_batch_tokens",
            "grad_in_forward", "peak_bytes", "budget_bytes", "recompute_fraction", "modelled_step_seconds"}
HF_CONFIG = tiny_causal_lm("qwen3", hidden_size=64, num_layers=LAYERS, vocab_size=300).config


def _config(**options):
    base = dict(model="tiny", max_prompt_tokens=100, max_completion_tokens=60, micro_batch_tokens=400,
                batch_size=8, dtype="float32", optimizer="adamw", lora_r=4)
    return TrainConfig(**{**base, **options}).validate()


@pytest.fixture
def simulations(monkeypatch):
    """`simulate` of a config on HF_CONFIG, run once per config (it is deterministic) and shared by the test's
    own table and the search."""
    done: dict[str, object] = {}

    def simulated(config, hf_config=HF_CONFIG):
        key = repr(config)
        if key not in done:
            done[key] = simulate(config, hf_config)
        return done[key]

    monkeypatch.setattr(fit_module, "simulate", simulated)
    return simulated


def _options(config, layers: int, **options):
    return dataclasses.replace(config, checkpoint_layers=layers, gradient_checkpointing=None,
                               offload_activations=False, **options)


@pytest.mark.slow
def test_fit_takes_the_fewest_layers_that_fit_and_fewer_as_the_budget_grows(simulations):
    config = _config()
    totals = [simulations(_options(config, n)).total_bytes for n in range(LAYERS + 1)]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]
    fixed = {"offload_activations": False, "micro_batch_tokens": 400}
    chosen = []
    for budget in (totals[-1], (totals[1] + totals[2]) // 2, totals[0]):
        c = fit(config, fixed, budget, hf_config=HF_CONFIG).chosen
        assert c.plan.total_bytes == totals[c.checkpoint_layers] <= budget
        assert c.checkpoint_layers == min(n for n, t in enumerate(totals) if t <= budget)
        chosen.append(c.checkpoint_layers)
    assert chosen == [LAYERS, 2, 0]
    assert fit(config, fixed, totals[-1] - 1, hf_config=HF_CONFIG).chosen is None


@pytest.mark.slow
def test_fit_searches_offload_and_micro_batches_and_never_exceeds_the_budget(simulations):
    config = _config()
    budget = (simulations(_options(config, LAYERS)).total_bytes + simulations(_options(config, 0)).total_bytes) // 2
    result = fit(config, {}, budget, hf_config=HF_CONFIG)
    c = result.chosen
    assert {x.micro_batch_tokens for x in result.candidates} == {400, 160}
    assert simulate(result.config, HF_CONFIG).total_bytes == c.plan.total_bytes <= budget
    assert result.config.checkpoint_layers == c.checkpoint_layers
    fitting = [x for x in result.candidates if x.fits(budget)]
    assert c.time.total_seconds == min(x.time.total_seconds for x in fitting)


@pytest.mark.slow
def test_options_the_user_set_are_kept():
    config = _config(checkpoint_layers=2, offload_activations=True, micro_batch_tokens=200)
    result = fit(config, {"checkpoint_layers": 2, "offload_activations": True, "micro_batch_tokens": 200},
                 1 << 40, hf_config=HF_CONFIG)
    assert [(x.checkpoint_layers, x.offload_activations, x.micro_batch_tokens) for x in result.candidates] \
        == [(2, True, 200)]
    kept = fit(_config(gradient_checkpointing=True), {"gradient_checkpointing": True}, 1 << 40,
               hf_config=HF_CONFIG)
    assert {x.checkpoint_layers for x in kept.candidates} == {LAYERS}


@pytest.mark.slow
def test_plan_fit_json_has_exactly_the_named_fields(capsys, tmp_path):
    HF_CONFIG.save_pretrained(tmp_path)
    cli.main(["plan", "--model", str(tmp_path), "--fit", "--json", "--budget-gib", "100", "--lora-r", "4",
              "--max-prompt-tokens", "100", "--max-completion-tokens", "60", "--batch-size", "4", "--dtype",
              "float32", "--optimizer", "adamw"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["fit"]) == FIT_KEYS
    assert set(out) == {"fit", "candidates", "peak_bytes", "method", "phases", "breakdown", "fits", "budget_bytes",
                        "world_size"}
    fit_ = out["fit"]
    assert fit_["checkpoint_layers"] == 0 and fit_["num_layers"] == LAYERS and fit_["recompute_fraction"] == 0
    assert fit_["flags"] == ["--checkpoint-layers 0", f"--micro-batch-tokens {fit_['micro_batch_tokens']}"]
    config = TrainConfig(model=str(tmp_path), lora_r=4, max_prompt_tokens=100, max_completion_tokens=60,
                         batch_size=4, dtype="float32", optimizer="adamw", checkpoint_layers=0,
                         micro_batch_tokens=fit_["micro_batch_tokens"]).validate()
    assert fit_["peak_bytes"] == out["peak_bytes"] == simulate(config).peak_bytes
    assert fit_["budget_bytes"] == 100 * 2**30
    with loss_paths() as paths:
        simulate(config)
    assert paths[1:] == [fit_["grad_in_forward"]] * (len(paths) - 1) and paths[1:]


@contextlib.contextmanager
def loss_paths():
    """The grad_in_forward of every `sdpo_loss` call made inside (the LossParams it builds), in call order; a
    simulation's first is its warm-up step's (a 3-token completion, not in the peak)."""
    import sdpo_fast.loss.api as api

    paths: list[bool] = []

    def spy(*args, **kwargs):
        paths.append(kwargs["grad_in_forward"])
        return params(*args, **kwargs)

    params = api.LossParams
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "LossParams", spy)
        yield paths


WIDE_HF_CONFIG = tiny_causal_lm("qwen3", hidden_size=64, num_layers=2, vocab_size=3000).config


@pytest.mark.slow
def test_fit_takes_the_grad_in_forward_path_when_its_workspace_fits(monkeypatch):
    """With a 1 MiB default workspace (recompute path at this vocabulary), --fit simulates the default and the
    least workspace that admits the grad-in-forward path: the faster path with an ample budget, the recompute
    path with a budget between their simulated peaks; each candidate's path is the one its simulation ran."""
    for name in ("SDPO_FAST_TRITON_WORKSPACE_MB", "SDPO_FAST_TORCH_CHUNK_MB"):
        monkeypatch.setenv(name, "1")
    config = _config(checkpoint_layers=2, micro_batch_tokens=400)
    given = {"checkpoint_layers": 2, "offload_activations": False, "micro_batch_tokens": 400}
    totals = {}
    for path, workspace in ((False, None), (True, grad_in_forward_workspace_mb(config, WIDE_HF_CONFIG))):
        with loss_paths() as paths:
            totals[path] = simulate(_configured(config, 2, False, 400, workspace), WIDE_HF_CONFIG).total_bytes
        assert paths[1:] and set(paths[1:]) == {path}
    assert totals[True] > totals[False]
    ample = fit(config, given, 1 << 40, hf_config=WIDE_HF_CONFIG)
    assert ample.chosen.grad_in_forward is True and ample.to_json()["fit"]["grad_in_forward"] is True
    assert ample.chosen.plan.total_bytes == totals[True] and ample.chosen.loss_workspace_mb > 1
    assert f"--loss-workspace-mb {ample.chosen.loss_workspace_mb}" in ample.flags()
    assert ample.chosen.time.total_seconds < step_time(config, WIDE_HF_CONFIG, 2, False, False,
                                                       ample.gpu).total_seconds
    tight = fit(config, given, (totals[True] + totals[False]) // 2, hf_config=WIDE_HF_CONFIG)
    assert tight.chosen.grad_in_forward is False and tight.to_json()["fit"]["grad_in_forward"] is False
    assert tight.chosen.plan.total_bytes == totals[False]
    assert not any(f.startswith("--loss-workspace-mb") for f in tight.flags())


@pytest.mark.parametrize("mode", ["sampled_token", "full_logits"])
def test_fits_loss_path_is_sdpo_losss_own_choice(mode):
    """`grad_in_forward_of` (what --fit states) against the path `sdpo_loss` takes on real tensors of the same
    shapes (torch backend, fp32), at workspaces on either side of the least that admits grad-in-forward."""
    vocab, rows, hidden = 3000, 1100, 8
    hf_config = tiny_causal_lm("qwen3", hidden_size=hidden, num_layers=1, vocab_size=vocab).config
    config = _config(loss_backend="torch", distillation_mode=mode)
    least = grad_in_forward_workspace_mb(config, hf_config)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    for mb in (least - 1, least, least + 1):
        with loss_paths() as paths:
            sdpo_loss(h, w, targets, teacher_hidden=h.detach(), backend="torch", distillation_mode=mode,
                      workspace_bytes=mb << 20)
        assert paths == [mb >= least]
        assert grad_in_forward_of(dataclasses.replace(config, loss_workspace_mb=mb), hf_config, rows) == paths[0]


def test_step_time_flops_match_torchs_flop_counter():
    """The trunk's forward FLOPs (one interaction, no lm_head) against FlopCounterMode on the model's own eager
    forward: its linear layers exactly, its attention products halved (the model counts causal attention)."""
    model = tiny_causal_lm("qwen3", hidden_size=64, num_layers=2, vocab_size=300, attn_implementation="eager")
    config = _config(batch_size=1)
    e = interaction(config.max_prompt_tokens, config.max_completion_tokens, 300)
    ids = torch.tensor([e.student_input_ids])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model(ids)
    ops = counter.get_flop_counts()["Global"]
    linear = ops[torch.ops.aten.mm] + ops.get(torch.ops.aten.addmm, 0)
    attention = ops[torch.ops.aten.bmm]
    t = step_time(config, model.config, 1, False, False, GPUS["h100"])
    assert t.flops["trunk_forward"] == linear + attention / 2
    assert t.flops["recompute"] == t.flops["trunk_forward"] / 2
    assert t.flops["loss"] == 8 * (len(e.completion_ids) - config.ignore_first_k) * 64 * 300
    assert 0 < t.recompute_fraction < 1 and t.seconds["offload"] == 0


def test_train_runs_fit_on_cuda_without_configuration_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = resolve_device("auto").type
    assert device == "cuda"
    assert runs_fit(None, {}, device) and runs_fit(None, {"lr": 1e-5}, device)
    for given in ({"micro_batch_tokens": 4096}, {"gradient_checkpointing": True}, {"checkpoint_layers": 3},
                  {"offload_activations": False}):
        assert not runs_fit(None, given, device)
    assert not runs_fit(False, {}, device) and runs_fit(True, {"micro_batch_tokens": 4096}, device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not runs_fit(None, {}, resolve_device("auto").type) and runs_fit(True, {}, "cpu")


def test_plan_refuses_an_offloaded_optimizer_step_of_two_micro_batches_as_train_does():
    config = _config(lora_r=0, offload_optimizer=True, batch_size=4, micro_batch_tokens=200)
    with pytest.raises(ValueError) as refused:
        simulate(config, HF_CONFIG)
    with pytest.raises(ValueError) as train_refusal:
        check_micro_batches(True, 2)
    assert str(refused.value) == str(train_refusal.value)


@pytest.mark.slow
def test_train_fit_logs_its_choice_in_the_start_event(tmp_path, capsys, model_dir, data_path):
    from sdpo_fast.train import load_yaml

    out = tmp_path / "run"
    assert cli.main(["train", "--model", model_dir, "--data", data_path, "--output-dir", str(out), "--max-steps", "1",
                     "--lora-r", "4", "--fit", "--budget-gib", "2", "--no-progress"]) == 0
    assert "--fit chose: --checkpoint-layers 0" in capsys.readouterr().err
    start = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    saved = TrainConfig(**load_yaml(out / "config.yaml"))
    assert start["event"] == "start" and set(start["fit"]) == FIT_KEYS
    assert (saved.checkpoint_layers, saved.micro_batch_tokens, saved.offload_activations) == (
        start["fit"]["checkpoint_layers"], start["fit"]["micro_batch_tokens"], start["fit"]["offload_activations"])
    assert start["fit"]["peak_bytes"] == simulate(saved).peak_bytes

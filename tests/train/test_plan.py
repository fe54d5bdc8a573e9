"""`sdpo-fast plan`: the step simulated on fake tensors against the same step on real tensors, and the counter
against storages summed by hand."""
from __future__ import annotations

import json

import pytest
import torch

from sdpo_fast import cli
from sdpo_fast.testing import tiny_causal_lm
from sdpo_fast.train.config import TrainConfig
from sdpo_fast.train.memory import StorageCounter
from sdpo_fast.train.plan import GIB, load_config, simulate


def _tiny_config():
    return tiny_causal_lm("qwen3", hidden_size=64, num_layers=3, vocab_size=300).config


def _config(**options):
    base = dict(model="tiny", max_prompt_tokens=100, max_completion_tokens=60, micro_batch_tokens=200,
                batch_size=4, dtype="float32", optimizer="adamw")
    return TrainConfig(**{**base, **options}).validate()


@pytest.mark.parametrize("options", [
    dict(gradient_checkpointing=True),
    dict(gradient_checkpointing=False, optimizer="sgd"),
    dict(lora_r=4, gradient_checkpointing=True),
    dict(lora_r=4, gradient_checkpointing=False, loss="sft"),
    dict(lora_r=4, gradient_checkpointing=True, dtype="bfloat16"),
    dict(lora_r=4, gradient_checkpointing=True, dtype="bfloat16", lora_dtype="float32"),
    dict(gradient_checkpointing=True, optimizer_in_backward=True),
    dict(gradient_checkpointing=True, distillation_mode="full_logits", distillation_alpha=0.5, loss_backend="torch"),
    dict(checkpoint_layers=1),
    dict(lora_r=4, checkpoint_layers=2, offload_activations=True),
])
def test_simulated_step_equals_the_real_step_byte_for_byte(options):
    config = _config(**options)
    simulated = simulate(config, _tiny_config(), fake=True)
    real = simulate(config, _tiny_config(), fake=False)
    assert simulated.peak_bytes == real.peak_bytes
    assert simulated.phases == real.phases and simulated.breakdown == real.breakdown
    assert (simulated.peak_phase, simulated.peak_module) == (real.peak_phase, real.peak_module)


def test_triton_logit_mode_simulated_as_the_torch_backend_runs(monkeypatch):
    """Both backends run the same distillation sweep with grad_in_forward=False; with equal chunk budgets, the
    Triton path with its chunk_logits and grad_weight launches faked allocates what the torch backend's real run
    does."""
    from sdpo_fast.loss import api

    monkeypatch.setattr(api, "choose_grad_in_forward", lambda *args: False)
    monkeypatch.setenv("SDPO_FAST_TRITON_WORKSPACE_MB", "1")
    monkeypatch.setenv("SDPO_FAST_TORCH_CHUNK_MB", "1")
    mode = dict(gradient_checkpointing=True, distillation_mode="full_logits", distillation_alpha=0.5)
    triton = simulate(_config(loss_backend="triton", **mode), _tiny_config())
    torch_real = simulate(_config(loss_backend="torch", **mode), _tiny_config(), fake=False)
    assert triton.phases == torch_real.phases and triton.breakdown == torch_real.breakdown
    assert triton.phases["loss"] > triton.phases["between"]


@pytest.mark.parametrize("workspace_mb,grad_in_forward", [("256", True), ("0", False)])
def test_plan_runs_the_path_the_loss_budget_picks(monkeypatch, workspace_mb, grad_in_forward):
    """The objective is handed the Triton backend's workspace budget (train/build.py), so the simulated step runs the
    loss path that budget picks: the grad-in-forward sweep (its row kernels faked) when a chunk of the micro-batch's
    rows fits, else the recompute path."""
    from sdpo_fast.loss import function

    monkeypatch.setenv("SDPO_FAST_TRITON_WORKSPACE_MB", workspace_mb)
    calls = []
    original = function.token_grad_sweep
    monkeypatch.setattr(function, "token_grad_sweep", lambda *a, **k: calls.append(1) or original(*a, **k))
    plan = simulate(_config(gradient_checkpointing=True, loss_backend="triton"), _tiny_config())
    assert bool(calls) == grad_in_forward and plan.peak_bytes > 0


def test_breakdown_parts_match_the_model():
    hf_config = _tiny_config()
    plan = simulate(_config(gradient_checkpointing=True), hf_config)
    model = tiny_causal_lm("qwen3", hidden_size=64, num_layers=3, vocab_size=300)
    weights = sum(-(-p.numel() * 4 // 512) * 512 for p in model.parameters())
    buffers = sum(-(-b.numel() * b.element_size() // 512) * 512 for b in model.buffers())
    assert plan.breakdown["weights"] == weights + buffers
    assert plan.breakdown["optimizer_state"] >= 2 * weights  # AdamW: two fp32 moments per parameter
    assert sum(plan.breakdown.values()) == plan.peak_bytes
    assert plan.peak_bytes == max(plan.phases.values())


def test_counter_counts_storages_once_and_frees_them():
    counter = StorageCounter()
    with counter:
        a = torch.ones(1000)           # 4000 bytes -> 4096
        view = a[10:20]                # same storage
        b = torch.ones(10, dtype=torch.int64)  # 80 -> 512
        assert counter.current == 4096 + 512
        del a
        assert counter.current == 4096 + 512  # the view keeps the storage
        del view, b
        assert counter.current == 0
    assert counter.peak == 4096 + 512


def test_load_config_from_a_directory_and_known_shapes(tmp_path):
    _tiny_config().save_pretrained(tmp_path)
    assert load_config(str(tmp_path)).hidden_size == 64
    assert load_config(str(tmp_path / "config.json")).num_hidden_layers == 3
    assert load_config("qwen3-8b").num_hidden_layers == 36
    with pytest.raises(ValueError, match="no model config"):
        load_config(str(tmp_path / "missing"))


def test_plan_command_json(capsys, tmp_path):
    _tiny_config().save_pretrained(tmp_path)
    args = ["plan", "--model", str(tmp_path), "--max-prompt-tokens", "64", "--max-completion-tokens", "32",
            "--batch-size", "2", "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"peak_bytes", "method", "phases", "breakdown", "fits", "budget_bytes", "world_size"}
    assert out["world_size"] == 1
    assert out["method"] == "simulated" and out["fits"] is True and out["budget_bytes"] == 24 * GIB
    assert out["peak_bytes"] == max(out["phases"].values()) == sum(out["breakdown"].values())
    assert cli.main(args[:-1] + ["--budget-gib", "0.0001"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


QWEN3_8B = dict(model="qwen3-8b", dtype="bfloat16", optimizer="adamw")


@pytest.mark.slow
def test_qwen3_8b_lora_r16_one_interaction_fits_20_gib():
    plan = simulate(TrainConfig(**QWEN3_8B, lora_r=16, gradient_checkpointing=True, batch_size=1))
    assert plan.micro_batch_tokens == [4096 - 64]
    assert plan.peak_bytes <= 20 * GIB


def test_check_fits_names_the_flags_that_fit(tmp_path):
    from sdpo_fast.train.plan import check_fits

    _tiny_config().save_pretrained(tmp_path)
    off = _config(model=str(tmp_path), gradient_checkpointing=False, micro_batch_tokens=100, batch_size=1)
    on = simulate(_config(model=str(tmp_path), gradient_checkpointing=True, micro_batch_tokens=100, batch_size=1))
    assert check_fits(off, 10 * GIB).peak_bytes > on.peak_bytes
    with pytest.raises(ValueError, match="these fit: --gradient-checkpointing"):
        check_fits(off, on.total_bytes)


def test_lora_turns_checkpointing_on_only_on_cuda_unless_told():
    assert TrainConfig(lora_r=16).checkpointing_on("cuda") is True
    assert TrainConfig(lora_r=16).checkpointing_on("cpu") is False
    assert TrainConfig().checkpointing_on("cuda") is False
    assert TrainConfig(lora_r=16, gradient_checkpointing=False).checkpointing_on("cuda") is False
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="yes").validate()


def test_train_sets_expandable_segments_when_unset(monkeypatch):
    from sdpo_fast.train.preflight import check_memory

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    check_memory(TrainConfig(device="cpu"))
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:native")
    check_memory(TrainConfig(device="cpu"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:native"


@pytest.mark.slow
def test_qwen3_8b_lora_r64_4096_token_micro_batches_fit_24_gib_with_allowances():
    plan = simulate(TrainConfig(**QWEN3_8B, lora_r=64, lora_alpha=128, micro_batch_tokens=4096,
                                batch_size=4))
    assert plan.micro_batch_tokens == [4096 - 64] * 2
    assert plan.total_bytes <= 24 * GIB
    one = simulate(TrainConfig(**QWEN3_8B, lora_r=64, lora_alpha=128, micro_batch_tokens=4096, batch_size=1))
    assert one.micro_batch_tokens == [4096 - 64]
    assert one.peak_bytes <= 20 * GIB  # a step of one micro-batch: no fp32 master gradients alive from a previous one


@pytest.mark.slow
def test_qwen3_8b_full_fine_tuning_offloaded_fits_24_gib_with_allowances():
    plan = simulate(TrainConfig(**QWEN3_8B, offload_optimizer=True, gradient_checkpointing=True, batch_size=1))
    assert plan.breakdown["optimizer_state"] == 0 and plan.breakdown["grads"] < GIB
    assert plan.total_bytes <= 24 * GIB


def test_4bit_stand_in_holds_what_bitsandbytes_stores():
    """The planner's NF4 layer against bitsandbytes' own Params4bit (quantized on the CPU, as transformers'
    BitsAndBytesConfig of `load_model` sets it): the same tensors, shapes and dtypes (the double quantization's
    256-entry code, shared by all layers, aside)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (QLoRA's optional dependency) not installed")
    from sdpo_fast.train.fakes import Linear4bitStandIn as _Linear4bitStandIn

    linear = torch.nn.Linear(256, 192, bias=False, dtype=torch.bfloat16)
    packed = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                               quant_storage=torch.uint8).to("cpu")
    state = packed.quant_state
    assert state.blocksize == 64 and state.state2.blocksize == 256
    stored = [packed.data, state.absmax, state.state2.absmax, state.offset, state.code]
    stand_in = _Linear4bitStandIn(linear, torch.bfloat16)
    mine = list(stand_in.parameters()) + list(stand_in.buffers())
    assert sorted((tuple(t.shape), str(t.dtype)) for t in mine) == sorted((tuple(t.shape), str(t.dtype))
                                                                            for t in stored)
    layer = bnb.nn.Linear4bit(256, 192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = packed
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    assert stand_in(x).shape == layer(x).shape and stand_in(x).dtype == layer(x).dtype


def test_qlora_simulated_step_equals_the_real_step_and_holds_4bit_weights():
    config = _config(lora_r=4, gradient_checkpointing=True, dtype="bfloat16", load_in_4bit=True)
    simulated = simulate(config, _tiny_config(), fake=True)
    real = simulate(config, _tiny_config(), fake=False)
    assert simulated.phases == real.phases and simulated.breakdown == real.breakdown
    bf16 = simulate(_config(lora_r=4, gradient_checkpointing=True, dtype="bfloat16"), _tiny_config())
    model = tiny_causal_lm("qwen3", hidden_size=64, num_layers=3, vocab_size=300)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    saved = bf16.breakdown["weights"] - simulated.breakdown["weights"]
    assert 2 * linear - linear // 2 - linear // 64 - 8192 * 21 <= saved <= 2 * linear - linear // 2


def test_world_size_2_shards_weights_and_lowers_the_peak():
    """Rank 0 of two under FSDP2 (fake process group): each parameter's shard is its first ceil(rows / 2) rows
    (fp32, as `train` loads trained weights under torchrun), the peak is below one GPU's, and the fake step equals
    the same step on real tensors."""
    config = _config(gradient_checkpointing=True, batch_size=8)
    one = simulate(config, _tiny_config())
    two = simulate(config, _tiny_config(), world_size=2)
    assert two.world_size == 2 and two.peak_bytes < one.peak_bytes
    model = tiny_causal_lm("qwen3", hidden_size=64, num_layers=3, vocab_size=300)

    def rounded(nbytes: int) -> int:
        return -(-nbytes // 512) * 512

    shards = sum(rounded(-(-p.shape[0] // 2) * p[0].numel() * 4) for p in model.parameters())
    buffers = sum(rounded(b.numel() * b.element_size()) for b in model.buffers())
    assert two.breakdown["weights"] == shards + buffers
    assert two.breakdown["grads"] + two.breakdown["optimizer_state"] < (one.breakdown["grads"]
                                                                        + one.breakdown["optimizer_state"]) * 0.6
    real = simulate(config, _tiny_config(), fake=False, world_size=2)
    assert (two.peak_bytes, two.phases, two.breakdown) == (real.peak_bytes, real.phases, real.breakdown)


def test_world_size_refuses_what_torchrun_refuses():
    with pytest.raises(ValueError, match="offload_optimizer"):
        simulate(_config(offload_optimizer=True), _tiny_config(), world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        simulate(_config(), _tiny_config(), world_size=0)


def test_world_size_2_in_bf16_runs_the_packed_passes():
    """bf16 compute under FSDP2 (fp32 shards gathered as bf16): the packed passes reach every attention layer
    (FSDP2 must not rebuild the pass's `sdpo_call` by casting inputs), fake equal to real."""
    config = _config(gradient_checkpointing=True, dtype="bfloat16", batch_size=4)
    fake = simulate(config, _tiny_config(), world_size=2)
    real = simulate(config, _tiny_config(), fake=False, world_size=2)
    assert (fake.peak_bytes, fake.phases) == (real.peak_bytes, real.phases)


@pytest.mark.parametrize("optimizer,state_bytes", [("adamw", 4 + 8), ("adamw8bit", 4 + 2)])
def test_bf16_weights_are_stepped_through_fp32_masters_in_the_plan(optimizer, state_bytes):
    """As `build_optimizer` on CUDA: an fp32 master (4 bytes) per bf16 parameter beside the optimizer's moments
    (AdamW: two fp32; the 8-bit stand-in: two uint8)."""
    plan = simulate(_config(gradient_checkpointing=True, dtype="bfloat16", optimizer=optimizer, batch_size=1),
                    _tiny_config())
    model = tiny_causal_lm("qwen3", hidden_size=64, num_layers=3, vocab_size=300)
    n = sum(p.numel() for p in model.parameters())
    assert state_bytes * n <= plan.breakdown["optimizer_state"] <= state_bytes * n * 1.1

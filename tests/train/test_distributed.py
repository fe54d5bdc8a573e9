"""torchrun + FSDP2 (gloo, CPU): the sharded job equals one process with the same global batch; sharded
checkpoints resume exactly (also on another world size); the consolidated Hugging Face checkpoint equals the
shards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdpo_fast.train import train
from sdpo_fast.train.config import resolve_config
from sdpo_fast.train.distributed import World, rank_micro_batches

FLAGS = {"max_steps": 4, "batch_size": 5, "micro_batch_tokens": 200, "save_steps": 2, "optimizer": "sgd",
         "lr": 0.05, "seed": 1}
"""Small steps of the bundled model and data; 200-token micro-batches make the ranks' micro-batch counts differ."""
TIMEOUT_S = 240

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    return out


def torchrun(nproc: int, args: list[str], *, module: str = "sdpo_fast.cli") -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m module args` (bounded in time), checked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def run_single(output_dir: Path, **values) -> Path:
    train(resolve_config({}, {**FLAGS, **values, "output_dir": str(output_dir)}), progress=False)
    return output_dir


def run_two(output_dir: Path, nproc: int = 2, **values) -> Path:
    torchrun(nproc, ["train", *_flags({**FLAGS, **values, "output_dir": str(output_dir)}), "--no-progress"])
    return output_dir


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(checkpoint / name))


def max_rel(a: dict, b: dict) -> float:
    """The largest relative error ||a - b|| / ||b|| over the tensors."""
    assert sorted(a) == sorted(b)
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


def changed(a: dict, before: dict) -> bool:
    return any(not torch.equal(a[k], before[k]) for k in a)


@needs_gloo
@pytest.mark.slow
def test_two_processes_equal_one_then_resume_exactly(tmp_path):
    single, two = run_single(tmp_path / "one"), run_two(tmp_path / "two")
    end = weights(two / "checkpoint-4")
    assert changed(end, weights(two / "checkpoint-2"))
    assert max_rel(end, weights(single / "checkpoint-4")) <= 1e-5
    assert sorted(p.name for p in (two / "checkpoint-4").iterdir() if p.suffix == ".json") == \
        sorted(p.name for p in (single / "checkpoint-4").iterdir() if p.suffix == ".json")

    # A job that dies right after its step-2 checkpoint, then resumed with --resume: equal to the uninterrupted job.
    crashed = tmp_path / "crashed"
    script = tmp_path / "crash.py"
    script.write_text("import json, sys\nfrom sdpo_fast.train import train\nfrom sdpo_fast.train.config import "
                      "resolve_config\ntrain(resolve_config({}, json.loads(sys.argv[1])), progress=False, "
                      "stop_after=2)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), json.dumps({**FLAGS, "output_dir": str(crashed)})],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (crashed / "checkpoint-4").exists() and (crashed / "checkpoint-2" / "distributed").is_dir()
    three = tmp_path / "three"
    shutil.copytree(crashed, three)
    torchrun(2, ["train", "--output-dir", str(crashed), "--resume", "--no-progress"])
    resumed = weights(crashed / "checkpoint-4")
    assert all(torch.equal(resumed[k], end[k]) for k in end)

    # The same checkpoint resumed by three processes: the same steps, resharded.
    torchrun(3, ["train", "--output-dir", str(three), "--resume", "--no-progress"])
    assert max_rel(weights(three / "checkpoint-4"), end) <= 1e-5


@needs_gloo
@pytest.mark.slow
def test_consolidated_checkpoint_loads_and_equals_the_shards(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    run = run_two(tmp_path / "two", max_steps=2)
    checkpoint = run / "checkpoint-2"
    dcp_to_torch_save(checkpoint / "distributed", tmp_path / "shards.pt")
    shards = torch.load(tmp_path / "shards.pt", weights_only=True)["model"]
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert set(shards) == set(loaded)
    assert all(torch.equal(shards[k], loaded[k]) for k in shards)


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("optimizer,lora_r,extra,bound", [
    ("adamw", 0, {}, 1e-4), ("sgd", 0, {"checkpoint_layers": 2, "offload_activations": True}, 1e-5),
    ("sgd", 4, {}, 1e-5),
    ("adamw", 4, {"gradient_checkpointing": True}, 1e-4), ("sgd", 4, {"teacher": "base"}, 1e-5),
    ("sgd", 4, {"teacher": "ema", "teacher_ema_rate": 0.5}, 1e-5)])
def test_two_processes_equal_one(tmp_path, optimizer, lora_r, extra, bound):
    pytest.importorskip("peft") if lora_r else None
    values = dict(max_steps=3, save_steps=0, optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 0.05,
                  lora_r=lora_r, **extra)
    single, two = run_single(tmp_path / "one", **values), run_two(tmp_path / "two", **values)
    end = weights(two / "checkpoint-3")
    assert max_rel(end, weights(single / "checkpoint-3")) <= bound
    if lora_r:
        assert all(".lora_" in k for k in end)


@needs_gloo
@pytest.mark.slow
def test_ema_teacher_resumes_exactly_under_torchrun(tmp_path):
    pytest.importorskip("peft")
    values = dict(lora_r=4, teacher="ema", teacher_ema_rate=0.5)
    whole = run_two(tmp_path / "whole", **values)
    part = tmp_path / "part"
    run_two(part, **values, max_steps=2)
    torchrun(2, ["train", "--output-dir", str(part), "--resume", "--max-steps", "4", "--no-progress"])
    resumed, end = weights(part / "checkpoint-4"), weights(whole / "checkpoint-4")
    assert all(torch.equal(resumed[k], end[k]) for k in end)


def test_rank_shares_cover_the_step_once_with_equal_micro_batch_counts():
    from sdpo_fast.data import encode_interactions, load_interactions
    from sdpo_fast.demo.assets import tiny_model_path, tiny_sample_path
    from sdpo_fast.train.setup import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_path()))
    batch, _ = encode_interactions(tokenizer, load_interactions(tiny_sample_path()))
    batch = batch[:7]
    counts = [len(e.completion_ids) for e in batch]
    single = [g for g, padding in rank_micro_batches(batch, counts, 200, None)]
    assert sorted(i for g in single for i in g) == list(range(7))
    for size in (2, 3, 8):
        shares = [rank_micro_batches(batch, counts, 200, World(rank, size, rank)) for rank in range(size)]
        assert len({len(s) for s in shares}) == 1
        assert sorted(i for s in shares for g, padding in s if not padding for i in g) == list(range(7))
        assert all(len(g) == 1 for s in shares for g, padding in s if padding)
    assert [padding for _, padding in rank_micro_batches(batch, counts, 200, World(7, 8, 7))] == [True]


def test_one_process_refuses_a_sharded_checkpoint_and_torchrun_a_single_one(tmp_path):
    from sdpo_fast.train.rundir import check_resumable

    sharded = tmp_path / "checkpoint-2"
    (sharded / "distributed").mkdir(parents=True)
    with pytest.raises(ValueError, match="sharded .*torchrun"):
        check_resumable(sharded, None)
    single = tmp_path / "checkpoint-3"
    single.mkdir()
    with pytest.raises(ValueError, match="written by one process"):
        check_resumable(single, World(0, 2, 0))
    check_resumable(sharded, World(0, 2, 0))
    check_resumable(single, None)


@pytest.mark.parametrize("key,value", [("teacher", "ema"), ("optimizer_in_backward", True),
                                       ("offload_optimizer", True), ("load_in_4bit", True)])
def test_torchrun_refuses_what_fsdp2_cannot_run_naming_the_option(key, value):
    from sdpo_fast.train.distributed import check_distributed

    extra = {"lora_r": 4} if key == "load_in_4bit" else {}
    with pytest.raises(ValueError, match=f"^{key} .*torchrun"):
        check_distributed(resolve_config({}, {key: value, **extra}))


@needs_gloo
def test_the_loss_sees_the_gathered_lm_head_inside_the_root_and_refuses_a_shard_outside():
    """One gloo process (world size 1): outside the root's forward the lm_head is a DTensor shard, which
    sdpo_loss refuses by name; inside it is the plain full weight."""
    from sdpo_fast import sdpo_loss
    from sdpo_fast.testing import tiny_causal_lm
    from sdpo_fast.train.distributed import shard_model

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        model = tiny_causal_lm("qwen3", seed=0)
        root = shard_model(model)
        head = model.get_output_embeddings()
        hidden = torch.randn(3, head.in_features)
        targets = torch.tensor([1, 2, 3])
        with pytest.raises(ValueError, match="lm_head_weight is a sharded DTensor"):
            sdpo_loss(hidden, head.weight, targets, teacher_logprobs=torch.zeros(3))

        def inside(inner):
            weight = inner.get_output_embeddings().weight
            assert not hasattr(weight, "placements") and weight.shape == (inner.config.vocab_size, hidden.shape[1])
            return sdpo_loss(hidden, weight, targets, teacher_logprobs=torch.zeros(3))

        root(inside).backward()
        assert hasattr(head.weight, "placements") and head.weight.grad is not None
    finally:
        torch.distributed.destroy_process_group()


@needs_gloo
@pytest.mark.slow
def test_one_failing_rank_ends_the_job_with_its_error(tmp_path):
    """Rank 1 raises in its second step while rank 0 waits in a collective: the job ends (no hang) with rank 1's
    error as the root cause."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import json, os, sys\nimport sdpo_fast.train.trainer as trainer\nfrom sdpo_fast.train.config import "
        "resolve_config\nreal, calls = trainer.train_step, []\n\ndef failing(*args, **kwargs):\n"
        "    if os.environ['RANK'] == '1' and len(calls) == 1:\n        raise RuntimeError('rank 1 failed on purpose')\n"
        "    calls.append(1)\n    return real(*args, **kwargs)\n\ntrainer.train_step = failing\n"
        "trainer.train(resolve_config({}, json.loads(sys.argv[1])), progress=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), json.dumps({**FLAGS, "output_dir": str(tmp_path / "run")})],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr
    root_cause = done.stderr.split("Root Cause")[-1]
    assert "rank      : 1" in root_cause


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL, one per process)")
def test_two_gpus_equal_one_gpu_in_fp32(tmp_path):
    values = dict(max_steps=3, save_steps=0, device="cuda", dtype="float32", attn_backend="sdpa")
    single, two = run_single(tmp_path / "one", **values), run_two(tmp_path / "two", **values)
    assert max_rel(weights(two / "checkpoint-3"), weights(single / "checkpoint-3")) <= 1e-5


@needs_gloo
def test_fsdp2_prefetches_the_previous_layer_and_syncs_lora_gradients_once_per_step(monkeypatch):
    """One gloo process: a step of two micro-batches (student and live teacher pass, two forwards per backward)
    gathers each layer once per backward, in reverse order (FSDP2's implicit prefetch would gather the last layer
    again after the first layer's backward), and LoRA gradients are reduce-scattered on the last micro-batch only,
    giving the gradients of the unsharded model."""
    import copy
    import dataclasses

    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
    from torch.distributed.fsdp._fully_shard._fsdp_common import is_bw
    from peft import LoraConfig, get_peft_model

    from sdpo_fast.data import encode_interactions, load_interactions, sample_path
    from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer
    from sdpo_fast.train import TrainConfig, objective_of, step_options, train_step
    from sdpo_fast.train.distributed import shard_model

    batch, _ = encode_interactions(tiny_tokenizer("qwen3"), list(load_interactions(sample_path()))[:2])
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm("qwen3", num_layers=3, initializer_range=0.2, seed=1),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                      init_lora_weights=False)).train()
    plain = copy.deepcopy(model)
    config = TrainConfig(ignore_first_k=0, loss_backend="torch")
    options = dataclasses.replace(step_options(config), micro_batch_tokens=1, attn_backend="sdpa")

    def step(runner, params):
        optimizer = torch.optim.SGD(params, lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        train_step(runner, batch, objective_of(config), optimizer, scheduler, options)

    step(plain, [p for p in plain.parameters() if p.requires_grad])
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        root = shard_model(model)
        layers = {layer: i for i, layer in enumerate(root.model.get_base_model().model.layers)}
        gathered, reduced = [], []
        real_unshard, real_reduce = param_group.FSDPParamGroup.unshard, param_group.foreach_reduce

        def unshard(self, async_op=False):
            if self._all_gather_result is None and not self.is_unsharded and self.modules[0] in layers:
                gathered.append(("backward" if is_bw() else "forward", layers[self.modules[0]]))
            return real_unshard(self, async_op)

        def foreach_reduce(*args, **kwargs):
            reduced.append(1)
            return real_reduce(*args, **kwargs)

        monkeypatch.setattr(param_group.FSDPParamGroup, "unshard", unshard)
        monkeypatch.setattr(param_group, "foreach_reduce", foreach_reduce)
        assert root.defer_sync
        step(root, [p for p in model.parameters() if p.requires_grad])
        got = {n: p.full_tensor().detach() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        torch.distributed.destroy_process_group()
    in_backward = [i for phase, i in gathered if phase == "backward"]
    assert in_backward == [2, 1, 0] * len(batch), gathered
    assert len(reduced) == len(layers)  # each layer once per step (the root holds no LoRA weights)
    want = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)

"""Peak GPU memory of `sdpo-fast train`'s step, measured without the GPU.

The model is built from its Hugging Face config on fake tensors (`FakeTensorMode`: shapes, dtypes and storages,
no data), wrapped and optimized as the trainer does, and the trainer's own `train_step` runs on a worst-case batch
(student pass, prefix-reusing teacher pass, the loss's Python path, backward, optimizer step) under
`StorageCounter`, which counts every live storage as `torch.cuda.max_memory_allocated` does. Two steps run: the
first on one short interaction creates the optimizer state, the second, on the worst-case batch, is reported. The same run on real tensors gives the same bytes,
which the tests check on a small model.

Not counted (stated as allowances): the CUDA context, cuBLAS workspaces, allocator fragmentation. Simulated on
the CPU code path: attention as the CPU flash kernel (same kept tensors as flash-attn: output and log-sum-exp);
the loss as on CUDA, the Triton backend's Python path with its kernel launches (the logit modes' chunk_logits
included) replaced by what they write (the torch backend, --loss-backend torch, runs as it is).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import resolved_checkpoint_layers
from .fakes import (IntegerConstants, Linear4bitStandIn, PhasedObjective, build_model, constant_index_tensors,
                    fake_world, fsdp_storage_resizes, planned_optimizer, triton_launches_as_workspace)

SHAPES = {
    # Published configs (shared/ANCHORS.md for Qwen3-8B), written here so planning needs no network.
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False),
}
GIB = 2**30
MAX_WORLD_SIZE = 1024
"""Largest simulated torchrun job: the worst-case batch grows with the world size, and so does the time."""
HINDSIGHT_TOKENS = 64
"""Teacher prompt tokens beyond the student's in the planned worst case (the hindsight block and follow-up)."""
ALLOWANCES = {"cuda_context": 512 << 20, "cublas_workspace": 64 << 20}
FRAGMENTATION = 0.05
"""Share of the counted peak allowed for allocator fragmentation (expandable segments keep it small)."""
CATEGORIES = ("weights", "grads", "optimizer_state", "checkpointed_inputs", "prefix_kv", "teacher_hidden",
              "loss_workspace", "working_set")
_PHASE_CATEGORY = {"student forward": "checkpointed_inputs", "teacher forward": "teacher_hidden",
                   "loss": "loss_workspace", "loss backward": "loss_workspace", "backward": "working_set",
                   "optimizer step": "optimizer_state", "setup": "working_set", "between": "working_set"}


def load_config(model: str):
    """A transformers config: a name in SHAPES, a local directory / config.json, or a Hub id (refused at once
    when the Hub cannot be reached). The shape fields must be in the file itself (`check_shape_fields`)."""
    from transformers import AutoConfig, CONFIG_MAPPING, PretrainedConfig

    from .setup import check_model_source

    if model.lower() in SHAPES:
        fields = dict(SHAPES[model.lower()])
        return CONFIG_MAPPING[fields.pop("model_type")](**fields)
    try:
        path = Path(model).expanduser()
        if not path.exists():
            check_model_source(model, weights=False)
        elif path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"{model!r} is a directory without a config.json")
        check_shape_fields(PretrainedConfig.get_config_dict(model)[0], model)
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no model config at {model!r} (known shapes: {sorted(SHAPES)}): "
                         f"{str(exc).splitlines()[0]}") from None


SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
"""The config.json fields the plan's model is built from; without them transformers would fill in its defaults
(another model's shape)."""


def check_shape_fields(values: dict, model: str) -> None:
    """ValueError unless each of SHAPE_FIELDS is a positive integer in `values` (a raw config.json mapping, or its
    text_config for a multimodal model), and num_key_value_heads and head_dim too where given."""
    if not isinstance(values, dict):
        raise ValueError(f"{model!r}: config.json must hold a JSON object, got {type(values).__name__}")
    text = values.get("text_config") if isinstance(values.get("text_config"), dict) else values
    for key in SHAPE_FIELDS + ("num_key_value_heads", "head_dim"):
        if key not in text:
            if key in SHAPE_FIELDS:
                raise ValueError(f"{model!r}: config.json has no {key} (planning would use the defaults of "
                                 f"model_type {values.get('model_type')!r}, not this model's)")
            continue
        value = text[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{model!r}: config.json's {key} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class SimulatedPlan:
    """Bytes of the reported step's peak (counted storages) on one GPU (rank 0 of world_size), where it happened,
    its parts, and allowances; parameters and trainable count that GPU's shards."""

    peak_bytes: int
    peak_phase: str
    peak_module: str
    phases: dict[str, int]
    breakdown: dict[str, int]
    allowances: dict[str, int]
    parameters: int
    trainable: int
    micro_batch_tokens: list[int]
    world_size: int = 1

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + sum(self.allowances.values())

    def fits(self, budget_bytes: int) -> bool:
        return self.total_bytes <= budget_bytes

    def to_json(self, budget_bytes: int) -> dict:
        return {"peak_bytes": self.peak_bytes, "method": "simulated", "phases": dict(self.phases),
                "breakdown": dict(self.breakdown), "fits": self.fits(budget_bytes), "budget_bytes": budget_bytes,
                "world_size": self.world_size}


def simulated_dtype(config) -> torch.dtype:
    """The weights' dtype `simulate` takes by default: bfloat16 (as `train` on CUDA) unless config.dtype names one."""
    return torch.bfloat16 if config.dtype == "auto" else getattr(torch, config.dtype)


def simulated_loss_backend(config) -> str:
    """The loss backend the simulated step runs: "auto" and "triton" are Triton where it imports (its launches
    replaced by what they write), else torch; torch and reference as named."""
    from .setup import importable

    if config.loss_backend in ("auto", "triton") and importable("triton"):
        return "triton"
    return "torch" if config.loss_backend == "auto" else config.loss_backend


def interaction(prompt_tokens: int, completion_tokens: int, vocab_size: int, behavior: bool = False):
    """An interaction at these limits: student prompt prompt_tokens - HINDSIGHT_TOKENS, teacher prompt
    prompt_tokens (the encoder fits both prompts into max_prompt_tokens), completion completion_tokens; with
    `behavior`, the sampler's log-probs of the completion (importance clipping)."""
    from ..model import EncodedInteraction

    student_prompt = max(prompt_tokens - HINDSIGHT_TOKENS, 1)
    shared = max(student_prompt - 8, 0)
    completion = [(7 + i) % vocab_size for i in range(completion_tokens)]
    student = [(3 + i) % vocab_size for i in range(student_prompt)] + completion
    teacher = student[:shared] + [(5 + i) % vocab_size for i in range(prompt_tokens - shared)] + completion
    return EncodedInteraction(student, teacher, completion, shared,
                              [-1.0] * completion_tokens if behavior else None)


def worst_case_batch(config, vocab_size: int, world_size: int = 1):
    """The step's interactions at the configured limits, as many as fill two micro-batches on each of
    `world_size` ranks (so gradients accumulate), at most batch_size."""
    e = interaction(config.max_prompt_tokens, config.max_completion_tokens, vocab_size,
                    config.importance_clip is not None)
    per_micro_batch = max(1, config.micro_batch_tokens // max(len(e.student_input_ids), len(e.teacher_input_ids)))
    return [e] * min(config.batch_size, 2 * per_micro_batch * world_size)


def check_step(config, world_size: int = 1) -> None:
    """The check `train_step` makes of each step (`step.check_micro_batches`), made of the planned worst case
    before anything is built: ValueError when offload_optimizer would get several micro-batches per step."""
    from ..model import micro_batch_indices
    from .step import check_micro_batches

    batch = worst_case_batch(config, 1 << 20, world_size)
    check_micro_batches(config.offload_optimizer,
                        len(micro_batch_indices(batch[::world_size], config.micro_batch_tokens)))


def simulate(config, hf_config=None, *, fake: bool = True, dtype: torch.dtype | None = None,
             steps: int = 2, world_size: int = 1) -> SimulatedPlan:
    """Run `steps` training steps of `config` (a TrainConfig) on the model of `hf_config` (default: the config
    `config.model` names) and count storages; the last step, on `worst_case_batch`, is reported (the ones before
    run one short interaction, to create the optimizer state). fake False: the same on real CPU
    tensors (the check that the simulation is exact). dtype default: bfloat16 (as `train` on CUDA) unless
    config.dtype names one. world_size > 1: rank 0 of a torchrun job, the model sharded by FSDP2 as `train` shards
    it (`distributed.shard_model`) over a fake process group, the batch `world_size` times as large."""
    from torch._subclasses import FakeTensorMode

    from ..model import unwrap_model
    from .build import make_scheduler, objective_of, step_options
    from .memory import StorageCounter, local_shard
    from .step import train_step

    if isinstance(world_size, bool) or not (isinstance(world_size, int) and 1 <= world_size <= MAX_WORLD_SIZE):
        raise ValueError(f"world_size must be an integer in [1, {MAX_WORLD_SIZE}], got {world_size!r} (the "
                         "simulated step holds a batch world_size times as large: 4096 already takes a minute)")
    if world_size > 1:
        from .distributed import check_distributed

        check_distributed(config)
    check_step(config, world_size)
    if hf_config is None:
        hf_config = load_config(config.model)
    resolved_checkpoint_layers(config, hf_config.get_text_config().num_hidden_layers)
    if dtype is None:
        dtype = simulated_dtype(config)
    config = dataclasses.replace(config, loss_backend=simulated_loss_backend(config), attn_backend="auto")
    triton = config.loss_backend == "triton"
    modules: list[str] = []
    counter = StorageCounter(module=lambda: modules[-1] if modules else "", categories=_PHASE_CATEGORY)
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    constants = IntegerConstants(fake_mode) if fake else contextlib.nullcontext()
    torch.manual_seed(config.seed)
    launches = triton_launches_as_workspace() if triton else contextlib.nullcontext()
    # Under torchrun the trained weights load in fp32 (the sharded weights are the master weights; trainer._train)
    weights_dtype = torch.float32 if world_size > 1 and not config.lora_r else dtype
    with constant_index_tensors(), launches, fake_world(world_size) as world, fake_mode, constants:
        model = build_model(hf_config, config, weights_dtype, fake)
        runner = model
        if world is not None:
            from .distributed import shard_model

            runner = shard_model(model, param_dtype=None if dtype == torch.float32 else dtype,
                                 reduce_dtype=torch.float32)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = planned_optimizer(params, config)
        scheduler = make_scheduler(optimizer, config, steps)
        for t in list(model.parameters()) + list(model.buffers()):
            counter.track(t, "weights")
        for group in optimizer.param_groups:  # fp32 masters of 16-bit parameters (the rest: counted above)
            for p in group["params"]:
                counter.track(p, "optimizer_state")
        hooks = _phase_hooks(unwrap_model(model), counter, params, optimizer, modules)
        objective = PhasedObjective(objective_of(config), counter)
        options = step_options(config)
        vocab_size = hf_config.get_text_config().vocab_size
        batch = worst_case_batch(config, vocab_size, world_size)
        first = [interaction(config.ignore_first_k + 2, config.ignore_first_k + 1, vocab_size,
                             config.importance_clip is not None)]
        collecting = gc.isenabled()
        gc.disable()
        try:
            resizes = fsdp_storage_resizes(counter) if world is not None else contextlib.nullcontext()
            with counter, resizes:
                for step in range(steps):
                    gc.collect()
                    if step == steps - 1:
                        counter.reset_peak()
                    counter.set_phase("between")
                    train_step(runner, batch if step == steps - 1 else first, objective, optimizer, scheduler,
                               options, world=world)
        finally:
            for hook in hooks:
                hook.remove()
            if collecting:
                gc.enable()
        breakdown = {name: counter.peak_breakdown.get(name, 0) for name in CATEGORIES}
        parameters = sum(local_shard(p).numel() for p in model.parameters()) + sum(
            m.out_features * m.in_features - m.weight.numel() for m in model.modules()
            if isinstance(m, Linear4bitStandIn))
        trainable = sum(local_shard(p).numel() for p in params)
    from ..model import micro_batch_indices

    mine = batch[::world_size]  # rank 0's share (distributed.rank_micro_batches)
    groups = micro_batch_indices(mine, config.micro_batch_tokens)
    tokens = [sum(len(mine[i].student_input_ids) for i in g) for g in groups]
    allowances = dict(ALLOWANCES, fragmentation=int(FRAGMENTATION * counter.peak))
    return SimulatedPlan(counter.peak, counter.peak_phase, counter.peak_module, dict(counter.phase_peaks), breakdown,
                         allowances, parameters, trainable, tokens, world_size)


def _phase_hooks(hf_model, counter, params, optimizer, modules: list[str]) -> list:
    """Hooks that mark the passes' phases, tag gradients, optimizer state and the prefix K/V by what they are,
    and keep `modules` the stack of running module forwards (recomputations in backward included). No hook
    holds a tensor, so no reference cycle keeps one alive."""
    decoder = hf_model.get_decoder()
    names = {module: name for name, module in hf_model.named_modules()}

    def enter(module, args):
        modules.append(names[module])

    def leave(module, args, output):
        modules.pop()
    hooks = [decoder.register_forward_pre_hook(
                 lambda m, a: counter.set_phase("student forward" if torch.is_grad_enabled() else "teacher forward")),
             decoder.register_forward_hook(lambda m, a, o: counter.set_phase("between"))]

    def tag_prefix(module, args, kwargs, output):
        call = kwargs.get("sdpo_call")
        if call is not None and call.mode == "student" and call.prefix_cache.is_stored(module):
            for t in call.prefix_cache._kv[module]:
                counter.tag(t, "prefix_kv")

    for module in decoder.modules():
        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        if module.__class__.__name__.endswith("Attention"):
            hooks.append(module.register_forward_hook(tag_prefix, with_kwargs=True))
    def tag_grad(p):
        if p.grad is not None:  # None: already consumed by an optimizer stepped in backward
            counter.tag(p.grad, "grads")

    hooks += [p.register_post_accumulate_grad_hook(tag_grad) for p in params]

    outer: list[str] = []

    def before_step(opt, args, kwargs):
        outer.append(counter.phase)
        counter.set_phase("optimizer step")

    def after_step(opt, args, kwargs):
        for state in opt.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    counter.tag(t, "optimizer_state")
        phase = outer.pop()
        counter.set_phase("between" if opt is optimizer else phase)

    for opt in getattr(optimizer, "inner", [optimizer]):  # stepped in backward: one optimizer per parameter
        hooks += [opt.register_step_pre_hook(before_step), opt.register_step_post_hook(after_step)]
    return hooks


def format_plan(plan: SimulatedPlan, budget_bytes: int) -> str:
    """A human-readable report of `plan` against `budget_bytes`."""
    per_gpu = f" on each of {plan.world_size} GPUs (FSDP2 shards)" if plan.world_size > 1 else ""
    lines = [f"parameters {plan.parameters / 1e9:.3f}B, trainable {plan.trainable / 1e6:.2f}M{per_gpu}; "
             f"micro-batches of {plan.micro_batch_tokens} student tokens",
             f"simulated peak {plan.peak_bytes / GIB:.2f} GiB during {plan.peak_phase} ({plan.peak_module})"]
    lines += [f"  {name:<20}{value / GIB:9.2f} GiB" for name, value in plan.breakdown.items()]
    lines.append("peak by phase: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.phases.items()))
    lines.append("allowances: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.allowances.items())
                 + f" GiB; total {plan.total_bytes / GIB:.2f} GiB")
    fits = plan.fits(budget_bytes)
    lines.append(f"{'fits' if fits else 'does NOT fit'} in {budget_bytes / GIB:.2f} GiB")
    return "\n".join(lines)


def _candidates(config, num_layers: int) -> list[tuple[str, dict]]:
    every = dict(gradient_checkpointing=True, checkpoint_layers=None)
    out = []
    if resolved_checkpoint_layers(config, num_layers) < num_layers:
        out.append(("--gradient-checkpointing", every))
    if config.micro_batch_tokens > config.max_prompt_tokens + config.max_completion_tokens:
        tokens = config.max_prompt_tokens + config.max_completion_tokens
        out.append((f"--gradient-checkpointing --micro-batch-tokens {tokens}", dict(every, micro_batch_tokens=tokens)))
    if not config.lora_r:
        out.append(("--lora-r 16 --gradient-checkpointing", dict(every, lora_r=16)))
    return out


def check_fits(config, free_bytes: int) -> SimulatedPlan:
    """The simulated plan of `config`; ValueError if it needs more than `free_bytes`, naming flags that fit
    (each simulated too)."""
    hf_config = load_config(config.model)
    plan = simulate(config, hf_config)
    if plan.fits(free_bytes):
        return plan
    fixes = [flags for flags, change in _candidates(config, hf_config.get_text_config().num_hidden_layers)
             if simulate(dataclasses.replace(config, **change), hf_config).fits(free_bytes)]
    raise ValueError(f"this configuration needs {plan.total_bytes / GIB:.2f} GiB (simulated peak "
                     f"{plan.peak_bytes / GIB:.2f} GiB during {plan.peak_phase}, plus allowances) but the GPU has "
                     f"{free_bytes / GIB:.2f} GiB free; "
                     + (f"these fit: {'; '.join(fixes)}" if fixes else "lower --max-prompt-tokens / "
                        "--max-completion-tokens or train LoRA adapters (--lora-r)")
                     + " (--no-check-memory skips this check)")

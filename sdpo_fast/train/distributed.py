"""Data-parallel training under `torchrun` on PyTorch's FSDP2: the process group, the sharded model, each rank's
share of a step, and the collectives a step needs.

Sharding: every decoder layer is one FSDP2 unit (gathered for its forward and again for its backward), and the
root unit holds the rest (embeddings, final norm, lm_head). The root is `ShardedRoot`, whose forward runs a
whole micro-batch: student pass, live teacher pass and the loss (an ema/base teacher's pass is a root call of
its own, before: train/teachers.py). `sdpo_loss` reads the whole lm_head weight, so it must run inside the
root's forward: there the root's parameters are gathered (FSDP2 keeps the root's gathered from forward to the
end of backward) and the lm_head gradient is reduce-scattered by the root's post-backward, like every other
gradient. One process (no torchrun) does not shard at all.

Prefetching is explicit: layer i gathers layer i + 1 during its forward and layer i - 1 during its backward. A
micro-batch runs two forwards (student, then the no-grad teacher pass) per backward, and FSDP2's implicit
backward prefetch, which replays the recorded forward order, would gather the last layer again after the first
layer's backward, once per micro-batch.

Gradient sync: with at most `DEFERRED_SYNC_BYTES` of trainable weights' fp32 gradient (LoRA), the micro-batches
of a step accumulate unsharded fp32 gradients and only the last one reduce-scatters (one reduce-scatter per
unit per step instead of one per micro-batch), at the cost of holding the whole trainable gradient on every
rank between micro-batches instead of its 1/world_size shard. Above it (full fine-tuning: 4 bytes per
parameter unsharded), every micro-batch reduce-scatters, as before.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..model import unwrap_model

@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job."""

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> World | None:
    """The torchrun job this process belongs to (WORLD_SIZE > 1 in the environment), else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: torch.device, timeout_minutes: float) -> World | None:
    """Join the torchrun job's process group (NCCL on CUDA, gloo on CPU; a collective waiting longer than
    `timeout_minutes` for the other ranks fails the run); None when not under torchrun."""
    world = launched_world()
    if world is None:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                             **kwargs)
    return world


def close_world() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


DEFERRED_SYNC_BYTES = 1 << 30
"""Largest unsharded fp32 gradient of the trainable weights for which a step reduce-scatters only once."""


class ShardedRoot(nn.Module):
    """The FSDP2 root around a causal LM (or peft model): `root(fn, *args)` runs `fn(model, *args)` inside the
    root's forward, with the root's parameters (embeddings, final norm, lm_head) gathered. defer_sync: gradients
    are reduce-scattered on a step's last micro-batch only (`sync_gradients`)."""

    def __init__(self, model: nn.Module, defer_sync: bool = False):
        super().__init__()
        self.model, self.defer_sync = model, defer_sync

    def forward(self, fn, *args):
        return fn(self.model, *args)

    def sync_gradients(self, last: bool) -> None:
        """Before a micro-batch's backward: reduce-scatter its gradients, or (defer_sync, not the step's `last`
        micro-batch) accumulate them unsharded in fp32 for the last one to reduce-scatter."""
        self.set_requires_gradient_sync(last or not self.defer_sync)


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers of a causal LM (or peft model), the FSDP2 units below the root."""
    decoder = unwrap_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"{type(decoder).__name__} has no `layers`: FSDP2 sharding needs a decoder with a "
                        "`layers` list (Llama/Qwen/Mistral-style)")
    return list(layers)


def shard_model(model, *, param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                mesh=None) -> ShardedRoot:
    """Shard `model` with FSDP2 (`fully_shard` per decoder layer, then the root) over `mesh` (default: all
    ranks). param_dtype: the compute dtype the gathered parameters are cast to (None: their own);
    reduce_dtype: the dtype gradients are reduced in (None: param_dtype's)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Inputs are not cast: FSDP2 would rebuild the packed pass's `sdpo_call` dataclass per layer, and its
    # attention layers would record into copies.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = ShardedRoot(model, defer_sync=4 * trainable <= DEFERRED_SYNC_BYTES)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[i + 1]])
        # layer 0 names the root (gathered until backward ends: a no-op), which turns off the implicit pick
        layer.set_modules_to_backward_prefetch([layers[i - 1] if i else root])
    return root


def rank_micro_batches(batch, counts: list[int], max_tokens: int,
                       world: World | None) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of a step as (indices into `batch`, padding).

    Rank r takes interactions r, r + size, ... (deterministic, whatever the data); each rank packs its share
    under `max_tokens`, leaving out micro-batches without loss tokens (`counts`). Every rank runs as many
    micro-batches as the busiest one, so that all join the same collectives: the missing ones are padding
    (the step's cheapest interaction with loss tokens, run with zero token weights)."""
    from ..model import micro_batch_indices

    def groups_of(indices: list[int]) -> list[list[int]]:
        packed = micro_batch_indices([batch[i] for i in indices], max_tokens)
        return [[indices[j] for j in g] for g in packed if any(counts[indices[j]] for j in g)]

    if world is None:
        return [(g, False) for g in groups_of(list(range(len(batch))))]
    per_rank = [groups_of(list(range(r, len(batch), world.size))) for r in range(world.size)]
    mine, most = per_rank[world.rank], max(map(len, per_rank))
    if len(mine) == most:
        return [(g, False) for g in mine]
    filler = min((i for i in range(len(batch)) if counts[i]),
                 key=lambda i: len(batch[i].student_input_ids) + len(batch[i].teacher_input_ids))
    return [(g, False) for g in mine] + [([filler], True)] * (most - len(mine))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. clip_grad_norm_'s total norm over sharded gradients); a tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks (a new tensor)."""
    out = tensor.clone()
    torch.distributed.all_reduce(out)
    return out


def barrier() -> None:
    torch.distributed.barrier()


def broadcast_object(value, src: int = 0):
    """Rank `src`'s `value`, on every rank (any picklable value built by this program, never read from disk)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over the ranks (one small all-reduce), so that every rank takes the same branch."""
    values = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


SHARDED_DIR = "distributed"
"""The checkpoint subdirectory holding the sharded training state (torch.distributed.checkpoint)."""


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def save_sharded(directory, model, optimizer, teacher_state: dict | None = None) -> None:
    """Every rank writes its shards of the trainable weights, the optimizer state and the teacher's own tensors
    (an EMA adapter: sharded like the adapter) into `directory` (torch.distributed.checkpoint; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    if teacher_state:
        state["teacher"] = teacher_state
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory, model, optimizer, teacher_state: dict | None = None) -> None:
    """The state saved by `save_sharded`, resharded onto this job's ranks (the world size may differ from the
    saving job's); `teacher_state`'s tensors are filled in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    if teacher_state:
        state["teacher"] = teacher_state
    dcp.load(state, checkpoint_id=str(directory))
    # frozen weights (a LoRA base) are not in the checkpoint; dcp.load has failed on any trainable one missing
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_options(strict=False))


def full_state_dict(model, dtype: torch.dtype | None = None, trainable_only: bool = False) -> dict:
    """The unsharded weights on rank 0's CPU (cast to `dtype` if given; {} on the other ranks; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=trainable_only))
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()
            if k not in tied_aliases(model)}


def tied_aliases(model) -> set[str]:
    """Names of parameters that are another name's parameter (tied embeddings: lm_head.weight), which a
    Hugging Face checkpoint leaves out."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        first.setdefault(id(param), name)
    return aliases


def check_distributed(config) -> None:
    """ValueError naming the first `TrainConfig` option that a torchrun (FSDP2) job cannot run."""
    refused = {
        "teacher": (config.teacher != "live" and not config.lora_r,
                    "without LoRA the ema and base teachers are unsharded copies of the model; use --teacher live "
                    "or --lora-r"),
        "optimizer": (config.optimizer == "adamw8bit", "bitsandbytes' 8-bit AdamW does not step sharded "
                                                       "(DTensor) parameters; use --optimizer adamw"),
        "optimizer_in_backward": (config.optimizer_in_backward, "FSDP2 reduce-scatters each gradient already; "
                                                                "drop --optimizer-in-backward"),
        "offload_optimizer": (config.offload_optimizer, "shard the optimizer state over the GPUs instead; drop "
                                                        "--offload-optimizer"),
        "load_in_4bit": (config.load_in_4bit, "4-bit base weights are not sharded here; use --lora-r without "
                                              "--load-in-4bit"),
    }
    for key, (bad, advice) in refused.items():
        if bad:
            raise ValueError(f"{key} {getattr(config, key)!r} is not supported under torchrun: {advice}")

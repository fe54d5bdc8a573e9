"""Data-parallel training under `torchrun` on PyTorch's FSDP2: the process group, the sharded model, each rank's
share of a step, and the collectives a step needs.

Sharding: every decoder layer is one FSDP2 unit (gathered for its forward and again for its backward), and the
root unit holds the rest (embeddings, final norm, lm_head). The root is `ShardedRoot`, whose forward runs a
whole micro-batch: student pass, teacher pass and the loss. `sdpo_loss` reads the whole lm_head weight, so it
must run inside the root's forward: there the root's parameters are gathered (FSDP2 keeps the root's gathered
from forward to the end of backward) and the lm_head gradient is reduce-scattered by the root's post-backward,
like every other gradient. One process (no torchrun) does not shard at all.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..model import unwrap_model

DEFAULT_TIMEOUT_MINUTES = 30.0
"""How long a collective waits for the other ranks before the run fails (a crashed or stuck rank)."""


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


def init_world(device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> World | None:
    """Join the torchrun job's process group (NCCL on CUDA, gloo on CPU); None when not under torchrun."""
    world = launched_world()
    if world is None:
        return None
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                             **kwargs)
    return world


def close_world() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ShardedRoot(nn.Module):
    """The FSDP2 root around a causal LM (or peft model): `root(fn, *args)` runs `fn(model, *args)` inside the
    root's forward, with the root's parameters (embeddings, final norm, lm_head) gathered."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


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

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = ShardedRoot(model)
    fully_shard(root, mesh=mesh, mp_policy=policy)
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

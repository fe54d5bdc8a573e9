"""One training step, offline and online alike: micro-batches, token weights, masking, backward, clipping, step.

Token weights come from the whole step, so the micro-batch gradients add up to the gradient of the step's loss
taken in one piece (exact accumulation). Statistics stay on the device until the step ends (one sync).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ..constants import IGNORE_INDEX
from ..loss import Objective
from ..model import EncodedInteraction, forward_micro_batch
from ..utils.device import upload
from .distributed import ShardedRoot, World, all_reduce_sum, full_tensor, rank_micro_batches


@dataclass(frozen=True)
class StepOptions:
    """micro_batch_tokens: token budget of one packed pass; ignore_first_k: completion tokens left out of the
    loss; aggregation: "sequence" (per-interaction mean, then batch mean) or "token"; max_grad_norm: global-norm
    clip (None: off); prefix_reuse / attn_backend: as `forward_micro_batch`."""

    micro_batch_tokens: int = 8192
    ignore_first_k: int = 0
    aggregation: str = "sequence"
    max_grad_norm: float | None = None
    prefix_reuse: bool = True
    attn_backend: str = "auto"


@dataclass(frozen=True)
class StepStats:
    """One step: its loss (sum over micro-batches), tokens run (student, plus teacher when the objective has one),
    and over its loss tokens their count, the sum of the objective's signal and how many are > 0; the gradient
    norm before clipping."""

    loss: float
    tokens: int
    loss_tokens: int
    signal_sum: float
    positive: int
    grad_norm: float

    @property
    def mean_signal(self) -> float:
        return self.signal_sum / max(self.loss_tokens, 1)

    @property
    def positive_share(self) -> float:
        return self.positive / max(self.loss_tokens, 1)


def loss_token_counts(batch: list[EncodedInteraction], ignore_first_k: int) -> list[int]:
    """Completion tokens of each interaction that enter the loss (all but the first `ignore_first_k`)."""
    return [max(len(e.completion_ids) - ignore_first_k, 0) for e in batch]


def interaction_weights(counts: list[int], aggregation: str) -> list[float]:
    """Per-token weight of each interaction of a step, given its loss-token counts.

    sequence: 1 / (n_interactions * count_i), the authors' per-sequence mean then batch mean (interactions
    without loss tokens still count in the batch mean, as in their code); token: 1 / sum(counts).
    """
    if aggregation == "sequence":
        return [1.0 / (len(counts) * c) if c else 0.0 for c in counts]
    total = sum(counts)
    return [1.0 / total if c else 0.0 for c in counts]


def read_totals(totals: torch.Tensor) -> list[float]:
    """The step's one device->host synchronization: its statistics, once every kernel of the step is queued."""
    return totals.cpu().tolist()


def micro_batch_output(model, encoded: list[EncodedInteraction], weights: list[float], objective: Objective,
                       options: StepOptions, own):
    """The objective's output over one micro-batch: student pass, teacher pass, loss with per-interaction token
    weights `weights`. own: (hidden, `LogitHead` or None) of an ema/base teacher's pass over `encoded`
    (`Teacher.hidden_states`, a call of its own made before), used instead of the live teacher's; None: live."""
    mb = forward_micro_batch(model, encoded, prefix_reuse=options.prefix_reuse and own is None,
                             attn_backend=options.attn_backend, teacher=objective.needs_teacher and own is None)
    if own is not None:
        mb = dataclasses.replace(mb, teacher_hidden=own[0], teacher_lm_head_weight=None if own[1] is None else
                                 own[1].weight, teacher_head=own[1])
    seq = mb.sequence_index
    targets = mb.target_ids.masked_fill(mb.position_in_completion < options.ignore_first_k, IGNORE_INDEX)
    token_weights = upload(weights, torch.float32, seq.device)[seq]
    return objective(dataclasses.replace(mb, target_ids=targets, token_weights=token_weights))


def check_behavior_logprobs(objective: Objective, batch: list[EncodedInteraction]) -> None:
    """ValueError when the objective clips importance ratios and an interaction has no behavior_logprobs."""
    if getattr(objective, "importance_clip", None) is not None:
        missing = sum(e.behavior_logprobs is None for e in batch)
        if missing:
            raise ValueError(f"importance_clip is set but {missing} of the step's {len(batch)} interactions have no "
                             "behavior_logprobs (the sampler's log-probs of their completion tokens)")


def check_micro_batches(one_backward_per_step: bool, micro_batches: int) -> None:
    """ValueError when an optimizer that keeps one backward's gradients per step (offload_optimizer) gets a step
    of several micro-batches (`train_step` checks each step; `plan.check_step` the planned worst case)."""
    if one_backward_per_step and micro_batches > 1:
        raise ValueError(f"offload_optimizer keeps one micro-batch's gradient per step (torchao offloads each as it "
                         f"arrives), but this step packs into {micro_batches}: raise micro_batch_tokens or lower "
                         "batch_size")


def train_step(model, batch: list[EncodedInteraction], objective: Objective, optimizer, scheduler,
               options: StepOptions, teacher=None, world: World | None = None) -> StepStats:
    """Forward and backward over the micro-batches of `batch`, then clip, step, advance the schedule, clear grads.

    teacher: a `teachers.Teacher` (None: the live teacher); an ema or base one runs its own teacher pass and is
    updated after the optimizer step. An objective with importance_clip needs every interaction's
    behavior_logprobs (ValueError before any pass otherwise). world: under torchrun, `model` is a `ShardedRoot`
    and this rank runs its share of `batch` (token weights still from the whole batch; statistics summed over
    ranks)."""
    check_behavior_logprobs(objective, batch)
    own_teacher = teacher is not None and not teacher.live and objective.needs_teacher
    counts = loss_token_counts(batch, options.ignore_first_k)
    in_backward = hasattr(optimizer, "take_grad_norm")
    weights = interaction_weights(counts, options.aggregation)
    groups = rank_micro_batches(batch, counts, options.micro_batch_tokens, world)
    check_micro_batches(getattr(optimizer, "one_backward_per_step", False), len(groups))
    ranks = 1 if world is None else world.size
    weights = [w * ranks for w in weights]  # FSDP2 averages gradients over ranks: their sum is wanted
    run = model if isinstance(model, ShardedRoot) else functools.partial(_run, model)
    sums = []
    for k, (group, padding) in enumerate(groups):
        encoded = [batch[i] for i in group]
        # an ema/base teacher's pass is a root call of its own: its weight swap stays outside FSDP2's forwards
        own = teacher.hidden_states(encoded, options.attn_backend, run) if own_teacher else None
        out = run(micro_batch_output, encoded, [0.0 if padding else weights[i] for i in group], objective,
                  options, own)
        if in_backward:  # the optimizer steps from the gradient hooks of the step's last backward (train/optim.py)
            optimizer.final_backward = k == len(groups) - 1
        if isinstance(model, ShardedRoot):
            model.sync_gradients(last=k == len(groups) - 1)
        out.loss.backward()
        if not padding:
            signal = out.signal.masked_fill(~out.mask, 0.0)
            sums.append(torch.stack([out.loss.detach().double(), signal.sum().double(),
                                     ((signal > 0) & out.mask).sum().double()]))
    if in_backward:
        norm = optimizer.take_grad_norm()
    else:
        params = [p for group in optimizer.param_groups for p in group["params"]]  # fp32 masters under bf16
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm or math.inf))
    optimizer.step()
    if own_teacher:
        teacher.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = torch.stack(sums).sum(0) if sums else torch.zeros(3, dtype=torch.float64, device=norm.device)
    if world is not None:
        totals = all_reduce_sum(totals) / torch.tensor([ranks, 1, 1], dtype=torch.float64, device=totals.device)
    loss_sum, signal_sum, positive, grad_norm = read_totals(torch.cat([totals, norm.detach().double()[None]]))
    run_tokens = [len(e.student_input_ids) + (len(e.teacher_input_ids) if objective.needs_teacher else 0)
                  for e in batch]
    return StepStats(loss=loss_sum, tokens=sum(run_tokens), loss_tokens=sum(counts), signal_sum=signal_sum,
                     positive=int(positive), grad_norm=grad_norm)


def _run(model, fn, *args):
    return fn(model, *args)

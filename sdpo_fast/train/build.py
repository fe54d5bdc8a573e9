"""A run built from its config: the objective, the step options, the optimizer and its schedule, the step order
and the encoded data. The config is a `TrainConfig` or any config with the shared options of train/options.py
(`OnlineConfig`); the trainer, the online loop and the memory planner build through these functions (the
planner passes its stand-ins for what needs a GPU). The model and tokenizer come from train/setup.py."""
from __future__ import annotations

import math

import torch

from ..data import EncodedInteraction, encode_interactions, load_interactions
from ..demo.assets import tiny_sample_path
from ..loss import Objective, default_workspace_bytes, distillation_objective, make_objective
from .optim import OptimizerInBackward, offload_optimizer
from .setup import build_optimizer, build_scheduler
from .step import StepOptions


def objective_of(config) -> Objective:
    """The objective `config.loss` names, with its options (signal_clip and center_advantages as resolved) and the
    loss's workspace budget stated, so that the planner (which builds through here) counts the path it picks."""
    if config.loss == "sft":
        return make_objective("sft")
    return distillation_objective(config.distillation_mode, temperature=config.temperature,
                                  alpha=config.distillation_alpha, topk=config.distillation_topk,
                                  add_tail=config.distillation_add_tail, signal_clip=config.resolved_signal_clip,
                                  center_advantages=config.resolved_center_advantages,
                                  importance_clip=config.importance_clip, backend=config.loss_backend,
                                  workspace_bytes=loss_workspace_bytes(config))


def loss_workspace_bytes(config, cuda: bool | None = None) -> int | None:
    """The loss's workspace budget in bytes: config.loss_workspace_mb, else the default of its backend on a
    machine with (cuda; None: this machine's) or without a GPU (None for the reference backend)."""
    if config.loss_workspace_mb is not None:
        return config.loss_workspace_mb << 20
    return default_workspace_bytes(config.loss_backend, torch.cuda.is_available() if cuda is None else cuda)


def step_options(config) -> StepOptions:
    return StepOptions(micro_batch_tokens=config.micro_batch_tokens, ignore_first_k=config.ignore_first_k,
                       aggregation=config.aggregation, max_grad_norm=config.max_grad_norm,
                       prefix_reuse=config.prefix_reuse, attn_backend=config.attn_backend)


def make_optimizer(params: list, config, *, construct=None, offload=offload_optimizer):
    """The optimizer `config` names over `params`: plain, stepped in backward, or offloaded to the CPU.
    construct: `group -> optimizer` in place of the named one, offload: `offload_optimizer`'s stand-in (the
    memory planner's, for what needs a GPU)."""
    def build(ps):
        return build_optimizer(ps, config.optimizer, config.lr, config.weight_decay, construct=construct)

    if config.offload_optimizer:
        return offload(params, config.optimizer, config.lr, config.weight_decay)
    if config.optimizer_in_backward:
        return OptimizerInBackward(params, build, config.max_grad_norm)
    return build(params)


def make_scheduler(optimizer, config, total: int):
    """`config.schedule` after its warm-up, over `total` steps."""
    return build_scheduler(optimizer, config.schedule, config.warmup_ratio, total)


def step_order(n_interactions: int, batch_size: int, epoch: int, seed: int, shuffle: bool) -> list[list[int]]:
    """Interaction indices of each step of `epoch` (the last step may be short); depends only on the arguments."""
    if shuffle:
        order = torch.randperm(n_interactions, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n_interactions)
    order = order.tolist()
    return [order[i:i + batch_size] for i in range(0, n_interactions, batch_size)]


def total_steps(n_interactions: int, config) -> int:
    return config.max_steps or config.epochs * math.ceil(n_interactions / config.batch_size)


def load_encoded_data(config, tokenizer) -> tuple[list[EncodedInteraction], dict]:
    """Encoded interactions of `config.data` (default: the bundled tiny_sample.jsonl) and what was read: rows,
    conversations, interactions, encoded, skipped (reason -> count), bad_rows (count) and the first bad rows'
    locations ("file:number: reason")."""
    source = config.data if config.data is not None else tiny_sample_path()
    stream = load_interactions(source, max_history=config.max_history, preset=config.data_preset)
    encoded, skipped = encode_interactions(tokenizer, stream, max_prompt_tokens=config.max_prompt_tokens,
                                           max_completion_tokens=config.max_completion_tokens,
                                           hindsight_template=config.hindsight_template,
                                           prompt_truncation=config.prompt_truncation)
    stats = stream.stats
    skipped = {**dict(stats.skipped), **dict(skipped)}
    counts = {"rows": stats.rows, "conversations": stats.conversations, "interactions": stats.interactions,
              "encoded": len(encoded), "skipped": skipped,
              "bad_rows": sum(skipped.get(reason, 0) for reason in {b.reason for b in stats.bad_rows}),
              "first_bad_rows": [f"{b.file}:{b.number}: {b.reason}" for b in stats.bad_rows[:5]]}
    if not encoded:
        raise ValueError(f"data {str(source)!r} gave zero usable interactions (skipped: {skipped or 'none'}; "
                         f"bad rows: {len(stats.bad_rows)})")
    empty = sum(1 for e in encoded if not e.student_prompt_len or not e.completion_ids)
    if empty:
        raise ValueError(f"data {str(source)!r}: {empty} interactions encode to zero prompt or completion tokens; "
                         "the tokenizer does not encode this text (check the model directory's tokenizer files)")
    return encoded, counts


def describe_counts(counts: dict) -> str:
    """One line: rows/interactions read, used, skipped and why."""
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(counts["skipped"].items(), key=lambda kv: -kv[1]))
    line = (f"data: {counts['rows']} rows read, {counts['conversations']} conversations, "
            f"{counts['interactions']} interactions, {counts['encoded']} encoded; skipped: {skipped or 'none'}")
    if counts["first_bad_rows"]:
        line += f"; first bad rows: {'; '.join(counts['first_bad_rows'][:3])}"
    return line

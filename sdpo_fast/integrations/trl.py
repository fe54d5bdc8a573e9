"""TRL drop-in: `use_sdpo_loss(trainer)` makes TRL's experimental `SDPOTrainer` compute its self-distillation loss
through `sdpo_loss` from hidden states, never forming the student's or the teacher's (B, T, V) logits.

```python
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer
from sdpo_fast.integrations.trl import use_sdpo_loss

trainer = use_sdpo_loss(SDPOTrainer(model=model, reward_funcs=reward, args=SDPOConfig(...), train_dataset=data))
trainer.train()
```

Served: `distillation_mode` sampled_token, full_logits and topk_logits (with or without the tail), any
`distillation_alpha` TRL accepts, importance clipping (`distillation_is_clip` with the rollout log-probs TRL
records), every teacher kind TRL builds (the teacher forward still runs under TRL's own adapter context), TRL's
per-sequence-mean aggregation and gradient-accumulation scaling. TRL's trainer runs its own student and teacher
forwards; the lm_head is bypassed during them, so the "logits" TRL slices and divides by the temperature are the
final hidden states, which `sdpo_loss` multiplies by the lm_head weight chunk by chunk (in the weight's dtype:
under autocast, as with TRL's default `bf16=True`, TRL's lm_head product runs in bf16 and ours does not).
The model's logit head is reproduced (`sdpo_fast.model.logit_head`): a logit scale (Cohere, Granite) is applied
by the model's own forward to the hidden states the bypassed lm_head returns (it is linear); a bias and a soft cap
(Gemma-2/3, switched off in the config during the forward) are passed to `sdpo_loss`, with the hidden states
multiplied back by the temperature TRL divided them by, so that the cap and the bias act before it.

Not served, with a ValueError at `use_sdpo_loss` (or at the step, when the arguments changed since): a
`distillation_weight` other than 1 (the policy-loss blend needs full logits), the teacher server
(`use_teacher_server`), `use_liger_kernel`, an lm_head that is not a `torch.nn.Linear` (an adapter on it, for
example), and models whose logits sdpo_fast does not reproduce (`sdpo_fast.model.check_model_support`).
"""
from __future__ import annotations

import contextlib
import types

import torch

from ..constants import IGNORE_INDEX
from ..loss import sdpo_loss
from ..loss.divergence import importance_ratio
from ..loss.head import LogitHead, head_kwargs
from ..model.support import logit_transform
from ..loss.objectives import DISTILLATION_MODES

def _unwrap(trainer, model):
    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lm_head(trainer, model, role: str) -> tuple[torch.nn.Linear, LogitHead]:
    """The model's lm_head and the head `sdpo_loss` applies to the hidden states TRL returns (its scale already
    applied by the model's forward)."""
    base = _unwrap(trainer, model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"sdpo_fast's TRL integration needs the {role} model's lm_head to be a torch.nn.Linear, "
                         f"got {type(head).__name__}; train without an adapter on the lm_head")
    try:
        scale, softcap = logit_transform(base.config, type(base))
    except ValueError as exc:
        raise ValueError(f"sdpo_fast's TRL integration cannot serve the {role} model: {exc}") from None
    if head.bias is not None and scale != 1.0:
        raise ValueError(f"sdpo_fast's TRL integration cannot serve a {role} model with both an lm_head bias and a "
                         "logit scale (the scale reaches the hidden states, not the bias)")
    return head, LogitHead(head.weight, head.bias, 1.0, softcap)


@contextlib.contextmanager
def _uncapped(models):
    """Within the block the models' configs have no final_logit_softcapping (their forwards read it there)."""
    configs = {id(c): c for m in models for c in (m.config, m.config.get_text_config())}.values()
    saved = [(c, c.final_logit_softcapping) for c in configs if getattr(c, "final_logit_softcapping", None) is not None]
    for config, _ in saved:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        for config, value in saved:
            config.final_logit_softcapping = value


def _check_args(trainer) -> None:
    args = trainer.args
    if args.distillation_weight != 1.0:
        raise ValueError(f"sdpo_fast's TRL integration serves distillation_weight=1.0 only, got "
                         f"{args.distillation_weight}: the blend with the policy loss needs full logits")
    if getattr(trainer, "use_teacher_server", False) or getattr(args, "use_teacher_server", False):
        raise ValueError("sdpo_fast's TRL integration does not serve use_teacher_server=True (the teacher's log-probs "
                         "then come from the vLLM server, not from hidden states)")
    if getattr(args, "use_liger_kernel", False):
        raise ValueError("sdpo_fast's TRL integration replaces the distillation loss; set use_liger_kernel=False")
    if args.distillation_mode not in DISTILLATION_MODES:
        raise ValueError(f"distillation_mode {args.distillation_mode!r} is not served by sdpo_fast's TRL integration")
    if args.distillation_mode == "topk_logits" and args.distillation_topk is None:
        raise ValueError("`distillation_mode='topk_logits'` requires `distillation_topk` to be set.")


@contextlib.contextmanager
def _hidden_state_heads(heads):
    """Within the block each lm_head returns its input (the final hidden states) instead of logits."""
    saved = [head.__dict__.get("forward") for head in heads]
    for head in heads:
        head.forward = types.MethodType(lambda self, hidden: hidden, head)
    try:
        yield
    finally:
        for head, forward in zip(heads, saved):
            if forward is None:
                del head.forward
            else:
                head.forward = forward


def _distillation_loss(trainer, model, inputs, backend: str) -> torch.Tensor:
    _check_args(trainer)
    args = trainer.args
    student_head, student_logit_head = _lm_head(trainer, model, "student")
    teacher_head, teacher_logit_head = _lm_head(trainer, trainer.teacher_model, "teacher")
    heads = [student_head] if teacher_head is student_head else [student_head, teacher_head]
    with _hidden_state_heads(heads), _uncapped([_unwrap(trainer, model), _unwrap(trainer, trainer.teacher_model)]):
        hidden = trainer._compute_teacher_student_logits(model, trainer.teacher_model, inputs)
    student_hidden = hidden.student_logits.to(student_head.weight.dtype)
    teacher_hidden = hidden.teacher_logits.to(teacher_head.weight.dtype)
    nonlinear = any(h.bias is not None or h.softcap is not None for h in (student_logit_head, teacher_logit_head))
    temperature = args.temperature if nonlinear else 1.0
    if nonlinear and temperature != 1.0:  # TRL divided by the temperature, which must act after the bias and cap
        student_hidden, teacher_hidden = student_hidden * temperature, teacher_hidden * temperature
    if student_hidden.shape[-1] != student_head.in_features or teacher_hidden.shape[-1] != teacher_head.in_features:
        raise ValueError("the model's forward did not return its lm_head's input; sdpo_fast's TRL integration cannot "
                         "serve this model")

    mask = hidden.loss_mask.float()
    per_sequence = mask.sum(-1, keepdim=True).clamp(min=1.0)
    token_weights = mask / per_sequence / mask.shape[0]
    target_ids = hidden.completion_ids.masked_fill(mask == 0, IGNORE_INDEX)
    behavior = inputs.get("old_per_token_logps")
    clip = args.distillation_is_clip if behavior is not None else None
    own_teacher = None if teacher_head is student_head else LogitHead(
        teacher_head.weight.detach(), None if teacher_head.bias is None else teacher_head.bias.detach(), 1.0,
        teacher_logit_head.softcap)
    options = dict(distillation_mode=args.distillation_mode, distillation_alpha=args.distillation_alpha,
                   temperature=temperature, **head_kwargs(student_logit_head, own_teacher))
    if args.distillation_mode == "topk_logits":
        options.update(distillation_topk=args.distillation_topk, distillation_add_tail=args.distillation_add_tail)
    loss, stats = sdpo_loss(
        student_hidden, student_head.weight, target_ids, teacher_hidden=teacher_hidden.detach(),
        token_weights=token_weights.to(torch.float32),
        behavior_logprobs=None if clip is None else behavior.float(), importance_clip=clip, backend=backend,
        return_stats=True, **options)

    per_token = stats.divergence
    if clip is not None:
        per_token = per_token * importance_ratio(stats.student_logprobs, behavior, clip)
    mode = "train" if model.training else "eval"
    mean = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    trainer._log_self_distillation_metric(mode, trainer.accelerator.gather(mean).mean().item())
    return loss


def use_sdpo_loss(trainer, *, backend: str = "auto"):
    """Make `trainer` (a `trl.experimental.sdpo.SDPOTrainer`) compute its self-distillation loss with `sdpo_loss`
    (backend: as `sdpo_loss`'s). Raises ValueError for configurations it cannot serve; returns the trainer."""
    from trl.experimental.sdpo import SDPOTrainer

    if not isinstance(trainer, SDPOTrainer):
        raise TypeError(f"trainer must be a trl.experimental.sdpo.SDPOTrainer, got {type(trainer).__name__}")
    _check_args(trainer)
    _lm_head(trainer, trainer.model, "student")
    _lm_head(trainer, trainer.teacher_model, "teacher")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The SDPOTrainer does not support returning outputs")
        loss = _distillation_loss(self, model, inputs, backend)
        accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
        return loss / accumulation_scale

    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    return trainer

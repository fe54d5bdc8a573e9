"""Argument checks of `sdpo_loss`: TypeError/ValueError naming the argument, before any kernel runs."""
from __future__ import annotations

import torch

from ..utils.checks import check_bool, check_choice, check_int, check_number
from .divergence import MODES, POLICY_GRADIENT_MODE

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_TEMPERATURE = 1e-3
"""Below this, logits/temperature overflow the fp32 accumulation of long rows (1/T multiplies every logit)."""
LOGPROB_SLACK = 1e-3
"""teacher_logprobs may exceed 0 by this much (rounding of low-precision log-softmax), no more."""


def _check_float(name: str, tensor, ndim: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")


def _check_same(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}")
    if dtype and tensor.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def _check_integer(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")


def _check_index(name: str, tensor, target_ids: torch.Tensor) -> None:
    _check_integer(name, tensor)
    _check_like_targets(name, tensor, target_ids)


def _check_per_token(name: str, tensor, target_ids: torch.Tensor) -> None:
    _check_float(name, tensor)
    _check_like_targets(name, tensor, target_ids)


def _check_like_targets(name: str, tensor, target_ids: torch.Tensor) -> None:
    if tensor.shape != target_ids.shape:
        raise ValueError(f"{name} must have the shape of target_ids {tuple(target_ids.shape)}, got {tuple(tensor.shape)}")
    _check_same(name, tensor, "target_ids", target_ids, dtype=False)


def validate(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs, teacher_lm_head_weight,
             token_weights, ignore_index, temperature, signal_clip, sequence_index=None,
             center_advantages=False) -> None:
    """Raise TypeError/ValueError naming the first bad argument of `sdpo_loss`; runs before any kernel."""
    _check_float("student_hidden", student_hidden)
    if student_hidden.dim() < 2:
        raise ValueError(f"student_hidden must be (..., d), got shape {tuple(student_hidden.shape)}")
    _check_float("lm_head_weight", lm_head_weight, ndim=2)
    for name, weight in (("lm_head_weight", lm_head_weight), ("teacher_lm_head_weight", teacher_lm_head_weight)):
        if hasattr(weight, "placements"):
            raise ValueError(f"{name} is a sharded DTensor (placements {tuple(weight.placements)}): under FSDP2 call "
                             "sdpo_loss inside the forward of the module that holds the lm_head (its parameters are "
                             "gathered there), or unshard it first")
    _check_same("lm_head_weight", lm_head_weight, "student_hidden", student_hidden, dtype=True)
    vocab_size, hidden_dim = lm_head_weight.shape
    if student_hidden.shape[-1] != hidden_dim:
        raise ValueError(f"student_hidden has hidden size {student_hidden.shape[-1]} but lm_head_weight is "
                         f"{tuple(lm_head_weight.shape)} (V, d)")
    _check_integer("target_ids", target_ids)
    if target_ids.shape != student_hidden.shape[:-1]:
        raise ValueError(f"target_ids must have shape {tuple(student_hidden.shape[:-1])} (student_hidden without "
                         f"its last dim), got {tuple(target_ids.shape)}")
    _check_same("target_ids", target_ids, "student_hidden", student_hidden, dtype=False)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    if (teacher_hidden is None) == (teacher_logprobs is None):
        raise ValueError("pass exactly one of teacher_hidden or teacher_logprobs")
    if teacher_hidden is not None:
        _check_float("teacher_hidden", teacher_hidden)
        if teacher_hidden.shape[:-1] != target_ids.shape:
            raise ValueError(f"teacher_hidden must have shape {tuple(target_ids.shape)} + (d,), "
                             f"got {tuple(teacher_hidden.shape)}")
        teacher_weight, weight_name = lm_head_weight, "lm_head_weight"
        if teacher_lm_head_weight is not None:
            _check_float("teacher_lm_head_weight", teacher_lm_head_weight, ndim=2)
            if teacher_lm_head_weight.shape[0] != vocab_size:
                raise ValueError(f"teacher_lm_head_weight has vocabulary {teacher_lm_head_weight.shape[0]} but "
                                 f"lm_head_weight has {vocab_size}")
            teacher_weight, weight_name = teacher_lm_head_weight, "teacher_lm_head_weight"
        if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_hidden has hidden size {teacher_hidden.shape[-1]} but {weight_name} is "
                             f"{tuple(teacher_weight.shape)}")
        _check_same("teacher_hidden", teacher_hidden, weight_name, teacher_weight, dtype=True)
    else:
        if teacher_lm_head_weight is not None:
            raise ValueError("teacher_lm_head_weight is only used with teacher_hidden, not with teacher_logprobs")
        _check_per_token("teacher_logprobs", teacher_logprobs, target_ids)
    if token_weights is not None:
        _check_per_token("token_weights", token_weights, target_ids)
        if token_weights.requires_grad and torch.is_grad_enabled():
            raise ValueError("token_weights requires grad, but sdpo_loss treats the token weights as constants (the "
                             "fused backends give them no gradient): pass token_weights.detach()")
    check_number("temperature", temperature, positive=True)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} (smaller values overflow the logits), "
                         f"got {temperature!r}")
    check_number("signal_clip", signal_clip, positive=True, optional=True, what="None or a number > 0")
    check_bool("center_advantages", center_advantages)
    if center_advantages:
        if not isinstance(sequence_index, torch.Tensor):
            raise ValueError("center_advantages=True needs sequence_index, an integer tensor shaped like target_ids")
    if sequence_index is not None:
        _check_index("sequence_index", sequence_index, target_ids)


def validate_values(student_hidden, lm_head_weight, target_ids, teacher_hidden, teacher_logprobs,
                    teacher_lm_head_weight, token_weights, ignore_index, sequence_index=None,
                    check_finite: bool = True, behavior_logprobs=None, *, lm_head_bias=None,
                    teacher_lm_head_bias=None) -> None:
    """The checks that read tensor values, gathered into one device->host read: target ids in [0, V) or
    ignore_index, sequence ids in [0, number of positions), token_weights >= 0 and teacher_logprobs <= 0 at loss
    positions, and with `check_finite` every float input (behavior_logprobs included) finite. ValueError naming the
    tensor."""
    vocab_size = lm_head_weight.shape[0]
    loss = target_ids != ignore_index
    out_of_range = loss & ((target_ids < 0) | (target_ids >= vocab_size))
    checks: list[tuple[str, torch.Tensor]] = [("target_ids", out_of_range.any())]
    if sequence_index is not None and sequence_index.numel():
        checks.append((f"sequence_index values must lie in [0, {sequence_index.numel()}) (one id per sequence)",
                       ((sequence_index < 0) | (sequence_index >= sequence_index.numel())).any()))
    if token_weights is not None:
        checks.append(("token_weights must be >= 0 at loss positions", (token_weights[loss] < 0).any()))
    if teacher_logprobs is not None:
        checks.append(("teacher_logprobs must be <= 0 at loss positions (log-probabilities; pass log q, "
                       "not q or a logit)", (teacher_logprobs[loss].float() > LOGPROB_SLACK).any()))
    if check_finite:
        tensors = {"student_hidden": student_hidden, "lm_head_weight": lm_head_weight,
                   "teacher_hidden": teacher_hidden, "teacher_lm_head_weight": teacher_lm_head_weight,
                   "lm_head_bias": lm_head_bias, "teacher_lm_head_bias": teacher_lm_head_bias}
        for name, tensor in tensors.items():
            if tensor is not None:
                checks.append((f"{name} has non-finite values (NaN or inf); pass check_finite=False to skip this "
                               "check", ~torch.isfinite(tensor).all()))
        for name, tensor in (("teacher_logprobs", teacher_logprobs), ("token_weights", token_weights),
                             ("behavior_logprobs", behavior_logprobs)):
            if tensor is not None:
                checks.append((f"{name} has non-finite values (NaN or inf) at loss positions",
                               ~torch.isfinite(tensor[loss]).all()))
    flags = torch.stack([flag.to(target_ids.device) for _, flag in checks]).tolist()
    for (message, _), bad in zip(checks, flags):
        if not bad:
            continue
        if message == "target_ids":
            value = int(target_ids[out_of_range][0])
            raise ValueError(f"target_ids contains {value}, outside [0, {vocab_size}) and not "
                             f"ignore_index={ignore_index}")
        raise ValueError(message)


def validate_distillation(target_ids, vocab_size, teacher_hidden, teacher_logprobs, signal_clip, center_advantages,
                          distillation_mode, distillation_alpha, distillation_topk, distillation_add_tail,
                          behavior_logprobs, importance_clip) -> None:
    """The distillation-mode and importance-clipping arguments of `sdpo_loss` (ValueError/TypeError naming them)."""
    check_choice("distillation_mode", distillation_mode, MODES)
    check_number("distillation_alpha", distillation_alpha, what="a number in [0, 1]")
    if distillation_alpha > 1:
        raise ValueError(f"distillation_alpha must be a number in [0, 1], got {distillation_alpha!r}")
    check_int("distillation_topk", distillation_topk, 1)
    check_bool("distillation_add_tail", distillation_add_tail)
    check_number("importance_clip", importance_clip, positive=True, optional=True, what="None or a number > 0")
    if behavior_logprobs is not None:
        _check_per_token("behavior_logprobs", behavior_logprobs, target_ids)
    elif importance_clip is not None:
        raise ValueError(f"importance_clip={importance_clip!r} needs behavior_logprobs (the sampler's log mu of each "
                         "target); pass them, or importance_clip=None")
    check_topk_support(distillation_mode, distillation_topk, distillation_add_tail)
    check_mode_options(distillation_mode, distillation_alpha, signal_clip, center_advantages)
    if distillation_mode == POLICY_GRADIENT_MODE:
        return
    if teacher_logprobs is not None:
        raise ValueError(f"teacher_logprobs is only valid with distillation_mode={POLICY_GRADIENT_MODE!r}; "
                         f"distillation_mode={distillation_mode!r} needs teacher_hidden")
    if teacher_hidden is None:
        raise ValueError(f"distillation_mode={distillation_mode!r} needs teacher_hidden")
    check_topk_vocabulary(distillation_mode, distillation_topk, vocab_size)


def check_topk_vocabulary(distillation_mode: str, distillation_topk: int, vocab_size: int) -> None:
    """ValueError when topk_logits asks for more tokens than the model's vocabulary has."""
    if distillation_mode == "topk_logits" and distillation_topk > vocab_size:
        raise ValueError(f"distillation_topk must be at most the vocabulary size {vocab_size}, "
                         f"got {distillation_topk}")


def check_mode_options(mode: str, alpha: float, signal_clip, center_advantages) -> None:
    """The alpha/mode rule: the policy gradient (sampled_token) needs alpha 1 (reverse KL); signal_clip and
    center_advantages shape its advantages, so the logit modes refuse them. ValueError naming the option."""
    if mode == POLICY_GRADIENT_MODE:
        if alpha != 1:
            raise ValueError(f"distillation_alpha must be 1 with distillation_mode {mode} (reverse KL), "
                             f"got {alpha!r}")
        return
    if signal_clip is not None:
        raise ValueError(f"signal_clip applies to distillation_mode {POLICY_GRADIENT_MODE} only; unset it for "
                         f"{mode} (got {signal_clip!r})")
    if center_advantages:
        raise ValueError(f"center_advantages applies to distillation_mode {POLICY_GRADIENT_MODE} only; unset it "
                         f"for {mode}")


def check_topk_support(distillation_mode: str, distillation_topk: int, distillation_add_tail: bool) -> None:
    """ValueError for topk_logits over one token without the tail bucket: renormalized, that token has probability
    1 for student and teacher alike, so the loss and its gradient are 0 (nothing trains)."""
    if distillation_mode == "topk_logits" and distillation_topk == 1 and not distillation_add_tail:
        raise ValueError("distillation_topk=1 with distillation_add_tail=False trains nothing (one token renormalized "
                         "has probability 1 for student and teacher: loss 0, gradient 0); use distillation_topk >= 2 "
                         "or keep the tail bucket (distillation_add_tail=True)")


def _check_bias(name: str, bias, weight_name: str, weight: torch.Tensor) -> None:
    _check_float(name, bias, ndim=1)
    if hasattr(bias, "placements"):
        raise ValueError(f"{name} is a sharded DTensor; pass it where {weight_name} is gathered, or unshard it first")
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{name} must have shape ({weight.shape[0]},) (the vocabulary of {weight_name}), "
                         f"got {tuple(bias.shape)}")
    _check_same(name, bias, weight_name, weight, dtype=True)


def _check_scale_and_cap(scale_name: str, scale, cap_name: str, cap) -> None:
    check_number(scale_name, scale, positive=True, what="a finite number > 0")
    check_number(cap_name, cap, positive=True, optional=True, what="None or a finite number > 0")


def validate_head(lm_head_weight, lm_head_bias, logit_scale, logit_softcap, teacher_lm_head_weight,
                  teacher_lm_head_bias, teacher_logit_scale, teacher_logit_softcap) -> None:
    """The logit-head arguments of `sdpo_loss` (ValueError/TypeError naming them): biases (V,) in their weight's
    dtype and device, scales finite and > 0, soft caps None or finite and > 0; the teacher's only with its own
    teacher_lm_head_weight."""
    if lm_head_bias is not None:
        _check_bias("lm_head_bias", lm_head_bias, "lm_head_weight", lm_head_weight)
    _check_scale_and_cap("logit_scale", logit_scale, "logit_softcap", logit_softcap)
    _check_scale_and_cap("teacher_logit_scale", teacher_logit_scale, "teacher_logit_softcap", teacher_logit_softcap)
    if teacher_lm_head_weight is None:
        given = [name for name, is_set in (("teacher_lm_head_bias", teacher_lm_head_bias is not None),
                                           ("teacher_logit_scale", teacher_logit_scale != 1.0),
                                           ("teacher_logit_softcap", teacher_logit_softcap is not None)) if is_set]
        if given:
            raise ValueError(f"{given[0]} describes the teacher's own head: pass it with teacher_lm_head_weight "
                             "(without one the teacher uses the student's lm_head_bias, logit_scale and "
                             "logit_softcap)")
    elif teacher_lm_head_bias is not None:
        _check_bias("teacher_lm_head_bias", teacher_lm_head_bias, "teacher_lm_head_weight", teacher_lm_head_weight)

"""Mixed precision that trains: 16-bit weights for compute, fp32 master weights for the update.

With bf16 weights and no master copy, an update smaller than half a bf16 ulp (2^-8 relative) rounds away: at
lr 2e-6 most weights of an 8B model would never change. `with_master_weights` gives the optimizer fp32 copies of
the 16-bit trainable parameters: each micro-batch's gradient is added into the copy's fp32 `.grad` as it arrives
(so accumulation over micro-batches is fp32, the lm_head's included), the optimizer steps the fp32 copies, and
the 16-bit parameters are set to their rounding after every step. The copies travel with the optimizer's
`state_dict`, so a resumed run continues from the exact fp32 values.

The copies start from the checkpoint's own values (`to_compute_dtype`: for full fine-tuning the loader reads the
weights in fp32 and each fp32 tensor becomes its master, no copy), not from their bf16 rounding, and RoPE's
frequency buffers stay fp32 (rounded to bf16, each angle is off by up to position * 2^-9 rad).

Where bf16 training lost precision (bundled model, `train_step`, 40 steps, batch 8, lr 1e-5, AdamW, the same
batches; cosine of the weight changes against the fp32 run's, both on the bf16 grid; measured on a 2-core CPU):
fp32 weights under `torch.autocast(bf16, cache_enabled=False)` 0.9957; bf16 weights with masters copied from the
bf16 weights 0.677. Bisected: the compute path is not it (one step's gradient is off fp32's by 1.6 % with bf16
weights and residual stream, 1.7 % under autocast; an fp32 residual stream changes nothing), nor the update (the
masters' own trajectory from their start has cosine 0.9996 with fp32's, autocast's weights 0.9997). The masters
started from the bf16 rounding of the fp32 checkpoint, so every weight carried a sub-ulp offset that shifts its
rounding boundaries by as much as the 40 steps move it. Started from the checkpoint's fp32 values: 0.9946 (a
checkpoint stored in bf16 was never affected). LoRA r8, same setting, the adapters: peft draws each in fp32 and
casts it to the base's bf16, so its master started from the rounding (0.883; lora_A 0.833, lora_B from zero
0.9999), and `lora_dtype` float32 adapters held the rounding upcast (0.883). `fp32_draws_kept` keeps the draw:
bf16 adapters 0.9976, float32 adapters 0.9974, autocast 0.9975 (at 20 steps 0.9950, 0.9957 autocast).

| --dtype | weights | gradients | optimizer steps | bytes / trainable parameter (AdamW) |
|---|---|---|---|---|
| float32 | fp32 | fp32 | fp32 weights | 4 + 4 + 8 = 16 |
| bfloat16 | bf16 (compute) | bf16 per micro-batch, summed in fp32 | fp32 master copy | 2 + 4 + 4 + 8 = 18 |
| bfloat16, LoRA (lora_dtype base) | bf16 adapters, bf16 base | as above | fp32 master copy | 2 + 4 + 4 + 8 = 18 |
| bfloat16, LoRA, lora_dtype float32 | fp32 adapters, bf16 base | fp32 | fp32 adapters | 4 + 4 + 8 = 16 |
| float16 | refused: no loss scaling (underflow); use bfloat16 | | | |

Loading in fp32 for bf16 full fine-tuning holds 4 + 2 bytes per parameter at load, the masters and the bf16
weights of the steady state, so no more than before; LoRA's kept draws (4 bytes per adapter parameter) become the
masters without a copy. fp32 weights under autocast would be 16 bytes per trained parameter plus the bf16 casts
autocast keeps for backward (2), and a LoRA base twice its bf16 bytes: bf16 weights with fp32 masters stay the
default.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.overrides import TorchFunctionMode

MASTER_KEY = "sdpo_fast_master_weights"
FP32_START = "sdpo_fast_fp32_start"
"""The attribute of a 16-bit parameter holding the fp32 value its master copy starts from (`to_compute_dtype`)."""
MASTER = "sdpo_fast_master"
"""The attribute of a 16-bit parameter holding its fp32 master weight (`with_master_weights`)."""


def needs_master_weights(params: list[torch.nn.Parameter]) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in params)


@torch.no_grad()
def to_compute_dtype(params: Iterable[torch.nn.Parameter], dtype: torch.dtype) -> None:
    """Cast the floating-point `params` (a model's: not its buffers, RoPE's frequencies) to the 16-bit `dtype` in
    place; each trainable fp32 one keeps its fp32 tensor (no copy) as the start of its master weight, which
    `with_master_weights` takes over."""
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            if p.requires_grad and p.dtype == torch.float32:
                setattr(p, FP32_START, p.data)
            p.data = p.data.to(dtype)


class _Fp32Casts(TorchFunctionMode):
    """Records each fp32 parameter that a `Tensor.to` casts to 16 bits, with its fp32 value (the tensor it had)."""

    def __init__(self):
        super().__init__()
        self.kept: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.Tensor.to and isinstance(args[0], torch.nn.Parameter) and args[0].dtype == torch.float32
                and out.dtype in (torch.bfloat16, torch.float16)):
            self.kept.setdefault(id(args[0]), (args[0], args[0].detach()))
        return out


@contextlib.contextmanager
def fp32_draws_kept() -> Iterator[None]:
    """Trainable parameters drawn in fp32 and cast to 16 bits inside (peft draws each adapter in fp32 and casts it
    to its base layer's dtype) keep their draw, moved to their device, as their master weight's start
    (`FP32_START`)."""
    casts = _Fp32Casts()
    with casts:
        yield
    for p, draw in casts.kept.values():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) and p.shape == draw.shape:
            setattr(p, FP32_START, draw.to(p.device))


@torch.no_grad()
def to_fp32(params: Iterable[torch.nn.Parameter]) -> None:
    """Cast the 16-bit `params` to fp32 in place, each to the fp32 value it kept (`FP32_START`) if any, not to
    its rounding."""
    for p in params:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = _fp32_start(p)


def fp32_value(param: torch.Tensor) -> torch.Tensor:
    """A trained parameter's exact value in fp32: its master weight when it has one, else itself (a view when
    fp32). Detached; clone before writing."""
    return getattr(param, MASTER, param).detach().float()


def _fp32_start(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 value `param`'s master starts from: the one `to_compute_dtype` kept (taken over), else `param`'s."""
    start = getattr(param, FP32_START, None)
    if start is not None:
        delattr(param, FP32_START)
    if start is None or start.shape != param.shape or start.device != param.device:
        return param.detach().float().clone()
    return start


def with_master_weights(params: list[torch.nn.Parameter],
                        build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """An optimizer (made by `build` over fp32 copies of `params`) whose steps reach the 16-bit `params`.

    After backward, a parameter's 16-bit gradient is moved into its copy's fp32 `.grad` (the parameter's own
    `.grad` stays None); clip and step the optimizer's parameters, not the model's.
    """
    masters = [torch.nn.Parameter(_fp32_start(p)) for p in params]

    def accumulate_into(master: torch.nn.Parameter):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None
        return hook

    for p, master in zip(params, masters):
        p.register_post_accumulate_grad_hook(accumulate_into(master))
        setattr(p, MASTER, master)
    optimizer = build(masters)

    @torch.no_grad()
    def copy_to_params(*_):
        for p, master in zip(params, masters):
            p.copy_(master)

    def save_masters(_optimizer, state: dict) -> dict:
        state[MASTER_KEY] = [m.detach().clone() for m in masters]
        return state

    @torch.no_grad()
    def load_masters(_optimizer, state: dict) -> dict:
        state = dict(state)
        saved = state.pop(MASTER_KEY, None)
        if saved is None:
            raise ValueError("this optimizer state has no fp32 master weights: it was saved by a run with another "
                             "--dtype; resume with the same --dtype")
        for master, value in zip(masters, saved):
            master.copy_(value)
        copy_to_params()
        return state

    optimizer.register_step_post_hook(copy_to_params)
    optimizer.register_state_dict_post_hook(save_masters)
    optimizer.register_load_state_dict_pre_hook(load_masters)
    return optimizer

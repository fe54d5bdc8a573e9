"""Mixed precision that trains: 16-bit weights for compute, fp32 master weights for the update.

With bf16 weights and no master copy, an update smaller than half a bf16 ulp (2^-8 relative) rounds away: at
lr 2e-6 most weights of an 8B model would never change. `with_master_weights` gives the optimizer fp32 copies of
the 16-bit trainable parameters: each micro-batch's gradient is added into the copy's fp32 `.grad` as it arrives
(so accumulation over micro-batches is fp32, the lm_head's included), the optimizer steps the fp32 copies, and
the 16-bit parameters are set to their rounding after every step. The copies travel with the optimizer's
`state_dict`, so a resumed run continues from the exact fp32 values.

| --dtype | weights | gradients | optimizer steps | bytes / trainable parameter (AdamW) |
|---|---|---|---|---|
| float32 | fp32 | fp32 | fp32 weights | 4 + 4 + 8 = 16 |
| bfloat16 | bf16 (compute) | bf16 per micro-batch, summed in fp32 | fp32 master copy | 2 + 4 + 4 + 8 = 18 |
| float16 | refused: no loss scaling (underflow); use bfloat16 | | | |
"""
from __future__ import annotations

from collections.abc import Callable

import torch

MASTER_KEY = "sdpo_fast_master_weights"


def needs_master_weights(params: list[torch.nn.Parameter]) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in params)


def with_master_weights(params: list[torch.nn.Parameter],
                        build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """An optimizer (made by `build` over fp32 copies of `params`) whose steps reach the 16-bit `params`.

    After backward, a parameter's 16-bit gradient is moved into its copy's fp32 `.grad` (the parameter's own
    `.grad` stays None); clip and step the optimizer's parameters, not the model's.
    """
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in params]

    def accumulate_into(master: torch.nn.Parameter):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None
        return hook

    for p, master in zip(params, masters):
        p.register_post_accumulate_grad_hook(accumulate_into(master))
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

"""The optimizer step fused into backward (torchtune's optimizer_in_bwd): each parameter's update runs from its
post-accumulate-grad hook during the step's last backward, and its gradient is freed at once, so the gradients
of the whole model never exist together.

Gradient clipping: a global-norm clip needs every gradient before the first update (a second backward as a
pre-pass), so here each parameter's gradient is clipped to `max_grad_norm` on its own (per-parameter clipping);
the step reports the global norm, sqrt(sum of the per-parameter squared norms), before clipping. With clipping
off (or never active) the updates equal a plain optimizer step's.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch


class OptimizerInBackward(torch.optim.Optimizer):
    """One inner optimizer per parameter (built by `build([p])`), stepped from the parameter's hook while
    `final_backward` is True; earlier micro-batches accumulate into .grad as usual. `param_groups` are the inner
    optimizers' own groups, so learning-rate schedulers drive them; `step()` does nothing."""

    def __init__(self, params: list[torch.nn.Parameter], build: Callable[[list[torch.nn.Parameter]],
                 torch.optim.Optimizer], max_grad_norm: float | None = None):
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.inner = [build([p]) for p in params]
        self.params, self.max_grad_norm = list(params), max_grad_norm
        self.final_backward = True
        self._squared_norm = torch.zeros((), dtype=torch.float64, device=params[0].device)
        self.defaults = dict(self.inner[0].defaults)
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]
        self.state = {}
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(opt)) for p, opt in zip(params, self.inner)]

    def _hook(self, opt: torch.optim.Optimizer):
        stepped = opt.param_groups[0]["params"][0]  # the parameter, or its fp32 master (train/precision.py), whose
        # own hook, registered first, has moved the gradient there

        def step(p: torch.Tensor) -> None:
            if not self.final_backward:
                return
            norm = torch.linalg.vector_norm(stepped.grad, dtype=torch.float32)
            self._squared_norm += norm.double() ** 2
            if self.max_grad_norm is not None:
                stepped.grad.mul_((self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).to(stepped.grad.dtype))
            opt.step()
            stepped.grad = None
        return step

    def take_grad_norm(self) -> torch.Tensor:
        """The global gradient norm of the updates since the last call (before clipping); resets it."""
        norm, self._squared_norm = self._squared_norm.sqrt(), torch.zeros_like(self._squared_norm)
        return norm

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"inner": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict.get("inner", ())) != len(self.inner):
            raise ValueError("optimizer state was saved for a different set of parameters")
        for opt, state in zip(self.inner, state_dict["inner"]):
            opt.load_state_dict(state)
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()


def offload_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float):
    """torchao's CPUOffloadOptimizer: optimizer state and fp32 master weights in CPU memory, the update on the
    CPU while the GPU runs backward. CUDA parameters only; torchao installed."""
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        raise ValueError("offload_optimizer needs torchao (pip install torchao, or sdpo_fast[offload])") from None
    if not params or any(p.device.type != "cuda" for p in params):
        raise ValueError("offload_optimizer needs the model on a CUDA GPU (use --device cuda)")
    if name != "adamw":
        raise ValueError(f"offload_optimizer supports optimizer 'adamw', got {name!r}")
    optimizer = CPUOffloadOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=weight_decay, fused=True,
                                    offload_gradients=True)
    optimizer.one_backward_per_step = True  # each offloaded gradient replaces, not adds to, the previous one
    return optimizer

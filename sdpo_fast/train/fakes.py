"""The memory planner's stand-ins (train/plan.py): what `simulate` runs in place of what needs a GPU or real data
(fake tensors whose integer constants keep their values, the Triton loss launches as the buffers they write,
bitsandbytes' 8-bit AdamW and 4-bit Linear, torchao's CPU offload, a fake process group), the model and optimizer
built through `setup.prepare_model` and `build.make_optimizer` with them, and the phase marks of the objective."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..model import OffloadedInputs

CONSTANT_LIMIT = 1 << 20


@contextlib.contextmanager
def patched(attributes: dict):
    """{(module, name): value} set for the block, the previous values restored after it."""
    previous = {key: getattr(*key) for key in attributes}
    try:
        for (module, name), value in attributes.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in previous.items():
            setattr(module, name, value)


@contextlib.contextmanager
def triton_launches_as_workspace():
    """The Triton loss backend's Python path on CPU tensors, its kernel launches replaced by what they allocate
    (README: lse_gather writes 2 floats per token; grad_logits, grad_weight and the logit modes' chunk_logits
    write into buffers the Python path allocated; the grad-in-forward path's row kernels write into its chunks and
return (n,) fp32 vectors). A 16-bit trainable lm_head's gradient is counted as formed
    slice by slice (no fp32 (V, d) accumulator: the least memory; on a GPU the one-sweep fp32 accumulation runs
    only when it fits in free memory as well)."""
    from ..loss import api
    from ..loss.backends import triton_fused

    def lse_gather(hidden, weight, targets, inv_temperature, softcap=None):
        n = hidden.shape[0]
        return (torch.zeros(n, dtype=torch.float32, device=hidden.device),
                torch.zeros(n, dtype=torch.float32, device=hidden.device))

    def grad_logits(hidden, weight, targets, lse, coef, inv_temperature, out, softcap=None):
        return out

    def accumulate_grad_weight(grad_logits_chunk, hidden, grad_weight, accumulate=True):
        return None

    def chunk_logits(hidden, weight, inv_temperature, out):
        return out

    def vectors(chunk, count):
        return tuple(torch.zeros(chunk.shape[0], dtype=torch.float32, device=chunk.device) for _ in range(count))

    with patched({(triton_fused, "lse_gather"): lse_gather, (triton_fused, "grad_logits"): grad_logits,
                   (triton_fused, "accumulate_grad_weight"): accumulate_grad_weight,
                   (triton_fused, "chunk_logits"): chunk_logits,
                   (triton_fused, "row_lse"): lambda chunk, *a, **k: vectors(chunk, 2),
                   (triton_fused, "row_token_grad"): lambda chunk, *a, **k: vectors(chunk, 2),
                   (triton_fused, "row_divergence_grad"): lambda chunk, *a, **k: vectors(chunk, 3),
                   (triton_fused, "_fp32_grad_weight_fits"): lambda weight, workspace_bytes: False,
                   (api, "resolve_backend"): lambda backend, device: backend}):
        yield


@contextlib.contextmanager
def constant_index_tensors(limit: int = CONSTANT_LIMIT):
    """Fake tensors built from Python lists (token ids, positions, indices) keep their values, so data-dependent
    ops on them (nonzero) run; float tensors derived from weights stay fake."""
    from torch._subclasses import fake_tensor

    previous = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = limit
    try:
        yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = previous


class IntegerConstants(TorchDispatchMode):
    """Under `fake_mode`: integer and bool tensors made from nothing (arange, full) are computed for real and kept
    as the fake tensor's constant, so positions and indices derived from them keep their values. Reading a scalar
    out of a data-less tensor (the step's logged statistics) gives 0."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and getattr(args[0], "constant", 0) is None:
            return False if args[0].dtype == torch.bool else 0 if not args[0].dtype.is_floating_point else 0.0
        if not any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs))):
            dtype = kwargs.get("dtype")
            integer = dtype is not None and not (dtype.is_floating_point or dtype.is_complex)
            if integer or (dtype is None and func.__name__.startswith(("arange", "full", "scalar_tensor"))):
                with no_dispatch():
                    out = func(*args, **kwargs)
                if not (out.dtype.is_floating_point or out.dtype.is_complex) and out.numel() <= CONSTANT_LIMIT:
                    converter = self.fake_mode.fake_tensor_converter
                    return converter.from_real_tensor(self.fake_mode, out, make_constant=True)
        return func(*args, **kwargs)


class Adam8bitStandIn(torch.optim.Optimizer):
    """Memory stand-in for bitsandbytes' AdamW8bit (CUDA only): two uint8 states per parameter and one fp32
    absmax per 256-element block of each; the update itself is not computed."""

    def __init__(self, params, lr: float):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    blocks = -(-p.numel() // 256)
                    state["state1"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                    state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                    state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


class PhasedObjective:
    """The objective, marking the step's phases on `counter`: loss, loss backward, then backward once the
    gradient reaches the student's hidden states."""

    def __init__(self, objective, counter):
        self.objective, self.counter = objective, counter
        self.needs_teacher, self.signal_name = objective.needs_teacher, objective.signal_name

    def __call__(self, inputs):
        self.counter.set_phase("loss")
        if inputs.student_hidden.requires_grad:
            inputs.student_hidden.register_hook(lambda g: self.counter.set_phase("backward"))
        out = self.objective(inputs)
        self.counter.set_phase("loss backward")
        return out


NF4_BLOCK = 64
"""Weights per absmax block of bitsandbytes' 4-bit quantization (its default, as transformers loads it)."""
ABSMAX_BLOCK = 256
"""absmax values per fp32 scale of the double quantization (bitsandbytes' state2 blocksize)."""


class Dequantize4bit(torch.autograd.Function):
    """y = x @ W.T with W the layer's weight dequantized to its compute dtype as a transient, in forward and again
    in backward; nothing saved for backward (bitsandbytes' MatMul4Bit: above 1536 tokens its CUDA gemm_4bit
    dequantizes and calls F.linear; it reconstructs the double-quantized absmax in fp32 twice in forward, once
    in backward)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dequantized(absmax_copies=2))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(absmax_copies=1), None


class Linear4bitStandIn(torch.nn.Module):
    """Memory stand-in for bitsandbytes' Linear4bit as `load_model` loads it (NF4, double quantization, uint8
    storage): the packed weight ((n + 1) // 2 bytes), one uint8 absmax per 64 weights, one fp32 scale per 256 of
    those, an fp32 offset and the 16-entry fp32 NF4 code (bitsandbytes' Params4bit and QuantState; the 256-entry
    code of the double quantization, shared by all layers, is left out). No bias (none of the known shapes has
    one)."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("load_in_4bit planning covers Linear layers without bias")
        self.out_features, self.in_features = linear.weight.shape
        self.compute_dtype = compute_dtype
        n, device = linear.weight.numel(), linear.weight.device
        blocks = -(-n // NF4_BLOCK)
        self.weight = torch.nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device),
                                         requires_grad=False)
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scale", torch.empty(-(-blocks // ABSMAX_BLOCK), dtype=torch.float32,
                                                         device=device))
        self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))

    def dequantized(self, absmax_copies: int) -> torch.Tensor:
        """A (out, in) tensor in the compute dtype, with `absmax_copies` fp32 absmax vectors alive meanwhile."""
        absmax = [torch.zeros(self.absmax.shape, dtype=torch.float32, device=self.absmax.device)
                  for _ in range(absmax_copies)]
        weight = torch.zeros((self.out_features, self.in_features), dtype=self.compute_dtype, device=absmax[0].device)
        del absmax
        return weight

    def forward(self, x):
        return Dequantize4bit.apply(x, self)


def quantize_linears(model, dtype: torch.dtype) -> None:
    """Every Linear but the output embedding and the LoRA adapters replaced by `Linear4bitStandIn` (transformers'
    bitsandbytes quantizer skips the lm_head)."""
    from ..model import unwrap_model

    output = unwrap_model(model).get_output_embeddings()
    for name, parent in list(model.named_modules()):
        if "lora_" in name:
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child is not output and not child_name.startswith("lora_"):
                setattr(parent, child_name, Linear4bitStandIn(child, dtype))


class OffloadStandIn(OffloadedInputs):
    """`OffloadedInputs` as on CUDA, every tensor counted as on the GPU: the host copy is shape and dtype only
    (it leaves the counted memory), the copy back a fresh tensor allocated when `OffloadedInputs` fetches it (the
    layer's own recompute, or the prefetch of the one below)."""

    def __init__(self):
        super().__init__(device_types=("cpu",))

    def to_host(self, x: torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta"), None

    def to_device(self, held) -> torch.Tensor:
        return torch.zeros(held.host.shape, dtype=held.host.dtype, device=held.device)


def build_model(hf_config, config, dtype: torch.dtype, fake: bool):
    """The model `train` would train (`setup.prepare_model`: checkpointing with `OffloadStandIn`, LoRA; 4-bit
    base Linears as `Linear4bitStandIn`), random weights; fake: built on the meta device and every parameter and
    buffer then replaced by a fresh fake CPU tensor (ties kept)."""
    from transformers import AutoModelForCausalLM

    from .setup import prepare_model

    with torch.device("meta") if fake else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model = prepare_model(model, dataclasses.replace(config, use_liger=False), "cuda", dtype,
                              offload=OffloadStandIn())
        if config.load_in_4bit:
            quantize_linears(model, dtype)
    if fake:
        made: dict[int, torch.Tensor] = {}
        if config.lora_r and config.lora_dtype == "base":  # peft leaves meta adapters in fp32
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(dtype)
        for module in model.modules():
            for table, wrap in ((module._parameters, True), (module._buffers, False)):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    if id(t) not in made:
                        new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                        made[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if wrap else new
                    table[name] = made[id(t)]
    return model.train()


class OffloadedStandIn(torch.optim.Optimizer):
    """Memory stand-in for an optimizer whose state lives in CPU memory (torchao's CPUOffloadOptimizer): nothing
    of it on the GPU; the gradient leaves as it arrives (stepped in backward)."""

    def __init__(self, params, lr: float):
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        return None


def planned_optimizer(params, config):
    """The optimizer `train` builds on CUDA (`build.make_optimizer` with fused AdamW, and stand-ins for
    bitsandbytes and CPU offload)."""
    from .build import make_optimizer
    from .optim import OptimizerInBackward

    def on_cuda(group):
        if config.optimizer == "adamw8bit":
            return Adam8bitStandIn(group, config.lr)
        return torch.optim.AdamW(group, lr=config.lr, weight_decay=config.weight_decay, fused=True)

    def offloaded(ps, name, lr, weight_decay):
        return OptimizerInBackward(ps, lambda group: OffloadedStandIn(group, lr), config.max_grad_norm)

    return make_optimizer(params, config, construct=on_cuda if config.optimizer in ("adamw", "adamw8bit") else None,
                          offload=offloaded)


@contextlib.contextmanager
def fsdp_storage_resizes(counter):
    """FSDP2's in-place storage frees and re-allocations of gathered parameters reported to `counter`."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def counted_alloc(tensor):
        alloc(tensor)
        counter.resized(tensor)

    def counted_free(tensor):
        free(tensor)
        counter.resized(tensor)

    with patched({(_fsdp_param, "alloc_storage"): counted_alloc, (_fsdp_param, "free_storage"): counted_free,
                   (_fsdp_param_group, "alloc_storage"): counted_alloc}):
        yield


@contextlib.contextmanager
def fake_world(world_size: int):
    """Rank 0 of a `world_size`-rank job on torch's fake process group (collectives return at once, their
    outputs allocated as the real ones are), or None for one process."""
    if world_size == 1:
        yield None
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .distributed import World

    if torch.distributed.is_initialized():
        raise RuntimeError("world_size > 1 is simulated on a fake process group; one is already initialized")
    torch.distributed.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield World(rank=0, size=world_size, local_rank=0)
    finally:
        torch.distributed.destroy_process_group()

"""Ahead-of-time compilation of every Triton kernel for given GPU architectures, with resource usage.

Needs no GPU: Triton compiles to a cubin for the target and the cuobjdump shipped in Triton's wheel reads
registers, stack (spills) and local memory from it; shared memory comes from Triton's metadata.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Shared memory a block may use, per compute capability (bytes, opt-in maximum).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Pointer arguments whose element type is the input dtype ("X") or fixed.
_POINTER_TYPES = {
    "hidden_ptr": "X", "weight_ptr": "X", "grad_ptr": "X", "grad_logits_ptr": "X",
    "target_ptr": "*i64", "lse_ptr": "*fp32", "target_logit_ptr": "*fp32", "coef_ptr": "*fp32",
    "grad_weight_ptr": "*fp32",
}
_FLOAT_SCALARS = {"inv_temperature"}
# The launchers pass inner-contiguous tensors, so Triton's JIT specializes these strides to the constant 1;
# the other strides are specialized as multiples of 16 whenever the model's sizes are.
_UNIT_STRIDES = {"stride_hd", "stride_wd", "stride_gv"}


@dataclass(frozen=True)
class KernelUsage:
    kernel: str
    dtype: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    @property
    def fits_shared(self) -> bool:
        return self.shared_bytes <= MAX_SHARED_BYTES.get(self.arch, 101376)


def _kernels():
    """(jit function, launch_meta) of every kernel."""
    from . import grad_logits, grad_weight, lse_gather
    return [(module.__dict__[f"{module.__name__.rsplit('.', 1)[1]}_kernel"], module.launch_meta)
            for module in (lse_gather, grad_logits, grad_weight)]


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}; it ships with Triton's NVIDIA backend")
    return str(path)


def _resource_usage(cubin: bytes, name: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)], check=True,
                              capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_kernel(fn, meta_fn, dtype: torch.dtype, arch: int) -> KernelUsage:
    """Compile one kernel for `sm_{arch}` with the launch configuration used at run time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .config import kernel_config

    cfg = kernel_config(dtype, arch)
    constexprs = {**meta_fn(cfg), **{name: 1 for name in fn.arg_names if name in _UNIT_STRIDES}}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTER_TYPES:
            kind = _POINTER_TYPES[name]
            signature[name] = f"*{_DTYPE_NAMES[dtype]}" if kind == "X" else kind
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    aligned = [(i,) for i, name in enumerate(fn.arg_names)
               if name in _POINTER_TYPES or (name.startswith("stride_") and name not in _UNIT_STRIDES)]
    attrs = {key: backend.parse_attr("D") for key in aligned} if hasattr(backend, "parse_attr") else None
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=target,
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    usage = _resource_usage(compiled.asm["cubin"], fn.__name__)
    return KernelUsage(fn.__name__, _DTYPE_NAMES[dtype], arch, usage.get("REG", 0), usage.get("STACK", 0),
                       usage.get("LOCAL", 0), int(compiled.metadata.shared))


def check_kernels(archs, dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list[KernelUsage]:
    """Compile every kernel for every arch (e.g. [80, 86, 89, 90]) and dtype. Needs TRITON_INTERPRET unset."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("check_kernels needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    return [compile_kernel(fn, meta_fn, dtype, arch)
            for arch in archs for dtype in dtypes for fn, meta_fn in _kernels()]


def format_table(rows: list[KernelUsage]) -> str:
    """A markdown table: kernel x dtype x arch with registers, spills and shared memory."""
    lines = ["| kernel | dtype | arch | registers | stack (B) | local (B) | shared (B) | spills | fits smem |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.dtype} | sm_{r.arch} | {r.registers} | {r.stack_bytes} | {r.local_bytes} "
                     f"| {r.shared_bytes} | {'YES' if r.spills else 'no'} | {'yes' if r.fits_shared else 'NO'} |")
    return "\n".join(lines)

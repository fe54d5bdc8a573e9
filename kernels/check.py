"""Ahead-of-time compilation of the fused path's kernels, exactly as the run-time launches specialize them.

Needs no GPU. For a shape (N, d, V), a dtype and an architecture, the launches of one loss step (sampled_token,
a logit mode's chunk_logits / grad_weight, and the grad-in-forward path's row kernels) are built on the `meta`
device (`sdpo_fast.kernels.fused`), bound by Triton's own JIT binder for that target (so pointer alignment,
integers divisible by 16 and integers equal to 1 are specialized as `kernel[grid](...)` would), and compiled to a
cubin. The cuobjdump shipped in Triton's wheel reads registers, stack and local memory (spills) and the SASS; the
SASS tells the matrix instructions (HGMMA = wgmma, HMMA = mma.sync, else FFMA) and async copies (LDGSTS = cp.async,
UTMALDG = TMA); the TTGIR tells the software-pipeline depth.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import KernelConfig, kernel_configs, triton_workspace_bytes
from .fused import divergence_step_launches, fused_step_launches, grad_in_forward_launches
from .gpus import GPU, arch_limits, gpu_for_arch, programs_per_sm
from .lse_gather import lse_gather_launch

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Named shapes (N tokens, hidden d, vocabulary V).
SHAPES = {"qwen3-8b": (16384, 4096, 151936), "qwen3-8b-4k": (4096, 4096, 151936)}


@dataclass(frozen=True)
class KernelUsage:
    kernel: str
    dtype: str
    arch: int
    signature: str  # the specialized integer arguments, e.g. "n_tokens=i32:16 vocab_size=i32:16 stride_hd=1"
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    num_warps: int
    num_stages: int  # requested
    pipeline_stages: int  # buffers of the deepest multi-buffered shared-memory allocation in the TTGIR (1: none)
    mma: str  # HGMMA, HMMA or FFMA: the instruction doing the products
    mma_shape: str  # the matrix instructions' shapes in the SASS, e.g. 64x128x16 (HGMMA, MxNxK) or 16816 (HMMA)
    async_copies: str  # LDGSTS and/or UTMALDG, or "none"
    programs_per_sm: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    @property
    def fits_shared(self) -> bool:
        return self.shared_bytes <= arch_limits(self.arch).shared_per_block

    def as_dict(self) -> dict:
        return {**asdict(self), "spills": self.spills, "fits_shared": self.fits_shared}


def _triton_tool(name: str) -> str | None:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def _cuobjdump() -> str:
    path = _triton_tool("cuobjdump")
    if path is None:
        raise FileNotFoundError("cuobjdump not found; it ships with Triton's NVIDIA backend (backends/nvidia/bin)")
    return path


def _cubin_text(cubin: bytes, name: str, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_cuobjdump(), *flags, str(path)], check=True, capture_output=True, text=True).stdout


def sass(cubin: bytes, name: str) -> str:
    """The cubin's SASS: cuobjdump -sass, or nvdisasm where cuobjdump prints none."""
    text = _cubin_text(cubin, name, "-sass")
    nvdisasm = _triton_tool("nvdisasm")
    if not re.search(r"^\s+/\*[0-9a-f]{4}\*/", text, re.M) and nvdisasm:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.cubin"
            path.write_bytes(cubin)
            text = subprocess.run([nvdisasm, str(path)], check=True, capture_output=True, text=True).stdout
    return text


def sass_features(text: str) -> tuple[str, str]:
    """(matrix instruction kind, async copy kinds) read from SASS text."""
    opcodes = set(re.findall(r"\b(HGMMA|HMMA|FFMA|LDGSTS|UTMALDG)\b", text))
    mma = next((kind for kind in ("HGMMA", "HMMA", "FFMA") if kind in opcodes), "none")
    copies = ",".join(kind for kind in ("LDGSTS", "UTMALDG") if kind in opcodes) or "none"
    return mma, copies


def mma_shapes(text: str) -> str:
    """The distinct shapes of the SASS's matrix instructions, widest first: HGMMA.64x128x16.F32.BF16 -> 64x128x16,
    HMMA.16816.F32.BF16 -> 16816; "" without any."""
    shapes = set(re.findall(r"\bH(?:G)?MMA\.(\d+(?:x\d+x\d+)?)\.", text))
    return ",".join(sorted(shapes, key=lambda shape: [-int(x) for x in shape.split("x")]))


def pipeline_stages(ttgir: str) -> int:
    """Depth of the deepest multi-buffered shared-memory descriptor (memdesc<S x M x K x ...>); 1 when none."""
    depths = [int(m) for m in re.findall(r"memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(depths, default=1)


def _bind(launch, backend):
    """Triton's own binding of the launch's arguments for `backend`: (signature, constexprs, attrs, options)."""
    from triton.runtime import jit

    fn = launch.kernel
    if not (hasattr(jit, "create_function_from_signature") and hasattr(fn, "_pack_args")):
        raise RuntimeError("this Triton has no create_function_from_signature/_pack_args (known: 3.6 to 3.9)")
    kwargs = dict(launch.options, debug=bool(getattr(fn, "debug", False)))
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _int_summary(launch, signature, constexprs, attrs) -> str:
    """The integer arguments as specialized: name=i32:16 (divisible by 16), name=i32, name=1 (constexpr)."""
    names = list(signature)
    parts = []
    for i, name in enumerate(names):
        value = launch.args[i] if i < len(launch.args) else None
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if signature[name] == "constexpr":
            parts.append(f"{name}={value}")
        else:
            divisible = any("16" in str(attr) for attr in attrs.get((i,), []))
            parts.append(f"{name}={signature[name]}{':16' if divisible else ''}")
    return " ".join(parts)


def compile_launch(launch, arch: int, sass_dir: str | Path | None = None, variant: int = 0) -> KernelUsage:
    """Compile one Launch for `sm_{arch}` as the JIT would specialize it; optionally write its SASS to sass_dir
    as kernel_dtype_smARCH.sass (a second specialization of the same kernel: ..._v1.sass)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    signature, constexprs, attrs, options = _bind(launch, backend)
    fn = launch.kernel
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options.__dict__)
    cubin = compiled.asm["cubin"]
    usage = {key: int(value) for key, value in
             re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", _cubin_text(cubin, fn.__name__, "--dump-resource-usage"))}
    text = sass(cubin, fn.__name__)
    dtype = DTYPE_NAMES[launch.args[0].dtype]
    if sass_dir is not None:
        Path(sass_dir).mkdir(parents=True, exist_ok=True)
        stem = f"{fn.__name__.removesuffix('_kernel')}_{dtype}_sm{arch}" + (f"_v{variant}" if variant else "")
        (Path(sass_dir) / f"{stem}.sass").write_text(text)
    mma, copies = sass_features(text)
    registers = usage.get("REG", 0)
    shared = int(compiled.metadata.shared)
    num_warps = launch.options["num_warps"]
    return KernelUsage(
        fn.__name__, dtype, arch, _int_summary(launch, signature, constexprs, attrs), registers,
        usage.get("STACK", 0), usage.get("LOCAL", 0), shared, num_warps, launch.options["num_stages"],
        pipeline_stages(compiled.asm.get("ttgir", "")), mma, mma_shapes(text), copies,
        programs_per_sm(registers, shared, num_warps, arch))


def step_launches(shape: tuple[int, int, int], dtype: torch.dtype, gpu: GPU, need_weight: bool = True,
                  cfgs: dict[str, KernelConfig] | None = None, lse_programs_per_sm: int | None = None) -> list:
    """Every launch of one loss step at shape (N, d, V) on `gpu`, as the Triton backend issues them there: the
    vocabulary splits follow lse_gather's compiled occupancy (compiled here unless lse_programs_per_sm is given),
    SM count and L2 size. cfgs: the kernels' configs (default `config.kernel_configs` for the GPU's arch)."""
    n_tokens, hidden_dim, vocab_size = shape
    cfgs = cfgs or kernel_configs(dtype, gpu.arch)
    if lse_programs_per_sm is None:
        hidden = torch.empty(n_tokens, hidden_dim, dtype=dtype, device="meta")
        weight = torch.empty(vocab_size, hidden_dim, dtype=dtype, device="meta")
        probe, _, _ = lse_gather_launch(hidden, weight, torch.empty(n_tokens, dtype=torch.int64, device="meta"), 1.0,
                                        cfgs["lse_gather"], None)
        lse_programs_per_sm = compile_launch(probe, gpu.arch).programs_per_sm
    return [launch for _, launch in fused_step_launches(n_tokens, hidden_dim, vocab_size, dtype, cfgs, gpu.sms,
                                                          need_weight, gpu.l2_bytes, max(1, lse_programs_per_sm))]


def logit_mode_launches(shape: tuple[int, int, int], dtype: torch.dtype, arch: int, need_weight: bool = True) -> list:
    """Every launch of one distillation-mode (full_logits / topk_logits) step at shape (N, d, V) on `sm_{arch}`:
    chunk_logits and grad_weight over chunks sized by the Triton workspace budget, as the backend issues them."""
    n_tokens, hidden_dim, vocab_size = shape
    return [launch for _, launch in divergence_step_launches(n_tokens, hidden_dim, vocab_size, dtype,
                                                               kernel_configs(dtype, arch), triton_workspace_bytes(),
                                                               need_weight)]


def distinct_launches(shape: tuple[int, int, int], dtype: torch.dtype, arch: int, need_weight: bool = True):
    """The launches of one loss step at `shape` on the reference GPU of `arch`, sampled_token (the fused path) and
    the logit modes, and the grad-in-forward path's row kernels, one per distinct specialization."""
    launches = step_launches(shape, dtype, gpu_for_arch(arch), need_weight) + \
        logit_mode_launches(shape, dtype, arch, need_weight) + \
        [launch for _, launch in grad_in_forward_launches(shape[0], shape[2], dtype, triton_workspace_bytes())]
    return distinct(launches, arch)


def distinct(launches: list, arch: int) -> list:
    """The first launch of each distinct specialization for `sm_{arch}` (kernel, bound signature, constexprs and
    integer attributes), in order."""
    import triton
    from triton.backends.compiler import GPUTarget

    backend = triton.compiler.make_backend(GPUTarget("cuda", arch, 32))
    seen, out = set(), []
    for launch in launches:
        signature, constexprs, attrs, _ = _bind(launch, backend)
        key = (launch.kernel.__name__, tuple(signature.items()), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def check_kernels(archs, dtypes=(torch.bfloat16, torch.float16, torch.float32), shape=SHAPES["qwen3-8b"],
                  sass_dir: str | Path | None = None) -> list[KernelUsage]:
    """Compile every distinct kernel specialization of one loss step at `shape` for every arch (e.g. [80, 90])
    and dtype. Needs TRITON_INTERPRET unset."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("check_kernels needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    rows = []
    for arch in archs:
        for dtype in dtypes:
            variants: dict[str, int] = {}
            for launch in distinct_launches(shape, dtype, arch):
                name = launch.kernel.__name__
                rows.append(compile_launch(launch, arch, sass_dir, variants.get(name, 0)))
                variants[name] = variants.get(name, 0) + 1
    return rows


def format_table(rows: list[KernelUsage]) -> str:
    """A markdown table: kernel x dtype x arch with the compiled code's features and resources."""
    lines = ["| kernel | dtype | arch | matrix | async copies | stages | registers | spills (B) | shared (B) "
             "| programs/SM | integer specialization |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        smem = f"{r.shared_bytes}" + ("" if r.fits_shared else " (too much)")
        matrix = f"{r.mma}.{r.mma_shape}" if r.mma_shape else r.mma
        lines.append(f"| {r.kernel.removesuffix('_kernel')} | {r.dtype} | sm_{r.arch} | {matrix} | {r.async_copies} "
                     f"| {r.pipeline_stages} | {r.registers} | {r.stack_bytes + r.local_bytes} | {smem} "
                     f"| {r.programs_per_sm} | {r.signature} |")
    return "\n".join(lines)

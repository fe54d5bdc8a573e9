"""Tile sizes and launch options, chosen per input dtype and GPU architecture; the backward's chunk size."""
import contextlib
import os
from dataclasses import dataclass, field

import torch

MIN_CHUNK_ROWS = 128
DEFAULT_WORKSPACE_BYTES = 256 << 20


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    input_precision: str
    # The Triton interpreter (3.9) multiplies bf16 dot operands wrongly; upcasting them first is exact, since
    # bf16 x bf16 products are representable in fp32.
    upcast_operands: bool = False


KERNELS = ("lse_gather", "grad_logits", "grad_weight", "chunk_logits")
"""The kernels that sweep logits tiles, each with its own `kernel_config`."""

COMMON_TILE = KernelConfig(128, 128, 32, 8, 3, "tf32")
"""The 16-bit tile of every kernel and arch unless WIDER_TILES names another."""
WIDER_TILES = {
    ("grad_logits", 90): KernelConfig(128, 256, 64, 8, 3, "tf32"),
    ("grad_logits", 80): KernelConfig(256, 128, 32, 8, 3, "tf32"),
    ("grad_weight", 80): KernelConfig(128, 128, 64, 8, 3, "tf32"),
    ("grad_weight", 89): KernelConfig(128, 128, 64, 8, 3, "tf32"),
    ("grad_weight", 90): KernelConfig(128, 128, 64, 8, 3, "tf32"),
}
"""(kernel, arch) -> the larger 16-bit tile that `benchmarks/tile_table.py`'s compiled sweep picks (BENCHMARKS.md,
"Tile sweep"; its criteria: no build spills on Triton 3.6-3.9, the model predicts no more HBM bytes and no longer
step, and a larger product tile, i.e. fewer operand bytes through shared memory per FLOP). sm_90: grad_logits HGMMA 64x128x16 ->
64x256x16 (113 -> 229 registers, 48 -> 144 KB shared, 2 -> 1 programs/SM); grad_weight 64x64x16 -> 64x128x16 (58/88
-> 99/182 registers for the first / accumulating chunks, 36 -> 96 KB, 4/2 -> 2/1 programs/SM). sm_80: grad_logits
256 rows (202 -> 247 registers, 32 -> 64 KB, 1 program/SM as before; 256x128x64 would spill 48 B on Triton 3.6
and 3.7, and a tile is picked only if it passes on every supported Triton); grad_weight 128 x 128 (104/107 -> 186
registers, 32 -> 64 KB, 2 -> 1 programs/SM), the same on sm_89. lse_gather keeps the common tile: larger ones spill,
or on sm_90 (128 x 256) need 2 MiB weight tiles that no vocabulary split keeps in L2 (58 -> 324 GB in the model);
so does sm_89's grad_logits (larger tiles: +0.5 ms in the model, wave quantization on 142 SMs). Other archs: not
swept, the common tile. Soft-capped logits (`capped`) keep the common tile: their tanh epilogue spills grad_logits'
wider tiles (sm_90: 255 registers and 72 B of spills, sm_80: 368 B)."""


def kernel_config(dtype: torch.dtype, arch: int | None, kernel: str, capped: bool = False) -> KernelConfig:
    """The tile of `kernel` (one of KERNELS) for inputs of `dtype` on arch: compute capability as 80, 86, 89, 90
    (None on CPU); capped: the launch soft-caps its logits (`loss.head`).

    fp32 uses exact ("ieee") products rather than TF32, on CUDA cores, unpipelined (num_stages=2 was a single
    buffer too, and spilled lse_gather on sm_90 as launched; three spill on sm_80). 16-bit inputs: COMMON_TILE or
    WIDER_TILES, num_stages=3 everywhere; on sm_80-sm_89 that is a double buffer (2 stages would be a single buffer,
    no pipelining), on sm_90 a triple one, as `sdpo-fast check-kernels` reads from the TTGIR. grad_weight maps the
    config to its (BLOCK_V, 2 x block_d) output tile over block_d tokens per step (`grad_weight.launch_meta`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {KERNELS}")
    if arch is None:  # TRITON_INTERPRET on CPU: wide vocabulary tiles keep the number of programs low
        return KernelConfig(64, 256, 32, 4, 1, "ieee") if dtype == torch.float32 \
            else KernelConfig(64, 256, 64, 4, 1, "tf32", upcast_operands=True)
    if dtype == torch.float32:
        return KernelConfig(64, 64, 32, 8, 1, "ieee")
    return COMMON_TILE if capped else WIDER_TILES.get((kernel, arch), COMMON_TILE)


def kernel_configs(dtype: torch.dtype, arch: int | None) -> dict[str, KernelConfig]:
    """kernel name -> `kernel_config` for every kernel of KERNELS."""
    return {kernel: kernel_config(dtype, arch, kernel) for kernel in KERNELS}


def launch_config(dtype: torch.dtype, device: torch.device, kernel: str, capped: bool = False) -> KernelConfig:
    if device.type != "cuda":
        return kernel_config(dtype, None, kernel, capped)
    major, minor = torch.cuda.get_device_capability(device)
    return kernel_config(dtype, 10 * major + minor, kernel, capped)


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def l2_bytes(device: torch.device) -> int:
    """L2 cache bytes of a CUDA device (0 elsewhere, or where torch does not report it)."""
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)


def tile_meta(cfg: KernelConfig) -> dict:
    """Compile-time arguments shared by the kernels that sweep (BLOCK_N, BLOCK_V) logits tiles."""
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, INPUT_PRECISION=cfg.input_precision,
                UPCAST_OPERANDS=cfg.upcast_operands)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the launcher issues it: jit function, grid, positional arguments, keyword options
    (constexprs, num_warps, num_stages). `sdpo_fast.kernels.check` compiles the same object ahead of time.

    Called, it launches on its tensors' device (Triton launches on the current device: tensors on cuda:1, e.g.
    under device_map="auto", would otherwise be read by a kernel running on cuda:0)."""
    kernel: object = field(repr=False)
    grid: tuple
    args: tuple = field(repr=False)
    options: dict

    @property
    def device(self) -> torch.device:
        """The device of the first tensor argument (every tensor argument is on it)."""
        return next(a.device for a in self.args if isinstance(a, torch.Tensor))

    def __call__(self):
        device = self.device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return self.kernel[self.grid](*self.args, **self.options)


DIVERGENCE_BUFFERS = 8
"""fp32 (rows, V) buffers of one distillation-mode chunk at most: student and teacher logits plus the temporaries
of the divergence and its gradient."""


def triton_workspace_bytes() -> int:
    """The distillation modes' workspace budget on the Triton backend: SDPO_FAST_TRITON_WORKSPACE_MB, else 256 MiB."""
    env = os.environ.get("SDPO_FAST_TRITON_WORKSPACE_MB")
    return DEFAULT_WORKSPACE_BYTES if env is None else int(env) << 20


def divergence_chunk_rows(n_tokens: int, vocab_size: int, budget_bytes: int) -> int:
    """Rows per distillation-mode chunk so that DIVERGENCE_BUFFERS fp32 (rows, V) buffers fit budget_bytes (at
    least one row)."""
    return min(max(1, budget_bytes // (DIVERGENCE_BUFFERS * 4 * vocab_size)), max(n_tokens, 1))


def backward_chunk_rows(n_tokens: int, vocab_size: int, hidden_dim: int, dtype: torch.dtype,
                        need_weight: bool, l2_bytes: int = 0) -> int:
    """Tokens per backward chunk, whose (rows, V) gradient workspace is in `dtype`.

    Budget: `SDPO_FAST_TRITON_WORKSPACE_MB` when set, else 256 MiB, raised to half the fp32 grad_W's size when
    grad_W is accumulated, so grad_W's read-add-write (8·V·d bytes per chunk) runs fewer times; but a chunk's
    hidden rows stay within a quarter of the L2 (l2_bytes, 0: unknown), so that grad_logits and grad_weight read
    them from HBM once. Multiples of 128 rows, at least 128.
    """
    env = os.environ.get("SDPO_FAST_TRITON_WORKSPACE_MB")
    budget = DEFAULT_WORKSPACE_BYTES if env is None else int(env) << 20
    elem = torch.finfo(dtype).bits // 8
    if need_weight and env is None:
        budget = max(budget, vocab_size * hidden_dim * 2)
        if l2_bytes:
            budget = max(DEFAULT_WORKSPACE_BYTES, min(budget, l2_bytes // 4 // (hidden_dim * elem) * vocab_size * elem))
    rows = budget // (vocab_size * elem)
    return min(n_tokens, max(MIN_CHUNK_ROWS, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS))


def gemm_sweep_bytes_per_row(mode: str, elem_bytes: int, vocab_size: int, topk: int = 0) -> int:
    """Workspace bytes per row of the grad-in-forward path on the Triton backend: one (rows, V) chunk in the input
    dtype for sampled_token (the teacher's pass runs first in the same buffer), two for the logit modes (student and
    teacher) plus torch.topk's values and int64 indices."""
    if mode == "sampled_token":
        return vocab_size * elem_bytes
    return 2 * vocab_size * elem_bytes + topk * (8 + elem_bytes)

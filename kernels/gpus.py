"""Per-architecture limits (occupancy) and per-GPU datasheet figures (the traffic/roofline model).

Architecture limits: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (registers per
SM, threads and resident blocks per SM, shared memory per SM and per block; 1 KiB of each block's shared memory is
reserved by the system). Register allocation: 256 registers per warp granularity (the guide's occupancy section).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchLimits:
    registers_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    shared_per_sm: int
    shared_per_block: int


ARCH_LIMITS = {
    80: ArchLimits(65536, 2048, 32, 167936, 166912),
    86: ArchLimits(65536, 1536, 16, 102400, 101376),
    87: ArchLimits(65536, 2048, 32, 167936, 166912),
    89: ArchLimits(65536, 1536, 24, 102400, 101376),
    90: ArchLimits(65536, 2048, 32, 233472, 232448),
}
_RESERVED_SHARED_PER_BLOCK = 1024


def arch_limits(arch: int) -> ArchLimits:
    return ARCH_LIMITS.get(arch, ARCH_LIMITS[86])


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """Resident programs (thread blocks) per SM, the minimum over the register, thread, block and shared limits."""
    lim = arch_limits(arch)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim.registers_per_sm // regs_per_warp // num_warps
    by_threads = lim.max_threads_per_sm // (32 * num_warps)
    by_shared = lim.shared_per_sm // (shared_bytes + _RESERVED_SHARED_PER_BLOCK)
    return max(0, min(by_regs, by_threads, by_shared, lim.max_blocks_per_sm))


@dataclass(frozen=True)
class GPU:
    """Dense (no sparsity) peak rates and memory figures from the vendor's datasheet (`source`)."""
    name: str
    arch: int
    sms: int
    l2_bytes: int
    hbm_bytes_per_s: float
    tensor_16bit_flops: float  # bf16/fp16 inputs, fp32 accumulation
    fp32_flops: float  # CUDA cores (the fp32 kernels use exact "ieee" products)
    source: str


GPUS = {
    "h100": GPU("H100 SXM5", 90, 132, 50 * 2**20, 3.35e12, 989.4e12, 66.9e12,
                "NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16 1,979 TFLOPS with sparsity, FP32 67 TFLOPS, "
                "3.35 TB/s); Hopper whitepaper (132 SMs, 50 MB L2)"),
    "h200": GPU("H200 SXM", 90, 132, 50 * 2**20, 4.8e12, 989.4e12, 66.9e12,
                "NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity, FP32 67 TFLOPS, "
                "4.8 TB/s HBM3e); same GH100 die as H100 SXM5 (132 SMs, 50 MB L2)"),
    "a100": GPU("A100 SXM4 80GB", 80, 108, 40 * 2**20, 2.039e12, 312e12, 19.5e12,
                "NVIDIA A100 Tensor Core GPU datasheet (BF16 312 TFLOPS, FP32 19.5 TFLOPS, 2,039 GB/s); "
                "Ampere whitepaper (108 SMs, 40 MB L2)"),
    "a10": GPU("A10", 86, 72, 6 * 2**20, 600e9, 125e12, 31.2e12,
               "NVIDIA A10 Tensor Core GPU datasheet (BF16 250 TFLOPS with sparsity, FP32 31.2 TFLOPS, 600 GB/s); "
               "GA102 (72 SMs, 6 MB L2)"),
    "rtx4090": GPU("RTX 4090", 89, 128, 72 * 2**20, 1.008e12, 165.2e12, 82.6e12,
                   "NVIDIA Ada GPU architecture whitepaper, RTX 4090 (FP16/BF16 tensor with FP32 accumulate "
                   "165.2 TFLOPS dense, FP32 82.6 TFLOPS, 1,008 GB/s, 128 SMs, 72 MB L2)"),
    "l40s": GPU("L40S", 89, 142, 96 * 2**20, 864e9, 362.05e12, 91.6e12,
                "NVIDIA L40S datasheet (BF16 733 TFLOPS with sparsity, FP32 91.6 TFLOPS, 864 GB/s); Ada "
                "whitepaper (142 SMs, 96 MB L2)"),
}
# The GPU the ahead-of-time check assumes for an architecture (its SM count sets the vocabulary splits).
GPU_OF_ARCH = {80: "a100", 86: "a10", 89: "l40s", 90: "h100"}


def gpu_for_arch(arch: int) -> GPU:
    key = GPU_OF_ARCH.get(arch)
    if key is None:
        raise ValueError(f"arch: no reference GPU for sm_{arch}; known: {sorted(GPU_OF_ARCH)}")
    return GPUS[key]

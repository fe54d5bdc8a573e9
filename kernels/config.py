"""Tile sizes and launch options, chosen per input dtype and GPU architecture."""
from dataclasses import dataclass

import torch


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


def kernel_config(dtype: torch.dtype, arch: int | None) -> KernelConfig:
    """arch: compute capability as 80, 86, 89, 90 (None on CPU).

    fp32 uses exact ("ieee") products rather than TF32, on CUDA cores with two pipeline stages (three spill on
    sm_80). sm_86/sm_89 have ~100 KB of shared memory per block, so 16-bit inputs pipeline fewer stages there.
    """
    if arch is None:  # TRITON_INTERPRET on CPU: wide vocabulary tiles keep the number of programs low
        return KernelConfig(64, 256, 32, 4, 1, "ieee") if dtype == torch.float32 \
            else KernelConfig(64, 256, 64, 4, 1, "tf32", upcast_operands=True)
    small_smem = arch in (86, 87, 89, 120)
    if dtype == torch.float32:
        return KernelConfig(64, 64, 32, 8, 2, "ieee")
    return KernelConfig(128, 128, 32, 8, 2 if small_smem else 3, "tf32")


def launch_config(dtype: torch.dtype, device: torch.device) -> KernelConfig:
    if device.type != "cuda":
        return kernel_config(dtype, None)
    major, minor = torch.cuda.get_device_capability(device)
    return kernel_config(dtype, 10 * major + minor)


def tile_meta(cfg: KernelConfig) -> dict:
    """Compile-time arguments shared by the kernels that sweep (BLOCK_N, BLOCK_V) logits tiles."""
    return dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, INPUT_PRECISION=cfg.input_precision,
                UPCAST_OPERANDS=cfg.upcast_operands)

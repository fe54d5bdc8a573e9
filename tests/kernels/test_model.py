"""The traffic/roofline model against hand-computed small cases (no GPU, no compilation)."""
from types import SimpleNamespace

import pytest
import torch

from sdpo_fast.kernels import model
from sdpo_fast.kernels.config import KernelConfig
from sdpo_fast.kernels.gpus import GPU, programs_per_sm
from sdpo_fast.kernels.grad_weight import grad_weight_launch
from sdpo_fast.kernels.lse_gather import lse_gather_launch

CFG = KernelConfig(block_n=16, block_v=128, block_d=32, num_warps=8, num_stages=3, input_precision="tf32")


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def grad_weight_case(n=32, vocab=256, d=128):
    return grad_weight_launch(meta(n, vocab), meta(n, d), meta(vocab, d, dtype=torch.float32), CFG)


def test_grad_weight_bytes_with_a_large_cache():
    """2 vocabulary x 2 hidden blocks (128 x 64): each grad_logits/hidden slice read once, each fp32 tile read
    and written once."""
    launch = grad_weight_case()
    g_slice, h_slice, tile = 32 * 128 * 2, 32 * 64 * 2, 128 * 64 * 4
    assert model.hbm_bytes(launch, resident=4, l2_bytes=1 << 30) == 2 * g_slice + 2 * h_slice + 4 * 2 * tile


def test_grad_weight_bytes_without_a_cache_follow_program_order():
    """One program at a time and room for one block: every block a program reads comes from HBM."""
    launch = grad_weight_case()
    g_slice, h_slice, tile = 32 * 128 * 2, 32 * 64 * 2, 128 * 64 * 4
    assert model.hbm_bytes(launch, resident=1, l2_bytes=0) == 4 * (g_slice + h_slice + 2 * tile)


def test_first_chunk_writes_grad_weight_without_reading_it():
    launch = grad_weight_launch(meta(32, 256), meta(32, 128), meta(256, 128, dtype=torch.float32), CFG, False)
    g_slice, h_slice, tile = 32 * 128 * 2, 32 * 64 * 2, 128 * 64 * 4
    assert model.hbm_bytes(launch, resident=4, l2_bytes=1 << 30) == 2 * g_slice + 2 * h_slice + 4 * tile


def test_lse_gather_bytes_reuse_within_a_wave():
    """32 tokens (2 row blocks of 16), V = 512 (4 tiles), one split, both row blocks resident: each weight tile is
    read once per wave, each hidden block once; the outputs are 2 floats per token."""
    launch, _, _ = lse_gather_launch(meta(32, 64), meta(512, 64), meta(32, dtype=torch.int64), 1.0, CFG, None)
    assert launch.args[9] == 1  # one vocabulary split
    hidden, weight = 32 * 64 * 2, 512 * 64 * 2
    assert model.hbm_bytes(launch, resident=2, l2_bytes=1 << 30) == hidden + weight + 32 * 2 * 4
    # one program at a time, a cache too small for a tile: the weight is read once per row block, and the
    # hidden block once per tile
    assert model.hbm_bytes(launch, resident=1, l2_bytes=0) == 2 * weight + 4 * hidden + 32 * 2 * 4


def test_predicted_time_is_the_calibrated_roofline_with_wave_quantization():
    gpu = GPU("toy", 90, sms=2, l2_bytes=1 << 30, hbm_bytes_per_s=1e9, tensor_16bit_flops=1e12, fp32_flops=1e11,
              source="made up")
    calibration = model.Efficiency(triton_tensor=0.5, triton_fp32=0.25, cublas=0.8, hbm=0.8, source="test")
    launch = grad_weight_case()
    p = model.predict_launch(launch, gpu, occupancy=1, calibration=calibration)  # 4 programs on 2 SMs: 2 waves
    flops = 2 * 32 * 256 * 128
    moved = model.hbm_bytes(launch, 2, int(model.L2_EFFECTIVE * gpu.l2_bytes))
    assert p.flops == flops and p.hbm_bytes == moved and p.wave_efficiency == 1.0
    assert p.seconds == pytest.approx(max(flops / 0.5e12, moved / 0.8e9)) and p.bound == "memory"
    p3 = model.predict_launch(launch, GPU(**{**gpu.__dict__, "sms": 3, "hbm_bytes_per_s": 1e15}), occupancy=1,
                              calibration=calibration)
    assert p3.wave_efficiency == pytest.approx(4 / 6) and p3.seconds == pytest.approx(flops / 0.5e12 * 6 / 4)


def test_qwen3_8b_step_costs_each_grad_weight_launch_by_its_own_options(monkeypatch):
    """N=16384, d=4096, V=151936, bf16 on H100: the backward's chunks hold (50 MiB / 4) // (4096 x 2 bytes) = 1600
    -> 1536 rows (10 chunks and one of 1024). By hand, grad_weight reads grad_logits (N x V x 2) and hidden (N x d x
    2) once and writes the fp32 (V, d) tile set per chunk (11 x 4Vd) and reads it back in the 10 accumulating ones:
    57.39 GB, not the 11 first-chunk copies (write only) a memo keyed without ACCUMULATE gave (35.0 GB). The table
    prints the efficiency assumptions, and the step runs between the Triton and the cuBLAS factors' rates."""
    from sdpo_fast.kernels import check

    monkeypatch.setattr(check, "compile_launch", lambda launch, arch, *a, **k: SimpleNamespace(programs_per_sm=1))
    n, d, vocab = 16384, 4096, 151936
    step = model.model_step((n, d, vocab), torch.bfloat16, "h100")
    grad_weight = next(k for k in step.kernels if k.kernel == "grad_weight")
    assert grad_weight.launches == 11
    assert grad_weight.hbm_bytes == n * vocab * 2 + n * d * 2 + (11 + 10) * vocab * d * 4
    assert round(grad_weight.hbm_bytes / 1e9, 1) == 57.4
    table = model.format_model(step)
    assert "Assumptions: Triton 16-bit products at 60% of the datasheet tensor peak" in table
    peak = model.GPUS["h100"].tensor_16bit_flops / 1e12  # Triton kernels at 60 % of it, grad_h (cuBLAS) at 75 %
    assert 0.6 * peak < step.tflops < 0.75 * peak


@pytest.mark.parametrize("regs,smem,warps,arch,want", [
    (238, 49152, 8, 90, 1),   # 238 -> 240 registers x 256 threads = 61,440 of 65,536
    (113, 49152, 8, 90, 2),   # 120 x 256 x 2 = 61,440 registers; shared 2 x 49 KiB
    (64, 100000, 4, 90, 2),   # shared: 233,472 // 101,024
    (32, 0, 4, 86, 12),       # threads: 1,536 // 128
    (16, 0, 1, 90, 32),       # the block limit
])
def test_programs_per_sm(regs, smem, warps, arch, want):
    assert programs_per_sm(regs, smem, warps, arch) == want


@pytest.mark.parametrize("n_tokens", [4096, 16384])
def test_vocab_splits_on_h100(n_tokens):
    """d=4096, V=151936, 128x128 bf16 tiles (1 MiB each), 132 SMs x 1 program, 50 MiB L2: with S splits the
    resident programs hold min(row blocks, ceil(132/S)) hidden blocks and S weight tiles; S=7 needs 26 MiB (19 + 7)
    > 25 MiB, S=8 needs 25 (17 + 8) and fills 97 % of the waves, which no larger fitting S beats."""
    from sdpo_fast.kernels.lse_gather import _vocab_splits
    cfg = KernelConfig(block_n=128, block_v=128, block_d=32, num_warps=8, num_stages=3, input_precision="tf32")
    assert _vocab_splits(n_tokens, 151936, 4096, 2, cfg, 132, 50 * 2**20, 1) == 8
    assert _vocab_splits(n_tokens, 151936, 4096, 2, cfg, None, 50 * 2**20, 1) == 1


def test_grad_in_forward_step_by_hand():
    """N=16384, d=4096, V=151936, bf16 on H100 with a budget of exactly 2048 rows (one bf16 (rows, V) chunk): 8
    chunks; each GEMM is 2·N·d·V FLOPs in all; dW reads G and h and reads and writes the fp32 (V, d) once per chunk;
    the row passes move the chunk 1x (row_lse) and 3x (row_token_grad); 8·N·d·V counted, 6 with a frozen head (no
    dW)."""
    n, d, vocab = 16384, 4096, 151936
    step = model.model_grad_in_forward_step((n, d, vocab), torch.bfloat16, "h100", 2048 * vocab * 2)
    kernels = {k.kernel: k for k in step.kernels}
    assert all(k.launches == 8 for k in step.kernels) and len(kernels) == 6
    for name in ["teacher logits (cuBLAS)", "student logits (cuBLAS)", "dX = G @ W (cuBLAS)", "dW += G.T @ h (cuBLAS)"]:
        assert kernels[name].flops == 2 * n * d * vocab, name
    assert kernels["dW += G.T @ h (cuBLAS)"].hbm_bytes == 8 * (2048 * vocab * 2 + 2048 * d * 2 + 8 * vocab * d)
    assert kernels["row_lse"].hbm_bytes == n * vocab * 2 and kernels["row_token_grad"].hbm_bytes == 3 * n * vocab * 2
    gpu = model.GPUS["h100"]
    assert kernels["row_token_grad"].seconds == pytest.approx(3 * n * vocab * 2 / (gpu.hbm_bytes_per_s * 0.9))
    assert step.tflops == pytest.approx(8 * n * d * vocab / step.seconds / 1e12)
    assert step.tflops < 0.75 * gpu.tensor_16bit_flops / 1e12  # no faster than its cuBLAS factor
    frozen = model.model_grad_in_forward_step((n, d, vocab), torch.bfloat16, "h100", 2048 * vocab * 2,
                                              need_weight=False)
    assert frozen.counted == 6 and "dW += G.T @ h (cuBLAS)" not in {k.kernel for k in frozen.kernels}
    assert "grad_in_forward path" in model.format_model(frozen) and "(6·N·d·V)" in model.format_model(frozen)

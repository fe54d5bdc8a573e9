"""A traffic and roofline model of one fused-path loss step: bytes through HBM, FLOPs, predicted time per GPU; and of
one grad-in-forward step (`model_grad_in_forward_step`: cuBLAS GEMMs and memory-bound row kernels).

For each launch of the step (`sdpo_fast.kernels.fused`), the programs run in launch order (axis 0 fastest), in
waves of `programs_per_sm * SMs` resident programs that advance in lockstep through their steps (one vocabulary
tile per step for lse_gather; one whole tile for grad_logits and grad_weight). Every operand block a program reads
goes through an LRU cache of L2_EFFECTIVE x the L2 size: a miss reads the block from HBM; stores go to HBM once.
The L2 starts empty at each launch. Predicted time of a launch = max(FLOPs / (peak x efficiency) x wave
quantization, bytes / (bandwidth x efficiency)), with the GPU's datasheet peaks (`sdpo_fast.kernels.gpus`) scaled
by the stated `EFFICIENCY` factors; no latency, no epilogue cost (exp per logit is < 4 % of the 2·d multiply-adds
at d = 4096). A prediction, not a measurement: `benchmarks/gpu_check.sh` measures the same step.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch

from .gpus import GPU, GPUS

# H100/A100 L2s are two partitions that can each hold a copy of a line, and stores and prefetches share it.
L2_EFFECTIVE = 0.5


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks the kernels reach (the roofline's calibration)."""
    triton_tensor: float  # the Triton kernels' 16-bit tensor-core products
    triton_fp32: float  # their fp32 ("ieee") products on CUDA cores
    cublas: float  # grad_h, a cuBLAS GEMM
    hbm: float  # bandwidth any kernel streams at
    source: str

    def describe(self) -> str:
        return (f"Assumptions: Triton 16-bit products at {self.triton_tensor:.0%} of the datasheet tensor peak, fp32 "
                f"products at {self.triton_fp32:.0%} of the fp32 peak, cuBLAS at {self.cublas:.0%}, HBM at "
                f"{self.hbm:.0%} of its bandwidth; L2 holds {L2_EFFECTIVE:.0%} of its size. {self.source}")


EFFICIENCY = Efficiency(
    triton_tensor=0.6, triton_fp32=0.6, cublas=0.75, hbm=0.9,
    source="Anchors: the fastest public H100 bf16 GEMM measurement, 780 TFLOP/s for (4224 x 8192) @ (8192 x 2048) "
           "with torch.compile max-autotune's CUTLASS kernels and vboost (Horace He, gist 'H100 peak matmul FLOPS', "
           "gist.github.com/Chillee/2ec89696db8b7ed1c24461159e325405), is 79 % of the 989 TFLOP/s datasheet peak: "
           "cuBLAS is taken just below it. Triton's matmul tutorial (03-matrix-multiplication) reaches cuBLAS only "
           "autotuned; these kernels run untuned 128 x 128 x 32 tiles or config.WIDER_TILES' (8 warps, 3 stages, no "
           "TMA, no warp specialization) with a softmax epilogue per tile, taken at 60 % whatever the tile. HBM: "
           "90 % of the datasheet rate, what streaming copies sustain. All four are assumptions until "
           "benchmarks/gpu_check.sh measures them.")


def _elem(tensor) -> int:
    return tensor.element_size()


def _lse_gather_programs(launch):
    """Program (row block r, split s) in launch order (split fastest); per step: its hidden rows and one weight
    tile."""
    hidden = launch.args[0]
    n_tokens, vocab_size, hidden_dim, per_split, splits = launch.args[5:10]
    bn, bv = launch.options["BLOCK_N"], launch.options["BLOCK_V"]
    e = _elem(hidden)
    for r in range(launch.grid[0] // splits):
        for s in range(splits):
            rows = min(bn, n_tokens - r * bn)
            v_end = min(vocab_size, (s + 1) * per_split)
            steps = [[("h", r, rows * hidden_dim * e), ("w", v0, min(bv, v_end - v0) * hidden_dim * e)]
                     for v0 in range(s * per_split, v_end, bv)]
            yield steps, 2 * rows * 4


def _grad_logits_programs(launch):
    hidden = launch.args[0]
    n_tokens, vocab_size, hidden_dim = launch.args[6:9]
    bn, bv = launch.options["BLOCK_N"], launch.options["BLOCK_V"]
    row_blocks, col_blocks = launch.grid
    e = _elem(hidden)
    for c in range(col_blocks):
        cols = min(bv, vocab_size - c * bv)
        for r in range(row_blocks):
            rows = min(bn, n_tokens - r * bn)
            yield [[("h", r, rows * hidden_dim * e), ("w", c, cols * hidden_dim * e)]], rows * cols * e


def _grad_weight_programs(launch):
    """Program (vocabulary block v, hidden block j), hidden block fastest: its grad_logits columns, hidden
    columns, and its fp32 tile (read only when accumulating)."""
    grad = launch.args[0]
    n_tokens, vocab_size, hidden_dim = launch.args[3:6]
    bv, bd = launch.options["BLOCK_V"], launch.options["BLOCK_D"]
    d_blocks = -(-hidden_dim // bd)
    e = _elem(grad)
    for v in range(launch.grid[0] // d_blocks):
        rows = min(bv, vocab_size - v * bv)
        for j in range(d_blocks):
            cols = min(bd, hidden_dim - j * bd)
            tile = rows * cols * 4
            reads = [("g", v, n_tokens * rows * e), ("h", j, n_tokens * cols * e)]
            yield [reads + ([("o", (v, j), tile)] if launch.options["ACCUMULATE"] else [])], tile


PROGRAMS = {"lse_gather_kernel": _lse_gather_programs, "grad_logits_kernel": _grad_logits_programs,
            "grad_weight_kernel": _grad_weight_programs}


def launch_flops(launch) -> int:
    name = launch.kernel.__name__
    if name == "lse_gather_kernel":
        n, v, d = launch.args[5:8]
    elif name == "grad_logits_kernel":
        n, v, d = launch.args[6:9]
    else:
        n, v, d = launch.args[3:6]
    return 2 * n * d * v


def hbm_bytes(launch, resident: int, l2_bytes: int) -> int:
    """Bytes the launch moves through HBM when `resident` programs run at once and the cache holds l2_bytes."""
    cache: OrderedDict = OrderedDict()
    used = moved = 0
    programs = list(PROGRAMS[launch.kernel.__name__](launch))
    for start in range(0, len(programs), resident):
        wave = programs[start:start + resident]
        for step in range(max(len(steps) for steps, _ in wave)):
            for steps, _ in wave:
                if step >= len(steps):
                    continue
                for key in steps[step]:
                    if key in cache:
                        cache.move_to_end(key)
                        continue
                    moved += key[2]
                    cache[key] = None
                    used += key[2]
                    while used > l2_bytes and len(cache) > 1:
                        used -= cache.popitem(last=False)[0][2]
        moved += sum(stored for _, stored in wave)
    return moved


@dataclass(frozen=True)
class KernelPrediction:
    kernel: str
    launches: int
    flops: float
    hbm_bytes: float
    programs_per_sm: int
    wave_efficiency: float
    seconds: float
    bound: str  # "compute" or "memory"

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12 if self.seconds else 0.0


@dataclass(frozen=True)
class StepPrediction:
    gpu: str
    dtype: str
    shape: tuple
    kernels: list = field(default_factory=list)
    counted: int = 10
    """The useful FLOPs are counted·N·d·V: 10 for the recompute path, 8 for the grad-in-forward path (6 with a
    frozen head)."""
    path: str = "recompute"

    @property
    def seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    @property
    def tflops(self) -> float:
        """Counting `counted`·N·d·V, as the benchmarks do."""
        n, d, v = self.shape
        return self.counted * n * d * v / self.seconds / 1e12

    def as_dict(self) -> dict:
        return {"gpu": self.gpu, "dtype": self.dtype, "shape": list(self.shape), "path": self.path,
                "counted": self.counted, "seconds": self.seconds,
                "tflops": self.tflops, "assumptions": EFFICIENCY.describe(),
                "kernels": [{**asdict(k), "tflops": k.tflops} for k in self.kernels]}


def predict_launch(launch, gpu: GPU, occupancy: int, calibration: Efficiency = EFFICIENCY) -> KernelPrediction:
    """One launch on `gpu` with `occupancy` resident programs per SM, at `calibration`'s fractions of its peaks."""
    resident = max(1, occupancy) * gpu.sms
    programs = math.prod(launch.grid)
    efficiency = programs / (math.ceil(programs / resident) * resident)
    flops = launch_flops(launch)
    fp32 = launch.options["INPUT_PRECISION"] == "ieee"
    peak = gpu.fp32_flops * calibration.triton_fp32 if fp32 else gpu.tensor_16bit_flops * calibration.triton_tensor
    moved = hbm_bytes(launch, resident, int(L2_EFFECTIVE * gpu.l2_bytes))
    compute_s, memory_s = flops / peak / efficiency, moved / (gpu.hbm_bytes_per_s * calibration.hbm)
    return KernelPrediction(launch.kernel.__name__.removesuffix("_kernel"), 1, flops, moved, occupancy, efficiency,
                            max(compute_s, memory_s), "compute" if compute_s >= memory_s else "memory")


def _merge(preds: list[KernelPrediction]) -> KernelPrediction:
    first = preds[0]
    flops, moved, seconds = (sum(getattr(p, f) for p in preds) for f in ("flops", "hbm_bytes", "seconds"))
    memory_s = sum(p.seconds for p in preds if p.bound == "memory")
    return KernelPrediction(first.kernel, len(preds), flops, moved, first.programs_per_sm,
                            min(p.wave_efficiency for p in preds), seconds,
                            "memory" if memory_s > seconds / 2 else "compute")


def _gemm(name: str, m: int, n: int, k: int, elem: int, gpu: GPU, count: int, fp32: bool,
          calibration: Efficiency = EFFICIENCY, fp32_accumulate: bool = False) -> KernelPrediction:
    """A cuBLAS GEMM (m, k) @ (k, n): each operand read once, the output written once (fp32_accumulate: an fp32
    output read and written, C += A @ B), at calibration.cublas of the peak."""
    flops = 2 * m * n * k * count
    moved = ((m * k + k * n) * elem + m * n * (8 if fp32_accumulate else elem)) * count
    peak = (gpu.fp32_flops if fp32 else gpu.tensor_16bit_flops) * calibration.cublas
    compute_s, memory_s = flops / peak, moved / (gpu.hbm_bytes_per_s * calibration.hbm)
    return KernelPrediction(name, count, flops, moved, 0, 1.0, max(compute_s, memory_s),
                            "compute" if compute_s >= memory_s else "memory")


def model_step(shape: tuple[int, int, int], dtype: torch.dtype, gpu: str | GPU, usages=None,
               need_weight: bool = True, cfgs=None) -> StepPrediction:
    """Predicted kernels of one forward+backward (student and teacher) at shape (N, d, V) on `gpu`.

    usages: `check.KernelUsage` rows giving programs per SM for (kernel, dtype, arch); compiled here when None.
    cfgs: the kernels' configs (`config.kernel_configs`, the default for the GPU's arch when None); usages must
    then be of those configs.
    """
    from .check import DTYPE_NAMES, compile_launch, step_launches

    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    n_tokens, hidden_dim, vocab_size = shape
    occupancy = {(u.kernel, u.dtype, u.arch): u.programs_per_sm for u in usages or []}
    launches = step_launches(shape, dtype, gpu, need_weight, cfgs,
                             occupancy.get(("lse_gather_kernel", DTYPE_NAMES[dtype], gpu.arch)))
    memo: dict = {}
    by_kernel: dict[str, list[KernelPrediction]] = {}
    for launch in launches:
        name = launch.kernel.__name__
        key_occ = (name, DTYPE_NAMES[dtype], gpu.arch)
        if key_occ not in occupancy:
            occupancy[key_occ] = compile_launch(launch, gpu.arch).programs_per_sm
        key = (name, launch.grid, tuple(a if isinstance(a, (int, float)) else tuple(a.shape) for a in launch.args),
               tuple(sorted(launch.options.items())))  # the options too: ACCUMULATE reads grad_weight's tiles
        if key not in memo:
            memo[key] = predict_launch(launch, gpu, occupancy[key_occ])
        by_kernel.setdefault(name, []).append(memo[key])
    elem = torch.finfo(dtype).bits // 8
    kernels = [_merge(preds) for preds in by_kernel.values()]
    chunks = [launch.args[6] for launch in launches if launch.kernel.__name__ == "grad_logits_kernel"]
    grad_h = [_gemm("grad_h (cuBLAS)", rows, hidden_dim, vocab_size, elem, gpu, 1, dtype == torch.float32)
              for rows in chunks]
    kernels.insert(-1 if need_weight else len(kernels), _merge(grad_h))
    return StepPrediction(gpu.name, DTYPE_NAMES[dtype], tuple(shape), kernels)


def _row_pass(name: str, moved: int, gpu: GPU, calibration: Efficiency = EFFICIENCY) -> KernelPrediction:
    """A memory-bound row kernel moving `moved` bytes at calibration.hbm of the bandwidth (its exp per element is
    far below the FLOP roof)."""
    return KernelPrediction(name, 1, 0.0, moved, 0, 1.0, moved / (gpu.hbm_bytes_per_s * calibration.hbm), "memory")


ROW_PASSES = {"sampled_token": (("row_lse", 1, 0), ("row_token_grad", 2, 1)),
              "full_logits": (("row_lse", 1, 0), ("row_divergence_grad", 5, 1))}
"""mode -> (row kernel, chunk reads, chunk writes) per row: the teacher's row_lse reads its chunk once;
row_token_grad reads the student's twice (log-sum-exp, gradient) and writes it once; row_divergence_grad (full)
reads the student's three times and the teacher's twice and writes the student's once."""


def model_grad_in_forward_step(shape: tuple[int, int, int], dtype: torch.dtype, gpu: str | GPU,
                               budget_bytes: int, need_weight: bool = True, mode: str = "sampled_token",
                               calibration: Efficiency = EFFICIENCY) -> StepPrediction:
    """Predicted kernels of one grad-in-forward step (`loss.backends.gemm_sweep`) at shape (N, d, V) on `gpu`: per
    chunk (rows from budget_bytes, `config.gemm_sweep_bytes_per_row`) the teacher's and the student's logits GEMMs,
    the row kernels (`ROW_PASSES`), dX = G @ W and, with need_weight, dW += G.T @ h with an fp32 output; every
    GEMM at calibration.cublas, every row pass at calibration.hbm. Counted FLOPs: 8·N·d·V (6 without dW)."""
    from .check import DTYPE_NAMES
    from .config import gemm_sweep_bytes_per_row

    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    n_tokens, hidden_dim, vocab_size = shape
    elem = torch.finfo(dtype).bits // 8
    fp32 = dtype == torch.float32
    rows = max(1, min(n_tokens, budget_bytes // gemm_sweep_bytes_per_row(mode, elem, vocab_size)))
    sizes = [min(rows, n_tokens - start) for start in range(0, n_tokens, rows)]
    parts: dict[str, list[KernelPrediction]] = {}

    def add(prediction: KernelPrediction) -> None:
        parts.setdefault(prediction.kernel, []).append(prediction)

    for m in sizes:
        add(_gemm("teacher logits (cuBLAS)", m, vocab_size, hidden_dim, elem, gpu, 1, fp32, calibration))
        add(_gemm("student logits (cuBLAS)", m, vocab_size, hidden_dim, elem, gpu, 1, fp32, calibration))
        for name, reads, writes in ROW_PASSES[mode]:
            add(_row_pass(name, (reads + writes) * m * vocab_size * elem, gpu, calibration))
        add(_gemm("dX = G @ W (cuBLAS)", m, hidden_dim, vocab_size, elem, gpu, 1, fp32, calibration))
        if need_weight:
            add(_gemm("dW += G.T @ h (cuBLAS)", vocab_size, hidden_dim, m, elem, gpu, 1, fp32, calibration,
                      fp32_accumulate=True))
    return StepPrediction(gpu.name, DTYPE_NAMES[dtype], tuple(shape), [_merge(p) for p in parts.values()],
                          counted=8 if need_weight else 6, path="grad_in_forward")


def format_model(step: StepPrediction) -> str:
    """A markdown table of the predicted kernels, then the whole step, then the assumptions it rests on."""
    lines = [f"Model: {step.gpu}, {step.dtype}, N, d, V = {step.shape}, {step.path} path",
             "", "| kernel | launches | TFLOP | HBM GB | programs/SM | wave eff. | bound | predicted ms | TFLOP/s |",
             "|---|--:|--:|--:|--:|--:|---|--:|--:|"]
    for k in step.kernels:
        lines.append(f"| {k.kernel} | {k.launches} | {k.flops / 1e12:.2f} | {k.hbm_bytes / 1e9:.1f} "
                     f"| {k.programs_per_sm or '–'} | {k.wave_efficiency:.2f} | {k.bound} | {k.seconds * 1e3:.2f} "
                     f"| {k.tflops:.0f} |")
    lines.append(f"| **whole step** ({step.counted}·N·d·V) | | {step.counted * math.prod(step.shape) / 1e12:.1f} "
                 f"| {sum(k.hbm_bytes for k in step.kernels) / 1e9:.1f} | | | | {step.seconds * 1e3:.1f} "
                 f"| {step.tflops:.0f} |")
    lines += ["", EFFICIENCY.describe()]
    return "\n".join(lines)

"""Forward+backward time and peak memory of each `sdpo_loss` backend against the reference and against
Liger-Kernel's fused linear cross entropy, at the same shapes.

Run: pytest benchmarks/test_loss_bench.py --benchmark-only [--benchmark-json FILE; then benchmarks/summarize.py FILE]
Every case runs on CUDA when a GPU is present, else on CPU (the Qwen3-8B shapes need CUDA).

- Peak memory is the growth over the inputs during one fwd+bwd. CUDA: torch.cuda.max_memory_allocated after
  reset_peak_memory_stats, minus memory_allocated before. CPU: a fresh subprocess (this file run as a script)
  warms the code path on a tiny shape, builds the inputs, resets VmHWM through /proc/self/clear_refs, runs the
  step and reports VmHWM - VmRSS; glibc is told to mmap blocks >= 1 MiB so freed tensors leave the RSS.
- Effective TFLOP/s counts 10·N·d·V per SDPO step (student and teacher logits, the backward's recompute,
  grad_h, grad_W) and 6·N·d·V per Liger cross-entropy step (logits, grad_h, grad_W), over the median time.
- x_cublas (CUDA only) is that median time over cuBLAS's time for the same matrix products (torch.mm at the
  same shapes and dtype, timed with CUDA events in the same run).
- test_kernels_vs_model (CUDA, bf16 Qwen3-8B shapes): each fused-path kernel timed alone with CUDA events in the
  order the Triton backend launches them, its TFLOP/s next to the traffic/roofline model's prediction for this
  GPU (`sdpo_fast.kernels.model`) and the same-run cuBLAS time of the same GEMM.
- test_recompute_tiles (CUDA, bf16, N=16384): the recompute path's kernels at the previous common tile and at the
  per-kernel tiles of `kernel_configs` for this GPU, alternating in one run: seconds, TFLOP/s, new/previous ratio.
- test_paths_fwd_bwd: the grad-in-forward path (grad_in_forward=True, gradients formed in the forward from
  GEMM-computed logits chunks) beside the recompute path (False) at equal shapes, with and without a frozen head
  (LoRA), on the torch backend (CPU or CUDA) and the Triton backend (CUDA): time, peak memory, TFLOP/s counting
  8·N·d·V (6 with a frozen head) for both, and on CUDA x_cublas over torch.mm GEMMs of the same shapes (two logits
  products, dX and, unless frozen, dW) and the model's prediction for the path.
- The issue's target is asserted: the default path (backend="auto") at N=4096, d=256, V=65536 fp32 grows peak
  memory by at most 25% of what the reference needs.
"""
from __future__ import annotations

import functools
import gc
import json
import statistics
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from bench_memory import cpu_peak_growth, cuda_peak_growth, subprocess_env
from sdpo_fast import sdpo_loss
from sdpo_fast.loss import resolve_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_BACKEND = resolve_backend("auto", torch.device(DEVICE))
BACKENDS = ["reference", "torch", "triton", "liger"]
MAX_DEFAULT_VS_REFERENCE = 0.25
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Shape(NamedTuple):
    name: str
    n: int
    d: int
    vocab: int
    dtype: str
    rounds: int
    warmup_rounds: int
    cuda_only: bool = False

    def __str__(self) -> str:
        return f"{self.name}-N{self.n}-d{self.d}-V{self.vocab}-{self.dtype}"


TARGET = Shape("target", 4096, 256, 65536, "fp32", rounds=2, warmup_rounds=1)  # round 1 would time compilation
SHAPES = [
    Shape("small", 1024, 128, 50257, "fp32", rounds=3, warmup_rounds=1),
    TARGET,
    Shape("qwen3-8b", 4096, 4096, 151936, "bf16", rounds=5, warmup_rounds=1, cuda_only=True),
    Shape("qwen3-8b", 16384, 4096, 151936, "bf16", rounds=5, warmup_rounds=1, cuda_only=True),
]


def make_inputs(shape: Shape, device: str, n: int | None = None, vocab: int | None = None) -> dict:
    """Student/teacher hidden states, lm_head weight (both leaves needing grad) and targets; n/vocab override."""
    n, vocab, dtype = n or shape.n, vocab or shape.vocab, _DTYPES[shape.dtype]
    g = torch.Generator(device).manual_seed(0)
    student = torch.randn(n, shape.d, generator=g, device=device, dtype=dtype)
    teacher = torch.randn(n, shape.d, generator=g, device=device, dtype=dtype).mul_(0.7).add_(student)
    weight = torch.randn(vocab, shape.d, generator=g, device=device, dtype=dtype).mul_(2 / shape.d ** 0.5)
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)
    return dict(student_hidden=student.requires_grad_(), lm_head_weight=weight.requires_grad_(),
                target_ids=targets, teacher_hidden=teacher)


def make_step(backend: str, inputs: dict):
    """One forward+backward (grads reset first); Liger computes plain cross entropy on the student only."""
    student, weight = inputs["student_hidden"], inputs["lm_head_weight"]
    if backend == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def step():
        student.grad = weight.grad = None
        if backend == "liger":
            loss = liger_fused_linear_cross_entropy(student, weight, inputs["target_ids"])
        else:
            loss = sdpo_loss(**inputs, backend=backend)
        loss.backward()
        if student.is_cuda:
            torch.cuda.synchronize()

    return step


def step_flops(shape: Shape, backend: str) -> int:
    return (6 if backend == "liger" else 10) * shape.n * shape.d * shape.vocab


def _cpu_peak_growth_here(shape: Shape, maker: str, args: list) -> int:
    """Run inside a fresh process: bytes the process's peak RSS grows during one fwd+bwd of
    STEP_MAKERS[maker](*args, inputs)."""
    make = STEP_MAKERS[maker]
    make(*args, make_inputs(shape, "cpu", n=8, vocab=512))()  # load lazily initialized code first
    return cpu_peak_growth(make(*args, make_inputs(shape, "cpu")))


@functools.cache
def peak_growth(shape: Shape, maker: str, *args) -> int | None:
    """Peak memory growth of one fwd+bwd of STEP_MAKERS[maker](*args, inputs) over its inputs, in bytes; None when
    CUDA runs out of memory. On CPU it is measured in a fresh process (this file's __main__)."""
    if DEVICE == "cuda":
        try:
            return cuda_peak_growth(STEP_MAKERS[maker](*args, make_inputs(shape, DEVICE)))
        except torch.cuda.OutOfMemoryError:
            return None
    spec = json.dumps([shape._asdict(), maker, args])
    out = subprocess.run([sys.executable, __file__, spec], env=subprocess_env(), check=True, capture_output=True,
                         text=True)
    return int(out.stdout.split()[-1])


def _cuda_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@functools.cache
def cublas_seconds(shape: Shape) -> dict:
    """cuBLAS times of the (N,d)@(d,V) logits product, grad_h (N,V)@(V,d) and grad_W (V,N)@(N,d)."""
    g = torch.Generator(DEVICE).manual_seed(1)
    dtype = _DTYPES[shape.dtype]
    hidden = torch.randn(shape.n, shape.d, generator=g, device=DEVICE, dtype=dtype)
    weight = torch.randn(shape.vocab, shape.d, generator=g, device=DEVICE, dtype=dtype)
    grad_logits = torch.randn(shape.n, shape.vocab, generator=g, device=DEVICE, dtype=dtype)
    logits = torch.empty_like(grad_logits)
    grad_h, grad_w = torch.empty_like(hidden), torch.empty_like(weight)
    times = {
        "logits": _cuda_seconds(lambda: torch.mm(hidden, weight.T, out=logits)),
        "grad_h": _cuda_seconds(lambda: torch.mm(grad_logits, weight, out=grad_h)),
        "grad_w": _cuda_seconds(lambda: torch.mm(grad_logits.T, hidden, out=grad_w)),
    }
    del hidden, weight, grad_logits, logits, grad_h, grad_w
    torch.cuda.empty_cache()
    return times


def _skip_unsupported(shape: Shape, backend: str) -> None:
    if shape.cuda_only and DEVICE != "cuda":
        pytest.skip("Qwen3-8B shapes need a CUDA GPU")
    if backend == "triton" and DEVICE != "cuda":
        pytest.skip("Triton kernels need a CUDA GPU")
    if backend == "liger":
        if DEVICE != "cuda":
            pytest.skip("Liger-Kernel's fused linear cross entropy needs a CUDA GPU")
        pytest.importorskip("liger_kernel.transformers.functional", reason="liger-kernel is not installed")


def model_gpu():
    """The model's datasheet entry for this CUDA device, matched by name (None when unknown)."""
    from sdpo_fast.kernels.gpus import GPUS

    name = torch.cuda.get_device_name().lower()
    keys = {"h200": "h200", "h100": "h100", "a100": "a100", "4090": "rtx4090", "l40s": "l40s", "a10": "a10"}
    return next((GPUS[key] for word, key in keys.items() if word in name), None)


@functools.cache
def predicted(shape: Shape):
    """The model's StepPrediction for this shape on this GPU, or None."""
    gpu = model_gpu() if DEVICE == "cuda" else None
    if gpu is None:
        return None
    from sdpo_fast.kernels.model import model_step
    return model_step((shape.n, shape.d, shape.vocab), _DTYPES[shape.dtype], gpu)


def _timed(events: dict, name: str, fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    events.setdefault(name, []).append((start, end))
    return out


def kernel_seconds(inputs: dict, cfgs: dict | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Seconds per kernel of one forward (student and teacher) and backward of the fused path, each launch timed,
    each Triton kernel at its tile in cfgs when given (else `launch_config`'s); and the student's lse and grad_W."""
    from sdpo_fast.kernels.config import l2_bytes
    from sdpo_fast.kernels.fused import backward_chunks
    from sdpo_fast.kernels.grad_logits import grad_logits
    from sdpo_fast.kernels.grad_weight import accumulate_grad_weight
    from sdpo_fast.kernels.lse_gather import lse_gather

    cfg = (cfgs or {}).get
    hidden, weight, targets = inputs["student_hidden"].detach(), inputs["lm_head_weight"].detach(), inputs["target_ids"]
    events: dict = {}
    lse, _ = _timed(events, "lse_gather", lambda: lse_gather(hidden, weight, targets, 1.0, cfg=cfg("lse_gather")))
    _timed(events, "lse_gather", lambda: lse_gather(inputs["teacher_hidden"], weight, targets, 1.0,
                                                    cfg=cfg("lse_gather")))
    coef = torch.full_like(lse, 1.0 / len(lse))
    chunks = backward_chunks(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.dtype, True,
                             l2_bytes(hidden.device))
    workspace = torch.empty(chunks[0].stop, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.empty_like(hidden)
    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=hidden.device)
    for rows in chunks:
        g = workspace[: rows.stop - rows.start]
        _timed(events, "grad_logits", lambda: grad_logits(hidden[rows], weight, targets[rows], lse[rows], coef[rows],
                                                          1.0, g, cfg=cfg("grad_logits")))
        _timed(events, "grad_h (cuBLAS)", lambda: torch.mm(g, weight, out=grad_h[rows]))
        _timed(events, "grad_weight", lambda: accumulate_grad_weight(g, hidden[rows], grad_w, rows.start > 0,
                                                                     cfg=cfg("grad_weight")))
    torch.cuda.synchronize()
    seconds = {name: sum(a.elapsed_time(b) for a, b in pairs) / 1e3 for name, pairs in events.items()}
    return seconds, lse, grad_w


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.dtype == "bf16"], ids=lambda s: f"{DEVICE}-{s}")
def test_kernels_vs_model(benchmark, shape):
    if DEVICE != "cuda":
        pytest.skip("timing the Triton kernels needs a CUDA GPU")
    benchmark.group = f"kernels {DEVICE} {shape}"
    inputs = make_inputs(shape, DEVICE)
    kernel_seconds(inputs)  # compile and warm up
    runs = []
    benchmark.pedantic(lambda: runs.append(kernel_seconds(inputs)[0]), rounds=3, iterations=1)
    measured = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    model = predicted(shape)
    gemm = cublas_seconds(shape)
    same_gemm = {"lse_gather": 2 * gemm["logits"], "grad_logits": gemm["logits"], "grad_h (cuBLAS)": gemm["grad_h"],
                 "grad_weight": gemm["grad_w"]}
    flops = 2 * shape.n * shape.d * shape.vocab
    rows = {}
    for name, seconds in measured.items():
        count = 2 if name == "lse_gather" else 1
        pred = next((k for k in model.kernels if k.kernel == name.removesuffix("_kernel")), None) if model else None
        rows[name] = dict(measured_s=seconds, tflops=count * flops / seconds / 1e12, cublas_s=same_gemm[name],
                          predicted_s=pred.seconds if pred else None, predicted_tflops=pred.tflops if pred else None)
    benchmark.extra_info.update(device=DEVICE, dtype=shape.dtype, n=shape.n, d=shape.d, vocab=shape.vocab,
                                gpu_model=model.gpu if model else None, kernels=rows,
                                predicted_step_s=model.seconds if model else None,
                                predicted_step_tflops=model.tflops if model else None)


TILE_SHAPE = Shape("qwen3-8b", 16384, 4096, 151936, "bf16", rounds=3, warmup_rounds=1, cuda_only=True)


def test_recompute_tiles(benchmark):
    """The recompute path's kernels (`kernel_seconds`) at the tile every kernel used before (`config.COMMON_TILE`)
    and at this GPU's `kernel_configs`, alternating in the same run (CUDA, bf16, N=16384, d=4096, V=151936): median
    seconds and TFLOP/s per kernel and for the three Triton kernels together, and the new/previous time ratio; both
    tiles' lse and grad_W agree (fp32 sums in another order)."""
    if DEVICE != "cuda":
        pytest.skip("timing the Triton kernels needs a CUDA GPU")
    from sdpo_fast.kernels.config import COMMON_TILE, KERNELS, kernel_configs

    shape = TILE_SHAPE
    major, minor = torch.cuda.get_device_capability()
    tiles = {"previous": dict.fromkeys(KERNELS, COMMON_TILE),
             "new": kernel_configs(torch.bfloat16, 10 * major + minor)}
    benchmark.group = f"recompute tiles {DEVICE} {shape}"
    inputs = make_inputs(shape, DEVICE)
    outputs = {name: kernel_seconds(inputs, cfgs)[1:] for name, cfgs in tiles.items()}  # compile, warm up
    for a, b in zip(outputs["new"], outputs["previous"]):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    del outputs
    runs: dict = {name: [] for name in tiles}

    def both():
        for name, cfgs in tiles.items():
            runs[name].append(kernel_seconds(inputs, cfgs)[0])

    benchmark.pedantic(both, rounds=shape.rounds, iterations=1)
    flops = {"lse_gather": 4, "grad_logits": 2, "grad_h (cuBLAS)": 2, "grad_weight": 2, "recompute kernels": 8}
    triton_kernels = ("lse_gather", "grad_logits", "grad_weight")
    rows = {}
    for name, timings in runs.items():
        medians = {k: statistics.median(run[k] for run in timings) for k in timings[0]}
        medians["recompute kernels"] = statistics.median(sum(run[k] for k in triton_kernels) for run in timings)
        rows[name] = {k: dict(seconds=s, tflops=flops[k] * shape.n * shape.d * shape.vocab / s / 1e12)
                      for k, s in medians.items()}
    benchmark.extra_info.update(
        device=DEVICE, gpu=torch.cuda.get_device_name(), dtype=shape.dtype, n=shape.n, d=shape.d, vocab=shape.vocab,
        tiles={name: {k: [c.block_n, c.block_v, c.block_d, c.num_warps, c.num_stages] for k, c in cfgs.items()}
               for name, cfgs in tiles.items()},
        tile_kernels=rows, new_over_previous={k: rows["new"][k]["seconds"] / rows["previous"][k]["seconds"]
                                              for k in rows["new"]})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{DEVICE}-{s}")
def test_fwd_bwd(benchmark, shape, backend):
    _skip_unsupported(shape, backend)
    benchmark.group = f"fwd+bwd {DEVICE} {shape}"
    step = make_step(backend, make_inputs(shape, DEVICE))
    try:
        benchmark.pedantic(step, rounds=shape.rounds, warmup_rounds=shape.warmup_rounds, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{backend} ran out of GPU memory: {str(exc).splitlines()[0]}")
    del step
    gc.collect()

    seconds = benchmark.stats.stats.median
    flops = step_flops(shape, backend)
    info = dict(backend=backend, device=DEVICE, dtype=shape.dtype, n=shape.n, d=shape.d, vocab=shape.vocab,
                flops=flops, tflops=flops / seconds / 1e12, default_backend=backend == DEFAULT_BACKEND)
    peak = peak_growth(shape, "fwd_bwd", backend)
    reference_peak = peak_growth(shape, "fwd_bwd", "reference")
    info["peak_bytes"] = peak
    if peak is not None and reference_peak and backend != "reference":
        info["peak_vs_reference"] = peak / reference_peak
    if DEVICE == "cuda":
        gemm = cublas_seconds(shape)
        products = ("logits", "grad_h", "grad_w") if backend == "liger" else ("logits",) * 3 + ("grad_h", "grad_w")
        info["cublas_seconds"] = sum(gemm[p] for p in products)
        info["x_cublas"] = seconds / info["cublas_seconds"]
        model = predicted(shape) if backend == "triton" and shape.dtype == "bf16" else None
        if model is not None:
            info["predicted_tflops"] = model.tflops
    benchmark.extra_info.update(info)

    if shape == TARGET and backend == DEFAULT_BACKEND:
        assert peak <= MAX_DEFAULT_VS_REFERENCE * reference_peak, (
            f"default path ({backend}) grows peak memory by {peak / 2**20:.0f} MiB, more than "
            f"{MAX_DEFAULT_VS_REFERENCE:.0%} of the reference's {reference_peak / 2**20:.0f} MiB")


# Distillation modes: full_logits / topk_logits (and sampled_token with importance clipping) against the
# reference and, for full_logits, Liger-Kernel's fused linear JSD (LigerFusedLinearJSDLoss, soft loss only,
# beta = alpha; no importance clipping). FLOPs per step: 8·N·d·V for our modes (student and teacher logits,
# grad_h, grad_W; gradients formed in the forward sweep).
MODES = [("sampled_token", 1.0), ("full_logits", 0.5), ("full_logits", 1.0), ("topk_logits", 0.5)]
MODE_BACKENDS = ["reference", "torch", "triton", "liger_jsd"]
MODE_SHAPES = [
    Shape("modes-small", 1024, 128, 32768, "fp32", rounds=3, warmup_rounds=1),
    Shape("qwen3-8b", 4096, 4096, 151936, "bf16", rounds=3, warmup_rounds=1, cuda_only=True),
]


def make_mode_step(backend: str, mode: str, alpha: float, inputs: dict):
    """One forward+backward of `sdpo_loss` in `mode` (top-k: k = 100 with the tail; sampled_token: importance
    clip 2 with behavior log-probs of 0), or of Liger's fused linear JSD at beta = alpha."""
    student, weight = inputs["student_hidden"], inputs["lm_head_weight"]
    options = dict(distillation_mode=mode, distillation_alpha=alpha)
    if mode == "sampled_token":
        options.update(importance_clip=2.0, behavior_logprobs=torch.zeros_like(inputs["target_ids"],
                                                                               dtype=torch.float32))
    if backend == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=alpha,
                                      compiled=student.is_cuda)

    def step():
        student.grad = weight.grad = None
        if backend == "liger_jsd":
            loss = jsd(student, weight, inputs["teacher_hidden"], weight.detach(), inputs["target_ids"])
        else:
            loss = sdpo_loss(**inputs, backend=backend, **options)
        loss.backward()
        if student.is_cuda:
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("backend", MODE_BACKENDS)
@pytest.mark.parametrize("mode,alpha", MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", MODE_SHAPES, ids=lambda s: f"{DEVICE}-{s}")
def test_mode_fwd_bwd(benchmark, shape, mode, alpha, backend):
    if shape.cuda_only and DEVICE != "cuda":
        pytest.skip("Qwen3-8B shapes need a CUDA GPU")
    if backend == "triton" and DEVICE != "cuda":
        pytest.skip("Triton kernels need a CUDA GPU")
    if backend == "liger_jsd":
        if mode != "full_logits":
            pytest.skip("Liger's fused linear JSD serves full_logits only")
        pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    benchmark.group = f"mode fwd+bwd {DEVICE} {shape} {mode} alpha={alpha}"
    step = make_mode_step(backend, mode, alpha, make_inputs(shape, DEVICE))
    try:
        benchmark.pedantic(step, rounds=shape.rounds, warmup_rounds=shape.warmup_rounds, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{backend} ran out of GPU memory: {str(exc).splitlines()[0]}")
    del step
    gc.collect()
    flops = 8 * shape.n * shape.d * shape.vocab
    seconds = benchmark.stats.stats.median
    info = dict(backend=backend, mode=mode, alpha=alpha, device=DEVICE, dtype=shape.dtype, n=shape.n, d=shape.d,
                vocab=shape.vocab, flops=flops, tflops=flops / seconds / 1e12)
    peak, reference_peak = (peak_growth(shape, "mode", b, mode, alpha) for b in (backend, "reference"))
    info["peak_bytes"] = peak
    if peak is not None and reference_peak and backend != "reference":
        info["peak_vs_reference"] = peak / reference_peak
    benchmark.extra_info.update(info)


# Both paths of sdpo_loss (grad_in_forward True / False) at equal shapes.
PATH_SHAPES = [
    Shape("paths-small", 1024, 128, 16384, "fp32", rounds=3, warmup_rounds=1),
    TARGET,
    Shape("qwen3-8b", 4096, 4096, 151936, "bf16", rounds=5, warmup_rounds=1, cuda_only=True),
    Shape("qwen3-8b", 16384, 4096, 151936, "bf16", rounds=5, warmup_rounds=1, cuda_only=True),
]
PATH_WORKSPACE_BYTES = 2 << 30
"""The grad-in-forward path's budget here: 2 GiB holds 7000 bf16 rows of V = 151936 (the default 256 MiB: 883)."""


def make_path_step(backend: str, grad_in_forward: bool, frozen: bool, inputs: dict):
    """One forward+backward of sampled_token on one path; frozen: lm_head_weight needs no grad (LoRA)."""
    student = inputs["student_hidden"]
    weight = inputs["lm_head_weight"].detach() if frozen else inputs["lm_head_weight"]
    inputs = dict(inputs, lm_head_weight=weight)

    def step():
        student.grad = weight.grad = None
        sdpo_loss(**inputs, backend=backend, grad_in_forward=grad_in_forward,
                  workspace_bytes=PATH_WORKSPACE_BYTES).backward()
        if student.is_cuda:
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen-head"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["grad-in-forward", "recompute"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: f"{DEVICE}-{s}")
def test_paths_fwd_bwd(benchmark, shape, backend, grad_in_forward, frozen):
    _skip_unsupported(shape, backend)
    benchmark.group = f"paths fwd+bwd {DEVICE} {shape} {backend}"
    step = make_path_step(backend, grad_in_forward, frozen, make_inputs(shape, DEVICE))
    try:
        benchmark.pedantic(step, rounds=shape.rounds, warmup_rounds=shape.warmup_rounds, iterations=1)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{backend} ran out of GPU memory: {str(exc).splitlines()[0]}")
    del step
    gc.collect()
    seconds = benchmark.stats.stats.median
    flops = (6 if frozen else 8) * shape.n * shape.d * shape.vocab
    info = dict(backend=backend, grad_in_forward=grad_in_forward, frozen_head=frozen, device=DEVICE,
                dtype=shape.dtype, n=shape.n, d=shape.d, vocab=shape.vocab, flops=flops,
                tflops=flops / seconds / 1e12, workspace_bytes=PATH_WORKSPACE_BYTES,
                peak_bytes=peak_growth(shape, "path", backend, grad_in_forward, frozen))
    if DEVICE == "cuda":
        gemm = cublas_seconds(shape)
        info["cublas_seconds"] = 2 * gemm["logits"] + gemm["grad_h"] + (0 if frozen else gemm["grad_w"])
        info["x_cublas"] = seconds / info["cublas_seconds"]
        gpu = model_gpu()
        if gpu is not None and backend == "triton":
            from sdpo_fast.kernels.model import model_grad_in_forward_step, model_step
            dims = (shape.n, shape.d, shape.vocab)
            model = model_grad_in_forward_step(dims, _DTYPES[shape.dtype], gpu, PATH_WORKSPACE_BYTES, not frozen) \
                if grad_in_forward else model_step(dims, _DTYPES[shape.dtype], gpu, need_weight=not frozen)
            info["predicted_s"], info["predicted_tflops"] = model.seconds, flops / model.seconds / 1e12
    benchmark.extra_info.update(info)


STEP_MAKERS = {"fwd_bwd": make_step, "mode": make_mode_step, "path": make_path_step}
"""The steps whose peak memory `peak_growth` measures, each called as maker(*args, inputs)."""


if __name__ == "__main__":  # peak_growth's CPU worker: argv[1] = JSON [shape fields, maker, args]
    shape_fields, maker_name, maker_args = json.loads(sys.argv[1])
    print(_cpu_peak_growth_here(Shape(**shape_fields), maker_name, maker_args))

"""Kernel launches run on their tensors' device; lse_gather measures its occupancy once per (dtype, device, config)
and compiles one specialization for it."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses import FakeTensorMode

from helpers import triton_device
from sdpo_fast.kernels import lse_gather as lse_module
from sdpo_fast.kernels.config import Launch

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _recording_device(monkeypatch, log: list):
    """torch.cuda.device replaced by a context that records the device it is entered with and when it is left."""
    @contextlib.contextmanager
    def device(where):
        log.append(("enter", torch.device(where)))
        yield
        log.append(("leave", torch.device(where)))

    monkeypatch.setattr(torch.cuda, "device", device)


class _Kernel:
    """A jit function stand-in: kernel[grid](*args, **options) records the call in `log`."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **options: self.log.append(("launch", grid))


def test_a_launch_runs_under_its_tensors_cuda_device(monkeypatch):
    log = []
    _recording_device(monkeypatch, log)
    with FakeTensorMode():
        on_second_gpu = torch.empty(4, 8, device="cuda:1"), torch.empty(4, device="cuda:1")
    Launch(_Kernel(log), (3,), (*on_second_gpu, 4, 8), {"BLOCK_N": 16})()
    assert log == [("enter", torch.device("cuda:1")), ("launch", (3,)), ("leave", torch.device("cuda:1"))]

    log.clear()
    Launch(_Kernel(log), (2,), (torch.empty(4), 4), {})()  # CPU (the interpreter): no CUDA device entered
    assert log == [("launch", (2,))]


def test_lse_gather_measures_occupancy_once_per_dtype_device_and_config(monkeypatch):
    """The GPU path of lse_gather on the interpreter (SM count, L2, capability and Triton's warmup stood in for):
    the warmup runs once per (dtype, device, config), on a one-split launch of the kernel that runs (n_splits not
    specialized), and every call still gives the reference lse and target logits."""
    device = triton_device()
    monkeypatch.setattr(lse_module, "_PROGRAMS_PER_SM", {})
    monkeypatch.setattr(lse_module, "sm_count", lambda where: 4)
    monkeypatch.setattr(lse_module, "device_l2_bytes", lambda where: 1 << 20)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda where=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda where: contextlib.nullcontext())
    warmups = []

    def warmup(*args, grid, **options):
        warmups.append((args[0].dtype, args[9], grid))
        return SimpleNamespace(_init_handles=lambda: None, n_regs=128, metadata=SimpleNamespace(shared=4096))

    monkeypatch.setattr(lse_module.lse_gather_kernel, "warmup", warmup)
    g = torch.Generator().manual_seed(0)
    for n, dtype in [(70, torch.float32), (130, torch.float32), (33, torch.float32), (70, torch.bfloat16)]:
        hidden = torch.randn(n, 40, generator=g).to(device=device, dtype=dtype)
        weight = (torch.randn(600, 40, generator=g) / 40 ** 0.5).to(device=device, dtype=dtype)
        targets = torch.randint(0, 600, (n,), generator=g).to(device)
        lse, target_logit = lse_module.lse_gather(hidden, weight, targets, 0.5)
        logits = hidden.double() @ weight.double().T * 0.5
        torch.testing.assert_close(lse.double(), torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target_logit.double(), logits.gather(1, targets[:, None])[:, 0], rtol=1e-5,
                                   atol=1e-5)
    assert [(dtype, splits) for dtype, splits, _ in warmups] == [(torch.float32, 1), (torch.bfloat16, 1)]
    kernel = lse_module.lse_gather_kernel  # a JITFunction, or the interpreter's wrapper of one
    unspecialized = {p.name for p in kernel.params if p.do_not_specialize} if hasattr(kernel, "params") \
        else set(kernel.kwargs.get("do_not_specialize", ()))
    assert "n_splits" in unspecialized


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_lse_gather_compiles_one_kernel_and_warms_up_once(monkeypatch):
    """On a GPU: three calls at different N, 16-bit: one warmup, and at most one kernel compiled for them (the
    one-split occupancy launch compiles the kernel the real launches run, not a second specialization)."""
    monkeypatch.setattr(lse_module, "_PROGRAMS_PER_SM", {})
    kernel = lse_module.lse_gather_kernel
    real_warmup, warmups = kernel.warmup, []
    monkeypatch.setattr(kernel, "warmup", lambda *a, **k: warmups.append(1) or real_warmup(*a, **k))
    caches = getattr(kernel, "device_caches", None)
    before = {d: len(c[0]) for d, c in caches.items()} if caches is not None else None
    g = torch.Generator().manual_seed(0)
    for n in (4096, 4096 + 16, 4096 + 32):  # same divisibility by 16: one specialization
        hidden = torch.randn(n, 512, generator=g).to("cuda", torch.bfloat16)
        weight = (torch.randn(32000, 512, generator=g) / 512 ** 0.5).to("cuda", torch.bfloat16)
        targets = torch.randint(0, 32000, (n,), generator=g).cuda()
        lse, _ = lse_module.lse_gather(hidden, weight, targets, 1.0)
        torch.testing.assert_close(lse, torch.logsumexp(hidden.float() @ weight.float().T, 1), rtol=2e-2, atol=2e-2)
    assert len(warmups) == 1
    if caches is not None:
        added = sum(len(c[0]) - before.get(d, 0) for d, c in kernel.device_caches.items())
        assert added <= 1  # 0 when an earlier test compiled this specialization already


@pytest.mark.cuda
@two_gpus
def test_cuda_sdpo_loss_on_the_second_gpu_matches_the_torch_backend():
    """Tensors on cuda:1 while cuda:0 is current: the Triton kernels launch on cuda:1 and give the torch backend's
    loss and gradients."""
    from sdpo_fast import sdpo_loss

    g = torch.Generator().manual_seed(0)
    n, d, vocab = 300, 256, 5000
    hidden = torch.randn(n, d, generator=g).to("cuda:1").requires_grad_()
    teacher = torch.randn(n, d, generator=g).to("cuda:1")
    weight = (torch.randn(vocab, d, generator=g) / d ** 0.5).to("cuda:1").requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g).to("cuda:1")
    torch.cuda.set_device(0)
    results = {}
    for backend in ("triton", "torch"):
        loss = sdpo_loss(hidden, weight, targets, teacher_hidden=teacher, backend=backend)
        results[backend] = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    for got, want in zip(results["triton"], results["torch"]):
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

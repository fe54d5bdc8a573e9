"""Each Triton kernel against its plain PyTorch baseline (interpreter on CPU, or a real GPU)."""
import pytest
import torch

from helpers import triton_device


@pytest.fixture
def device():
    return triton_device()


def inputs(n, d, vocab, device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    return hidden, weight, targets


@pytest.mark.parametrize("n,d,vocab", [(1, 1, 2), (70, 33, 300), (129, 65, 257)])
@pytest.mark.parametrize("splits", [1, 3])
def test_lse_gather(device, n, d, vocab, splits, monkeypatch):
    from sdpo_fast.kernels import lse_gather as module
    monkeypatch.setattr(module, "_vocab_splits", lambda *args: splits)
    hidden, weight, targets = inputs(n, d, vocab, device)
    lse, target_logit = module.lse_gather(hidden, weight, targets, 0.75)
    logits = (hidden.double() @ weight.double().T) * 0.75
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target_logit.double(), logits.gather(1, targets[:, None]).squeeze(1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d,vocab", [(3, 5, 7), (70, 33, 300)])
def test_grad_logits(device, n, d, vocab):
    from sdpo_fast.kernels.grad_logits import grad_logits
    hidden, weight, targets = inputs(n, d, vocab, device, seed=1)
    logits = (hidden.double() @ weight.double().T) * 1.3
    lse = torch.logsumexp(logits, 1)
    coef = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(device)
    out = torch.full((n, vocab), float("nan"), device=device)
    grad_logits(hidden, weight, targets, lse.float(), coef, 1.3, out)
    want = torch.softmax(logits, 1) - torch.nn.functional.one_hot(targets, vocab).double()
    want = want * coef.double()[:, None] * 1.3
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d,vocab", [(1, 3, 2), (70, 33, 300), (130, 70, 129)])
def test_accumulate_grad_weight(device, n, d, vocab):
    from sdpo_fast.kernels.grad_weight import accumulate_grad_weight
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(n, vocab, generator=g).to(device)
    hidden = torch.randn(n, d, generator=g).to(device)
    start = torch.randn(vocab, d, generator=g).to(device)
    out = start.clone()
    accumulate_grad_weight(grad, hidden, out)
    torch.testing.assert_close(out.double(), start.double() + grad.double().T @ hidden.double(),
                               rtol=1e-5, atol=1e-5)


def test_first_chunk_overwrites_grad_weight(device):
    """accumulate=False (the backward's first chunk) writes every tile: an uninitialized (NaN) buffer is replaced."""
    from sdpo_fast.kernels.grad_weight import accumulate_grad_weight
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(40, 300, generator=g).to(device)
    hidden = torch.randn(40, 70, generator=g).to(device)
    out = torch.full((300, 70), float("nan"), device=device)
    accumulate_grad_weight(grad, hidden, out, accumulate=False)
    torch.testing.assert_close(out.double(), grad.double().T @ hidden.double(), rtol=1e-5, atol=1e-5)


def test_kernel_reads_stay_in_bounds(device):
    """Views into a larger buffer whose surroundings are NaN: any out-of-bounds read would poison results."""
    from sdpo_fast.kernels.lse_gather import lse_gather
    n, d, vocab = 37, 19, 131
    hidden, weight, targets = inputs(n, d, vocab, device, seed=4)
    hidden_buf = torch.full((n + 64, d + 64), float("nan"), device=device)
    weight_buf = torch.full((vocab + 300, d + 64), float("nan"), device=device)
    hidden_buf[:n, :d], weight_buf[:vocab, :d] = hidden, weight
    lse, target_logit = lse_gather(hidden_buf[:n, :d], weight_buf[:vocab, :d], targets, 1.0)
    assert torch.isfinite(lse).all() and torch.isfinite(target_logit).all()
    logits = hidden.double() @ weight.double().T
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [80, 89, 90])
def test_gpu_tiles_of_each_kernel(device, arch, monkeypatch):
    """The bf16 tiles `kernel_config` gives each kernel on sm_80/89/90, launched as configured (on CPU with the
    interpreter's operand upcast, exact for bf16 products), at shapes where every dimension ends in a partial block:
    lse_gather over two vocabulary splits, grad_logits, and grad_weight's first and accumulating chunks, against
    fp64 PyTorch on the same bf16 values."""
    import dataclasses

    from sdpo_fast.kernels import lse_gather as lse_module
    from sdpo_fast.kernels.config import kernel_configs
    from sdpo_fast.kernels.grad_logits import grad_logits_launch
    from sdpo_fast.kernels.grad_weight import grad_weight_launch, launch_meta

    cfgs = {kernel: dataclasses.replace(cfg, upcast_operands=device == "cpu")
            for kernel, cfg in kernel_configs(torch.bfloat16, arch).items()}
    weight_tile = launch_meta(cfgs["grad_weight"])
    n = max(cfgs["lse_gather"].block_n, cfgs["grad_logits"].block_n, weight_tile["BLOCK_K"]) + 7
    vocab = max(cfgs["lse_gather"].block_v, cfgs["grad_logits"].block_v, weight_tile["BLOCK_V"]) + 11
    d = max(cfgs["lse_gather"].block_d, cfgs["grad_logits"].block_d, weight_tile["BLOCK_D"]) + 3
    hidden, weight, targets = inputs(n, d, vocab, device, seed=6, dtype=torch.bfloat16)
    logits = hidden.double() @ weight.double().T * 0.75
    lse = torch.logsumexp(logits, 1)

    monkeypatch.setattr(lse_module, "_vocab_splits", lambda *args: 2)
    launch, lse_parts, target_parts = lse_module.lse_gather_launch(hidden, weight, targets, 0.75,
                                                                   cfgs["lse_gather"], None)
    launch()
    assert lse_parts.shape[0] == 2
    torch.testing.assert_close(torch.logsumexp(lse_parts.double(), 0), lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target_parts.double().sum(0), logits.gather(1, targets[:, None]).squeeze(1),
                               rtol=1e-5, atol=1e-5)

    coef = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(device)
    grad = torch.full((n, vocab), float("nan"), dtype=torch.bfloat16, device=device)
    grad_logits_launch(hidden, weight, targets, lse.float(), coef, 0.75, grad, cfgs["grad_logits"])()
    want = (torch.softmax(logits, 1) - torch.nn.functional.one_hot(targets, vocab).double()) * coef.double()[:, None]
    torch.testing.assert_close(grad.double(), want * 0.75, rtol=1e-2, atol=1e-5)  # stored in bf16

    grad_weight = torch.full((vocab, d), float("nan"), device=device)
    for rows, accumulate in ((slice(0, n // 2), False), (slice(n // 2, n), True)):
        grad_weight_launch(grad[rows], hidden[rows], grad_weight, cfgs["grad_weight"], accumulate)()
    torch.testing.assert_close(grad_weight.double(), grad.double().T @ hidden.double(), rtol=1e-5, atol=1e-5)

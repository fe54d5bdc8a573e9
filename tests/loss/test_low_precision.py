"""bf16/fp16 inputs, judged as Cut Cross-Entropy does: error against an fp64 truth no worse than the same
computation in plain PyTorch at that dtype (the reference backend), plus a small margin."""
import pytest
import torch

from helpers import backend_device, make_case, max_abs_err, run_loss, run_truth
from sdpo_fast import sdpo_loss

FIELDS = ["loss", "grad_hidden", "grad_weight", "student_logprobs", "advantages"]
MARGIN = 1e-2  # relative to the truth's largest magnitude, as CCE's bf16 tests allow


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,d,vocab,seed", [(64, 64, 500, 0), (37, 40, 777, 1)])
def test_low_precision_no_worse_than_plain_pytorch(backend, dtype, n, d, vocab, seed):
    case = make_case(n, d, vocab, dtype=dtype, device=backend_device(backend), seed=seed, ignore_frac=0.1)
    options = dict(signal_clip=2.0)
    got = run_loss(sdpo_loss, case, backend, **options)
    baseline = run_loss(sdpo_loss, case, "reference", **options)
    truth = run_truth(case, **options)
    assert got["grad_weight"].dtype == dtype and got["grad_hidden"].dtype == dtype
    for field in FIELDS:
        scale = truth[field].abs().max().item()
        err, base_err = max_abs_err(got[field], truth[field]), max_abs_err(baseline[field], truth[field])
        assert err <= base_err + MARGIN * scale, f"{field}: {err:.3e} vs plain {dtype} {base_err:.3e}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_weight_accumulates_in_fp32(backend):
    """Many tokens adding to one vocabulary row: an accumulation in bf16 would lose the small contributions."""
    device = backend_device(backend)
    n, d, vocab = 512, 32, 64
    case = make_case(n, d, vocab, dtype=torch.bfloat16, device=device, seed=3)
    got = run_loss(sdpo_loss, case, backend)["grad_weight"]
    truth = run_truth(case)["grad_weight"]
    rounding = truth.abs().max().item() * 2**-8  # one bf16 rounding of the final result
    assert max_abs_err(got, truth) <= 4 * rounding


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_16_bit_path_with_fp32_grads(backend, monkeypatch):
    """fp32 inputs under torch.autocast(bf16): the products run in bf16 (as with bf16 inputs), the gradients come
    back fp32 (grad_W accumulated in fp32, not rounded to bf16)."""
    from sdpo_fast.loss.backends.torch_chunked import TorchBackend
    from sdpo_fast.loss.backends.triton_fused import TritonBackend

    device = backend_device(backend)
    case = make_case(33, 32, 300, device=device, seed=4)
    seen = []
    cls = TritonBackend if backend == "triton" else TorchBackend
    original = cls.token_logprobs
    monkeypatch.setattr(cls, "token_logprobs", lambda self, h, *a: seen.append(h.dtype) or original(self, h, *a))
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = run_loss(sdpo_loss, case, backend, grad_in_forward=False)
    low = run_loss(sdpo_loss, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in case.items()},
                   backend, grad_in_forward=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert got["grad_hidden"].dtype == got["grad_weight"].dtype == torch.float32
    assert torch.equal(got["loss"], low["loss"])
    assert torch.equal(got["grad_hidden"].to(torch.bfloat16), low["grad_hidden"])
    assert torch.equal(got["grad_weight"].to(torch.bfloat16), low["grad_weight"])


@pytest.mark.parametrize("fp32_fits", [True, False], ids=["one-sweep", "slice-by-slice"])
def test_triton_16_bit_grad_weight_is_the_fp32_accumulation_rounded_once(monkeypatch, fp32_fits):
    """A bf16 grad_W equals the whole fp32 accumulation rounded to bf16 once, whether accumulated in fp32 in the
    sweep that forms grad_hidden (3 grad_logits launches: one per token chunk) or, when the fp32 (V, d) tensor
    does not fit, formed vocabulary slice by slice (4 slices of 128 rows x 3 chunks more); grad_hidden is
    unchanged."""
    from sdpo_fast.loss.backends import triton_fused
    from sdpo_fast.loss.backends.triton_fused import TritonBackend, _vocab_slices

    monkeypatch.setenv("SDPO_FAST_TRITON_WORKSPACE_MB", "0")
    monkeypatch.setattr(triton_fused, "_fp32_grad_weight_fits", lambda weight, workspace_bytes: fp32_fits)
    launches = []
    real_grad_logits = triton_fused.grad_logits
    monkeypatch.setattr(triton_fused, "grad_logits", lambda *args: launches.append(args[1].shape[0]) or
                        real_grad_logits(*args))
    device = backend_device("triton")
    case = make_case(300, 32, 500, dtype=torch.bfloat16, device=device, seed=5)
    hidden, weight, targets = case["student_hidden"], case["lm_head_weight"], case["target_ids"]
    assert len(_vocab_slices(500, 32)) == 4
    backend = TritonBackend()
    logprobs, lse = backend.token_logprobs(hidden, weight, targets, 1.0)
    coef = torch.randn(300, generator=torch.Generator().manual_seed(1)).to(device)
    fp32_hidden, fp32_weight = backend.grad(hidden, weight, targets, lse, coef, 1.0, True, True)
    launches.clear()
    bf16_hidden, bf16_weight = backend.grad(hidden, weight, targets, lse, coef, 1.0, True, True,
                                            grad_weight_dtype=torch.bfloat16)
    assert launches == [500] * 3 if fp32_fits else [500] * 3 + [128, 128, 128] * 3 + [116] * 3
    assert fp32_weight.dtype == torch.float32 and bf16_weight.dtype == torch.bfloat16
    assert torch.equal(bf16_weight, fp32_weight.to(torch.bfloat16))
    assert torch.equal(bf16_hidden, fp32_hidden)

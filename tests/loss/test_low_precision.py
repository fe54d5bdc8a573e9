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

"""`sdpo_loss` with a logit head (bias, scale, soft cap; the teacher's own): every backend and mode against the
fp64 reference, the reference against a plain `torch.nn.Linear` + transform, and the argument checks."""
import math

import pytest
import torch

from helpers import backend_device, make_case, rel_err, run_loss, run_truth
from sdpo_fast import sdpo_loss
from sdpo_fast.loss.reference import reference_logits

FP32_TOL = 3e-5
HEADS = {
    "bias": dict(bias=True),
    "scale": dict(logit_scale=0.25),
    "softcap": dict(logit_softcap=1.5),
    "all": dict(bias=True, logit_scale=2.5, logit_softcap=3.0),
}
MODES = {
    "sampled": dict(signal_clip=2.0),
    "centered": dict(center_advantages=True),
    "full": dict(distillation_mode="full_logits", distillation_alpha=0.5),
    "topk": dict(distillation_mode="topk_logits", distillation_alpha=0.0, distillation_topk=7),
}


def head_case(n, d, vocab, device, seed, head, teacher_head=None):
    """make_case plus the head's bias (and the teacher's own head when teacher_head is given)."""
    case = make_case(n, d, vocab, device=device, seed=seed, ignore_frac=0.2,
                     separate_teacher_weight=teacher_head is not None)
    g = torch.Generator().manual_seed(seed + 1)
    options = {k: v for k, v in head.items() if k != "bias"}
    if head.get("bias"):
        case["lm_head_bias"] = torch.randn(vocab, generator=g).to(device)
    for key, value in (teacher_head or {}).items():
        if key == "bias":
            case["teacher_lm_head_bias"] = torch.randn(vocab, generator=g).to(device)
        else:
            options[f"teacher_{key}"] = value
    case["sequence_index"] = (torch.arange(n) // 5).to(device)
    return case, options


def assert_matches_truth(case, backend, options):
    """Each output within FP32_TOL of the fp64 reference, or within twice the error of the plain fp32 reference
    (the rounding any fp32 computation of it suffers), whichever is larger."""
    got = run_loss(sdpo_loss, case, backend, **options)
    truth = run_truth(case, **options)
    plain = run_loss(sdpo_loss, case, "reference", **options)
    assert set(got) == set(truth)
    for name, expected in truth.items():
        err, bound = rel_err(got[name], expected), max(FP32_TOL, 2 * rel_err(plain[name], expected))
        assert err <= bound, f"{backend} {name}: relative error {err:.2e} > {bound:.2e}"
    return got, truth


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", HEADS)
def test_head_matches_reference(backend, mode, head):
    options = dict(MODES[mode])
    case, head_options = head_case(23, 20, 97, backend_device(backend), seed=len(head) + 3 * len(mode),
                                   head=HEADS[head])
    options.update(head_options, temperature=0.8)
    if mode != "centered":
        del case["sequence_index"]
    got, truth = assert_matches_truth(case, backend, options)
    if "lm_head_bias" in case:
        assert got["grad_bias"].abs().max() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_teacher_with_its_own_head(backend, mode):
    case, options = head_case(19, 16, 80, backend_device(backend), seed=11, head=dict(bias=True, logit_scale=0.5),
                              teacher_head=dict(bias=True, logit_scale=1.7, logit_softcap=2.0))
    del case["sequence_index"]
    options.update(MODES[mode])
    got, truth = assert_matches_truth(case, backend, options)
    shared = run_truth({k: v for k, v in case.items() if not k.startswith("teacher_lm_head")},
                       **{k: v for k, v in options.items() if not k.startswith("teacher_")})
    assert rel_err(shared["teacher_logprobs"], truth["teacher_logprobs"]) > 1e-2  # the teacher's head is used


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_with_a_cap(backend, monkeypatch):
    """Many chunks and vocabulary tiles (the cap's slope buffer shares the budget) still match."""
    monkeypatch.setenv("SDPO_FAST_TORCH_CHUNK_MB", "0")
    monkeypatch.setenv("SDPO_FAST_TRITON_WORKSPACE_MB", "0")
    for mode in ("sampled", "topk"):
        case, options = head_case(40, 12, 300, backend_device(backend), seed=4, head=HEADS["all"])
        del case["sequence_index"]
        assert_matches_truth(case, backend, {**options, **MODES[mode]})


def test_reference_logits_are_the_models():
    """reference_logits equals nn.Linear with a bias, then scale, then c * tanh(z / c), divided by T."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(6, 11, bias=True, dtype=torch.float64)
    hidden = torch.randn(4, 6, generator=g, dtype=torch.float64)
    z = linear(hidden) * 0.3
    expected = 5.0 * torch.tanh(z / 5.0) / 0.7
    got = reference_logits(hidden, linear.weight, 0.7, linear.bias, 0.3, 5.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_scale_without_cap_and_large_cap_limits():
    """A huge soft cap is the identity, and an unscaled, uncapped head is the plain loss (same values)."""
    case, options = head_case(15, 10, 40, "cpu", seed=2, head=dict(logit_scale=1.0))
    del case["sequence_index"]
    plain = run_loss(sdpo_loss, case, "torch")
    capped = run_loss(sdpo_loss, case, "torch", logit_softcap=1e7)
    for name in ("loss", "grad_hidden", "grad_weight"):
        assert rel_err(capped[name], plain[name]) < 1e-5, name


@pytest.mark.parametrize("kwargs, message", [
    (dict(logit_scale=0.0), "logit_scale"),
    (dict(logit_scale=math.inf), "logit_scale"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
    (dict(logit_softcap=math.nan), "logit_softcap"),
    (dict(teacher_logit_scale=2.0), "teacher_logit_scale"),
    (dict(teacher_logit_softcap=30.0), "teacher_logit_softcap"),
    (dict(teacher_lm_head_bias=torch.zeros(30)), "teacher_lm_head_bias"),
    (dict(lm_head_bias=torch.zeros(29)), "lm_head_bias"),
    (dict(lm_head_bias=torch.zeros(30, dtype=torch.float64)), "lm_head_bias"),
    (dict(lm_head_bias=torch.zeros(30, 1)), "lm_head_bias"),
    (dict(lm_head_bias=torch.full((30,), math.nan)), "lm_head_bias"),
])
def test_bad_head_arguments_are_named(kwargs, message):
    case = make_case(5, 8, 30)
    with pytest.raises((ValueError, TypeError), match=message):
        sdpo_loss(**case, backend="torch", **kwargs)


def test_no_loss_tokens_gives_the_bias_a_zero_gradient():
    case = make_case(4, 8, 30)
    case["target_ids"] = torch.full_like(case["target_ids"], -100)
    bias = torch.zeros(30, requires_grad=True)
    sdpo_loss(**case, lm_head_bias=bias, backend="torch").backward()
    assert bias.grad is not None and not bias.grad.any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["sampled", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_head_no_worse_than_plain_pytorch(backend, mode, dtype):
    """bf16/fp16 inputs with a bias, scale and cap, judged as Cut Cross-Entropy does: error against the fp64 truth
    no worse than the reference backend's at that dtype, plus 1e-2 of the truth's largest magnitude."""
    case, options = head_case(48, 32, 300, backend_device(backend), seed=9, head=HEADS["all"])
    del case["sequence_index"]
    case = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.items()}
    options.update(MODES[mode])
    got, plain = run_loss(sdpo_loss, case, backend, **options), run_loss(sdpo_loss, case, "reference", **options)
    truth = run_truth(case, **options)
    assert got["grad_bias"].dtype == dtype
    for name, expected in truth.items():
        scale = expected.abs().max().item()
        err = (got[name].double() - expected).abs().max().item()
        base = (plain[name].double() - expected).abs().max().item()
        assert err <= base + 1e-2 * scale, f"{name}: {err:.3e} vs plain {dtype} {base:.3e}"

"""`sdpo_loss(grad_in_forward=..., workspace_bytes=...)`: the grad-in-forward path (GEMM logits chunks, row passes
forming d(loss)/d(logits) in place; Triton row kernels under the interpreter) and the recompute path, both against
the fp64 reference; its workspace, its choice, forward-only calls, determinism and bad arguments."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import backend_device, make_case, max_abs_err, rel_err, run_loss, run_truth
from sdpo_fast import SDPOLoss, reference_sdpo_loss, sdpo_loss
from sdpo_fast.loss.backends.torch_chunked import TorchRowOps
from sdpo_fast.loss.backends.triton_fused import TritonRowOps

BACKENDS = ["torch", "triton"]
FP32_TOL = 1e-5
OUTPUTS = ["loss", "grad_hidden", "grad_weight", "student_logprobs", "teacher_logprobs", "divergence"]
ROW_OPS = {"torch": TorchRowOps, "triton": TritonRowOps}


def assert_close_to_truth(case, backend, **options):
    got = run_loss(sdpo_loss, case, backend, **options)
    truth = run_truth(case, **{k: v for k, v in options.items() if k not in ("grad_in_forward", "workspace_bytes")})
    for name in OUTPUTS:
        assert got[name].dtype == (case["lm_head_weight"].dtype if name.startswith("grad") else torch.float32)
        err = rel_err(got[name], truth[name])
        assert err <= FP32_TOL, f"{backend} {options.get('grad_in_forward')} {name}: relative error {err:.2e}"
    return got


def sequences(n, lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:n]


def behavior_near(case):
    student_lp = reference_sdpo_loss(case["student_hidden"], case["lm_head_weight"], case["target_ids"],
                                     teacher_logprobs=torch.zeros(case["target_ids"].shape))[1].student_logprobs
    noise = torch.randn(student_lp.shape, generator=torch.Generator().manual_seed(5))
    return (student_lp + noise).detach()


SAMPLED = [dict(), dict(signal_clip=0.4, temperature=0.7), dict(center_advantages=True),
           dict(center_advantages=True, signal_clip=0.5, importance_clip=1.3), dict(importance_clip=1.1),
           dict(logit_softcap=3.0, temperature=1.3)]
LOGIT = [dict(distillation_mode="full_logits", distillation_alpha=alpha) for alpha in (0.0, 0.5, 1.0)] + [
    dict(distillation_mode="topk_logits", distillation_alpha=alpha, distillation_topk=9, distillation_add_tail=tail)
    for alpha in (0.0, 0.25, 1.0) for tail in (True, False)] + [
    dict(distillation_mode="topk_logits", distillation_alpha=0.5, distillation_topk=5, importance_clip=1.2,
         logit_softcap=2.5, temperature=0.8),
    dict(distillation_mode="full_logits", distillation_alpha=0.75, importance_clip=0.9, logit_softcap=4.0)]


PATHS = [(options, True) for options in SAMPLED + LOGIT] + [(options, False) for options in (
    SAMPLED[3], SAMPLED[5], LOGIT[1], LOGIT[4])]  # the recompute path's own tests cover the rest


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options,grad_in_forward", PATHS,
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) if isinstance(o, dict) else str(o))
def test_both_paths_match_reference(backend, grad_in_forward, options):
    """Every mode x alpha x tail x importance clip x centring on the grad-in-forward path, some on the recompute
    path; several chunks (a 3-row budget), V = 203 (not a multiple of any block)."""
    case = make_case(29, 20, 203, device=backend_device(backend), seed=len(options), ignore_frac=0.2)
    options = dict(options)
    if options.get("center_advantages"):
        options["sequence_index"] = sequences(29, [7, 1, 12, 9])
    if "importance_clip" in options:
        options["behavior_logprobs"] = behavior_near(case)
    rows = 3 * ROW_OPS[backend]().bytes_per_row(options.get("distillation_mode", "sampled_token"), torch.float32,
                                                 203, options.get("distillation_topk", 0), True, True)
    assert_close_to_truth(case, backend, grad_in_forward=grad_in_forward, workspace_bytes=rows, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), d=st.integers(1, 40), vocab=st.integers(2, 300), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["sampled_token", "full_logits", "topk_logits"]), rows=st.integers(1, 50))
def test_random_shapes_match_reference(backend, n, d, vocab, seed, mode, rows):
    case = make_case(n, d, vocab, device=backend_device(backend), seed=seed, ignore_frac=0.2)
    options = dict(distillation_mode=mode, temperature=0.9)
    if mode == "topk_logits":
        options.update(distillation_topk=min(vocab, 1 + seed % 12), distillation_alpha=0.5)
    budget = rows * ROW_OPS[backend]().bytes_per_row(mode, torch.float32, vocab, options.get("distillation_topk", 0),
                                                     True, False)
    assert_close_to_truth(case, backend, grad_in_forward=True, workspace_bytes=budget, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sampled_token", "topk_logits"])
def test_deterministic_and_token_weights_accumulate_exactly(backend, mode):
    """Two runs give bitwise-equal results; the gradients of two calls with token weights w1 and w2 add up to those of
    one call with w1 + w2 (each gradient linear in the weights) within fp32 rounding."""
    device = backend_device(backend)
    case = make_case(31, 16, 150, device=device, seed=2)
    options = dict(grad_in_forward=True, workspace_bytes=40_000, distillation_mode=mode)
    first, second = run_loss(sdpo_loss, case, backend, **options), run_loss(sdpo_loss, case, backend, **options)
    for name in OUTPUTS:
        assert torch.equal(first[name], second[name]), name
    split = torch.rand(31, generator=torch.Generator().manual_seed(0)).to(device)
    parts = [run_loss(sdpo_loss, case, backend, token_weights=w, **options) for w in (split, 1 - split)]
    whole = run_loss(sdpo_loss, case, backend, token_weights=torch.ones(31, device=device), **options)
    for name in ["loss", "grad_hidden", "grad_weight"]:
        assert rel_err(parts[0][name] + parts[1][name], whole[name]) <= FP32_TOL, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sampled_token", "full_logits"])
def test_bf16_no_worse_than_plain_pytorch(backend, mode):
    """bf16 judged as Cut Cross-Entropy does: error against the fp64 truth within plain bf16 PyTorch's (the
    reference backend) plus 1 % of the truth's largest magnitude."""
    case = make_case(48, 40, 333, dtype=torch.bfloat16, device=backend_device(backend), seed=4, ignore_frac=0.1)
    options = dict(distillation_mode=mode, signal_clip=2.0 if mode == "sampled_token" else None)
    got = run_loss(sdpo_loss, case, backend, grad_in_forward=True, workspace_bytes=1 << 16, **options)
    plain = run_loss(sdpo_loss, case, "reference", **options)
    truth = run_truth(case, **options)
    assert got["grad_weight"].dtype == got["grad_hidden"].dtype == torch.bfloat16
    for name in ["loss", "grad_hidden", "grad_weight", "student_logprobs"]:
        scale = truth[name].abs().max().item()
        err, base_err = max_abs_err(got[name], truth[name]), max_abs_err(plain[name], truth[name])
        assert err <= base_err + 1e-2 * scale, f"{name}: {err:.3e} vs plain bf16 {base_err:.3e}"


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=(
        "needs CUDA: Triton's interpreter copies every tensor a kernel is given, which the counter sees")))])
@pytest.mark.parametrize("mode,alpha", [("sampled_token", 1.0), ("full_logits", 0.5), ("topk_logits", 0.0)])
def test_workspace_stays_within_workspace_bytes(backend, mode, alpha):
    """Peak bytes of every storage made during the loss and its gradients (StorageCounter): the gradients' own
    storage, the (N,)-sized outputs and the workspace within workspace_bytes, in several chunks."""
    from sdpo_fast.train.memory import StorageCounter

    n, d, vocab, budget = 96, 4, 2000, 300_000
    case = make_case(n, d, vocab, device=backend_device(backend), seed=1)
    hidden = case["student_hidden"].requires_grad_()
    weight = case["lm_head_weight"].requires_grad_()
    counter = StorageCounter()
    with counter:
        sdpo_loss(**case, distillation_mode=mode, distillation_alpha=alpha, backend=backend, grad_in_forward=True,
                  workspace_bytes=budget).backward()
    grads = 2 * vocab * d * 4 + 2 * n * d * 4  # grad_weight (fp32 accumulator and .grad) and grad_hidden
    assert counter.peak <= grads + budget + 64 * n * 4, counter.peak
    assert budget < n * vocab * 4 / 2  # the budget forces chunks


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_chooses_by_the_budget(backend, monkeypatch):
    """grad_in_forward=None takes the grad-in-forward path when min(1024, N) rows fit workspace_bytes, else the
    recompute path; both give the reference's result."""
    from sdpo_fast.loss import function

    calls = []
    original = function.token_grad_sweep
    monkeypatch.setattr(function, "token_grad_sweep", lambda *a, **k: calls.append(1) or original(*a, **k))
    case = make_case(40, 8, 100, device=backend_device(backend), seed=3)
    per_row = ROW_OPS[backend]().bytes_per_row("sampled_token", torch.float32, 100, 0, True, False)
    assert_close_to_truth(case, backend, workspace_bytes=40 * per_row)
    assert calls == [1]
    assert_close_to_truth(case, backend, workspace_bytes=39 * per_row)
    assert calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sampled_token", "full_logits"])
def test_forward_only_forms_no_gradients(backend, mode, monkeypatch):
    """Under torch.no_grad, and with nothing requiring grad, the row passes run without gradients and no dX/dW
    product runs; the loss is the reference's."""
    from sdpo_fast.loss.backends import gemm_sweep

    grads = []
    monkeypatch.setattr(gemm_sweep, "_gradients", lambda *a: grads.append(1))
    case = make_case(20, 8, 90, device=backend_device(backend), seed=6)
    want = reference_sdpo_loss(**case, distillation_mode=mode)[0]
    with torch.no_grad():
        case["student_hidden"].requires_grad_()
        loss = sdpo_loss(**case, backend=backend, distillation_mode=mode, grad_in_forward=True)
    case["student_hidden"].requires_grad_(False)
    assert rel_err(loss, want) <= FP32_TOL
    assert rel_err(sdpo_loss(**case, backend=backend, distillation_mode=mode, grad_in_forward=True), want) <= FP32_TOL
    assert grads == []


@pytest.mark.parametrize("options,match", [
    (dict(grad_in_forward="yes"), "grad_in_forward"), (dict(grad_in_forward=1), "grad_in_forward"),
    (dict(workspace_bytes=-1), "workspace_bytes"), (dict(workspace_bytes=1.5e9), "workspace_bytes"),
    (dict(grad_in_forward=True, workspace_bytes=100), "workspace_bytes"),
    (dict(grad_in_forward=True, workspace_bytes=0), "workspace_bytes"),
])
def test_bad_arguments_name_themselves(options, match):
    case = make_case(6, 4, 50, seed=0)
    with pytest.raises(ValueError, match=match):
        sdpo_loss(**case, **options)
    with pytest.raises(ValueError, match=match):
        SDPOLoss(**options)(case["student_hidden"], case["lm_head_weight"], case["target_ids"],
                            teacher_hidden=case["teacher_hidden"])

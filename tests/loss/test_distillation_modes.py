"""The full-logit and top-k distillation modes and importance clipping of `sdpo_loss`, every fast backend
against the fp64 reference, and the reference against TRL's own loss functions when TRL is installed."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import backend_device, make_case, max_abs_err, rel_err, run_loss, run_truth
from sdpo_fast import reference_sdpo_loss, sdpo_loss

BACKENDS = ["torch", "triton"]
ALPHAS = [0.0, 0.5, 1.0, 0.25]
FP32_TOL = 1e-5
OUTPUTS = ["loss", "grad_hidden", "grad_weight", "divergence", "student_logprobs", "teacher_logprobs"]


def behavior_for(case, seed):
    """Sampler log-probs near the student's, so that some ratios exceed the clip and some do not."""
    student_lp = reference_sdpo_loss(case["student_hidden"], case["lm_head_weight"], case["target_ids"],
                                     teacher_logprobs=torch.zeros(case["target_ids"].shape,
                                                                  device=case["target_ids"].device))[1].student_logprobs
    noise = torch.randn(student_lp.shape, generator=torch.Generator().manual_seed(seed)).to(student_lp.device)
    return (student_lp + noise).detach()


def assert_close_to_truth(case, backend, options):
    got = run_loss(sdpo_loss, case, backend, **options)
    truth = run_truth(case, **options)
    for name in OUTPUTS:
        assert got[name].shape == truth[name].shape, name
        err = rel_err(got[name], truth[name])
        assert err <= FP32_TOL, f"{backend} {name}: relative error {err:.2e}"
    return got, truth


def mode_options(mode, alpha, topk, tail, clip, temperature=1.0):
    options = dict(distillation_mode=mode, distillation_alpha=alpha, temperature=temperature)
    if mode == "topk_logits":
        options.update(distillation_topk=topk, distillation_add_tail=tail)
    if clip is not None:
        options["importance_clip"] = clip
    return options


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,tail", [("full_logits", True), ("topk_logits", True), ("topk_logits", False)])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("clip", [None, 1.5])
def test_modes_match_reference(backend, mode, tail, alpha, clip):
    case = make_case(23, 24, 157, device=backend_device(backend), seed=int(alpha * 8) + tail, ignore_frac=0.2)
    options = mode_options(mode, alpha, 7, tail, clip, temperature=0.8)
    if clip is not None:
        options["behavior_logprobs"] = behavior_for(case, seed=1)
    assert_close_to_truth(case, backend, options)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40), d=st.integers(1, 40), vocab=st.integers(3, 300), seed=st.integers(0, 2**16),
    mode=st.sampled_from(["full_logits", "topk_logits"]), alpha=st.sampled_from(ALPHAS), tail=st.booleans(),
    clip=st.sampled_from([None, 2.0]), weighted=st.booleans(), separate=st.booleans(),
)
def test_random_shapes_match_reference(backend, n, d, vocab, seed, mode, alpha, tail, clip, weighted, separate):
    device = backend_device(backend)
    case = make_case(n, d, vocab, device=device, seed=seed, ignore_frac=0.3, teacher_d=d + 2 if separate else None)
    topk = min(vocab, 1 + seed % 20)
    topk += topk == 1 and not tail  # one renormalized token trains nothing (refused)
    options = mode_options(mode, alpha, topk, tail, clip)
    if clip is not None:
        options["behavior_logprobs"] = behavior_for(case, seed)
    if weighted:
        options["token_weights"] = torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(device)
    assert_close_to_truth(case, backend, options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_chunks(backend, monkeypatch):
    """A workspace budget of 0 forces one row per chunk."""
    monkeypatch.setenv("SDPO_FAST_TORCH_CHUNK_MB", "0")
    monkeypatch.setenv("SDPO_FAST_TRITON_WORKSPACE_MB", "0")
    case = make_case(9, 16, 301, device=backend_device(backend), seed=4)
    assert_close_to_truth(case, backend, mode_options("topk_logits", 0.5, 11, True, None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [0.7, 3.0])
def test_sampled_token_importance_clip_matches_reference(backend, clip):
    case = make_case(31, 20, 211, device=backend_device(backend), seed=7, ignore_frac=0.1)
    options = dict(importance_clip=clip, behavior_logprobs=behavior_for(case, seed=2), signal_clip=2.0)
    got, truth = assert_close_to_truth(case, backend, options)
    plain = run_loss(sdpo_loss, case, backend, signal_clip=2.0)
    assert max_abs_err(got["loss"], plain["loss"]) > 1e-4  # the ratio changes the loss


@pytest.mark.parametrize("mode", ["full_logits", "topk_logits"])
def test_divergence_is_zero_when_teacher_equals_student(mode):
    case = make_case(12, 16, 90, seed=3)
    case["teacher_hidden"] = case["student_hidden"].clone()
    for alpha in ALPHAS:
        got = run_loss(sdpo_loss, case, "torch", **mode_options(mode, alpha, 5, True, None))
        assert got["loss"].abs().item() < 1e-6 and got["grad_hidden"].abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["full_logits", "topk_logits"])
def test_low_precision_no_worse_than_plain_pytorch(backend, dtype, mode):
    """As Cut Cross-Entropy judges: error vs fp64 no worse than plain PyTorch at that dtype + 1e-2 relative."""
    case = make_case(40, 48, 333, dtype=dtype, device=backend_device(backend), seed=5, ignore_frac=0.1)
    options = mode_options(mode, 0.5, 20, True, None)
    got, baseline = run_loss(sdpo_loss, case, backend, **options), run_loss(sdpo_loss, case, "reference", **options)
    truth = run_truth(case, **options)
    assert got["grad_weight"].dtype == dtype and got["grad_hidden"].dtype == dtype
    for name in ["loss", "grad_hidden", "grad_weight", "divergence"]:
        scale = truth[name].abs().max().item()
        err, base_err = max_abs_err(got[name], truth[name]), max_abs_err(baseline[name], truth[name])
        assert err <= base_err + 1e-2 * scale, f"{name}: {err:.3e} vs plain {dtype} {base_err:.3e}"


def test_topk_ties_follow_torch_topk():
    """Tied student logits: the support is whatever torch.topk picks, as in the reference."""
    case = make_case(6, 8, 40, seed=9)
    case["lm_head_weight"][20:] = case["lm_head_weight"][:20]
    assert_close_to_truth(case, "torch", mode_options("topk_logits", 1.0, 9, False, None))



def _trl():
    return pytest.importorskip("trl.experimental.sdpo.loss_utils",
                               reason="TRL is not installed (pip install -e '.[trl]')")


TRL_CASES = [(mode, tail, alpha) for mode, tail in [("full_logits", True), ("topk_logits", True),
                                                     ("topk_logits", False), ("sampled_token", True)]
             for alpha in ALPHAS if mode != "sampled_token" or alpha == 1.0]  # sampled_token needs alpha 1
LOSS_PATHS = [("torch", True), ("torch", False), ("triton", True), ("triton", False), ("reference", None)]


@pytest.mark.parametrize("backend,grad_in_forward", LOSS_PATHS)
@pytest.mark.parametrize("mode,tail,alpha", TRL_CASES)
@pytest.mark.parametrize("clip", [None, 1.2])
def test_matches_trl_loss_utils(backend, grad_in_forward, mode, tail, alpha, clip):
    """Per-token divergence, loss and gradients of each backend's both paths (gradients formed in the forward, or
    recomputed in the backward) equal TRL's functions on the same fp32 logits."""
    utils = _trl()
    temperature, topk = 0.9, 6
    case = make_case(17, 12, 97, seed=11, device=backend_device(backend))
    targets = case["target_ids"]
    options = mode_options(mode, alpha, topk, tail, clip, temperature)
    behavior = behavior_for(case, seed=3)
    if clip is not None:
        options["behavior_logprobs"] = behavior
    if grad_in_forward is not None:
        options["grad_in_forward"] = grad_in_forward
    got = run_loss(sdpo_loss, case, backend, **options)

    student = case["student_hidden"].clone().requires_grad_()
    weight = case["lm_head_weight"].clone().requires_grad_()
    student_logits = (student @ weight.T) / temperature
    teacher_logits = (case["teacher_hidden"] @ case["lm_head_weight"].T) / temperature
    if mode == "topk_logits":
        per_token = utils.compute_topk_self_distillation_loss(
            student_logits, teacher_logits, distillation_topk=topk, distillation_alpha=alpha,
            distillation_add_tail=tail)
    elif mode == "full_logits":
        per_token = utils.compute_full_logit_self_distillation_loss(student_logits, teacher_logits,
                                                                     distillation_alpha=alpha)
    else:
        per_token = utils.compute_sampled_token_self_distillation_loss(student_logits, teacher_logits, targets,
                                                                       distillation_alpha=alpha)
    divergence = per_token.detach()
    if clip is not None:
        student_lp = torch.log_softmax(student_logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        per_token = utils.apply_importance_sampling_clipping(per_token, student_lp, behavior, clip)
    loss = per_token.mean()
    loss.backward()
    assert rel_err(got["divergence"], divergence) <= FP32_TOL
    assert rel_err(got["loss"], loss.detach()) <= FP32_TOL
    assert rel_err(got["grad_hidden"], student.grad) <= FP32_TOL
    assert rel_err(got["grad_weight"], weight.grad) <= FP32_TOL


def test_one_objective_per_mode_calls_sdpo_loss():
    from sdpo_fast.loss import (FullLogitObjective, LossInputs, SDPOLoss, SDPOObjective, TopKLogitObjective,
                                make_objective)
    from sdpo_fast.loss.objectives import DISTILLATION_OBJECTIVES

    case = make_case(20, 16, 50, seed=2, ignore_frac=0.2)
    weights = torch.rand(20, generator=torch.Generator().manual_seed(0))
    behavior = behavior_for(case, seed=4)
    inputs = LossInputs(case["student_hidden"], case["lm_head_weight"], case["target_ids"], weights,
                        torch.zeros(20, dtype=torch.long), case["teacher_hidden"], behavior_logprobs=behavior)
    mask = case["target_ids"] != -100
    built = {mode: make_objective(name, importance_clip=2.0, **({} if mode == "sampled_token" else {"alpha": 0.5}))
             for mode, name in DISTILLATION_OBJECTIVES.items()}
    assert isinstance(built["sampled_token"], SDPOObjective)
    assert isinstance(built["full_logits"], FullLogitObjective)
    assert isinstance(built["topk_logits"], TopKLogitObjective)
    built["topk_logits"] = TopKLogitObjective(alpha=0.5, topk=5, add_tail=False, importance_clip=2.0)
    for mode, objective in built.items():
        out = objective(inputs)
        options = dict(distillation_mode=mode, importance_clip=2.0, behavior_logprobs=behavior)
        if mode != "sampled_token":
            options["distillation_alpha"] = 0.5
        if mode == "topk_logits":
            options.update(distillation_topk=5, distillation_add_tail=False)
        loss, stats = sdpo_loss(**case, token_weights=weights, return_stats=True, **options)
        module = SDPOLoss(**{k: v for k, v in options.items() if k != "behavior_logprobs"})
        assert torch.equal(out.loss, loss)
        assert torch.equal(module(**case, token_weights=weights, behavior_logprobs=behavior), loss)
        if mode != "sampled_token":
            assert objective.signal_name == "mean_divergence" and torch.equal(out.signal, stats.divergence[mask])


@pytest.mark.parametrize("options,argument", [
    (dict(distillation_mode="top_k"), "distillation_mode"),
    (dict(distillation_alpha=0.5), "distillation_alpha"),
    (dict(distillation_mode="full_logits", distillation_alpha=1.5), "distillation_alpha"),
    (dict(distillation_mode="topk_logits", distillation_topk=0), "distillation_topk"),
    (dict(distillation_mode="topk_logits", distillation_topk=51), "distillation_topk"),
    (dict(distillation_mode="topk_logits", distillation_add_tail=1), "distillation_add_tail"),
    (dict(distillation_mode="full_logits", signal_clip=1.0), "signal_clip"),
    (dict(distillation_mode="full_logits", center_advantages=True), "center_advantages"),
    (dict(importance_clip=0.0), "importance_clip"),
    (dict(importance_clip=2.0, behavior_logprobs=torch.zeros(3)), "behavior_logprobs"),
    (dict(importance_clip=2.0, behavior_logprobs=torch.zeros(8, dtype=torch.long)), "behavior_logprobs"),
])
def test_bad_combinations_name_the_argument(options, argument):
    case = make_case(8, 4, 50)
    with pytest.raises((ValueError, TypeError), match=argument):
        sdpo_loss(**case, **options)


def test_teacher_logprobs_only_for_sampled_token():
    case = make_case(8, 4, 50)
    case["teacher_logprobs"] = torch.zeros(8)
    del case["teacher_hidden"]
    for mode in ["full_logits", "topk_logits"]:
        with pytest.raises(ValueError, match="teacher_logprobs"):
            sdpo_loss(**case, distillation_mode=mode)


@pytest.mark.parametrize("mode,alpha", [("full_logits", 0.5), ("full_logits", 1.0), ("topk_logits", 0.0)])
def test_workspace_stays_within_the_budget(mode, alpha, monkeypatch):
    """Peak bytes of every storage made during the loss and its gradients (StorageCounter), torch backend: the
    gradients' own storage plus the chunk workspace within SDPO_FAST_TORCH_CHUNK_MB, far below one (N, V) fp32."""
    from sdpo_fast.train.memory import StorageCounter

    n, d, vocab = 128, 4, 8192
    monkeypatch.setenv("SDPO_FAST_TORCH_CHUNK_MB", "1")
    case = make_case(n, d, vocab, seed=1)
    hidden = case["student_hidden"].requires_grad_()
    weight = case["lm_head_weight"].requires_grad_()
    counter = StorageCounter()
    with counter:
        sdpo_loss(**case, distillation_mode=mode, distillation_alpha=alpha, backend="torch").backward()
    grads = 2 * vocab * d * 4 + 2 * n * d * 4  # grad_weight (fp32 accumulator and .grad) and grad_hidden
    assert counter.peak <= grads + (1 << 20) + (64 << 10), counter.peak
    assert counter.peak < n * vocab * 4 / 2


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_full_logits_matches_liger_fused_linear_jsd(alpha):
    """Liger's chunked JSD (beta = alpha, soft loss only, token mean) is the same divergence."""
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    case = make_case(30, 16, 203, seed=8)
    got = run_loss(sdpo_loss, case, "torch", distillation_mode="full_logits", distillation_alpha=alpha,
                   temperature=0.8)
    student = case["student_hidden"].clone().requires_grad_()
    weight = case["lm_head_weight"].clone().requires_grad_()
    loss = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=alpha, temperature=0.8,
                                         compiled=False)(student, weight, case["teacher_hidden"],
                                                         case["lm_head_weight"], case["target_ids"])
    loss.backward()
    assert rel_err(got["loss"], loss.detach()) <= FP32_TOL
    assert rel_err(got["grad_hidden"], student.grad) <= FP32_TOL
    assert rel_err(got["grad_weight"], weight.grad) <= FP32_TOL


def test_stats_still_unpack_as_three():
    case = make_case(5, 4, 30)
    for backend in ["torch", "reference"]:
        _, stats = sdpo_loss(**case, distillation_mode="full_logits", backend=backend, return_stats=True)
        logp, logq, adv = stats
        torch.testing.assert_close(adv, logq - logp)
        assert stats.divergence.shape == case["target_ids"].shape and bool((stats.divergence >= -1e-6).all())

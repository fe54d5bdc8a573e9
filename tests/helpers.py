"""Shared builders and comparisons for the tests: loss and kernel cases, a gradient-capturing optimizer, model-dir
copies with files dropped or added, a sampled reply's log-probs from a plain forward."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch


def triton_device() -> str:
    """Where Triton kernels run in this session: the interpreter on CPU, or a real GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def backend_device(backend: str) -> str:
    if backend == "triton":
        return triton_device()
    return "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are 0)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


def make_case(n, d, vocab, *, dtype=torch.float32, device="cpu", seed=0, ignore_frac=0.0, teacher_d=None,
              separate_teacher_weight=False, leading=None):
    """Random student/teacher hidden states, lm_head weight(s) and targets, built in fp64 then cast."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if leading is None else leading
    teacher_d = teacher_d or d
    student = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) / max(d, 1) ** 0.5 * 2
    if separate_teacher_weight or teacher_d != d:
        teacher_weight = torch.randn(vocab, teacher_d, generator=g, dtype=torch.float64) / max(teacher_d, 1) ** 0.5 * 2
        teacher = torch.randn(*shape, teacher_d, generator=g, dtype=torch.float64)
    else:
        teacher_weight = None
        teacher = student + 0.7 * torch.randn(*shape, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, shape, generator=g)
    if ignore_frac > 0:
        targets[torch.rand(shape, generator=g) < ignore_frac] = -100
    to = dict(dtype=dtype, device=device)
    case = dict(student_hidden=student.to(**to), lm_head_weight=weight.to(**to), target_ids=targets.to(device),
                teacher_hidden=teacher.to(**to))
    if teacher_weight is not None:
        case["teacher_lm_head_weight"] = teacher_weight.to(**to)
    return case


LEAVES = {"student_hidden": "grad_hidden", "lm_head_weight": "grad_weight", "lm_head_bias": "grad_bias"}
"""The case tensors a loss run differentiates, and the name of each one's gradient in its outputs."""


def _run(loss_fn, inputs: dict, options: dict) -> dict:
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in LEAVES if k in inputs}
    loss, stats = loss_fn(**{**inputs, **leaves}, **options)
    loss.backward()
    return {"loss": loss.detach(), **{LEAVES[k]: leaf.grad for k, leaf in leaves.items()},
            "student_logprobs": stats.student_logprobs, "teacher_logprobs": stats.teacher_logprobs,
            "advantages": stats.advantages, "divergence": stats.divergence}


def run_loss(sdpo_loss, case: dict, backend: str, **options) -> dict:
    """Loss, grads (of student_hidden, lm_head_weight and lm_head_bias when present) and stats for one backend
    ("reference": the reference at the case's dtype) on fresh leaf copies of the case's tensors."""
    return _run(lambda **kw: sdpo_loss(**kw, backend=backend, return_stats=True), case, options)


def run_truth(case: dict, **options) -> dict:
    """The reference in fp64 on the case's values: the ground truth a backend's error is measured against."""
    from sdpo_fast import reference_sdpo_loss

    def to64(value):
        return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    return _run(reference_sdpo_loss, {k: to64(v) for k, v in case.items()}, {k: to64(v) for k, v in options.items()})


def _logprob_condition(hidden, weight, targets, temperature):
    """|z_target| + |logsumexp z| per token: the size of the two terms log pi is the difference of."""
    logits = hidden @ weight.T / temperature
    return logits.gather(1, targets[:, None]).squeeze(1).abs() + torch.logsumexp(logits, 1).abs()


def error_scales(case: dict, truth: dict, **options) -> dict:
    """Condition-aware scales: the size of the terms each output is computed from, so rounding that any fp32
    computation suffers (cancellation in log pi = z_y - lse, in A = log q - log pi, in the sums of the
    gradients G @ W and G.T @ h with G = w A (softmax - onehot) / T) is not mistaken for error."""
    d = case["student_hidden"].shape[-1]
    temperature = options.get("temperature", 1.0)
    hidden = case["student_hidden"].detach().double().reshape(-1, d).cpu()
    weight = case["lm_head_weight"].detach().double().cpu()
    targets = case["target_ids"].reshape(-1).cpu()
    mask = targets != -100
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    weights = options.get("token_weights")
    weights = mask.double() / mask.sum().clamp(min=1) if weights is None else weights.double().reshape(-1).cpu()
    weights = weights * mask
    logp, logq, adv = (truth[k].reshape(-1).cpu() for k in ("student_logprobs", "teacher_logprobs", "advantages"))
    cond_p = _logprob_condition(hidden, weight, safe, temperature) * mask
    if "teacher_hidden" in case:
        teacher = case["teacher_hidden"].detach().double()
        teacher_weight = case.get("teacher_lm_head_weight", case["lm_head_weight"]).detach().double().cpu()
        cond_q = _logprob_condition(teacher.reshape(-1, teacher.shape[-1]).cpu(), teacher_weight, safe,
                                    temperature) * mask
    else:
        cond_q = logq.abs()
    cond_a = cond_p + cond_q
    probs = torch.softmax(hidden @ weight.T / temperature, dim=-1)
    onehot = torch.zeros_like(probs)
    onehot[mask, targets[mask]] = 1.0
    g_abs = (weights.abs() * cond_a)[:, None] * (probs + onehot) / temperature

    def largest(values):
        return values.max().item() if values.numel() else 0.0

    return {
        "loss": (weights.abs() * (cond_a * logp.abs() + adv.abs() * cond_p)).sum().item(),
        "grad_hidden": largest(g_abs @ weight.abs()),
        "grad_weight": largest(g_abs.T @ hidden.abs()),
        "student_logprobs": largest(cond_p),
        "teacher_logprobs": largest(cond_q),
        "advantages": largest(cond_a),
    }


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


def sampling_logprobs(model, prompt: list[int], ids, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """(len(ids),) float64: log of the probability of each id of `ids` (sampled after `prompt`) under softmax(logits /
    temperature) cut to its top_p nucleus (the most likely tokens, in order, while the mass before them is below
    top_p) and renormalised; -inf for an id outside its nucleus. From one unpadded forward of prompt + ids."""
    ids = list(ids)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].double()
    probs = torch.softmax(logits / temperature, -1)
    ordered, order = probs.sort(-1, descending=True)
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ordered.cumsum(-1) - ordered < top_p)
    nucleus = torch.where(kept, probs, 0.0)
    return (nucleus / nucleus.sum(-1, keepdim=True)).log().gather(-1, torch.tensor(ids)[:, None])[:, 0]


class CaptureGrads(torch.optim.Optimizer):
    """An optimizer whose step records each parameter's gradient (by id) and changes nothing."""

    def __init__(self, params):
        super().__init__(list(params), {"lr": 0.0})
        self.grads = {}

    def step(self, closure=None):
        self.grads = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None}


def copy_model(model_dir, target: Path, drop=(), add=None) -> str:
    """A copy of the model directory at `target` without the files in `drop` and with `add` (name -> text)."""
    shutil.copytree(model_dir, target)
    for name in drop:
        (target / name).unlink()
    for name, text in (add or {}).items():
        (target / name).write_text(text)
    return str(target)

"""Bad input raises a clear error naming the argument, before any kernel or chunk runs."""
import pytest
import torch

from helpers import make_case
from sdpo_fast import sdpo_loss
from sdpo_fast.loss.backends.torch_chunked import TorchBackend, TorchRowOps


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    def forbidden(*args):
        raise AssertionError("compute ran before validation")
    monkeypatch.setattr(TorchBackend, "token_logprobs", forbidden)
    monkeypatch.setattr(TorchBackend, "logprobs_and_grad", forbidden)
    for name in ["teacher_rows", "token_rows", "divergence_rows"]:
        monkeypatch.setattr(TorchRowOps, name, forbidden)


def case(**changes):
    base = make_case(6, 8, 20, seed=0)
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("changes,error,match", [
    (dict(target_ids=torch.tensor([0, 1, 2, 20, 4, 5])), ValueError, r"target_ids contains 20, outside \[0, 20\)"),
    (dict(target_ids=torch.tensor([0, 1, -5, 3, 4, 5])), ValueError, "target_ids contains -5"),
    (dict(target_ids=torch.zeros(6)), TypeError, "target_ids must be an integer"),
    (dict(target_ids=torch.zeros(5, dtype=torch.long)), ValueError, "target_ids must have shape"),
    (dict(target_ids=[0, 1, 2]), TypeError, "target_ids must be a torch.Tensor"),
    (dict(student_hidden=torch.randn(6, 9)), ValueError, "student_hidden has hidden size 9"),
    (dict(student_hidden=torch.randn(6, 8, dtype=torch.float64)), TypeError, "student_hidden must be float32"),
    (dict(student_hidden=torch.randn(8)), ValueError, "student_hidden must be"),
    (dict(lm_head_weight=torch.randn(20, 8, dtype=torch.bfloat16)), TypeError, "lm_head_weight has dtype"),
    (dict(lm_head_weight=torch.randn(20, 8, 1)), ValueError, "lm_head_weight must be 2-D"),
    (dict(teacher_hidden=torch.randn(5, 8)), ValueError, "teacher_hidden must have shape"),
    (dict(teacher_hidden=torch.randn(6, 7)), ValueError, "teacher_hidden has hidden size 7"),
    (dict(teacher_hidden=torch.randn(6, 8).half()), TypeError, "teacher_hidden has dtype"),
    (dict(teacher_hidden=None), ValueError, "exactly one of teacher_hidden or teacher_logprobs"),
    (dict(teacher_logprobs=torch.zeros(6)), ValueError, "exactly one of teacher_hidden or teacher_logprobs"),
    (dict(teacher_lm_head_weight=torch.randn(21, 8)), ValueError, "teacher_lm_head_weight has vocabulary 21"),
    (dict(teacher_lm_head_weight=torch.randn(20, 5)), ValueError, "teacher_hidden has hidden size 8 but teacher_lm"),
    (dict(token_weights=torch.ones(5)), ValueError, "token_weights must have the shape of target_ids"),
    (dict(token_weights=torch.ones(6, dtype=torch.long)), TypeError, "token_weights must be float32"),
])
def test_bad_tensors(changes, error, match):
    with pytest.raises(error, match=match):
        sdpo_loss(**case(**changes), backend="torch")


def test_teacher_logprobs_wrong_shape_and_extra_weight():
    inputs = case(teacher_hidden=None)
    with pytest.raises(ValueError, match="teacher_logprobs must have the shape of target_ids"):
        sdpo_loss(**inputs, teacher_logprobs=torch.zeros(7), backend="torch")
    with pytest.raises(ValueError, match="teacher_lm_head_weight is only used with teacher_hidden"):
        sdpo_loss(**inputs, teacher_logprobs=torch.zeros(6), teacher_lm_head_weight=torch.randn(20, 8),
                  backend="torch")


@pytest.mark.parametrize("options,match", [
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(temperature="1"), "temperature must be a finite number > 0"),
    (dict(signal_clip=0), "signal_clip must be None or a number > 0"),
    (dict(signal_clip=-1.0), "signal_clip must be None or a number > 0"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        sdpo_loss(**case(), **{"backend": "torch", **options})


def test_ignore_index_must_be_int():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        sdpo_loss(**case(), ignore_index=-100.0, backend="torch")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        sdpo_loss(**case(), backend="triton")


def test_ignore_index_targets_are_not_range_checked():
    targets = torch.tensor([0, -100, 2, 3, 4, 5])
    loss = sdpo_loss(**case(target_ids=targets), backend="reference")
    assert torch.isfinite(loss)

"""Mean-centred advantages inside one `sdpo_loss` call, and the objective interface the training step calls."""
import pytest
import torch

from helpers import backend_device, error_scales, make_case, max_abs_err, run_loss, run_truth
from sdpo_fast import sdpo_loss
from sdpo_fast.loss import LossInputs, SDPOObjective, SFTObjective, make_objective, sft_loss

FIELDS = ["loss", "grad_hidden", "grad_weight", "student_logprobs", "teacher_logprobs", "advantages"]


def _sequences(n: int, lengths) -> torch.Tensor:
    assert sum(lengths) == n
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("clip", [None, 0.4])
def test_centred_advantages_match_the_reference(backend, clip):
    device = backend_device(backend)
    case = make_case(45, 24, 301, device=device, seed=3, ignore_frac=0.2)
    options = dict(center_advantages=True, sequence_index=_sequences(45, [10, 1, 20, 14]).to(device),
                   signal_clip=clip)
    got = run_loss(sdpo_loss, case, backend, **options)
    truth = run_truth(case, **options)
    scales = error_scales(case, truth, **options)
    for field in FIELDS:
        assert max_abs_err(got[field], truth[field]) <= 1e-5 * max(scales[field], 1e-30), field
    mask = case["target_ids"] != -100
    per_sequence = torch.zeros(4, dtype=torch.float64).index_add_(
        0, options["sequence_index"].cpu()[mask.cpu()], truth["advantages"].cpu()[mask.cpu()])
    if clip is None:
        assert per_sequence.abs().max().item() < 1e-9  # centred: each sequence's advantages sum to zero


def test_centring_is_a_transform_inside_one_call():
    """Centred A = A - per-sequence mean of A, computed from the same call's student log-probs."""
    case = make_case(30, 16, 120, seed=5)
    seq = _sequences(30, [12, 18])
    _, raw = sdpo_loss(**case, backend="torch", return_stats=True)
    _, centred = sdpo_loss(**case, backend="torch", center_advantages=True, sequence_index=seq, return_stats=True)
    a = raw.teacher_logprobs - raw.student_logprobs
    expected = torch.cat([a[:12] - a[:12].mean(), a[12:] - a[12:].mean()])
    torch.testing.assert_close(centred.advantages, expected, rtol=0, atol=1e-6)
    assert torch.equal(centred.teacher_logprobs, raw.teacher_logprobs)
    assert not torch.allclose(centred.advantages, raw.advantages)


def test_centring_needs_sequence_index():
    case = make_case(6, 8, 20)
    with pytest.raises(ValueError, match="sequence_index"):
        sdpo_loss(**case, center_advantages=True)
    with pytest.raises(ValueError, match="sequence_index values"):
        sdpo_loss(**case, center_advantages=True, sequence_index=torch.full((6,), 6))
    with pytest.raises(TypeError, match="sequence_index must be an integer"):
        sdpo_loss(**case, center_advantages=True, sequence_index=torch.zeros(6))


def test_objectives_wrap_their_losses():
    case = make_case(20, 16, 50, seed=2)
    weights = torch.rand(20, generator=torch.Generator().manual_seed(0))
    seq = _sequences(20, [7, 13])
    inputs = LossInputs(case["student_hidden"], case["lm_head_weight"], case["target_ids"], weights, seq,
                        case["teacher_hidden"])
    out = SDPOObjective(center_advantages=True, signal_clip=0.5)(inputs)
    loss, stats = sdpo_loss(**case, token_weights=weights, center_advantages=True, sequence_index=seq,
                            signal_clip=0.5, return_stats=True)
    assert torch.equal(out.loss, loss)
    assert torch.equal(out.signal, stats.teacher_logprobs - stats.student_logprobs)  # raw A, before centring
    sft = SFTObjective()(inputs)
    want, nll = sft_loss(case["student_hidden"], case["lm_head_weight"], case["target_ids"], weights)
    assert torch.equal(sft.loss, want) and torch.equal(sft.signal, nll)
    assert not SFTObjective.needs_teacher and SDPOObjective.needs_teacher
    assert isinstance(make_objective("sft"), SFTObjective)
    with pytest.raises(ValueError, match="loss must be one of"):
        make_objective("dpo")

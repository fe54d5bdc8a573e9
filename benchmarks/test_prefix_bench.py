"""Teacher pass with prefix K/V reuse vs a full teacher pass; packed vs padded student pass.

Run: pytest benchmarks/test_prefix_bench.py --benchmark-columns=min,median,mean,rounds
CPU sizes finish in under a minute; CPU runs use one thread (a shared 2-core box stalls torch's thread
pool and turns timings into noise). The CUDA variants (bf16, larger) need a GPU.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from sdpo_fast.data import EncodedInteraction
from sdpo_fast.model.passes import new_prefix_cache, student_hidden_states, teacher_hidden_states
from sdpo_fast.testing import tiny_causal_lm
from sdpo_fast.demo.threads import single_thread

SETTINGS = {
    # device: (dtype, hidden_size, layers, sequences per micro-batch, teacher length, rounds)
    "cpu": (torch.float32, 256, 4, 8, 512, 5),
    "cuda": (torch.bfloat16, 1024, 8, 16, 2048, 20),
}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
COMPLETION = 64


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    with single_thread():
        yield


def _model(device):
    dtype, hidden, layers, *_ = SETTINGS[device]
    return tiny_causal_lm("qwen3", hidden_size=hidden, num_layers=layers).to(device, dtype)


def _run(benchmark, device, fn):
    rounds = SETTINGS[device][-1]

    def timed():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)


def _prefix_batch(n, teacher_len, fraction, vocab, seed=0):
    """n interactions whose teacher ids (teacher_len, completion included) share `fraction` with the student's."""
    g = torch.Generator().manual_seed(seed)
    shared = int(fraction * teacher_len)
    batch = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (teacher_len + 16,), generator=g).tolist()
        completion = ids[-COMPLETION:]
        teacher_prompt = ids[:teacher_len - COMPLETION]
        student_prompt = ids[:shared] + [(t + 1) % vocab for t in ids[shared:shared + 16]]
        batch.append(EncodedInteraction(student_prompt + completion, teacher_prompt + completion, completion, shared))
    return batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "full"])
def test_teacher_pass(benchmark, device, fraction, reuse):
    _, _, _, n, teacher_len, _ = SETTINGS[device]
    benchmark.group = f"teacher pass {device}, prefix fraction {fraction}"
    model = _model(device).eval()
    batch = _prefix_batch(n, teacher_len, fraction, model.config.vocab_size)
    cache = None
    if reuse:
        cache = new_prefix_cache(batch)
        with torch.no_grad():
            student_hidden_states(model, batch, prefix_cache=cache)
    benchmark.extra_info["teacher_tokens"] = n * teacher_len
    benchmark.extra_info["computed_tokens"] = n * teacher_len - (cache.num_prefix_tokens if reuse else 0)
    _run(benchmark, device, functools.partial(teacher_hidden_states, model, batch, prefix_cache=cache))


def _chat_lengths(n, median, cap, seed=0):
    """Lognormal lengths (sigma 0.9), like chat logs: mostly short, a few long ones."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(n, generator=g).mul(0.9).add(math.log(median)).exp()
    return [int(min(cap, max(COMPLETION + 8, x))) for x in draws.tolist()]


def _padded_student(model, batch):
    device = model.device
    width = max(len(e.student_input_ids) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(batch):
        ids[i, :len(e.student_input_ids)] = torch.tensor(e.student_input_ids, device=device)
        mask[i, :len(e.student_input_ids)] = 1
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    rows = torch.cat([torch.full((len(e.completion_ids),), i) for i, e in enumerate(batch)])
    cols = torch.cat([torch.arange(e.student_prompt_len - 1, len(e.student_input_ids) - 1) for e in batch])
    return hidden[rows.to(device), cols.to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_student_pass(benchmark, device, layout):
    _, _, _, n, teacher_len, _ = SETTINGS[device]
    benchmark.group = f"student pass {device}, chat-log length mix"
    model = _model(device).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batch = []
    for length in _chat_lengths(2 * n, teacher_len // 4, 4 * teacher_len):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        batch.append(EncodedInteraction(ids, ids, ids[-COMPLETION:], length - COMPLETION))
    lengths = [len(e.student_input_ids) for e in batch]
    benchmark.extra_info["tokens"] = sum(lengths)
    benchmark.extra_info["padded_tokens"] = len(lengths) * max(lengths)
    if layout == "packed":
        fn = functools.partial(student_hidden_states, model, batch)
    else:
        fn = functools.partial(_padded_student, copy.deepcopy(model), batch)
    with torch.no_grad():
        _run(benchmark, device, fn)

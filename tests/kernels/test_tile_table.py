"""benchmarks/tile_table.py's decision rule on hand-made sweep rows (no compilation)."""
import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tile_table  # noqa: E402


def row(block_n, block_v, block_d, mma_shape="64x128x16", step_ms=100.0, hbm_gb=10.0, programs=1, spills=False):
    """A grad_logits row on sm_90; spills: not modelled, as `rows` leaves a build that spills."""
    from sdpo_fast.kernels.config import COMMON_TILE, KernelConfig

    cfg = KernelConfig(block_n, block_v, block_d, 8, 3, "tf32")
    out = dict(kernel="grad_logits", arch=90, compiled=True, previous=cfg == COMMON_TILE,
               fill_bytes_per_kflop=tile_table.fill_bytes_per_kflop("grad_logits", cfg), config=dataclasses.asdict(cfg),
               builds=[dict(mma_shape=mma_shape, mma_per_ldsm=None, programs_per_sm=programs, shared_bytes=1)])
    return out if spills else dict(out, step_ms=step_ms, kernel_hbm_gb=hbm_gb)


def test_the_largest_passing_tile_with_the_widest_instruction_is_picked():
    base = row(128, 128, 32, programs=2)
    wide = row(128, 256, 32, mma_shape="64x256x16")
    deep = row(128, 256, 64, mma_shape="64x256x16")
    tall = row(256, 128, 32)  # same tile size, narrower HGMMA than `wide`
    assert tile_table.choose([base, tall, wide, deep])[("grad_logits", 90)] is deep  # deeper BLOCK_D breaks the tie


@pytest.mark.parametrize("loser", [
    dict(spills=True),  # a build spills
    dict(step_ms=100.2),  # the model's step is longer
    dict(hbm_gb=10.5),  # more HBM traffic
    dict(mma_shape="64x64x16"),  # a narrower HGMMA than the common tile's
])
def test_a_candidate_failing_a_criterion_leaves_the_common_tile(loser):
    base = row(128, 128, 32)
    assert tile_table.choose([base, row(256, 256, 32, **loser)])[("grad_logits", 90)] is base
    assert tile_table.choose([base, row(256, 256, 32)])[("grad_logits", 90)] is not base

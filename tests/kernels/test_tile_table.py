"""benchmarks/tile_table.py's decision rule on hand-made sweep rows (no compilation)."""
import dataclasses
import importlib
from pathlib import Path

import pytest


@pytest.fixture
def tile_table(monkeypatch):
    """benchmarks/tile_table.py, imported as its script runs (its folder on sys.path, for plan_table)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    return importlib.import_module("tile_table")


def row(tile_table, block_n, block_v, block_d, mma_shape="64x128x16", step_ms=100.0, hbm_gb=10.0, programs=1,
        spills=False):
    """A grad_logits row on sm_90; spills: not modelled, as `tile_table.rows` leaves a build that spills."""
    from sdpo_fast.kernels.config import COMMON_TILE, KernelConfig

    cfg = KernelConfig(block_n, block_v, block_d, 8, 3, "tf32")
    out = dict(kernel="grad_logits", arch=90, compiled=True, previous=cfg == COMMON_TILE,
               fill_bytes_per_kflop=tile_table.fill_bytes_per_kflop("grad_logits", cfg), config=dataclasses.asdict(cfg),
               builds=[dict(mma_shape=mma_shape, mma_per_ldsm=None, programs_per_sm=programs, shared_bytes=1)])
    return out if spills else dict(out, step_ms=step_ms, kernel_hbm_gb=hbm_gb)


def test_the_largest_passing_tile_with_the_widest_instruction_is_picked(tile_table):
    base = row(tile_table, 128, 128, 32, programs=2)
    wide = row(tile_table, 128, 256, 32, mma_shape="64x256x16")
    deep = row(tile_table, 128, 256, 64, mma_shape="64x256x16")
    tall = row(tile_table, 256, 128, 32)  # as large as `wide`, with a narrower HGMMA
    assert tile_table.choose([base, tall, wide, deep])[("grad_logits", 90)] is deep  # the deeper BLOCK_D breaks the tie


@pytest.mark.parametrize("loser", [
    dict(spills=True),  # a build spills
    dict(step_ms=100.2),  # the model's step is longer
    dict(hbm_gb=10.5),  # more HBM traffic
    dict(mma_shape="64x64x16"),  # a narrower HGMMA than the common tile's
])
def test_a_candidate_failing_a_criterion_leaves_the_common_tile(tile_table, loser):
    base = row(tile_table, 128, 128, 32)
    assert tile_table.choose([base, row(tile_table, 256, 256, 32, **loser)])[("grad_logits", 90)] is base
    assert tile_table.choose([base, row(tile_table, 256, 256, 32)])[("grad_logits", 90)] is not base


def test_a_tile_is_picked_only_if_every_other_tritons_sweep_passes_it(tile_table):
    """Another Triton version that spills the best tile leaves the next one that passes in both sweeps."""
    def swept(row_, spilled=0):
        builds = [dict(b, registers=255 if spilled else 200, stack_bytes=0, local_bytes=spilled)
                  for b in row_["builds"]]
        out = dict(row_, builds=builds)
        return {k: v for k, v in out.items() if k not in ("step_ms", "kernel_hbm_gb")} if spilled else out

    base = row(tile_table, 128, 128, 32)
    deep, wide = row(tile_table, 128, 256, 64, mma_shape="64x256x16"), row(tile_table, 128, 256, 32,
                                                                             mma_shape="64x256x16")
    here = [base, wide, deep]
    assert tile_table.choose(here)[("grad_logits", 90)] is deep
    older = {"triton": "3.6.0", "rows": [swept(base), swept(wide), swept(deep, spilled=48)]}
    assert tile_table.choose(here, [older])[("grad_logits", 90)] is wide
    passing = [tile_table.passing_configs(older["rows"])]
    assert tile_table.other_tritons(deep, [older], passing) == "3.6.0: 48 B spilled"
    assert tile_table.other_tritons(wide, [older], passing) == tile_table.other_tritons(base, [older], passing) \
        == "3.6.0: ok"
    assert tile_table.choose(here, [{"triton": "3.6.0", "rows": [swept(base)]}])[("grad_logits", 90)] is base
    record = tile_table.sweep_record([dict(r, builds=[dict(b, registers=1, stack_bytes=0, local_bytes=0)
                                                      for b in r["builds"]]) for r in here], "3.9.0")
    assert tile_table.choose(here, [record])[("grad_logits", 90)] is deep  # a recorded sweep reads back as its rows

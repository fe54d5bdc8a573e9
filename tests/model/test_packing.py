"""Packing into one row and token-budget micro-batches."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdpo_fast.model.packing import gather_index, pack, plan_micro_batches


def test_pack_concatenates_and_restarts_positions():
    row = pack([[5, 6, 7], [8], [9, 10]])
    assert row.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert row.lengths == (3, 1, 2) and row.starts == (0, 3, 4)
    assert row.input_ids.dtype == row.position_ids.dtype == torch.long


def test_pack_continues_positions_from_offsets():
    row = pack([[1, 2], [3, 4, 5]], position_offsets=[7, 0])
    assert row.position_ids.tolist() == [[7, 8, 0, 1, 2]]


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sequences"):
        pack([])
    with pytest.raises(ValueError, match="position_offsets"):
        pack([[1], [2]], position_offsets=[0])


def test_gather_index():
    assert gather_index([0, 10], [2, 0], [3, 1]).tolist() == [2, 3, 4, 10]


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(0, 50), max_size=40), max_tokens=st.integers(1, 60))
def test_plan_micro_batches_properties(costs, max_tokens):
    groups = plan_micro_batches(costs, max_tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    for g in groups:
        assert g == sorted(g) and g
        assert sum(costs[i] for i in g) <= max_tokens or len(g) == 1
    assert plan_micro_batches(list(costs), max_tokens) == groups


def test_plan_micro_batches_example():
    # taken as 12 (i5, oversize, alone), 9 (i1), 6 (i3), 5 (i0), 3 (i2 joins i3), 2 (i4 joins i0)
    assert plan_micro_batches([5, 9, 3, 6, 2, 12], 10) == [[5], [1], [2, 3], [0, 4]]


def test_plan_micro_batches_rejects_bad_budget():
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="max_tokens"):
            plan_micro_batches([1, 2], bad)
    with pytest.raises(ValueError, match="non-negative"):
        plan_micro_batches([1, -2], 4)

"""`accel.progress`: one bar (rate, ETA) on the main process, the plain iterable elsewhere."""

from __future__ import annotations

import io

import pytest

from accel.context import Context
from accel.testing import fake_world
from accel.tracking.progress import progress

tqdm = pytest.importorskip("tqdm", reason="tqdm is not installed (pip install 'accel[tracking]')")


def drawn(iterable, ctx, **kwargs) -> tuple[list, str]:
    """Iterate through progress(); return the items and what the bar printed."""
    out = io.StringIO()
    items = list(progress(iterable, ctx, file=out, mininterval=0, **kwargs))
    return items, out.getvalue()


def test_main_process_draws_count_rate_and_eta():
    items, text = drawn(range(6), Context(), desc="epoch 1")
    assert items == list(range(6))
    final = text.split("\r")[-1]
    assert final.startswith("epoch 1: 100%") and "6/6 [" in final
    assert "<00:00" in final and "it/s]" in final  # elapsed<remaining, then the rate


def test_without_a_length_the_bar_still_counts_and_rates():
    items, text = drawn((i for i in range(4)), Context(), unit="batch")
    assert items == [0, 1, 2, 3]
    final = text.split("\r")[-1]
    assert "4batch [" in final and "batch/s]" in final


def test_other_ranks_get_the_iterable_itself():
    data = [1, 2, 3]
    with fake_world(rank=1, world_size=2) as ctx:
        assert progress(data, ctx) is data
        # One node of two ranks: rank 1 is not its node's local main process either.
        assert progress(data, ctx, per_node=True) is data


def test_per_node_draws_one_labelled_bar_per_node():
    with fake_world(rank=2, world_size=4, local_world_size=2) as ctx:  # node 1, local rank 0
        data = [1]
        assert progress(data, ctx) is data             # not the global main process
        items, text = drawn([1, 2], ctx, per_node=True, desc="eval")
    assert items == [1, 2] and text.split("\r")[-1].startswith("node 1 eval: 100%")
    with fake_world(rank=3, world_size=4, local_world_size=2) as ctx:
        data = [1]
        assert progress(data, ctx, per_node=True) is data

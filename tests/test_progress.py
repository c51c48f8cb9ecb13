"""`accel.progress`: one bar (rate, ETA) on the main process, the plain iterable elsewhere;
in a terminal it redraws in place, in a log it prints a line every `log_interval` seconds."""

from __future__ import annotations

import io
import os
import time

import pytest

from accel.context import Context
from accel.errors import InvalidArgumentError
from accel.testing import fake_world
from accel.tracking.progress import progress

tqdm = pytest.importorskip("tqdm", reason="tqdm is not installed (pip install 'accel[tracking]')")


def drawn(iterable, ctx, **kwargs) -> tuple[list, str]:
    """Iterate through progress() into a log (no terminal); return the items and the last
    line the bar printed."""
    out = io.StringIO()
    items = list(progress(iterable, ctx, file=out, mininterval=0, **kwargs))
    return items, out.getvalue().splitlines()[-1]


def test_main_process_draws_count_rate_and_eta():
    items, final = drawn(range(6), Context(), desc="epoch 1")
    assert items == list(range(6))
    assert final.startswith("epoch 1: 100%") and "6/6 [" in final
    assert "<00:00" in final and "it/s]" in final  # elapsed<remaining, then the rate


def test_without_a_length_the_bar_still_counts_and_rates():
    items, final = drawn((i for i in range(4)), Context(), unit="batch")
    assert items == [0, 1, 2, 3]
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
        items, final = drawn([1, 2], ctx, per_node=True, desc="eval")
    assert items == [1, 2] and final.startswith("node 1 eval: 100%")
    with fake_world(rank=3, world_size=4, local_world_size=2) as ctx:
        data = [1]
        assert progress(data, ctx, per_node=True) is data


def slow(count: int, seconds: float):
    for item in range(count):
        time.sleep(seconds)
        yield item


def test_in_a_log_one_line_per_interval_not_per_update():
    out = io.StringIO()  # not a terminal, as a CI log or `> file`
    started = time.monotonic()
    items = list(progress(slow(40, 0.025), Context(), file=out, total=40, log_interval=0.3))
    elapsed = time.monotonic() - started
    lines = out.getvalue().splitlines()
    assert items == list(range(40))
    assert "\r" not in out.getvalue() and all(line.strip() for line in lines)
    # the first line, one per 0.3 s, the last: a handful, where each update would be 40.
    assert 3 <= len(lines) <= elapsed / 0.3 + 2, (elapsed, lines)
    assert lines[0].startswith("  0%") and lines[-1].startswith("100%|##########| 40/40")


def test_in_a_terminal_the_bar_redraws_in_place():
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert terminal.isatty()
        list(progress(range(5), Context(), file=terminal, mininterval=0, miniters=1))
    os.set_blocking(leader, False)
    chunks = []
    while True:
        try:
            chunks.append(os.read(leader, 65536))
        except OSError:  # EAGAIN: nothing more; EIO: the terminal's other end is closed
            break
    os.close(leader)
    text = b"".join(chunks).decode()
    # a redraw per update ("\r" + the bar), and no new line before the bar is done
    assert [f"{n}/5" in text for n in range(6)] == [True] * 6
    assert text.count("\r") >= 6 and "\n" not in text.rstrip(), repr(text)


def test_a_bad_interval_is_refused():
    with pytest.raises(InvalidArgumentError, match="log_interval"):
        progress([1], Context(), log_interval=-1)

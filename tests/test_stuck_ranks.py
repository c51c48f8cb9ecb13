"""Ranks that stop meeting end the run within the barrier timeout, and say why.

Real worlds of 2 gloo ranks with a 3 s barrier timeout: a loop where rank 0 has one
batch more than rank 1 (rank 1 waits in shutdown, rank 0 in DDP's all-reduce), barriers
that a rank reaches late or not at all, and a collective whose peer left.
"""

from __future__ import annotations

import datetime
import time

import pytest
import torch
from torch import nn

import accel
from accel.context import DEFAULT_BARRIER_TIMEOUT, init
from accel.errors import InvalidArgumentError, StuckRanksError
from accel.runtime import diagnosis
from accel.runtime.process import bounded_barrier
from accel.testing import run_world

BOUND = 3.0  # seconds: the barrier timeout of these worlds
#: what a rank may take past the bound to end: its group's connections close, then the
#: other rank's collective fails (measured: under 1 s; generous for a loaded machine).
SLACK = 10.0


def outcome(start: float, exc: BaseException | None = None) -> dict:
    return {"error": type(exc).__name__ if exc else None, "message": str(exc or ""),
            "missing": getattr(exc, "missing", None), "elapsed": time.time() - start}


def uneven_ddp_loop(ctx: accel.Context) -> dict:
    """5 batches on rank 0, 4 on rank 1, then shutdown: the example of the hang."""
    torch.manual_seed(0)
    model, ctx = accel.shard_model(nn.Linear(4, 2), ctx, strategy="ddp")
    optimizer, ctx = accel.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    accel.wait_for_everyone(ctx)
    start = time.time()
    try:
        for _ in range(5 if ctx.rank == 0 else 4):
            accel.backward(model(torch.randn(3, 4)).sum(), optimizer, ctx)
            optimizer.step()
            optimizer.zero_grad()
        accel.shutdown(ctx)
    except (RuntimeError, StuckRanksError) as exc:
        return outcome(start, exc)
    return outcome(start)


def uneven_reduce_loop(ctx: accel.Context) -> dict:
    """A metric averaged with accel.reduce each step, one step more on rank 0."""
    start = time.time()
    try:
        for step in range(5 if ctx.rank == 0 else 4):
            accel.reduce(torch.tensor([float(step)]), ctx)
        accel.shutdown(ctx)
    except (RuntimeError, StuckRanksError) as exc:
        return outcome(start, exc)
    return outcome(start)


def late_and_mismatched_barriers(ctx: accel.Context) -> dict:
    """Rank 1 comes late to a barrier, then the ranks call different barriers."""
    results = {}
    start = time.time()
    if ctx.rank == 1:
        time.sleep(BOUND)  # rank 0 gives up after 1 s
    try:
        accel.wait_for_everyone(ctx, timeout=1.0)
        results["late"] = outcome(start)
    except StuckRanksError as exc:
        results["late"] = outcome(start, exc)
    accel.wait_for_everyone(ctx)  # both here again: the ranks agree on the barrier count
    try:
        bounded_barrier(ctx, "wait_for_everyone" if ctx.rank == 0 else "other barrier",
                        datetime.timedelta(seconds=BOUND))
        results["mismatch"] = outcome(start)
    except StuckRanksError as exc:
        results["mismatch"] = outcome(start, exc)
    return results


@pytest.fixture(scope="module")
def uneven_ddp():
    began = time.time()
    ranks = run_world(uneven_ddp_loop, 2, barrier_timeout=BOUND)
    return ranks, time.time() - began


@pytest.mark.spawned
def test_uneven_batches_end_within_the_bound_and_name_the_missing_rank(uneven_ddp):
    (first, second), _ = uneven_ddp
    assert second["error"] == "StuckRanksError" and tuple(second["missing"]) == (0,)
    assert "shutdown on rank 1: rank(s) 0 of 2 did not arrive within 3 s" in second["message"]
    assert "even_batches=True" in second["message"]
    assert "join_uneven_inputs" in second["message"]
    assert BOUND <= second["elapsed"] < BOUND + SLACK


@pytest.mark.spawned
def test_the_rank_left_in_an_all_reduce_fails_promptly_too(uneven_ddp):
    (first, second), world_seconds = uneven_ddp
    assert first["error"] == "RuntimeError"  # DDP's own all-reduce in backward: torch's error
    assert "Connection closed by peer" in first["message"]
    assert first["elapsed"] < BOUND + SLACK
    print(f"\nstuck example: rank 1 raised after {second['elapsed']:.1f} s, rank 0's "
          f"all-reduce failed after {first['elapsed']:.1f} s (bound {BOUND:g} s); the world, "
          f"with process start, took {world_seconds:.1f} s")


@pytest.mark.spawned
def test_a_collective_whose_peer_left_points_at_debug_mode():
    first, second = run_world(uneven_reduce_loop, 2, barrier_timeout=BOUND)
    assert second["error"] == "StuckRanksError"
    assert first["error"] == "CollectiveFailedError"
    message = first["message"]
    assert message.startswith("reduce failed on rank 0 of 2: ")
    assert "ACCEL_DEBUG=1" in message and "accel launch --debug" in message
    assert "even_batches=True" in message
    assert first["elapsed"] < BOUND + SLACK


@pytest.mark.spawned
def test_late_ranks_and_different_barriers_are_named():
    first, second = run_world(late_and_mismatched_barriers, 2, barrier_timeout=BOUND)
    late = first["late"]
    assert late["error"] == "StuckRanksError" and tuple(late["missing"]) == (1,)
    assert "wait_for_everyone on rank 0: rank(s) 1 of 2 did not arrive within 1 s" in (
        late["message"])
    assert 1.0 <= late["elapsed"] < 1.0 + SLACK
    assert second["late"]["error"] is None  # it came last: everyone had arrived
    for result in (first, second):
        assert result["mismatch"]["error"] == "StuckRanksError"
        assert ("ranks reached different barriers: rank 0 at wait_for_everyone, rank 1 at "
                "other barrier") in result["mismatch"]["message"]


def test_barrier_timeout_comes_from_init_the_environment_or_the_default():
    one = {"WORLD_SIZE": "1"}
    assert init(env=one).barrier_timeout == DEFAULT_BARRIER_TIMEOUT
    assert DEFAULT_BARRIER_TIMEOUT == datetime.timedelta(seconds=30)
    assert init(env={**one, "ACCEL_BARRIER_TIMEOUT": "4.5"}).barrier_timeout.total_seconds() == 4.5
    assert init(barrier_timeout=2, env={**one, "ACCEL_BARRIER_TIMEOUT": "9"}).barrier_timeout == (
        datetime.timedelta(seconds=2))
    with pytest.raises(InvalidArgumentError, match="ACCEL_BARRIER_TIMEOUT must be a positive"):
        init(env={**one, "ACCEL_BARRIER_TIMEOUT": "soon"})
    with pytest.raises(InvalidArgumentError, match=r"init\(barrier_timeout=...\) must be"):
        init(barrier_timeout=0, env=one)


def test_the_hint_depends_on_debug_mode():
    failure = RuntimeError("Connection closed by peer\nmore lines")
    plain = diagnosis._failure("gather", accel.Context(), failure)
    assert plain.startswith("gather failed on rank 0 of 1: Connection closed by peer\n")
    assert "ACCEL_DEBUG=1" in plain and "more lines" not in plain
    checked = diagnosis._failure("gather", accel.Context(debug=True), failure)
    assert "ACCEL_DEBUG=1" not in checked and "look for a rank that stopped" in checked


def test_one_process_barriers_return_at_once():
    ctx = accel.Context()
    accel.wait_for_everyone(ctx, timeout=0.001)
    bounded_barrier(ctx, "shutdown", datetime.timedelta(seconds=0.001))
    accel.shutdown(ctx)

"""accel.get_logger: rank 0 only by default, every rank on request, rank order with in_order."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from accel.context import Context
from accel.errors import IncompatibleOptionsError, InvalidArgumentError
from accel.runtime.logging import get_logger
from accel.world import World


def rank_ctx(rank: int, world_size: int) -> Context:
    return Context(world=World(rank=rank, world_size=world_size, local_rank=rank,
                               local_world_size=world_size))


# --------------------------------------------------------------------------- spawned world


def _log_from_every_rank(ctx: Context, folder: str) -> None:
    logger = get_logger("accel.test.spawned", ctx, level="INFO")
    handlers = [logging.FileHandler(Path(folder, "shared.log")),
                logging.FileHandler(Path(folder, f"rank{ctx.rank}.log"))]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(rank)s/%(world_size)s %(message)s"))
        logger.logger.addHandler(handler)
    try:
        logger.info("once")
        logger.info("every %d", ctx.rank, main_process_only=False)
        logger.debug("filtered out, but the barriers still run", in_order=True)
        for turn in range(2):
            if ctx.rank == 0:
                time.sleep(0.3)  # without ordering, rank 1 would write first
            logger.warning("turn %d", turn, in_order=True)
    finally:
        for handler in handlers:
            logger.logger.removeHandler(handler)
            handler.close()


@pytest.fixture(scope="module")
def log_folder(tmp_path_factory) -> Path:
    from accel.testing import run_world

    folder = tmp_path_factory.mktemp("logging")
    run_world(_log_from_every_rank, 2, str(folder), timeout=90)
    return folder


@pytest.mark.spawned
def test_main_process_only_by_default(log_folder):
    assert (log_folder / "rank0.log").read_text().splitlines()[:2] == [
        "0/2 [rank 0] once", "0/2 [rank 0] every 0"]
    assert (log_folder / "rank1.log").read_text().splitlines()[0] == "1/2 [rank 1] every 1"


@pytest.mark.spawned
def test_in_order_logs_rank_by_rank(log_folder):
    lines = (log_folder / "shared.log").read_text().splitlines()
    turns = [line for line in lines if "turn" in line]
    assert turns == ["0/2 [rank 0] turn 0", "1/2 [rank 1] turn 0",
                     "0/2 [rank 0] turn 1", "1/2 [rank 1] turn 1"]
    assert not any("filtered" in line for line in lines)


# --------------------------------------------------------------------------- one process


def test_single_process_logs_without_prefix(caplog):
    logger = get_logger("accel.test.single", Context(), level="DEBUG")
    with caplog.at_level(logging.DEBUG, logger="accel.test.single"):
        logger.debug("step %d", 3)
        logger.info("ordered", in_order=True)
    assert [r.getMessage() for r in caplog.records] == ["step 3", "ordered"]
    record = caplog.records[0]
    assert record.rank == 0 and record.world_size == 1
    # The record points at this test, not at the adapter.
    assert record.pathname == __file__
    assert record.funcName == "test_single_process_logs_without_prefix"


def test_other_ranks_log_only_when_asked(caplog):
    logger = get_logger("accel.test.rank1", rank_ctx(1, 2), level=logging.INFO)
    with caplog.at_level(logging.INFO, logger="accel.test.rank1"):
        logger.info("rank 0 only")
        logger.warning("everyone", main_process_only=False, extra={"step": 7})
    assert [r.getMessage() for r in caplog.records] == ["[rank 1] everyone"]
    assert caplog.records[0].step == 7 and caplog.records[0].rank == 1


def test_in_order_contradicts_main_process_only():
    logger = get_logger("accel.test.contradiction", Context())
    with pytest.raises(IncompatibleOptionsError, match="drop main_process_only"):
        logger.info("x", in_order=True, main_process_only=True)


def test_level_from_argument_or_environment(monkeypatch):
    monkeypatch.setenv("ACCEL_LOG_LEVEL", "warning")
    assert get_logger("accel.test.env", Context()).logger.level == logging.WARNING
    assert get_logger("accel.test.arg", Context(), level="error").logger.level == logging.ERROR
    monkeypatch.setenv("ACCEL_LOG_LEVEL", "15")
    assert get_logger("accel.test.number", Context()).logger.level == 15
    monkeypatch.setenv("ACCEL_LOG_LEVEL", "loud")
    with pytest.raises(InvalidArgumentError, match="unknown log level 'loud'"):
        get_logger("accel.test.bad", Context())

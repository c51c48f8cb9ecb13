"""Rank-aware logging: log once (on rank 0) by default, or on every rank in rank order.

A thin `logging.LoggerAdapter` over a standard logger, so handlers, formatters and
levels stay the standard library's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Any

from accel.context import Context
from accel.errors import IncompatibleOptionsError, InvalidArgumentError
from accel.runtime.process import wait_for_everyone
from accel.validation import check_context, check_type, fail

LOG_LEVEL_VARIABLE = "ACCEL_LOG_LEVEL"


class RankLoggerAdapter(logging.LoggerAdapter):
    """A logger whose calls take `main_process_only` and `in_order` (see `get_logger`)."""

    def __init__(self, logger: logging.Logger, ctx: Context):
        super().__init__(logger, {"rank": ctx.rank, "world_size": ctx.world_size})
        self.ctx = ctx

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        if self.ctx.is_distributed:
            msg = f"[rank {self.ctx.rank}] {msg}"
        return msg, kwargs

    def log(self, level: int, msg: Any, *args: Any, main_process_only: bool | None = None,
            in_order: bool = False, **kwargs: Any) -> None:
        """Log on rank 0 only (default), on every rank (`main_process_only=False`), or on
        every rank in rank order with a barrier between turns (`in_order=True`; every rank
        must make the call)."""
        if in_order and main_process_only:
            raise IncompatibleOptionsError(
                "in_order=True makes every rank log in turn, which contradicts "
                "main_process_only=True; drop main_process_only"
            )
        # Point the record's file/line at the caller, past this method.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        if not in_order:
            if (main_process_only is False or self.ctx.is_main_process) \
                    and self.isEnabledFor(level):
                msg, kwargs = self.process(msg, kwargs)
                self.logger.log(level, msg, *args, **kwargs)
            return
        for turn in range(self.ctx.world_size):
            if turn == self.ctx.rank and self.isEnabledFor(level):
                msg, kwargs = self.process(msg, kwargs)
                self.logger.log(level, msg, *args, **kwargs)
                _flush(self.logger)
            # Barriers even when this rank's level filters the message out: the others wait.
            wait_for_everyone(self.ctx)


def _flush(logger: logging.Logger) -> None:
    """Flush every handler the record went through, so output order follows rank order."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            handler.flush()
        current = current.parent if current.propagate else None


def get_logger(name: str, ctx: Context, level: int | str | None = None) -> RankLoggerAdapter:
    """A logger for `name` that logs on rank 0 only unless told otherwise per call.

    Each call takes `main_process_only=False` (log on every rank) or `in_order=True` (every
    rank logs, one after another). With world size > 1 messages start with "[rank N]", and
    records carry `rank` and `world_size` for formatters.

    Args:
        level: set the logger's level ("INFO", "debug", 20); default: the environment
            variable ACCEL_LOG_LEVEL if set, else the logger's level is left as is.

    Raises:
        InvalidArgumentError: an unknown level name.

    >>> logger = accel.get_logger(__name__, ctx)
    >>> logger.info("epoch %d", epoch)                       # rank 0 only
    >>> logger.info("my shard: %d", n, in_order=True)         # every rank, in order
    """
    check_type("get_logger", "name", name, str, "a logger name (str), e.g. __name__")
    check_context("get_logger", ctx)
    if isinstance(level, bool) or not isinstance(level, (int, str, type(None))):
        fail("get_logger", "level", level, "a level name ('INFO'), a number (20) or None")
    logger = logging.getLogger(name)
    chosen = level if level is not None else os.environ.get(LOG_LEVEL_VARIABLE) or None
    if chosen is not None:
        logger.setLevel(_level_number(chosen))
    return RankLoggerAdapter(logger, ctx)


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    if level.strip().isdigit():
        return int(level)
    number = logging.getLevelName(level.strip().upper())  # a name gives its number
    if not isinstance(number, int):
        raise InvalidArgumentError(
            f"unknown log level {level!r} (from the argument or {LOG_LEVEL_VARIABLE}); use "
            "DEBUG, INFO, WARNING, ERROR, CRITICAL or a number"
        )
    return number

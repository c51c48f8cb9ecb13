"""Work a process still runs in the background, which `shutdown` waits for first.

A service that starts such work (an `accel.checkpoint` save with blocking=False)
registers a function that waits for it; `accel.shutdown` calls every one before the
process group goes away (the work's collectives need it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_waiters: list[Callable[[], object]] = []
_lock = threading.Lock()


def register(wait: Callable[[], object]) -> None:
    """Have `shutdown` call `wait` (once registered, until unregistered)."""
    with _lock:
        if wait not in _waiters:
            _waiters.append(wait)


def unregister(wait: Callable[[], object]) -> None:
    with _lock:
        if wait in _waiters:
            _waiters.remove(wait)


def wait_all() -> None:
    """Call every registered waiter; the first error is raised after all have run."""
    with _lock:
        waiters = list(_waiters)
    error = None
    for wait in waiters:
        try:
            wait()
        except Exception as exc:  # noqa: BLE001 - the others still get to finish
            error = error or exc
    if error is not None:
        raise error

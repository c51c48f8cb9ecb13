"""Saves that write in the background: `save_state(..., blocking=False)`.

The state is staged first (see `accel.checkpoint.snapshot.stage`), then a thread writes,
checksums and commits it exactly as a blocking save does (temporary folder, fsync,
atomic rename). Its collectives (the ranks' agreement, torch.distributed.checkpoint's
planning) run on a second process group of the same ranks (gloo, made once per
group), so they never interleave with the training's collectives on the first one.

With `staging="overlap"` the stepped tensors are copied by the thread itself, before it
writes, while training runs its next forward and backward; a hook before every torch
optimizer step (registered once per process) holds the step until those copies are made.

One save per process is in flight at a time: the next `save_state`, any `load_state`
and `accel.shutdown` wait for it first; its error, if it failed, is raised by the first
of them (and by every `AsyncSave.wait`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch.distributed as dist

from accel.context import Context
from accel.runtime import pending

#: (the group, its twin for background collectives) per process group in use.
_TWINS: list[tuple[Any, Any]] = []
_lock = threading.Lock()
_in_flight: AsyncSave | None = None
#: clear while a background save has yet to copy tensors an optimizer step changes
_staged = threading.Event()
_staged.set()
_step_hook: list[Any] = []


class AsyncSave:
    """A save writing in the background; `save_state(..., blocking=False)` returns it.

    >>> handle = accel.save_state(folder, ctx, model=model, blocking=False)
    >>> ...                                    # train on; the files are being written
    >>> path = handle.wait()                   # on every rank: the committed checkpoint
    """

    def __init__(self, work: Callable[[], Path]):
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,),
                                        name="accel-checkpoint-save")

    def _run(self, work: Callable[[], Path]) -> None:
        try:
            self._result = work()
        except BaseException as exc:  # noqa: BLE001 - raised again by wait()
            self._error = exc

    def done(self) -> bool:
        """Whether the writing has finished (successfully or not); never blocks."""
        return not self._thread.is_alive()

    def staged(self) -> bool:
        """Whether the state is copied, so that nothing training does can change what is
        written (with staging="copy": from the start; "overlap": once the background has
        copied what optimizer steps change); never blocks."""
        return self.done() or _staged.is_set()

    def wait(self) -> Path:
        """Block until the checkpoint is committed; return its final path.

        Raises:
            the error the background save failed with (CheckpointSaveError, ...); the
            next save_state, load_state or shutdown raises it only if it comes first.
        """
        self._thread.join()
        _forget(self)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def __repr__(self) -> str:
        state = "writing" if not self.done() else ("failed" if self._error else "committed")
        return f"AsyncSave({state}{'' if self._result is None else f': {self._result}'})"


def start(work: Callable[[], Path], *, holds_steps: bool = False) -> AsyncSave:
    """Run `work` (the writing and committing of a staged save) in the background.

    `holds_steps`: every torch optimizer step waits until `work` calls
    `release_steps()` (its deferred copies are made).
    """
    global _in_flight
    if holds_steps:
        _hold_steps()
    handle = AsyncSave(work)
    with _lock:
        _in_flight = handle
    pending.register(wait_in_flight)
    handle._thread.start()
    return handle


def _hold_steps() -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _staged.clear()
    if not _step_hook:  # once per process; a no-op while nothing is held
        _step_hook.append(register_optimizer_step_pre_hook(_before_step))


def release_steps() -> None:
    """Let optimizer steps go on: the stepped tensors are copied (or failed to be)."""
    _staged.set()


def _before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    _staged.wait()


def wait_in_flight() -> Path | None:
    """Wait for this process's save in the background, if any; raise its error."""
    with _lock:
        handle = _in_flight
    if handle is None:
        return None
    return handle.wait()


def _forget(handle: AsyncSave) -> None:
    global _in_flight
    with _lock:
        if _in_flight is handle:
            _in_flight = None
            pending.unregister(wait_in_flight)


def background_context(ctx: Context) -> Context:
    """`ctx` with its process group replaced by a twin for the background's collectives.

    Made (collectively, on every rank of `ctx.group`) the first time a group saves in
    the background; a single process needs none.
    """
    if not ctx.is_distributed:
        return ctx
    group = ctx.group if ctx.group is not None else dist.group.WORLD
    for known, twin in _TWINS:
        if known is group:
            return attrs.evolve(ctx, group=twin)
    twin = dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo",
                          timeout=ctx.timeout, use_local_synchronization=True)
    _TWINS.append((group, twin))
    return attrs.evolve(ctx, group=twin)

"""Temporary folders of saves in progress: who owns one, when it is stale, and the swap.

A save writes into a temporary folder beside its target, ``STEM.tmp-HOST-PID-ID``
(HOST and PID: the process that made it, rank 0 of the saving world), which every
reader ignores. Cleanup removes the temporary folders of the checkpoint (or
`CheckpointFolder`) being saved only, and of those only the stale ones:

- made on this host by a process that is gone, or by this very process but no save of
  it writes there any more (an interrupted save);
- otherwise (made on another host sharing the filesystem, or named without an owner:
  by an older accel, or by hand) once nothing in it changed for `STALE_AFTER` seconds.

So a save in progress elsewhere is never taken for an abandoned one; a process id
reused by an unrelated process only delays the cleanup until the age bound.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from accel.checkpoint.files import METADATA, TMP_MARK, fsync_dirs, fsync_path, is_complete

#: seconds after which a temporary folder whose owner cannot be checked counts as abandoned.
STALE_AFTER = 24 * 3600.0
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_OWNER = re.compile(r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{12}")
#: the temporary folders this process is writing now: never stale.
_ACTIVE: set[Path] = set()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def tmp_name(final: Path) -> Path:
    """A fresh temporary name beside `final`, owned by this process (nothing is created)."""
    return final.with_name(f"{final.name}{TMP_MARK}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def new_staging(final: Path) -> Path:
    """Create the temporary folder a save of `final` writes into (not stale while it saves)."""
    path = tmp_name(final)
    path.mkdir()
    _ACTIVE.add(path)
    return path


def finish(path: Path, *, remove: bool) -> None:
    """A save is over with its temporary folder `path`; `remove`: delete what is left there."""
    if remove:
        shutil.rmtree(path, ignore_errors=True)
    _ACTIVE.discard(path)


def is_stale(path: Path) -> bool:
    """Whether the temporary folder `path` is abandoned, by the rule in this module's doc."""
    if path in _ACTIVE:
        return False
    owner = _OWNER.fullmatch(path.name.partition(TMP_MARK)[2])
    if owner is not None and owner["host"] == _HOST:
        pid = int(owner["pid"])
        return pid == os.getpid() or not _alive(pid)
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER
    except FileNotFoundError:  # removed meanwhile
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temporaries(parent: Path, owns: Callable[[str], bool]) -> list[Path]:
    """The temporary folders in `parent` whose stem (the name before `TMP_MARK`) `owns`."""
    if not parent.is_dir():
        return []
    found = []
    for path in parent.iterdir():
        stem, mark, _ = path.name.partition(TMP_MARK)
        if mark and owns(stem) and path.is_dir():
            found.append(path)
    return found


def remove_stale(parent: Path, owns: Callable[[str], bool], *, keep_complete: bool) -> None:
    """Delete the stale temporary folders of `owns` in `parent`.

    Args:
        keep_complete: spare those holding a complete checkpoint (what a save killed in
            the middle of replacing a checkpoint leaves: see `survivors`).
    """
    for path in temporaries(parent, owns):
        if is_stale(path) and not (keep_complete and is_complete(path)):
            shutil.rmtree(path, ignore_errors=True)


def survivors(final: Path) -> list[Path]:
    """Complete checkpoints left beside `final` by a save interrupted while replacing it,
    newest first."""
    found = [path for path in temporaries(final.parent, final.name.__eq__) if is_complete(path)]
    return sorted(found, key=_created, reverse=True)


def _created(path: Path) -> str:
    """When the checkpoint in `path` was saved (ISO 8601, UTC: sorts as text)."""
    return str(json.loads((path / METADATA).read_bytes()).get("created", ""))


def swap_in(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` at `target`; an older `target` is then deleted.

    Where the system can (Linux renameat2), the two names are exchanged in one step, so
    `target` always names a complete checkpoint. Elsewhere the old one is renamed aside
    first: a crash between the two renames leaves both complete beside `target`, where
    `survivors` finds them and cleanup spares them until a new one is in place.
    """
    fsync_dirs(staging)
    if target.exists() and _exchange(staging, target):
        fsync_path(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # the old checkpoint, now under that name
        return
    aside = tmp_name(target) if target.exists() else None
    if aside is not None:
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_path(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two names atomically; False where the system or filesystem cannot."""
    rename = _renameat2()
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
              _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # e.g. NFS: the two-rename path
    raise OSError(code, os.strerror(code), str(second))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not glibc >= 2.28 / not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function

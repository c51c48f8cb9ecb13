"""A folder of numbered checkpoints: automatic numbering, `total_limit` rotation, `latest`.

Everything is computed from the directory itself, never from a counter in memory or a
``latest`` symlink: a checkpoint exists once its final name does (the name appears by an
atomic rename after every file is on disk), the next number follows the highest one
present, and a half-written save (a ``*.tmp-*`` directory) is never counted.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import attrs

from accel.checkpoint.files import TMP_MARK, fsync_path, tmp_path
from accel.errors import InvalidArgumentError

METADATA = "accel.json"


def _to_path(value: str | Path) -> Path:
    return Path(value)


@attrs.frozen
class CheckpointFolder:
    """Where numbered checkpoints go: ``root/checkpoint_000001``, ``checkpoint_000002``, ...

    Pass it to `save_state` instead of a path to save the next number, keeping only the
    newest `total_limit` (None: all); pass it to `load_state` to load the newest. The
    numbering continues from what is on disk, so a resumed run never restarts it.

    >>> folder = accel.CheckpointFolder("runs/exp1", total_limit=2)
    >>> if folder.latest() is not None:
    ...     info = accel.load_state(folder, ctx, model=model, optimizer=optimizer)
    >>> accel.save_state(folder, ctx, model=model, optimizer=optimizer)
    """

    root: Path = attrs.field(converter=_to_path)
    total_limit: int | None = None
    prefix: str = "checkpoint_"

    def __attrs_post_init__(self) -> None:
        if self.total_limit is not None and (
                not isinstance(self.total_limit, int) or self.total_limit < 1):
            raise InvalidArgumentError(
                f"CheckpointFolder(total_limit={self.total_limit!r}) must be a positive int "
                "(the number of newest checkpoints to keep) or None to keep all")
        if not re.fullmatch(r"[A-Za-z0-9_.-]*", self.prefix) or TMP_MARK in self.prefix:
            raise InvalidArgumentError(
                f"CheckpointFolder(prefix={self.prefix!r}) may hold letters, digits, '_', "
                f"'-' and '.' only, and not {TMP_MARK!r}")

    def name(self, number: int) -> str:
        return f"{self.prefix}{number:06d}"

    def number_of(self, path: Path) -> int | None:
        """The number in a checkpoint's directory name; None if it is not one of ours."""
        match = re.fullmatch(re.escape(self.prefix) + r"(\d+)", path.name)
        return int(match.group(1)) if match else None

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(self.number_of(path), path) for path in self.root.iterdir()]
        complete = [(number, path) for number, path in found
                    if number is not None and (path / METADATA).is_file()]
        return [path for _, path in sorted(complete)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none yet."""
        found = self.checkpoints()
        return found[-1] if found else None

    def next_path(self) -> Path:
        """Where the next save goes: one past the highest number present."""
        numbers = [self.number_of(path) for path in self.root.iterdir()] if (
            self.root.is_dir()) else []
        highest = max((number for number in numbers if number is not None), default=0)
        return self.root / self.name(highest + 1)

    def rotate(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond `total_limit`; return them."""
        if self.total_limit is None:
            return []
        doomed = self.checkpoints()[:-self.total_limit]
        for path in doomed:
            remove_atomically(path)
        return doomed


def remove_partial(parent: Path, stem: str | None = None) -> None:
    """Delete temporary directories left by interrupted saves (of `stem` only, if given)."""
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        name, mark, _ = path.name.partition(TMP_MARK)
        if mark and path.is_dir() and (stem is None or name == stem):
            shutil.rmtree(path, ignore_errors=True)


def remove_atomically(path: Path) -> None:
    """Rename to a temporary name first, so a crash mid-delete leaves no half checkpoint."""
    doomed = tmp_path(path)
    path.rename(doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)

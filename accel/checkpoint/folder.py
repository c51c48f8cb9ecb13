"""A folder of numbered checkpoints: automatic numbering, `total_limit` rotation, `latest`.

Everything is computed from the directory itself, never from a counter in memory or a
``latest`` symlink, so several jobs may save into one folder. A save is written under a
temporary name (see `accel.checkpoint.staging`) and gets its number when it is complete:
the finished folder is renamed to one past the highest number present, and a rename onto
a number that exists fails (a directory is only ever renamed onto a missing or empty
one), so the next number is tried: no number is handed out twice, and a numbered folder
is never one being filled. A checkpoint counts once every file its accel.json lists is
there with its recorded size; temporary folders are never counted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import attrs

from accel.checkpoint.files import METADATA, TMP_MARK, fsync_path, is_complete
from accel.checkpoint.staging import remove_stale, tmp_name
from accel.validation import check_int, check_type, fail

__all__ = ["METADATA", "CheckpointFolder"]


def _to_path(value: str | Path) -> Path:
    check_type("CheckpointFolder", "root", value, (str, os.PathLike),
               "a folder path (str or os.PathLike)")
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
        # total_limit: the number of newest checkpoints to keep, None to keep all
        check_int("CheckpointFolder", "total_limit", self.total_limit, minimum=1,
                  optional=True)
        allowed = f"a str of letters, digits, '_', '-' and '.' without {TMP_MARK!r}"
        check_type("CheckpointFolder", "prefix", self.prefix, str, allowed)
        if not re.fullmatch(r"[A-Za-z0-9_.-]*", self.prefix) or TMP_MARK in self.prefix:
            fail("CheckpointFolder", "prefix", self.prefix, allowed, wrong_type=False)

    def name(self, number: int) -> str:
        return f"{self.prefix}{number:06d}"

    def number_of(self, path: Path) -> int | None:
        """The number in a checkpoint's directory name; None if it is not one of ours."""
        match = re.fullmatch(re.escape(self.prefix) + r"(\d+)", path.name)
        return int(match.group(1)) if match else None

    def numbered(self) -> list[Path]:
        """Every folder named like a checkpoint of this folder, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(number, path) for path in self.root.iterdir()
                 if (number := self.number_of(path)) is not None]
        return [path for _, path in sorted(found)]

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        return [path for path in self.numbered() if is_complete(path)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none yet."""
        return next((path for path in reversed(self.numbered()) if is_complete(path)), None)

    def next_path(self) -> Path:
        """Where the next save goes: one past the highest number present (another job
        saving into this folder at the same time may take it first)."""
        found = self.numbered()
        return self.root / self.name(self.number_of(found[-1]) + 1 if found else 1)

    @property
    def staging(self) -> Path:
        """What a save in progress is named after (with a temporary mark): ``PREFIXnew``."""
        return self.root / f"{self.prefix}new"

    def owns(self, stem: str) -> bool:
        """Whether a temporary folder named ``STEM.tmp-...`` is one of this folder's saves
        (``PREFIXnew``) or of its rotation (``PREFIX000003``)."""
        return stem == self.staging.name or self.number_of(Path(stem)) is not None

    def commit(self, staging: Path, *, number: int | None = None) -> Path:
        """Give the finished folder `staging` the next free number (or exactly `number`:
        the one every node of a node-local save agreed on); return its final path.

        Raises:
            OSError: the rename failed otherwise (a full disk, a read-only folder), or
                `number` is taken.
        """
        while True:
            final = self.next_path() if number is None else self.root / self.name(number)
            try:
                os.rename(staging, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or number is not None:
                    raise
                continue  # another job took this number first
            fsync_path(self.root)
            return final

    def rotate(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond `total_limit`; return them."""
        if self.total_limit is None:
            return []
        doomed = self.checkpoints()[:-self.total_limit]
        for path in doomed:
            remove_atomically(path)
        return doomed

    def clean(self) -> None:
        """Delete this folder's stale temporary folders (see `accel.checkpoint.staging`)."""
        remove_stale(self.root, self.owns, keep_complete=False)


def remove_atomically(path: Path) -> None:
    """Rename to a temporary name first, so a crash mid-delete leaves no half checkpoint.

    A checkpoint another job's rotation removes at the same time is skipped.
    """
    doomed = tmp_name(path)
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return
    fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)

"""Checkpoints: exact resume (`save_state`/`load_state`), numbered folders, model export.

A checkpoint is a directory of safetensors and JSON files (no pickle), written
atomically: see `accel.checkpoint.common` for the layout.

>>> folder = accel.CheckpointFolder("runs/exp1", total_limit=2)
>>> accel.save_state(folder, ctx, model=model, optimizer=optimizer, loader=loader)
>>> info = accel.load_state(folder, ctx, model=model, optimizer=optimizer, loader=loader)
"""

from accel.checkpoint.background import AsyncSave
from accel.checkpoint.common import CheckpointInfo
from accel.checkpoint.export import load_model, save_model
from accel.checkpoint.folder import CheckpointFolder
from accel.checkpoint.load import load_state
from accel.checkpoint.parts import load_sharded_tensors
from accel.checkpoint.save import save_state
from accel.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CorruptCheckpointError,
)

__all__ = [
    "AsyncSave",
    "CheckpointFolder",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "load_model",
    "load_sharded_tensors",
    "load_state",
    "save_model",
    "save_state",
]

"""Checking and converting what users log: scalar metrics, steps, images, table cells.

Every tracker receives already-converted values (python numbers, uint8 numpy images), so
a bad value fails the same way, on every rank, before any backend sees it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from accel.errors import InvalidArgumentError


def to_scalar(name: str, value: Any) -> float | int:
    """A python int or float from a number, a numpy scalar or a 0-d tensor.

    Raises:
        InvalidArgumentError: for tensors or arrays with dimensions, strings, None.
    """
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.ndim != 0:
            raise InvalidArgumentError(
                f"metric {name!r} is a {type(value).__name__} of shape {tuple(value.shape)}; "
                "metrics must be scalars: log a 0-d tensor, `.item()`, or a reduction such "
                "as `.mean()`"
            )
        value = value.item()
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise InvalidArgumentError(
        f"metric {name!r} is {value!r} of type {type(value).__name__}; metrics must be "
        "numbers (int, float, a numpy scalar or a 0-d tensor)"
    )


def check_step(step: Any) -> int:
    """`step` as an int >= 0, or a clear error."""
    if isinstance(step, torch.Tensor) and step.ndim == 0:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise InvalidArgumentError(
            f"step must be an int >= 0 (the x axis of every chart), got {step!r}"
        )
    return int(step)


def to_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """Check names and convert every value with `to_scalar`."""
    if not isinstance(metrics, Mapping) or not metrics:
        raise InvalidArgumentError(
            f"metrics must be a non-empty dict of name -> number, got {metrics!r}"
        )
    return {_check_name(name, "metric"): to_scalar(name, value)
            for name, value in metrics.items()}


def to_images(images: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Convert each image to a uint8 numpy array of shape (H, W) or (H, W, C), C in 1, 3, 4.

    Float images are taken to be in [0, 1]; tensors are moved to the CPU. Channels come
    last (numpy, PIL, matplotlib); a CHW tensor needs `.permute(1, 2, 0)` first.
    """
    if not isinstance(images, Mapping) or not images:
        raise InvalidArgumentError(
            f"images must be a non-empty dict of name -> array, got {type(images).__name__}"
        )
    return {_check_name(name, "image"): _to_uint8_image(name, image)
            for name, image in images.items()}


def _to_uint8_image(name: str, image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy() if image.is_floating_point() \
            else image.detach().cpu().numpy()
    array = np.asarray(image)
    channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if not channels_ok:
        hint = " (a CHW tensor? use image.permute(1, 2, 0))" \
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        raise InvalidArgumentError(
            f"image {name!r} has shape {array.shape}; expected (H, W) or (H, W, C) with C "
            f"in 1, 3, 4{hint}"
        )
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.dtype == np.uint8:
        return array
    raise InvalidArgumentError(
        f"image {name!r} has dtype {array.dtype}; use uint8 (0-255) or floats in [0, 1]"
    )


def to_table(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
             ) -> tuple[list[str], list[list[Any]]]:
    """Check a table's shape and convert its cells to str, int or float."""
    _check_name(name, "table")
    columns = list(columns)
    if not columns or not all(isinstance(column, str) for column in columns):
        raise InvalidArgumentError(
            f"table {name!r} needs a non-empty list of column names (str), got {columns!r}"
        )
    converted = []
    for index, row in enumerate(rows):
        row = list(row)
        if len(row) != len(columns):
            raise InvalidArgumentError(
                f"row {index} of table {name!r} has {len(row)} cells but there are "
                f"{len(columns)} columns {columns}"
            )
        converted.append([cell if isinstance(cell, str) else to_scalar(f"{name}[{index}]", cell)
                          for cell in row])
    return columns, converted


def _check_name(name: Any, kind: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"{kind} names must be non-empty strings, got {name!r}")
    return name

"""The sample dimension of a collated batch: its length, slices, concatenation, skeleton.

A batch is any nesting of mappings, lists and tuples whose per-sample leaves are tensors
(dim 0 is the sample) or lists of plain values (what `default_collate` makes of strings).
Any other leaf (a number, a string, None) describes the whole batch and is kept as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from accel.errors import UnsupportedError
from accel.runtime.ops import recursively_apply

_PLAIN = (str, bytes, int, float, bool, complex, type(None))


def is_sample_list(value: Any) -> bool:
    """Whether `value` is a per-sample list of plain values (collated strings, ids)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, _PLAIN) for v in value)


def map_samples(fn: Callable[[Any], Any], batch: Any) -> Any:
    """Apply `fn` to every per-sample leaf (tensor or sample list); keep everything else.

    A 0-d tensor describes the whole batch, not a sample: it is kept.
    """
    if isinstance(batch, torch.Tensor) and batch.dim() > 0 or is_sample_list(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild(batch, {k: map_samples(fn, v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return _rebuild(batch, [map_samples(fn, v) for v in batch])
    return batch


def sample_leaves(batch: Any) -> list[Any]:
    """Every per-sample leaf, in a fixed order."""
    leaves: list[Any] = []
    map_samples(lambda leaf: leaves.append(leaf), batch)
    return leaves


def batch_length(batch: Any) -> int:
    """Samples in `batch`: dim 0 of its tensors, the length of its sample lists.

    Raises:
        UnsupportedError: no per-sample leaf, or leaves of different lengths.
    """
    lengths = {len(leaf) for leaf in sample_leaves(batch)}
    if len(lengths) != 1:
        found = sorted(lengths) if lengths else "no tensors or sample lists"
        raise UnsupportedError(
            f"cannot split a batch of type {type(batch).__name__} by sample: its sample "
            f"lengths are {found}; batches must hold tensors (or lists of plain values) "
            "whose first dimension is the sample"
        )
    return lengths.pop()


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples [start, stop) of every per-sample leaf (views of tensors)."""
    return map_samples(lambda leaf: leaf[start:stop], batch)


def concat_batches(batches: list[Any]) -> Any:
    """The batches' samples one after another, leaf by leaf (structures must match)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches, dim=0) if first.dim() else first
    if is_sample_list(first):
        return [value for batch in batches for value in batch]
    if isinstance(first, Mapping):
        return _rebuild(first, {k: concat_batches([b[k] for b in batches]) for k in first})
    if isinstance(first, (list, tuple)):
        return _rebuild(first, [concat_batches([b[i] for b in batches])
                                for i in range(len(first))])
    return first


@attrs.frozen
class TensorSpec:
    """What a receiving rank allocates before a broadcast fills it."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def skeleton(batch: Any) -> Any:
    """`batch` with every tensor replaced by its TensorSpec (small, picklable)."""
    return recursively_apply(lambda t: TensorSpec(tuple(t.shape), t.dtype), batch)


def allocate(spec_tree: Any, device: torch.device) -> Any:
    """Empty tensors where `skeleton` left TensorSpecs."""
    if isinstance(spec_tree, TensorSpec):
        return torch.empty(spec_tree.shape, dtype=spec_tree.dtype, device=device)
    if isinstance(spec_tree, Mapping):
        return _rebuild(spec_tree, {k: allocate(v, device) for k, v in spec_tree.items()})
    if isinstance(spec_tree, (list, tuple)):
        return _rebuild(spec_tree, [allocate(v, device) for v in spec_tree])
    return spec_tree


def _rebuild(original: Any, items: Any) -> Any:
    """A container of `original`'s type holding `items` (namedtuples, dict subclasses)."""
    if isinstance(original, Mapping):
        try:
            return type(original)(items)
        except TypeError:
            return dict(items)
    if isinstance(original, tuple) and hasattr(original, "_fields"):
        return type(original)(*items)
    return type(original)(items)

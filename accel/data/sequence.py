"""Cutting a batch's sequences for context parallelism (accel.context_parallel).

Every sequence is split into 2n chunks for n cp ranks, and rank r keeps chunks r and
2n-1-r (head-tail: with causal attention every rank then does the same work). What has
to see the whole sequence happens before the cut: the labels are shifted (a rank's last
token predicts the next rank's first), the position ids are laid out, and the tokens
that count for the loss are counted over the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from accel.errors import InvalidArgumentError, UnsupportedError

IGNORE_INDEX = -100


def cut_sequences(batch: Any, cp_rank: int, cp_size: int) -> dict[str, Any]:
    """This cp rank's slice of a transformers-style dict batch (see the module docstring).

    Returns the batch with `input_ids` (and any other (batch, sequence, ...) tensor) cut,
    `position_ids` added before the cut, `labels` replaced by `shift_labels` cut (and
    `labels` kept, cut, so models still compute a loss) and `num_items_in_batch`: the
    number of label tokens of the whole batch, so each rank's summed loss is its part
    of the batch's mean.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise UnsupportedError(
            "under context_parallel the loader must yield dict batches with 'input_ids' "
            f"(and 'labels'), as transformers models take them; got {type(batch).__name__}")
    batch = dict(batch)
    input_ids = batch["input_ids"]
    length = input_ids.shape[1]
    _check_length(length, cp_size)
    _drop_full_attention_mask(batch)
    if "position_ids" not in batch:
        positions = torch.arange(length, device=input_ids.device)
        batch["position_ids"] = positions.expand(input_ids.shape[0], length)
    if batch.get("labels") is not None:
        labels = batch["labels"]
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        batch["shift_labels"] = shifted
        batch["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum()
    return {key: _cut(value, length, cp_rank, cp_size) for key, value in batch.items()}


def _check_length(length: int, cp_size: int) -> None:
    if length % (2 * cp_size):
        raise InvalidArgumentError(
            f"context_parallel over {cp_size} ranks cuts each sequence into {2 * cp_size} "
            f"equal chunks, but the sequences have {length} tokens; pad or truncate them "
            f"to a multiple of {2 * cp_size}")


def _drop_full_attention_mask(batch: dict[str, Any]) -> None:
    mask = batch.get("attention_mask")
    if mask is None:
        return
    if not bool(mask.all()):
        raise UnsupportedError(
            "context_parallel trains on full-length sequences, but this batch's "
            "attention_mask hides padding; pack the data into full sequences")
    del batch["attention_mask"]  # all ones: the causal ring needs no mask


def _cut(value: Any, length: int, cp_rank: int, cp_size: int) -> Any:
    if not (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length):
        return value
    chunks = value.chunk(2 * cp_size, dim=1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=1)

"""transformers' `from_pretrained` under `accel.deepspeed_init`: ZeRO-3 without `accelerate`.

transformers decides how to build and load a model by asking
`transformers.integrations.deepspeed.is_deepspeed_zero3_enabled()`, which answers from a
weak reference that `set_hf_deepspeed_config(obj)` stores; `obj` needs `is_zero3()` and
`config` (the DeepSpeed config dict that transformers hands to its own zero.Init).
transformers' `HfDeepSpeedConfig` subclasses accelerate's class and checks accelerate's
version, so accel registers a small object of its own instead, for the duration of the
`deepspeed_init` block (the previous registration comes back after it).

Inside the block, `from_pretrained` then takes transformers' ZeRO-3 path: the model is
built under zero.Init (partitioned as it is created), rank 0 reads the checkpoint whole
and each module's parameters are gathered, filled from rank 0 and partitioned again.
`accel.load_pretrained` on a model built in the block reads each rank's own partition
instead (no rank reads a whole tensor).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class _Zero3Config:
    """What transformers reads from a registered DeepSpeed config."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def is_zero3(self) -> bool:
        return self.config.get("zero_optimization", {}).get("stage") == 3

    def is_offload(self) -> bool:
        zero = self.config.get("zero_optimization", {})
        return any(zero.get(key, {}).get("device") in ("cpu", "nvme")
                   for key in ("offload_param", "offload_optimizer"))


@contextlib.contextmanager
def registered_with_transformers(config: dict[str, Any]) -> Iterator[None]:
    """Let transformers (when it is imported) see `config` as the ZeRO-3 config in force."""
    if "transformers" not in sys.modules:  # a model without transformers: nothing to tell
        yield
        return
    from transformers.integrations import deepspeed as hf

    link = getattr(hf, "_hf_deepspeed_config_weak_ref", None)
    previous = link() if link is not None else None
    current = _Zero3Config(config)  # alive until the block ends: transformers holds a weak ref
    hf.set_hf_deepspeed_config(current)
    try:
        yield
    finally:
        if previous is not None:
            hf.set_hf_deepspeed_config(previous)
        else:
            hf.unset_hf_deepspeed_config()
        del current

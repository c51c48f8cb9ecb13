"""`accel merge-weights CKPT OUT`: a (sharded) checkpoint's model weights as safetensors.

Runs in one process, without a process group: a sharded checkpoint saved by any number
of ranks is read through `accel.checkpoint.load_sharded_tensors` one output shard at a
time (the reader fetches only the byte ranges it needs), so memory stays near
`--max-shard-size`. A plain torch.distributed.checkpoint folder keeps its metadata in a
pickle, read only with `--trust-pickle`. The weight files are written into OUT as
`save_model` writes them: the other files there stay.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from accel.checkpoint.files import output_folder
from accel.checkpoint.parts import load_sharded_tensors, sharded_tensor_specs
from accel.checkpoint.weights import (
    TensorSpec,
    WeightFiles,
    own_weight_file,
    plan_shards,
    write_safetensors_shards,
)
from accel.errors import InvalidArgumentError
from accel.inference.memory import parse_size

DCP_METADATA = ".metadata"  # the file torch.distributed.checkpoint writes beside its shards
HF_DCP_SHARDS = "shard-*-model-*.safetensors"  # what dcp.HuggingFaceStorageWriter writes
ACCEL_MANIFEST = "accel.json"
# Top-level keys under which a training checkpoint keeps optimizer state.
_OPTIMIZER_PREFIXES = ("optimizer.", "optim.")


def add_parser(subparsers: Any) -> None:
    """Register `accel merge-weights` on the `accel` command line."""
    parser = subparsers.add_parser(
        "merge-weights",
        help="write a checkpoint's model weights as (sharded) safetensors",
        description="Merge the model weights of an accel checkpoint, or of a "
                    "torch.distributed.checkpoint folder saved on any number of ranks, into "
                    "safetensors files that transformers' from_pretrained and accel.load_model "
                    "read. Runs in one process. The files are written into OUTPUT; other "
                    "files there (a tokenizer, a README) stay.",
    )
    parser.add_argument("checkpoint", help="an accel checkpoint folder (with accel.json), a "
                                           "weights folder or file, or a "
                                           "torch.distributed.checkpoint folder")
    parser.add_argument("output", help="the folder to write the weights into (created if "
                                       "absent; weight files of an earlier export there are "
                                       "replaced, other files stay)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file (default: 5GB)")
    parser.add_argument("--prefix", default="",
                        help="only tensors whose names start with this, with it removed: "
                             "'model.' for a DCP folder saved as {'model': ..., 'optimizer': ...}")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read a plain torch.distributed.checkpoint folder, whose .metadata "
                             "is a pickle that can run any code: only if you trust its author")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """`accel merge-weights CKPT OUT [--max-shard-size 5GB] [--prefix P] [--trust-pickle]`."""
    files = merge_weights(args.checkpoint, args.output, max_shard_size=args.max_shard_size,
                          prefix=args.prefix, trust_pickle=args.trust_pickle)
    print(f"wrote {len(files)} files to {args.output}: {', '.join(files)}")
    return 0


def merge_weights(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], *,
                  max_shard_size: int | str = "5GB", prefix: str = "",
                  trust_pickle: bool = False) -> list[str]:
    """Write the model weights of `checkpoint` into `output` as save_model does.

    Args:
        trust_pickle: also read a plain torch.distributed.checkpoint folder (see
            `accel.checkpoint.load_sharded_tensors`).

    Returns:
        The names of the files written, sorted.

    Raises:
        InvalidArgumentError: `output` is `checkpoint`'s folder or inside it, or no
            tensors match.
        UntrustedCheckpointError: a plain DCP folder without trust_pickle=True.

    >>> merge_weights("checkpoints/checkpoint_3", "export/", max_shard_size="2GB")
    """
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise InvalidArgumentError(f"--max-shard-size must be > 0, got {max_shard_size!r}")
    source, target = Path(checkpoint), Path(output)
    sharded = _dcp_folder(source)
    if sharded is not None:
        specs, fetch = _dcp_source(sharded, prefix, max_bytes, trust_pickle)
    else:
        specs, fetch = _weights_source(_weights_path(source), prefix)
    if not specs:
        raise InvalidArgumentError(f"{source} holds no tensors whose names start with {prefix!r}")
    _check_outside(source, target)
    records = write_safetensors_shards(specs, fetch, output_folder(target),
                                       max_shard_size=max_bytes)
    return sorted(records)


def _check_outside(source: Path, target: Path) -> None:
    # Written there, the new files would overwrite or (as an earlier export's) remove the
    # checkpoint's own files, or be taken for its shards. Beside a lone weights file is
    # fine unless it has a name merge-weights writes (pytorch_model.bin -> . converts).
    real, out = source.resolve(), target.resolve()
    if source.is_file():
        clash = out == real.parent and own_weight_file(real.name)
    else:
        clash = out == real or real in out.parents
    if clash:
        raise InvalidArgumentError(
            f"the output {target} is the checkpoint {source}, inside it, or the folder of "
            "that weights file: writing there would overwrite or remove the checkpoint's "
            "files; choose an output folder outside the checkpoint")


def _dcp_folder(source: Path) -> Path | None:
    """The torch.distributed.checkpoint folder inside `source`, if it is or holds one."""
    if (source / ACCEL_MANIFEST).is_file() and (source / "model").is_dir():
        source = source / "model"  # accel's sharded layout: DCP with safetensors shards
    if (source / DCP_METADATA).is_file() or (source.is_dir() and any(source.glob(HF_DCP_SHARDS))):
        return source
    return None


def _weights_path(source: Path) -> Path:
    if source.exists():
        return source
    raise InvalidArgumentError(
        f"{source} does not exist; pass an accel checkpoint folder (with {ACCEL_MANIFEST}) "
        f"or a torch.distributed.checkpoint folder (with {DCP_METADATA})")


def _weights_source(path: Path, prefix: str) -> tuple[list[TensorSpec], Any]:
    """A checkpoint whose model is already whole (model.safetensors): re-sharded as is."""
    files = WeightFiles(path)
    specs = [files.spec(name)._replace(name=name[len(prefix):])
             for name in files.names if name.startswith(prefix)]
    return specs, lambda name: files.read(prefix + name)


def _dcp_source(path: Path, prefix: str, max_bytes: int, trust_pickle: bool
                ) -> tuple[list[TensorSpec], Any]:
    """Specs from the DCP metadata; tensors read one output shard at a time."""
    tensors = {key: spec for key, spec in sharded_tensor_specs(
        path, trust_pickle=trust_pickle).items() if key.startswith(prefix)}
    stray = [key for key in tensors if key.startswith(_OPTIMIZER_PREFIXES)]
    if stray:
        raise InvalidArgumentError(
            f"{path} holds optimizer state ({stray[0]}, ...) beside the model: pass "
            "--prefix with the model's key (usually 'model.') to merge the model alone")
    specs = [TensorSpec(key[len(prefix):], tuple(shape), dtype)
             for key, (shape, dtype) in tensors.items()]
    return specs, _ShardReader(path, prefix, plan_shards(specs, max_bytes), trust_pickle)


class _ShardReader:
    """fetch(name) for the writer: loads the whole output shard holding `name` at once."""

    def __init__(self, path: Path, prefix: str, shards: list[list[TensorSpec]],
                 trust_pickle: bool):
        self.path, self.prefix, self.shards = path, prefix, shards
        self.trust_pickle = trust_pickle
        self.shard_of = {spec.name: index for index, shard in enumerate(shards) for spec in shard}
        self.loaded: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.loaded:
            self.loaded = {}  # the previous shard is written: free it before reading the next
            keys = [self.prefix + spec.name for spec in self.shards[self.shard_of[name]]]
            self.loaded = {key[len(self.prefix):]: tensor
                           for key, tensor in load_sharded_tensors(
                               self.path, keys, trust_pickle=self.trust_pickle).items()}
        return self.loaded.pop(name)

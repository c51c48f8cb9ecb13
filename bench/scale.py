"""Scale by simulation: what one rank of an 8- to 8,192-rank job computes before it trains
and around a checkpoint, measured in one process with torch's fake process group.

    python bench/scale.py                   # 8, 64, 1024, 8192 ranks; 8 layers of Llama-3-8B
    python bench/scale.py --layers 32       # the whole 8B model (about 4x the time)
    python bench/scale.py --json scale.json # every figure, wall times too

For each size W this process is rank 0 of W (also the coordinator, which sees every
rank's plan) on the "fake" backend: collectives return at once, so each step's own CPU
time and memory are measured, not the network. The model: a transformers Llama on the
meta device with Llama-3-8B's widths and 8 of its 32 layers (75 tensors of 291; every
step works tensor by tensor, so the whole model costs about 4 times as much), in two
layouts: `fsdp` (FSDP2 over W) and `tp8xfsdp` (`accel.tensor_parallel` over 8, then
FSDP2 over W/8). Steps, in CPU seconds of this process (all threads: the machine's other
load does not count) and resident-memory growth (MB, freed memory returned to the OS
first, the step's result alive):

- `mesh`: `accel.mesh.build_device_mesh`; `shard`: tensor_parallel and
  `shard_model(strategy=accel.FSDP(keep_meta=True))` on a copy of the model.
- `save_local`: DCP's `DefaultSavePlanner` local plan, as each rank makes it in save_state.
- `save_global`: rank 0's global plan from all W plans, without DCP's validation of it,
  which `validate` measures alone (up to --validate-max; above, projected from the chunk
  pairs it compares, counted exactly: it is quadratic). Rank r's plan is rank 0's with
  r's chunk of each shard (torch's sharding rule, checked against torch's own function
  on sample ranks; not timed).
- `load_local` / `load_global`: `DefaultLoadPlanner`'s plans against that metadata.
- `barrier`: accel's store barrier (`bounded_barrier`'s keys) for W ranks on a real
  TCPStore, one rank after another: the store's serial work.

Bytes: each rank's plan (pickled, sent to rank 0), DCP's global metadata, rank 0's
safetensors shard header (accel saves with DCP's HuggingFace writer, which keeps no
global metadata: at load every rank reads all W headers), accel.json's file list.
k: value ~ W^k between neighbouring sizes. The model part only; AdamW's state part has
two tensors of each parameter's shape: twice these.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import ctypes
import gc
import itertools
import json
import math
import os
import pickle
import random
import sys
import time
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import default_planner
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Shard, _StridedShard

import accel
from accel.mesh import MeshLayout, build_device_mesh
from accel.testing import fake_world

SIZES = (8, 64, 1024, 8192)
TP = 8
#: Llama-3-8B's shapes.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * _PAGE


def _settle() -> None:
    gc.collect()
    try:  # give freed heap back to the OS, so RSS growth is the step's own
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(fn, *args) -> tuple[Any, dict[str, float]]:
    """fn's result; its CPU seconds (this process, every thread: what the step costs on an
    idle core, whatever else the machine runs), wall seconds, and resident-memory growth
    (MB) while the result is alive."""
    _settle()
    before = rss()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    print(f"  {fn.__name__}: {cpu:.3f} s CPU, {wall:.3f} s wall", file=sys.stderr, flush=True)
    return result, {"s": cpu, "wall_s": wall, "mb": (rss() - before) / 2**20}


# --- rank r's chunk of a DTensor: torch's sharding rule, on index runs -------------------

def _select(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Local positions [lo, hi) of an index set given as runs of global indices."""
    out, seen = [], 0
    for start, stop in runs:
        length = stop - start
        a, b = max(lo, seen), min(hi, seen + length)
        if a < b:
            out.append((start + a - seen, start + b - seen))
        seen += length
    return out


def chunk_of(shape: tuple[int, ...], mesh_shape: tuple[int, ...], coord: tuple[int, ...],
             placements: tuple[Any, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sizes, offsets) of the piece the rank at `coord` holds, as torch computes them."""
    local, runs = list(shape), {}
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, (Shard, _StridedShard)):  # Replicate: all of it
            continue
        dim, n, r = placement.dim, mesh_shape[mesh_dim], coord[mesh_dim]
        size, current = local[dim], runs.get(placement.dim, [(0, shape[placement.dim])])
        if isinstance(placement, _StridedShard):  # r's chunk of each of split_factor pieces
            first = -(-size // placement.split_factor)
            picked = []
            for piece in range(placement.split_factor):
                start, stop = min(first * piece, size), min(first * (piece + 1), size)
                step = -(-(stop - start) // n)
                picked += _select(current, start + min(step * r, stop - start),
                                  start + min(step * (r + 1), stop - start))
        else:
            step = -(-size // n)
            picked = _select(current, min(step * r, size), min(step * r + step, size))
        runs[dim], local[dim] = picked, sum(b - a for a, b in picked)
    offsets = [0] * len(shape)
    for dim, picked in runs.items():
        offsets[dim] = picked[0][0] if local[dim] else shape[dim]
    return tuple(local), tuple(offsets)


def plans_for_all_ranks(plan: Any, state: dict[str, Any], mesh: Any) -> list[Any]:
    """W local save plans: rank 0's, with each shard item moved to rank r's chunk."""
    mesh_shape = tuple(mesh.shape)
    coords = list(itertools.product(*map(range, mesh_shape)))  # row-major: rank order
    specs = {fqn: (tuple(t.shape), tuple(t.placements)) for fqn, t in state.items()
             if isinstance(t, DTensor)}
    _check_chunk_rule(specs, mesh_shape, coords)
    cache: dict[Any, tuple[torch.Size, torch.Size]] = {}
    plans = []
    for coord in coords:
        items = []
        for item in plan.items:
            spec = specs.get(item.index.fqn)
            if spec is None or item.type != WriteItemType.SHARD:
                items.append(copy.copy(item))  # replicated: the same on every rank
                continue
            key = (spec, coord)
            if key not in cache:
                sizes, offsets = chunk_of(spec[0], mesh_shape, coord, spec[1])
                cache[key] = torch.Size(sizes), torch.Size(offsets)
            sizes, offsets = cache[key]
            data = item.tensor_data
            # New objects for each rank, as the coordinator unpickles them.
            items.append(WriteItem(
                index=MetadataIndex(item.index.fqn, offsets), type=item.type,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                    properties=data.properties, size=data.size)))
        plans.append(SavePlan(items, storage_data=plan.storage_data,
                              planner_data=dict(plan.planner_data)))
    return plans


def _check_chunk_rule(specs: dict[str, Any], mesh_shape: tuple[int, ...],
                      coords: list[tuple[int, ...]]) -> None:
    """chunk_of agrees with torch's own function on the first, last and 6 random ranks."""
    picks = {0, len(coords) - 1, *random.Random(0).sample(range(len(coords)),
                                                          min(6, len(coords)))}
    for shape, placements in set(specs.values()):
        for index in picks:
            coord = coords[index]
            want = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord),
                                                          placements)
            got = chunk_of(shape, mesh_shape, coord, placements)
            if tuple(map(tuple, want)) != got:
                raise AssertionError(f"chunk rule differs from torch's at {coord} for "
                                     f"{shape} {placements}: {got} != {want}")


# --- the steps ----------------------------------------------------------------------------

def llama_on_meta(layers: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def shard(model: torch.nn.Module, ctx: accel.Context, tp: int) -> torch.nn.Module:
    if tp > 1:
        # The model stays on meta: tensor_parallel moves it to ctx.device, so say meta.
        meta_ctx = attrs.evolve(ctx, device=torch.device("meta"))
        model, meta_ctx = accel.tensor_parallel(model, meta_ctx, plan="auto")
        ctx = attrs.evolve(meta_ctx, device=ctx.device)
    model, _ = accel.shard_model(model, ctx, strategy=accel.FSDP(keep_meta=True))
    return model


def save_local(state: dict[str, Any]) -> tuple[Any, Any]:
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    return planner, planner.create_local_plan()


def save_global(planner: Any, plans: list[Any]) -> tuple[list[Any], Any]:
    """The global plan without its validation, which `validate` measures on its own."""
    validate = default_planner._validate_global_plan
    default_planner._validate_global_plan = lambda plan, metadata: []
    try:
        return planner.create_global_plan(plans)
    finally:
        default_planner._validate_global_plan = validate


def overlap_checks(metadata: Any) -> int:
    """How many chunk pairs DCP's validation compares: its sweep along each tensor's
    longest dimension, counted instead of run (chunks cut along a shorter dimension all
    overlap on the sweep's: every pair is compared)."""
    checks = 0
    for value in metadata.state_dict_metadata.values():
        chunks = getattr(value, "chunks", [])
        if len(chunks) < 2 or len(value.size) == 0:
            continue
        sweep = max(range(len(value.size)), key=lambda d: value.size[d])
        active: list[tuple[int, int]] = []
        for chunk in sorted(chunks, key=lambda c: (c.offsets[sweep], *c.offsets)):
            start = chunk.offsets[sweep]
            del active[:bisect.bisect_right(active, (start, sys.maxsize))]
            checks += len(active)
            bisect.insort(active, (start + chunk.sizes[sweep], len(active)))
    return checks


def validate(plans: list[Any], metadata: Any) -> list[str]:
    return default_planner._validate_global_plan(plans, metadata)


def load_local(state: dict[str, Any], metadata: Any) -> Any:
    planner = DefaultLoadPlanner()
    planner.set_up_planner(state, metadata, is_coordinator=True)
    return planner, planner.create_local_plan()


def load_global(planner: Any, plans: list[Any]) -> list[Any]:
    return planner.create_global_plan(plans)


def header_bytes(plan: Any) -> int:
    """The safetensors header of this rank's shard file: tensor entries and DCP's offsets."""
    entries, sharding, offset = {}, {}, 0
    for item in plan.items:
        chunk = item.tensor_data.chunk
        length = math.prod(chunk.sizes) * 2  # bf16
        entries[item.index.fqn] = {"dtype": "BF16", "shape": list(chunk.sizes),
                                   "data_offsets": [offset, offset + length]}
        sharding[item.index.fqn] = {"saved_offsets": list(chunk.offsets)}
        offset += length
    entries["__metadata__"] = {"DCP_SHARDING_INFO": json.dumps(sharding),
                               "DCP_VERSION": "1.0", "format": "pt"}
    return len(json.dumps(entries, separators=(",", ":")).encode()) + 8


def accel_json_bytes(world_size: int) -> int:
    """accel.json's list of files: a shard file per rank for the model part, one per-rank
    file; each with its size and checksum."""
    record = {"size": 10**10, "xxh3_64": "0123456789abcdef"}
    files = {f"model/shard-{r + 1:05d}-model-00001-of-00001.safetensors": record
             for r in range(world_size)}
    files.update({f"ranks/rank{r}.safetensors": record for r in range(world_size)})
    return len(json.dumps({"files": files}).encode())


def run_layout(model: torch.nn.Module, ctx: accel.Context, tp: int,
               validate_max: int) -> dict[str, Any]:
    world = ctx.world_size
    layout = MeshLayout.of({"dp_shard": world // tp, "tp": tp} if tp > 1 else None, world)
    out: dict[str, Any] = {}
    (mesh, dp), out["mesh"] = measure(build_device_mesh, layout, "cpu")
    ctx = attrs.evolve(ctx, layout=layout, device_mesh=mesh, data_group=dp)
    sharded, out["shard"] = measure(shard, copy.deepcopy(model), ctx, tp)
    state = sharded.state_dict()
    (planner, local), out["save_local"] = measure(save_local, state)
    started = time.perf_counter()
    plans = plans_for_all_ranks(local, state, mesh)
    out["simulate_plans_s"] = time.perf_counter() - started
    print(f"  (simulating {world} plans: {out['simulate_plans_s']:.1f} s)", file=sys.stderr,
          flush=True)
    (global_plan, metadata), out["save_global"] = measure(save_global, planner, plans)
    del plans
    out["validate"] = {"checks": overlap_checks(metadata), "projected": world > validate_max}
    if not out["validate"]["projected"]:
        errors, measured = measure(validate, global_plan, metadata)
        assert not errors, errors[:3]
        out["validate"].update(measured)
    del global_plan
    (load_planner, load_plan), out["load_local"] = measure(load_local, state, metadata)
    _, out["load_global"] = measure(load_global, load_planner, [load_plan] * world)
    out["sizes"] = {"local_plan": len(pickle.dumps(local)),
                    "global_metadata": len(pickle.dumps(metadata)),
                    "shard_header": header_bytes(local),
                    "headers_read_per_rank_at_load": header_bytes(local) * world,
                    "accel_json_files": accel_json_bytes(world),
                    "items": len(local.items),
                    "chunks": sum(len(md.chunks) for md in
                                  metadata.state_dict_metadata.values())}
    return out


def store_barrier(world: int) -> dict[str, float]:
    """accel's bounded_barrier for `world` ranks on a real TCPStore, one rank at a time."""
    from accel.runtime.process import _arrive, _forget, _previous
    from accel.world import World

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    contexts = [accel.Context(world=World(rank=r, world_size=world)) for r in range(world)]

    def barrier() -> None:
        keys = [_arrive(store, contexts[r], "bench") for r in range(world)]
        for rank, key in enumerate(keys):
            store.wait([f"{key}/done"])
            store.get(f"{key}/done")
            _forget(store, _previous(key), [str(rank)])

    barrier()  # warm: the keys of the first barrier
    _, measured = measure(barrier)
    return measured


def run_size(world: int, model: torch.nn.Module, layouts: list[int],
             validate_max: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    started = time.perf_counter()
    with fake_world(0, world) as ctx:
        result["init_s"] = time.perf_counter() - started
        for tp in layouts:
            result["fsdp" if tp == 1 else f"tp{tp}xfsdp"] = run_layout(model, ctx, tp, validate_max)
    result["barrier"] = store_barrier(world)
    return result


# --- report ---------------------------------------------------------------------------

STEPS = ("mesh", "shard", "save_local", "save_global", "validate", "load_local",
         "load_global")


def project_validation(results: dict[int, Any]) -> None:
    """Above --validate-max: its time at the largest measured size, per pair compared."""
    for layout in [key for key in results[min(results)] if key not in ("init_s", "barrier")]:
        measured = [results[w][layout]["validate"] for w in sorted(results)
                    if not results[w][layout]["validate"]["projected"]]
        if not measured:
            continue
        rate = measured[-1]["s"] / max(1, measured[-1]["checks"])
        for w in results:
            cell = results[w][layout]["validate"]
            if cell["projected"]:
                cell.update(s=rate * cell["checks"], mb=float("nan"))


def _cell(cell: dict[str, Any]) -> str:
    if cell.get("projected"):
        return f"~{cell['s']:.1f} (projected)" if "s" in cell else "not run"
    return f"{cell['s']:.3f} ({cell['mb']:.0f})"


def growth(sizes: list[int], values: list[float]) -> str:
    """k of value ~ W^k between each pair of neighbouring sizes."""
    ks = []
    pairs = list(zip(sizes, values, strict=True))
    for (w0, v0), (w1, v1) in zip(pairs, pairs[1:], strict=False):
        ks.append("-" if min(v0, v1) <= 0 else f"{math.log(v1 / v0) / math.log(w1 / w0):.2f}")
    return " ".join(ks)


def report(results: dict[int, Any]) -> None:
    sizes = sorted(results)
    head = "| " + " | ".join(["layout", "step", *[f"W={w}" for w in sizes], "k"]) + " |"
    rule = "|" + "---|" * (len(sizes) + 3)
    print("\ninit_process_group (fake): " + ", ".join(
        f"W={w}: {results[w]['init_s']:.3f} s" for w in sizes))
    print("\nCPU seconds (memory growth MB) per step; k: value ~ W^k between neighbouring "
          "sizes\n")
    print(head)
    print(rule)
    layouts = [key for key in results[sizes[0]] if key not in ("init_s", "barrier")]
    for layout in layouts:
        for step in STEPS:
            cells = [results[w][layout][step] for w in sizes]
            print(f"| {layout} | {step} | " + " | ".join(map(_cell, cells))
                  + f" | {growth(sizes, [c.get('s', 0) for c in cells])} |")
    cells = [results[w]["barrier"] for w in sizes]
    print("| store | barrier | " + " | ".join(map(_cell, cells))
          + f" | {growth(sizes, [c['s'] for c in cells])} |")
    print("\nbytes per rank (k: growth with W)\n")
    print(head)
    print(rule)
    for layout in layouts:
        for name in [*results[sizes[0]][layout]["sizes"], "validate_checks"]:
            values = [results[w][layout]["validate"]["checks"] if name == "validate_checks"
                      else results[w][layout]["sizes"][name] for w in sizes]
            print(f"| {layout} | {name} | " + " | ".join(f"{v:,}" for v in values)
                  + f" | {growth(sizes, values)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--layers", type=int, default=8,
                        help="decoder layers of Llama-3-8B's 32 (every width as in 8B); "
                        "each step's cost is proportional to the tensors: 3 + 9 per layer")
    parser.add_argument("--layouts", default="fsdp,tp8xfsdp",
                        help="comma-separated: fsdp, tp8xfsdp")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--validate-max", type=int, default=1024,
                        help="run DCP's global-plan validation up to this size; above it, "
                        "project its time from the pairs it compares (quadratic)")
    args = parser.parse_args()
    layouts = [1 if name == "fsdp" else TP for name in args.layouts.split(",")]
    if any(w % TP for w in args.sizes if TP in layouts):
        sys.exit(f"every size must divide by {TP} for the tp{TP}xfsdp layout")
    started = time.perf_counter()
    model = llama_on_meta(args.layers)
    print(f"Llama on meta: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"parameters, {len(model.state_dict())} tensors; torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results = {}
    for world in args.sizes:
        results[world] = run_size(world, model, layouts, args.validate_max)
        print(f"W={world} done at {time.perf_counter() - started:.0f} s", flush=True)
    project_validation(results)
    report(results)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({str(w): r for w, r in results.items()}, file, indent=1)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

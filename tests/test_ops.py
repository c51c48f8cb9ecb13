"""accel.runtime.ops: collectives on nested data, on real gloo processes and in one process."""

from __future__ import annotations

import time
from collections import OrderedDict, UserDict, defaultdict, namedtuple
from types import MappingProxyType

import attrs
import pytest
import torch
import torch.distributed as dist

from accel.context import Context
from accel.errors import (
    CollectiveMismatchError,
    InvalidArgumentError,
    NotConnectedError,
    UnsupportedError,
)
from accel.runtime.ops import (
    _comm_device,
    broadcast,
    broadcast_object,
    concatenate,
    gather,
    gather_object,
    pad_across_processes,
    recursively_apply,
    reduce,
    send_to_device,
)
from accel.testing import fake_world, run_world
from accel.world import World

Pair = namedtuple("Pair", ["left", "right"])


# --------------------------------------------------------------------------- spawned world


def _collectives(ctx: Context) -> dict:
    """Rank r holds [2r+1, 2r+2]; every collective's result, computed without debug mode."""
    assert ctx.debug, "ACCEL_DEBUG=1 should have switched debug mode on"
    plain = attrs.evolve(ctx, debug=False)
    subgroup = attrs.evolve(plain, group=dist.new_group([0, 1]))
    r = ctx.rank
    x = torch.tensor([2.0 * r + 1, 2.0 * r + 2])
    out = {
        "gather": gather(x, plain),
        "gather_debug": gather(x, ctx),
        "gather_scalar": gather(torch.tensor(r), plain),
        "gather_nested": gather({"a": x, "b": [x * 10, "tag"], "c": Pair(x, 7)}, plain),
        # A (3, 2) view of a (2, 3) tensor: its memory is not contiguous.
        "gather_transposed": gather(torch.arange(6).reshape(2, 3).T + 10 * r, plain),
        "gather_object": gather_object([r], plain),
        "gather_object_str": gather_object(f"s{r}", plain),
        "broadcast": broadcast(x, plain),
        "broadcast_src1": broadcast({"x": x, "n": "keep"}, plain, src=1),
        "broadcast_object": broadcast_object({"rank": r}, plain, src=1),
        "broadcast_subgroup": broadcast(x, subgroup, src=1),
        "gather_subgroup": gather(x, subgroup),
        "x_after": x,
        "reduce_bool_sum": reduce(torch.tensor([r == 0, True]), plain, op="sum"),
        "reduce_int_mean": reduce(x.long(), plain),
        "reduce_nested": reduce({"loss": x[0], "parts": (x,)}, plain, op="sum"),
    }
    for op in ("sum", "mean", "max", "min"):
        out[f"reduce_{op}"] = reduce(x, plain, op=op)
    ragged = torch.arange(3 - r) + 10 * r + 1  # rank 0: [1, 2, 3], rank 1: [11, 12]
    out["pad"] = pad_across_processes(ragged, plain)
    out["pad_first"] = pad_across_processes(ragged, plain, pad_first=True)
    out["pad_debug"] = pad_across_processes(ragged, ctx, pad_index=-1)
    out["pad_nested"] = pad_across_processes(
        {"seq": torch.ones(2, 3 - r), "loss": torch.tensor(1.0)}, plain, dim=1)
    out["pad_then_gather"] = gather(pad_across_processes(ragged, plain), plain)
    out["reduce_int_mean_dtype"] = str(out["reduce_int_mean"].dtype)
    out.update(_mismatches(ctx))
    # Plain lists compare with == in the assertions below.
    return recursively_apply(lambda t: t.tolist(), out)


def _mismatches(ctx: Context) -> dict:
    """Each mismatch must raise on this rank (debug mode), fast; the world stays usable."""
    r = ctx.rank
    cases = {
        "shape": lambda: gather(torch.zeros(3 - r, 2), ctx),
        "dtype": lambda: reduce(torch.zeros(2, dtype=torch.float32 if r else torch.int64), ctx),
        "structure": lambda: broadcast({"a" if r == 0 else "b": torch.zeros(1)}, ctx),
        "collective": lambda: gather(torch.zeros(1), ctx) if r == 0 else reduce(
            torch.zeros(1), ctx),
        "ndim": lambda: pad_across_processes(torch.zeros((2,) * (r + 1)), ctx),
    }
    out = {}
    for name, call in cases.items():
        start = time.monotonic()
        try:
            call()
            out[f"mismatch_{name}"] = None
        except CollectiveMismatchError as exc:
            out[f"mismatch_{name}"] = (str(exc), time.monotonic() - start)
    out["after_mismatches"] = gather(torch.tensor([r]), ctx).tolist()
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_world(_collectives, 2, timeout=90, env={"ACCEL_DEBUG": "1"})


@pytest.mark.spawned
def test_gather_concatenates_in_rank_order(ranks):
    for out in ranks:
        assert out["gather"] == [1, 2, 3, 4]
        assert out["gather_debug"] == [1, 2, 3, 4]
        assert out["gather_scalar"] == [0, 1]
        assert out["gather_transposed"] == [[0, 3], [1, 4], [2, 5],
                                                     [10, 13], [11, 14], [12, 15]]


@pytest.mark.spawned
def test_gather_keeps_nested_structure_and_non_tensor_leaves(ranks):
    nested = ranks[1]["gather_nested"]
    assert set(nested) == {"a", "b", "c"}
    assert nested["a"] == [1, 2, 3, 4]
    assert nested["b"][0] == [10, 20, 30, 40] and nested["b"][1] == "tag"
    assert isinstance(nested["c"], Pair) and nested["c"].right == 7
    assert nested["c"].left== [1, 2, 3, 4]


@pytest.mark.spawned
def test_gather_object_concatenates_lists(ranks):
    for out in ranks:
        assert out["gather_object"] == [0, 1]
        assert out["gather_object_str"] == ["s0", "s1"]


@pytest.mark.spawned
def test_broadcast_sends_src_data_and_leaves_input_alone(ranks):
    for rank, out in enumerate(ranks):
        assert out["broadcast"] == [1, 2]
        assert out["broadcast_src1"]["x"] == [3, 4]
        assert out["broadcast_src1"]["n"] == "keep"
        assert out["broadcast_object"] == {"rank": 1}
        assert out["broadcast_subgroup"] == [3, 4]
        assert out["gather_subgroup"] == [1, 2, 3, 4]
        assert out["x_after"] == [2 * rank + 1, 2 * rank + 2]


@pytest.mark.spawned
def test_reduce_ops(ranks):
    expected = {"sum": [4, 6], "mean": [2, 3], "max": [3, 4], "min": [1, 2]}
    for out in ranks:
        for op, values in expected.items():
            assert out[f"reduce_{op}"] == values, op
        assert out["reduce_int_mean_dtype"] == str(torch.get_default_dtype())
        assert out["reduce_int_mean"] == [2.0, 3.0]
        assert out["reduce_bool_sum"] == [1, 2]  # counts, not logical or
        assert out["reduce_nested"]["loss"] == 4
        assert out["reduce_nested"]["parts"][0] == [4, 6]


@pytest.mark.spawned
def test_pad_across_processes(ranks):
    rank0, rank1 = ranks
    assert rank0["pad"] == [1, 2, 3]
    assert rank1["pad"] == [11, 12, 0]
    assert rank1["pad_first"] == [0, 11, 12]
    assert rank1["pad_debug"] == [11, 12, -1]
    assert rank1["pad_nested"]["seq"] == [[1, 1, 0], [1, 1, 0]]
    assert rank1["pad_nested"]["loss"] == 1.0  # 0-d: nothing to pad
    assert rank0["pad_then_gather"] == [1, 2, 3, 11, 12, 0]


@pytest.mark.spawned
def test_debug_mode_raises_on_every_rank_quickly(ranks):
    for out in ranks:
        message, seconds = out["mismatch_shape"]
        assert message == ("gather: tensor shapes differ across ranks: rank 0 (3, 2), "
                           "rank 1 (2, 2); pad them first with accel.pad_across_processes")
        assert seconds < 5
        assert "dtypes differ across ranks: rank 0 torch.int64, rank 1 torch.float32" in \
            out["mismatch_dtype"][0]
        assert "different structure" in out["mismatch_structure"][0]
        assert "['a']" in out["mismatch_structure"][0]
        assert "rank 0 called gather, rank 1 called reduce(op='mean')" in \
            out["mismatch_collective"][0]
        assert "numbers of dimensions differ" in out["mismatch_ndim"][0]
        assert out["after_mismatches"] == [0, 1]


# --------------------------------------------------------------------------- one process


def test_single_process_collectives_return_the_data():
    ctx = Context()
    x = torch.tensor([1.0, 2.0])
    assert gather(x, ctx) is x
    assert gather(torch.tensor(5), ctx).tolist() == [5]  # 0-d -> 1-d, as with many ranks
    assert gather_object([3], ctx) == [3]
    assert gather_object("a", ctx) == ["a"]
    assert broadcast(x, ctx) is x
    assert broadcast_object({"k": 1}, ctx) == {"k": 1}
    assert reduce(x, ctx, op="sum") is x
    mean = reduce(torch.tensor([1, 2]), ctx)
    assert mean.dtype == torch.get_default_dtype() and mean.tolist() == [1.0, 2.0]
    assert pad_across_processes(x, ctx) is x


def test_unknown_reduce_op_and_bad_src_raise():
    with pytest.raises(InvalidArgumentError, match="unknown op 'avg'.*'sum'"):
        reduce(torch.ones(1), Context(), op="avg")
    with pytest.raises(InvalidArgumentError, match="src=1 is not a rank"):
        broadcast(torch.ones(1), Context(), src=1)
    with pytest.raises(InvalidArgumentError, match="dim=2 is out of range"):
        pad_across_processes(torch.ones(2, 2), Context(), dim=2)


def test_distributed_context_without_process_group_raises():
    ctx = Context(world=World(rank=0, world_size=2, local_world_size=2))
    with pytest.raises(NotConnectedError, match="accel.init"):
        gather(torch.ones(1), ctx)


def test_fake_world_collectives_keep_shapes():
    with fake_world(rank=3, world_size=8) as ctx:
        assert gather(torch.ones(2, 3), ctx).shape == (16, 3)
        assert reduce(torch.ones(4), ctx).shape == (4,)


def test_comm_device_follows_the_backend():
    cpu, meta = torch.ones(1), torch.ones(1, device="meta")

    def device_for(tensor, backend, device="cpu"):
        return _comm_device(tensor, Context(dist_backend=backend, device=device))

    assert device_for(meta, "gloo") == torch.device("cpu")
    assert device_for(cpu, "cpu:gloo,cuda:nccl") == torch.device("cpu")
    assert device_for(cpu, "nccl", "cuda:1") == torch.device("cuda", 1)
    assert device_for(meta, "fake") == torch.device("meta")
    with pytest.raises(UnsupportedError, match="cannot communicate cpu tensors"):
        device_for(cpu, "nccl")


def test_recursively_apply_keeps_container_types():
    counts = defaultdict(list, {"a": torch.ones(1)})
    data = {
        "ordered": OrderedDict(b=torch.ones(1), a=torch.ones(1)),
        "default": counts,
        "proxy": MappingProxyType({"p": torch.ones(1)}),
        "pair": Pair(torch.ones(1), "text"),
        "tuple": (torch.ones(1), None, 3),
    }
    doubled = recursively_apply(lambda t: t * 2, data)
    assert list(doubled["ordered"]) == ["b", "a"] and isinstance(doubled["ordered"], OrderedDict)
    assert doubled["default"].default_factory is list
    assert isinstance(doubled["proxy"], MappingProxyType)
    assert isinstance(doubled["pair"], Pair) and doubled["pair"].right == "text"
    assert doubled["pair"].left.item() == 2
    assert doubled["tuple"][1:] == (None, 3) and doubled["tuple"][0].item() == 2


class Encoding(UserDict):
    """Like transformers' BatchEncoding: a Mapping with its own `.to`."""

    def __init__(self, data=None, note="kept"):
        super().__init__(data)
        self.note = note
        self.calls = []

    def to(self, device, *, non_blocking=False):
        self.calls.append(non_blocking)
        return Encoding({k: v.to(device) for k, v in self.data.items()}, self.note)


class Moves:
    def __init__(self):
        self.device = "cpu"

    def to(self, device):  # no non_blocking parameter
        self.device = device
        return self


def test_send_to_device_moves_every_tensor_and_keeps_types():
    enc = Encoding({"ids": torch.ones(2)}, note="special")
    batch = {"x": torch.ones(2, 3).T, "pair": Pair(torch.ones(1), "label"), "enc": enc,
             "obj": Moves(), "n": 3}
    moved = send_to_device(batch, "meta")
    assert moved["x"].device.type == "meta"
    assert isinstance(moved["pair"], Pair) and moved["pair"].left.device.type == "meta"
    assert moved["pair"].right == "label" and moved["n"] == 3
    assert isinstance(moved["enc"], Encoding) and moved["enc"].note == "special"
    assert moved["enc"]["ids"].device.type == "meta"
    assert moved["obj"].device == torch.device("meta")
    # Moves.to takes no non_blocking: it must not be passed one.
    assert send_to_device(Moves(), "meta", non_blocking=True).device == torch.device("meta")


def test_send_to_device_passes_objects_non_blocking_only_when_given():
    enc = Encoding({"ids": torch.ones(2)})
    send_to_device(enc, "cpu")
    send_to_device(enc, "cpu", non_blocking=True)
    assert enc.calls == [False, True]


def test_concatenate_leafwise():
    parts = [{"x": torch.ones(2, 1), "loss": torch.tensor(1.0), "tag": "a"},
             {"x": torch.zeros(1, 1), "loss": torch.tensor(2.0), "tag": "a"}]
    merged = concatenate(parts)
    assert merged["x"].tolist() == [[1], [1], [0]]
    assert merged["loss"].tolist() == [1.0, 2.0]
    assert merged["tag"] == "a"
    pairs = concatenate([Pair(torch.ones(1), torch.ones(2, 1)),
                         Pair(torch.ones(1), torch.ones(2, 2))], dim=-1)
    assert isinstance(pairs, Pair) and pairs.right.shape == (2, 3)


def test_concatenate_rejects_mismatched_structures():
    with pytest.raises(InvalidArgumentError, match="empty list"):
        concatenate([])
    with pytest.raises(InvalidArgumentError, match=r"structure 1 has dict at data where"):
        concatenate([{"x": torch.ones(1)}, {"y": torch.ones(1)}])
    with pytest.raises(InvalidArgumentError, match=r"structure 1 has str at data\['tag'\]"):
        concatenate([{"tag": "a"}, {"tag": "b"}])

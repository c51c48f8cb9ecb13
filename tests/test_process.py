"""accel.runtime.process: barriers, rank-chosen execution, splitting work, votes."""

from __future__ import annotations

import contextlib
import io
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from accel.context import Context
from accel.errors import InvalidArgumentError
from accel.runtime.ops import gather_object
from accel.runtime.process import (
    all_ranks,
    any_rank,
    local_main_process_first,
    main_process_first,
    on_last_process,
    on_local_main_process,
    on_main_process,
    on_process,
    print,
    split_between_processes,
    wait_for_everyone,
)
from accel.testing import fake_world, run_world
from accel.world import World


def rank_ctx(rank: int, world_size: int, local_world_size: int | None = None) -> Context:
    """A Context that believes it is `rank` of `world_size`; enough for local decisions."""
    local = local_world_size or world_size
    return Context(world=World(rank=rank, world_size=world_size, local_rank=rank % local,
                               local_world_size=local, node_rank=rank // local,
                               num_nodes=world_size // local))


# --------------------------------------------------------------------------- decorated helpers


@on_main_process
def main_only(tag: str, ctx: Context) -> tuple:
    return tag, ctx.rank


@on_local_main_process
def local_main_only(ctx: Context) -> int:
    return ctx.rank


@on_last_process
def last_only(*, ctx: Context) -> int:
    return ctx.rank


@on_process(1)
def second_only(ctx: Context, path: str) -> int:
    Path(path, f"second-ran-on-{ctx.rank}").touch()
    return ctx.rank


# --------------------------------------------------------------------------- spawned world


def _record_first(ctx: Context, log: Path, first: contextlib.AbstractContextManager) -> None:
    with first:
        with log.open("a") as f:
            f.write(f"start {ctx.rank}\n")
        time.sleep(0.3)  # give a rank that did not wait the chance to interleave
        with log.open("a") as f:
            f.write(f"end {ctx.rank}\n")


def _process_checks(ctx: Context, folder: str) -> dict:
    root = Path(folder)
    _record_first(ctx, root / "main_first.log", main_process_first(ctx))
    _record_first(ctx, root / "local_first.log", local_main_process_first(ctx))
    if ctx.rank == 1:
        time.sleep(0.3)
        (root / "before-barrier").touch()
    wait_for_everyone(ctx)
    seen_after_barrier = (root / "before-barrier").exists()
    bound = on_main_process(ctx)(lambda: "bound")
    return {
        "after_failed_body": _fail_on_main_first(ctx),
        "seen_after_barrier": seen_after_barrier,
        "main_only": main_only("hello", ctx),
        "local_main_only": local_main_only(ctx),
        "last_only": last_only(ctx=ctx),
        "second_only": second_only(ctx, folder),
        "bound": bound(),
        "any_one": any_rank(ctx.rank == 1, ctx),
        "any_none": any_rank(False, ctx),
        "all_one": all_ranks(ctx.rank == 1, ctx),
        "all_every": all_ranks(torch.tensor(True), ctx),
        "split": split_between_processes(list(range(17)), ctx),
    }


def _fail_on_main_first(ctx: Context) -> list:
    """The main process's body raises: the others must be released, not left waiting."""
    try:
        with main_process_first(ctx):
            if ctx.is_main_process:
                raise RuntimeError("boom")
    except RuntimeError:
        pass
    return gather_object([ctx.rank], ctx)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[list[dict], Path]:
    folder = tmp_path_factory.mktemp("process")
    return run_world(_process_checks, 2, str(folder), timeout=90), folder


@pytest.mark.spawned
def test_main_process_first_orders_the_body(world):
    _, folder = world
    expected = ["start 0", "end 0", "start 1", "end 1"]
    assert (folder / "main_first.log").read_text().split("\n")[:-1] == expected
    assert (folder / "local_first.log").read_text().split("\n")[:-1] == expected


@pytest.mark.spawned
def test_wait_for_everyone_is_a_barrier(world):
    ranks, _ = world
    assert [out["seen_after_barrier"] for out in ranks] == [True, True]


@pytest.mark.spawned
def test_main_process_first_releases_the_others_when_the_body_raises(world):
    assert [out["after_failed_body"] for out in world[0]] == [[0, 1], [0, 1]]


@pytest.mark.spawned
def test_decorators_run_only_on_the_chosen_rank(world):
    (rank0, rank1), folder = world
    assert (rank0["main_only"], rank1["main_only"]) == (("hello", 0), None)
    assert (rank0["local_main_only"], rank1["local_main_only"]) == (0, None)
    assert (rank0["last_only"], rank1["last_only"]) == (None, 1)
    assert (rank0["second_only"], rank1["second_only"]) == (None, 1)
    assert sorted(p.name for p in folder.glob("second-ran-on-*")) == ["second-ran-on-1"]
    assert (rank0["bound"], rank1["bound"]) == ("bound", None)


@pytest.mark.spawned
def test_votes_agree_on_every_rank(world):
    for out in world[0]:
        assert (out["any_one"], out["any_none"]) == (True, False)
        assert (out["all_one"], out["all_every"]) == (False, True)


@pytest.mark.spawned
def test_split_in_a_real_world(world):
    (rank0, rank1), _ = world
    assert rank0["split"] == list(range(9)) and rank1["split"] == list(range(9, 17))


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize(("data", "padding", "expected"), [
    (list("ABC"), False, [list("AB"), list("C")]),
    (list("ABC"), True, [list("AB"), list("CC")]),
    (tuple("ABCD"), True, [tuple("AB"), tuple("CD")]),
    (list("A"), True, [list("A"), list("A")]),  # nothing of its own: repeat the data's last
    ([], True, [[], []]),
])
def test_split_between_processes_sequences(data, padding, expected):
    parts = [split_between_processes(data, rank_ctx(r, 2), apply_padding=padding)
             for r in range(2)]
    assert parts == expected


def test_split_seventeen_items_nine_and_eight():
    sizes = [len(split_between_processes(list(range(17)), rank_ctx(r, 2))) for r in range(2)]
    assert sizes == [9, 8]
    shares = [split_between_processes(list(range(10)), rank_ctx(r, 4)) for r in range(4)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


def test_split_tensors_arrays_and_dicts_with_the_same_indices():
    tensor = torch.arange(10).reshape(5, 2)
    parts = [split_between_processes(tensor, rank_ctx(r, 2), apply_padding=True)
             for r in range(2)]
    assert parts[0].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert parts[1].tolist() == [[6, 7], [8, 9], [8, 9]]
    assert split_between_processes(np.arange(5), rank_ctx(1, 2)).tolist() == [3, 4]
    batch = {"ids": torch.arange(3), "text": ["a", "b", "c"]}
    second = split_between_processes(batch, rank_ctx(1, 2), apply_padding=True)
    assert second["ids"].tolist() == [2, 2] and second["text"] == ["c", "c"]
    counts = split_between_processes(defaultdict(list, {"k": [1, 2]}), rank_ctx(0, 2))
    assert dict(counts) == {"k": [1]}


def test_split_on_rank_3_of_8_in_a_fake_world():
    with fake_world(rank=3, world_size=8) as ctx:
        assert split_between_processes(list(range(20)), ctx) == [9, 10, 11]
        padded = split_between_processes(list(range(19)), ctx, apply_padding=True)
        assert padded == [9, 10, 10]  # ranks 0-2 get 3 items, rank 3 onwards 2 + padding
        assert split_between_processes(list(range(19)), rank_ctx(7, 8), apply_padding=True) \
            == [17, 18, 18]


def test_split_rejects_bad_input():
    ctx = rank_ctx(0, 2)
    with pytest.raises(InvalidArgumentError, match=r"'ids': 3, 'text': 2"):
        split_between_processes({"ids": torch.arange(3), "text": ["a", "b"]}, ctx)
    with pytest.raises(InvalidArgumentError, match="'n': int"):
        split_between_processes({"ids": [1], "n": 5}, ctx)
    with pytest.raises(InvalidArgumentError, match="cannot split a set"):
        split_between_processes({1, 2}, ctx)


def test_decorators_in_a_fake_world_rank_3_of_8():
    with fake_world(rank=3, world_size=8, local_world_size=4) as ctx:
        assert main_only("x", ctx) is None
        assert local_main_only(ctx) is None
        assert on_process(3, ctx)(lambda: "three")() == "three"
        assert on_process(2, ctx)(lambda: "two")() is None
    node_main = rank_ctx(4, 8, local_world_size=4)
    assert local_main_only(node_main) == 4 and main_only("x", node_main) is None
    assert last_only(ctx=rank_ctx(7, 8)) == 7


def test_decorators_explain_misuse():
    with pytest.raises(InvalidArgumentError, match=r"main_only.*none of its arguments.*"
                                                   r"@accel.on_main_process\(ctx\)"):
        main_only("no context", None)
    with pytest.raises(InvalidArgumentError, match=r"@accel.on_process\(1, ctx\)"):
        second_only("not a context", "folder")
    with pytest.raises(InvalidArgumentError, match="would run nowhere"):
        on_process(5, rank_ctx(0, 2))(lambda: None)()
    with pytest.raises(InvalidArgumentError, match="index must be a rank"):
        on_process(-1)
    with pytest.raises(InvalidArgumentError, match="got int"):
        on_main_process(42)
    assert main_only.__name__ == "main_only"


def test_single_process_runs_everything_once():
    ctx = Context()
    with main_process_first(ctx), local_main_process_first(ctx):
        wait_for_everyone(ctx)
    assert main_only("x", ctx) == ("x", 0) and last_only(ctx=ctx) == 0
    assert any_rank(True, ctx) is True and all_ranks(False, ctx) is False
    with pytest.raises(InvalidArgumentError, match="one truth value"):
        any_rank(torch.ones(2), ctx)


def test_print_per_node_or_once():
    def printed(ctx: Context, **kwargs) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print("loss", 1.5, ctx=ctx, **kwargs)
        return out.getvalue()

    node1_main = rank_ctx(2, 4, local_world_size=2)
    assert printed(node1_main) == "loss 1.5\n"
    assert printed(node1_main, per_node=False) == ""
    assert printed(rank_ctx(0, 4, local_world_size=2), per_node=False, sep="=") == "loss=1.5\n"
    assert printed(rank_ctx(3, 4, local_world_size=2)) == ""
    with pytest.raises(TypeError, match="ctx"):
        print("no context")

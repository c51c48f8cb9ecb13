"""The parallel dimensions of a run: their names, sizes, and this rank's place on each.

A layout is any subset of `DIMENSIONS`, always laid out outer to inner in that order
(torchtitan's order: pipeline stages outermost, tensor parallelism innermost, so that
the ranks of one TP group are neighbours, ideally on one node). Ranks are numbered
row-major over the sizes, as torch's `init_device_mesh` numbers them.

`MeshLayout` is plain arithmetic, usable without any process group (a one-process
Context has the layout `dp_shard=1`); `build_device_mesh` makes the torch `DeviceMesh`
and the data-parallel group once the process group exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from accel.errors import InvalidArgumentError

#: every dimension name accel knows, outer to inner.
DIMENSIONS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
#: the dimensions over which ranks see different data; their product is the dp size.
DATA_PARALLEL = ("dp_replicate", "dp_shard")


@attrs.frozen
class MeshLayout:
    """Named dimension sizes, outer to inner; a dimension not listed has size 1.

    >>> layout = MeshLayout.of({"dp_shard": 2, "tp": 2}, world_size=4)
    >>> layout.coordinates(3)
    {'dp_shard': 1, 'tp': 1}
    """

    sizes: tuple[tuple[str, int], ...] = (("dp_shard", 1),)

    @classmethod
    def of(cls, mesh: Mapping[str, int] | None, world_size: int) -> MeshLayout:
        """Validate `mesh` against the world size; None: one data-parallel dimension."""
        if mesh is None:
            return cls((("dp_shard", world_size),))
        if not isinstance(mesh, Mapping) or not mesh:
            raise InvalidArgumentError(
                f"mesh must be a dict of dimension sizes such as {{'dp_shard': 2, 'tp': 2}}, "
                f"got {mesh!r}"
            )
        unknown = [name for name in mesh if name not in DIMENSIONS]
        if unknown:
            raise InvalidArgumentError(
                f"mesh has unknown dimension(s) {unknown}; use names from {list(DIMENSIONS)}")
        sizes = _fill_rest({name: _size(name, mesh[name]) for name in DIMENSIONS if name in mesh},
                           world_size)
        # Every layout has dp_shard, if only of size 1: the transforms that shard or
        # replicate over the data-parallel ranks always find their dimension on the mesh.
        sizes.setdefault("dp_shard", 1)
        return cls(tuple((name, sizes[name]) for name in DIMENSIONS if name in sizes))

    @classmethod
    def from_names(cls, names: tuple[str, ...], shape: tuple[int, ...]) -> MeshLayout:
        """The layout of an existing mesh with these dimension names and sizes."""
        if list(names) != [name for name in DIMENSIONS if name in names]:
            raise InvalidArgumentError(
                f"a mesh adopted by accel needs dimension names from {list(DIMENSIONS)} in "
                f"that order, got {list(names)}; build it with init_device_mesh(..., "
                "mesh_dim_names=...) in that order"
            )
        return cls(tuple(zip(names, (int(size) for size in shape), strict=True)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.sizes)

    def size(self, *names: str) -> int:
        """The product of the sizes of `names` (1 for a dimension the layout lacks)."""
        table = dict(self.sizes)
        return math.prod(table.get(name, 1) for name in names)

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along each dimension (row-major, inner dimension fastest)."""
        found: dict[str, int] = {}
        for name, size in reversed(self.sizes):
            rank, found[name] = divmod(rank, size)
        return {name: found[name] for name in self.names}

    def rank_in(self, rank: int, *names: str) -> int:
        """`rank`'s index in the group spanned by `names` (row-major over them)."""
        coordinates = self.coordinates(rank)
        index = 0
        for name in (n for n in self.names if n in names):
            index = index * self.size(name) + coordinates[name]
        return index

    @property
    def dp_names(self) -> tuple[str, ...]:
        """The data-parallel dimensions of this layout, outer to inner."""
        return tuple(name for name in self.names if name in DATA_PARALLEL)

    @property
    def only_data_parallel(self) -> bool:
        """Whether every rank sees different data (no tp, cp or pp of size > 1)."""
        return self.size(*DATA_PARALLEL) == self.size(*self.names)

    def __str__(self) -> str:
        return " x ".join(f"{name}={size}" for name, size in self.sizes)


def _size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
        raise InvalidArgumentError(
            f"mesh[{name!r}] must be a positive integer, or -1 for the rest of the world; "
            f"got {value!r}"
        )
    return value


def _fill_rest(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Replace one -1 by what the others leave; check that the product is the world size."""
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise InvalidArgumentError(
            f"mesh sizes {sizes}: only one dimension may be -1 (the rest of the world)")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if world_size % known:
            raise InvalidArgumentError(
                f"mesh sizes {sizes}: the known sizes multiply to {known}, which does not "
                f"divide the world size {world_size}; change the sizes or the process count"
            )
        sizes = {**sizes, rest[0]: world_size // known}
    elif known != world_size:
        raise InvalidArgumentError(
            f"mesh sizes {sizes} multiply to {known}, but the world has {world_size} "
            f"processes; make the product {world_size}, or give one dimension -1"
        )
    return sizes


def build_device_mesh(layout: MeshLayout, device_type: str, group: Any = None) -> tuple[Any, Any]:
    """The torch DeviceMesh of `layout`, and the data-parallel process group; collective.

    Every rank must call it, in the same order as its other group creations. `group`
    (a process group spanning the layout, e.g. one from `from_process_group`) backs a
    one-dimensional layout; the default group backs the rest. The data-parallel group is
    `group` itself when the layout is only data-parallel and one-dimensional.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if len(layout.sizes) == 1:
        mesh = DeviceMesh.from_group(group, device_type, mesh_dim_names=layout.names) if (
            group is not None) else init_device_mesh(device_type, layout.shape,
                                                     mesh_dim_names=layout.names)
        return mesh, group
    mesh = init_device_mesh(device_type, layout.shape, mesh_dim_names=layout.names)
    return mesh, dp_group_of(mesh, layout)


def dp_group_of(mesh: Any, layout: MeshLayout) -> Any:
    """The process group over the data-parallel dimensions of `mesh` (collective)."""
    names = layout.dp_names
    if not names:  # an adopted mesh without data parallelism: no group to reduce over
        return None
    if len(names) == 1:
        return mesh[names[0]].get_group()
    return mesh[names]._flatten("dp").get_group()

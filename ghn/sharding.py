"""The one rule that places a large array on a mesh axis.

Used for predicted parameters (`GHN.predict(..., sharding="auto")`) and for
the GHN's own parameters and optimizer state under FSDP: an array's largest
axis that the mesh axis divides evenly is split over it; small or
indivisible arrays stay replicated. A function of the shape alone, so a
parameter, its gradient and its optimizer moments always agree.
"""

from __future__ import annotations

import math

from jax.sharding import Mesh, NamedSharding, PartitionSpec


def largest_axis_sharding(
    mesh: Mesh, shape: tuple[int, ...], axis: str | None = None, min_size: int = 0
) -> NamedSharding:
    """`shape`'s largest axis divisible by the size of mesh axis `axis` (default: the
    first), sharded over it; replicated when nothing divides, the axis has one
    device, or the array has fewer than `min_size` elements."""
    axis = axis or mesh.axis_names[0]
    n = mesh.shape[axis]
    spec: list[str | None] = [None] * len(shape)
    if n > 1 and math.prod(shape) >= min_size:
        for a in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[a] % n == 0 and shape[a] >= n:
                spec[a] = axis
                break
    return NamedSharding(mesh, PartitionSpec(*spec))

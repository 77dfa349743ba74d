"""Sharding the candidate axis of a batch over the local devices (parameters replicated).

Candidates are independent, so a batch splits over devices with no communication in the loop except the
batch-wide reductions of copy-mutation (ranking, donor choice), which XLA inserts itself. On one device this is a
no-op.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "candidates"


def candidate_mesh(batch_size: int, num_devices: int | None = None) -> Mesh | None:
    """A 1-D mesh over the first d local devices, d = the largest divisor of `batch_size` ≤ `num_devices`.

    Returns None when that leaves a single device (nothing to shard).
    """
    devices = jax.local_devices()
    limit = len(devices) if num_devices is None else min(int(num_devices), len(devices))
    d = max(k for k in range(1, limit + 1) if batch_size % k == 0)
    return None if d == 1 else Mesh(np.array(devices[:d]), (AXIS,))


def shard_candidates(tree, mesh: Mesh | None, batch_size: int):
    """Places every leaf whose leading axis has `batch_size` entries split over the mesh; others replicated."""
    if mesh is None:
        return tree

    def place(x):
        x = jax.numpy.asarray(x)
        if x.ndim >= 1 and x.shape[0] == batch_size:
            spec = PartitionSpec(AXIS, *([None] * (x.ndim - 1)))
        else:
            spec = PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def replicate(tree, mesh: Mesh | None):
    """Places every leaf on every device of the mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), tree)

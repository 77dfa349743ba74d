"""The `Predictor`: a frozen property model behind one pure function of the crystal batch."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrystal.crystal import CrystalBatch, validate
from jaxcrystal.errors import CheckpointError, StructureError


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A property predictor: parameters plus pure functions of `(params, lattice, frac, species, mask)`.

    Attributes:
      kind: "cgcnn", "crystalformer" or "alignn".
      name: what is predicted, e.g. "band-gap".
      units: physical units of the output, e.g. "eV" or "eV/atom".
      params: the parameter pytree (converted weights, target normalization folded in or applied by `apply`).
      apply: `(params, lattice [B,3,3] Å rows, frac [B,N,3], species [B,N,98], mask [B,N] bool) -> [B]`,
        the property in physical units; jittable, differentiable in lattice, frac and species.
      build_graph: graph predictors only: `(lattice, frac, mask) -> graph`, the neighbour topology
        (indices + integer image offsets, static capacity, overflow flag); jittable.
      apply_with_graph: graph predictors only: `(params, graph, lattice, frac, species, mask) -> [B]` with the
        topology frozen and bond vectors recomputed (differentiable) from lattice and frac.
      host_graph: graph predictors only: `(lattice, frac, mask) -> graph` on concrete host arrays, with the
        static capacities sized for the given cells (used by `__call__`; None: `build_graph`).
      metadata: free-form provenance (source file, sha256, config).
    """

    kind: str
    name: str
    units: str
    params: Any
    apply: Callable
    build_graph: Callable | None = None
    apply_with_graph: Callable | None = None
    metadata: dict = dataclasses.field(default_factory=dict)
    host_graph: Callable | None = None

    def __call__(self, lattice, frac, species, mask=None):
        """The property [B] for a batch; `mask=None` means every atom slot is real.

        With concrete (non-traced) inputs the batch is validated first (`jaxcrystal.crystal.validate`: shapes,
        finite lattice with non-zero volume, finite coordinates, species probabilities), and graph predictors
        build the topology on the host sized for the given cells, so a crystal never gets a silently truncated
        neighbour list: `StructureError` if it still overflows. Under `jit` / `grad` this is `apply` as is
        (static capacities, overflow flags in `build_graph`).
        """
        if mask is None:
            mask = jnp.ones(jnp.shape(frac)[:2], dtype=bool)
        inputs = (lattice, frac, species, mask)
        if any(isinstance(x, jax.core.Tracer) for x in inputs):
            return self.apply(self.params, *inputs)
        validate(CrystalBatch(*(np.asarray(x) for x in inputs)))
        if not self.is_graph_model:
            return self.apply(self.params, *inputs)
        graph = (self.host_graph or self.build_graph)(lattice, frac, mask)
        overflow = np.flatnonzero(np.asarray(graph.overflow))
        if overflow.size:
            raise StructureError(
                f"crystals {overflow.tolist()[:10]}: the {self.kind} neighbour graph overflows its static capacity; "
                f"load the predictor with larger capacity options (see jaxcrystal.predictors.{self.kind})"
            )
        return self.apply_with_graph(self.params, graph, *inputs)

    @property
    def is_graph_model(self) -> bool:
        return self.build_graph is not None


def check_variables(given, expected, where: str) -> None:
    """Raises `CheckpointError` unless `given` has exactly the entries and shapes of `expected`.

    Args:
      given: nested dicts of arrays (converted weights as read from a file).
      expected: the same structure of arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape` of `init`).
      where: the file, for messages.
    """
    have, want = _flat_shapes(given), _flat_shapes(expected)
    missing = sorted(set(want) - set(have))
    if missing:
        key = missing[0]
        raise CheckpointError(f"{where}: missing weight {key!r} (expected shape {want[key]}); {len(missing)} missing")
    extra = sorted(set(have) - set(want))
    if extra:
        key = extra[0]
        raise CheckpointError(f"{where}: unexpected weight {key!r} with shape {have[key]}; {len(extra)} extra")
    for key in sorted(want):
        if have[key] != want[key]:
            raise CheckpointError(f"{where}: weight {key!r} has shape {have[key]}, the model expects {want[key]}")


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf)) for path, leaf in leaves}

"""The `Predictor`: a frozen property model behind one pure function of the crystal batch."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp


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

    def __call__(self, lattice, frac, species, mask=None):
        """The property [B] for a batch; `mask=None` means every atom slot is real."""
        if mask is None:
            mask = jnp.ones(jnp.shape(frac)[:2], dtype=bool)
        return self.apply(self.params, lattice, frac, species, mask)

    @property
    def is_graph_model(self) -> bool:
        return self.build_graph is not None

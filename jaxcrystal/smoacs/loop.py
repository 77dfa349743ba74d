"""The compiled SMOACS loop: every step of a batch in one `lax.scan` under one `jit`.

One step (a pure function of the carry):
  1. graph predictors rebuild their neighbour topology if the step is scheduled (static table);
  2. decode the variables at temperature τ_s, predict every property, sum the objective terms per candidate;
  3. gradients of the batch-mean loss (candidates are independent, so candidate b only gets ∂ℓ_b);
  4. candidates whose loss or gradient is not finite are frozen and flagged, so they cannot poison the others;
  5. one `optax.partition` update (lattice / coords / atoms groups, Adam each, SMOACS's cosine tables);
  6. variables are projected back into their boxes;
  7. on copy-mutation steps: groups, donors, noisy copies, Adam moments reset (as SMOACS recreates its optimizers).

Adam is element-wise, so one optimizer state over the batch is exactly B independent optimizers.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcrystal import chemistry
from jaxcrystal.compile_options import compiler_options
from jaxcrystal.objectives import Objective, ToleranceObjective, total_loss
from jaxcrystal.predictors.base import Predictor
from jaxcrystal.smoacs import parametrization as pz
from jaxcrystal.smoacs.mutation import CopyMutation, copy_mutate, groups
from jaxcrystal.smoacs.schedules import cosine_with_restarts, temperature

GROUPS = ("lattice", "coords", "atoms")


@dataclasses.dataclass(frozen=True)
class PropertyModel:
    """A property as the loop sees it: a predictor and an optional transform of its output.

    Attributes:
      name: property name used by objectives and result columns (e.g. "bulk_modulus").
      predictor: the `Predictor`.
      transform: maps the predictor output to the property (e.g. 10**y for CGCNN's log10 bulk modulus).
      units: units of the transformed property.
    """

    name: str
    predictor: Predictor
    transform: Callable | None = None
    units: str = ""

    def __call__(self, params, graph, crystal):
        if graph is None:
            y = self.predictor.apply(params, *crystal)
        else:
            y = self.predictor.apply_with_graph(params, graph, *crystal)
        return y if self.transform is None else self.transform(y)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Static settings of one optimization run.

    Attributes:
      objectives: the property objectives.
      tolerance: tolerance-factor objective (perovskites) or None.
      geometry: decoding settings (length range, coordinate window, angles, mask mode).
      learning_rates: initial learning rate per group ("lattice", "coords", "atoms").
      num_steps: optimization steps.
      temperature: (τ_max, τ_min) of the linear temperature schedule.
      mutation: copy-mutation settings, or None.
      graph_refresh: steps at which graph predictors rebuild their topology (always step 0 and the step after
        each copy-mutation); "every" rebuilds at every step.
      main_property: the property of the main objective (copy-mutation's elite test).
      second_property: the property of the second objective, or None.
    """

    objectives: tuple[Objective, ...]
    tolerance: ToleranceObjective | None
    geometry: pz.Geometry
    learning_rates: dict
    num_steps: int = 200
    temperature: tuple[float, float] = (0.01, 1e-4)
    mutation: CopyMutation | None = CopyMutation()
    graph_refresh: tuple[int, ...] | str = "every"
    main_property: str = "band_gap"
    second_property: str | None = "formation_energy"

    def refresh_table(self) -> np.ndarray:
        """[num_steps] bool, True where graph predictors rebuild their topology."""
        if self.graph_refresh == "every":
            return np.ones(self.num_steps, dtype=bool)
        table = np.zeros(self.num_steps, dtype=bool)
        table[0] = True
        for s in self.graph_refresh:
            if 0 <= s < self.num_steps:
                table[s] = True
        for s in self.mutation.steps if self.mutation else ():
            if s + 1 < self.num_steps:
                table[s + 1] = True
        return table

    def mutation_table(self) -> np.ndarray:
        table = np.zeros(self.num_steps, dtype=bool)
        for s in self.mutation.steps if self.mutation else ():
            if 0 <= s < self.num_steps:
                table[s] = True
        return table

    def learning_rate_tables(self) -> dict:
        restarts = self.mutation.steps if self.mutation else ()
        return {g: cosine_with_restarts(self.learning_rates[g], self.num_steps, restarts) for g in GROUPS}


def make_optimizer(config: LoopConfig) -> optax.GradientTransformation:
    """`optax.partition` of three Adams (PyTorch defaults) scaled by the SMOACS learning-rate tables."""

    def group(table):
        table = jnp.asarray(table)
        schedule = lambda count: -table[jnp.minimum(count, table.shape[0] - 1)]  # noqa: E731
        return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.scale_by_schedule(schedule))

    transforms = {g: group(t) for g, t in config.learning_rate_tables().items()}
    transforms["frozen"] = optax.set_to_zero()
    labels = pz.Variables(
        lengths="lattice",
        angles="lattice" if config.geometry.optimize_angles else "frozen",
        frac="coords",
        logits="atoms",
        pattern_weights="atoms",
    )
    return optax.partition(transforms, labels)


def reset_adam_moments(opt_state):
    """Adam moments and bias-correction counts back to zero; schedule positions are kept."""

    def reset(node):
        if isinstance(node, optax.ScaleByAdamState):
            return optax.ScaleByAdamState(
                count=jnp.zeros_like(node.count),
                mu=jax.tree.map(jnp.zeros_like, node.mu),
                nu=jax.tree.map(jnp.zeros_like, node.nu),
            )
        return node

    return jax.tree.map(reset, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))


def _per_candidate_finite(tree, b):
    leaves = [jnp.reshape(jnp.isfinite(x), (b, -1)).all(axis=1) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all(axis=0)


class LoopState(NamedTuple):
    """The scan carry of a batch: everything needed to continue a run (a pytree of arrays, checkpointable).

    Attributes:
      step: [] int32, the next step to take.
      variables: the SMOACS `Variables`.
      opt_state: the optax state.
      problem: the per-candidate constants (copy-mutation moves them).
      graphs: property name -> neighbour topology of each graph predictor.
      healthy: [B] bool, False once a candidate met NaN/inf (it is frozen).
      overflow: [B] bool, True once a graph predictor's static capacity was too small for the candidate.
      rng: [2] uint32 raw PRNG key.
    """

    step: jax.Array
    variables: pz.Variables
    opt_state: optax.OptState
    problem: pz.Problem
    graphs: dict
    healthy: jax.Array
    overflow: jax.Array
    rng: jax.Array


class Loop(NamedTuple):
    """The compiled loop of one batch (see `make_loop`)."""

    init: Callable
    advance: Callable
    run: Callable


def make_loop(models: dict, config: LoopConfig) -> Loop:
    """Builds the jitted loop of one batch.

    Args:
      models: property name -> `PropertyModel`.
      config: the `LoopConfig`.

    Returns:
      `Loop` of three jitted functions (params maps property name -> predictor params):
      * `init(params, variables, problem, rng) -> LoopState` (step 0, graphs built, fresh optimizer);
      * `advance(params, state, num_steps) -> (state, history)`: the next `num_steps` steps (static) in one
        `lax.scan`; history maps "loss", "tau" and each property (and "tolerance") to [num_steps, B];
      * `run(params, variables, problem, rng) -> (state, history)`: init + every step.
      Each is compiled once per batch shape (and `num_steps`), so a run split into segments (checkpoints,
      progress) reuses one compiled scan.
    """
    tx = make_optimizer(config)
    taus = jnp.asarray(temperature(config.num_steps, *config.temperature))
    refresh_table = config.refresh_table()
    refresh = jnp.asarray(refresh_table)
    rebuild_every_step = bool(refresh_table.all())
    mutate_now = jnp.asarray(config.mutation_table())
    graph_names = tuple(n for n, m in models.items() if m.predictor.is_graph_model)
    options = compiler_options(tuple(sorted({m.predictor.kind for m in models.values()})))
    main_key = next((f"{o.kind}:{o.property}" for o in config.objectives if o.property == config.main_property), None)
    second_key = next(
        (f"{o.kind}:{o.property}" for o in config.objectives if o.property == config.second_property), None
    )
    has_elite = main_key is not None and main_key.startswith("window:") and second_key is not None

    def losses(variables, problem, params, graphs, tau):
        crystal, patterns = pz.decode(variables, problem, config.geometry, tau)
        predictions = {n: m(params[n], graphs.get(n), crystal) for n, m in models.items()}
        tolerance = None
        if config.tolerance is not None:
            tolerance = tolerance_of(crystal[2], patterns, problem)
            predictions["tolerance"] = tolerance
        loss, parts = total_loss(config.objectives, predictions, tolerance, config.tolerance)
        return loss, (parts, predictions)

    def build_graphs(variables, problem):
        crystal, _ = pz.decode(variables, problem, config.geometry, taus[0])
        lattice, frac, _, mask = jax.lax.stop_gradient(crystal)
        built = {}  # one search per distinct builder: predictors with the same `build_graph` share the topology
        for n in graph_names:
            build = models[n].predictor.build_graph
            if build not in built:
                built[build] = build(lattice, frac, mask)
        return {n: built[models[n].predictor.build_graph] for n in graph_names}

    def graph_overflow(graphs, b):
        flags = [jnp.reshape(g.overflow, (b,)) for g in graphs.values() if hasattr(g, "overflow")]
        return jnp.any(jnp.stack(flags), axis=0) if flags else jnp.zeros(b, dtype=bool)

    def step(params, state: LoopState, _):
        s = state.step
        variables, opt_state, problem, healthy = state.variables, state.opt_state, state.problem, state.healthy
        b = healthy.shape[0]
        if rebuild_every_step:
            graphs = build_graphs(variables, problem)
        else:
            graphs = jax.lax.cond(refresh[s], lambda: build_graphs(variables, problem), lambda: state.graphs)
        overflow = state.overflow | graph_overflow(graphs, b)

        def objective(v):
            loss, aux = losses(v, problem, params, graphs, taus[s])
            return jnp.sum(jnp.where(healthy, loss, 0.0)) / b, (loss, aux)

        (_, (loss, (parts, predictions))), grads = jax.value_and_grad(objective, has_aux=True)(variables)
        healthy = healthy & jnp.isfinite(loss) & _per_candidate_finite(grads, b)
        grads = jax.tree.map(lambda g: jnp.where(_bcast(healthy, g), g, 0.0), grads)
        updates, opt_state = tx.update(grads, opt_state, variables)
        updates = jax.tree.map(lambda u: jnp.where(_bcast(healthy, u), u, 0.0), updates)
        variables = pz.project(optax.apply_updates(variables, updates), problem, config.geometry)

        rng = state.rng
        if config.mutation is not None:
            rng, key = jax.random.split(rng)

            def mutate(args):
                variables, problem, opt_state, healthy = args
                elite, top = groups(
                    parts[main_key] if main_key else jnp.ones_like(loss),
                    parts[second_key] if second_key else jnp.zeros_like(loss),
                    parts.get("tolerance"),
                    loss,
                    healthy,
                    config.mutation,
                    has_elite,
                )
                variables, problem, replaced = copy_mutate(
                    key, variables, problem, elite, top, config.mutation, config.geometry.optimize_angles
                )
                return variables, problem, reset_adam_moments(opt_state), healthy | replaced

            variables, problem, opt_state, healthy = jax.lax.cond(
                mutate_now[s], mutate, lambda args: args, (variables, problem, opt_state, healthy)
            )

        row = {"loss": loss, "tau": jnp.broadcast_to(taus[s], loss.shape)}
        row.update(predictions)
        new_state = LoopState(s + 1, variables, opt_state, problem, graphs, healthy, overflow, rng)
        return _strong(new_state), row

    @functools.partial(jax.jit, compiler_options=options)
    def init(params, variables, problem, rng):
        del params  # the signature matches `advance`; graphs need only the geometry
        b = problem.atom_mask.shape[0]
        graphs = build_graphs(variables, problem)
        healthy = jnp.ones(b, dtype=bool)
        state = LoopState(
            jnp.zeros((), jnp.int32),
            variables,
            tx.init(variables),
            problem,
            graphs,
            healthy,
            graph_overflow(graphs, b),
            _raw_key(rng),
        )
        return _strong(state)

    @functools.partial(jax.jit, static_argnums=2, compiler_options=options)
    def advance(params, state, num_steps):
        return jax.lax.scan(functools.partial(step, params), state, length=num_steps)

    def run(params, variables, problem, rng):
        return advance(params, init(params, variables, problem, rng), config.num_steps)

    return Loop(init, advance, run)


def make_predict(models: dict):
    """Jitted `predict(params, crystal) -> {name: [B]}` with each graph built for the given structure."""
    options = compiler_options(tuple(sorted({m.predictor.kind for m in models.values()})))

    @functools.partial(jax.jit, compiler_options=options)
    def predict(params, crystal):
        out = {}
        for name, model in models.items():
            y = model.predictor.apply(params[name], *crystal)
            out[name] = y if model.transform is None else model.transform(y)
        return out

    return predict


def tolerance_of(species, patterns, problem: pz.Problem):
    """Goldschmidt t per candidate [B] from site-averaged expected radii of the A, B and X sites."""
    radius = pz.site_radius(species, patterns, problem)  # [B, N]

    def mean_over(role):
        on = (problem.site_roles == role) & problem.atom_mask
        return jnp.sum(jnp.where(on, radius, 0.0), axis=1) / jnp.maximum(jnp.sum(on, axis=1), 1)

    return chemistry.tolerance_factor(mean_over(0), mean_over(1), mean_over(2))


def _raw_key(rng):
    """A raw uint32 key from a typed or raw PRNG key (raw keys checkpoint as plain arrays)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def _strong(tree):
    """The tree (inside `jit`) with every weakly typed leaf made strongly typed (same dtype).

    The state is the argument of the jitted `advance`, whose compilation cache is keyed by the leaves' types
    including weak typing. A weakly typed leaf (e.g. logits made by `jnp.full(..., 1 / 98)`) comes out of the scan
    strongly typed, so without this every segment after the first one would compile the whole scan again.
    """
    return jax.tree.map(lambda x: x.astype(x.dtype), tree)


def _bcast(flag, x):
    return flag.reshape(flag.shape + (1,) * (x.ndim - 1))

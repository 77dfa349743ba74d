"""Compilation and sharing in the compiled loop: segments reuse one compilation, one neighbour search per builder."""

import jax
import jax.numpy as jnp
import numpy as np
from optim_toys import toy_problem

from jaxcrystal import geometry, objectives
from jaxcrystal.predictors.base import Predictor
from jaxcrystal.smoacs import parametrization as pz
from jaxcrystal.smoacs.loop import LoopConfig, PropertyModel, make_loop
from jaxcrystal.smoacs.mutation import CopyMutation

LRS = {"lattice": 2e-3, "coords": 5e-3, "atoms": 7e-3}


def _config(num_steps, graph_refresh="every"):
    return LoopConfig(
        objectives=(objectives.window("a", target=1.5, margin=0.0), objectives.linear("b", 0.5)),
        tolerance=None,
        geometry=pz.Geometry(length_range=(3.0, 10.0), coord_window=0.15, optimize_angles=False),
        learning_rates=LRS,
        num_steps=num_steps,
        mutation=CopyMutation(steps=(4,), top_ratio=0.25, keep_prob=0.1, noise=1e-3),
        graph_refresh=graph_refresh,
        main_property="a",
        second_property="b",
    )


def _graph_predictor(build, scale: float) -> Predictor:
    """A smooth graph property: scale · Σ_bonds exp(−d / 2 Å) + species term, on the frozen topology of `build`."""
    weights = jnp.asarray(np.random.default_rng(2).normal(size=98))

    def apply_with_graph(params, graph, lattice, frac, species, mask):
        d = geometry.bond_distances(lattice, frac, graph, fill=9.0)
        bonds = jnp.sum(jnp.where(graph.valid, jnp.exp(-d / 2.0), 0.0), axis=(1, 2))
        chem = jnp.sum(jnp.where(mask, species @ params["w"], 0.0), axis=1)
        return params["scale"] * bonds / mask.sum(axis=1) + 0.1 * chem

    def apply(params, lattice, frac, species, mask):
        return apply_with_graph(params, build(lattice, frac, mask), lattice, frac, species, mask)

    params = {"w": weights, "scale": jnp.asarray(scale)}
    return Predictor("toy", "graph", "", params, apply, build, apply_with_graph)


def _counting_builder(calls):
    def build(lattice, frac, mask):
        calls.append(1)
        return geometry.nearest_neighbors(lattice, frac, mask, cutoff=4.0, capacity=6, box=2)

    return build


def _setup(builders, b=6):
    problem, lengths, angles = toy_problem(b, seed=3)
    variables = pz.initial_variables(lengths, angles, problem)
    models = {
        "a": PropertyModel("a", _graph_predictor(builders[0], 1.0)),
        "b": PropertyModel("b", _graph_predictor(builders[1], -0.5)),
    }
    return models, {n: m.predictor.params for n, m in models.items()}, variables, problem


def test_segments_reuse_one_compilation():
    """The initial logits are weakly typed (`jnp.full(..., 1/98)`); the carry must not change type across calls."""
    calls = []
    build = _counting_builder(calls)
    models, params, variables, problem = _setup((build, build))
    assert variables.logits.weak_type  # the situation that used to trigger two extra compilations
    loop = make_loop(models, _config(num_steps=12))
    state = loop.init(params, variables, problem, jax.random.key(0))
    for _ in range(4):
        state, _ = loop.advance(params, state, 3)
    assert int(state.step) == 12
    assert loop.advance._cache_size() == 1


def test_same_builder_searches_once_and_matches_separate_builders():
    for refresh in ("every", (3, 7)):
        shared_calls, calls_a, calls_b = [], [], []
        shared = _counting_builder(shared_calls)
        models, params, variables, problem = _setup((shared, shared))
        out = make_loop(models, _config(8, refresh)).run(params, variables, problem, jax.random.key(1))
        # traced once in init and once in the scan body (a cond branch or the straight-line rebuild)
        assert len(shared_calls) == 2, refresh

        separate = (_counting_builder(calls_a), _counting_builder(calls_b))
        models2, params2, _, _ = _setup(separate)
        ref = make_loop(models2, _config(8, refresh)).run(params2, variables, problem, jax.random.key(1))
        assert len(calls_a) == len(calls_b) == 2
        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        graphs = out[0].graphs
        for x, y in zip(jax.tree.leaves(graphs["a"]), jax.tree.leaves(graphs["b"]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rebuild_every_step_equals_scheduled_rebuild_at_every_step():
    """The straight-line rebuild (no cond) and a cond whose schedule lists every step give the same run."""
    build = _counting_builder([])
    models, params, variables, problem = _setup((build, build))
    run_every = make_loop(models, _config(6, "every")).run
    run_listed = make_loop(models, _config(6, tuple(range(6)))).run
    a = run_every(params, variables, problem, jax.random.key(2))
    b = run_listed(params, variables, problem, jax.random.key(2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)

"""Small analytic predictors and problems for testing the optimizer machinery without a trained model."""

import jax.numpy as jnp
import numpy as np

from jaxcrystal.predictors.base import Predictor
from jaxcrystal.smoacs import parametrization as pz

# NaCl-like toy: site 0 cation (+1: Li, Na, K), site 1 anion (-1: F, Cl, Br); a dummy second pattern padded.
CATIONS, ANIONS = (3, 11, 19), (9, 17, 35)


def toy_problem(b: int, seed: int = 0) -> tuple[pz.Problem, np.ndarray, np.ndarray]:
    """B two-atom rock-salt-like candidates with one neutral pattern (+1, −1) and one dummy pattern."""
    rng = np.random.default_rng(seed)
    n, k = 2, 2
    masks = np.zeros((b, n, k, 98), dtype=bool)
    masks[:, 0, 0, [z - 1 for z in CATIONS]] = True
    masks[:, 1, 0, [z - 1 for z in ANIONS]] = True
    used = np.zeros((b, k), dtype=bool)
    used[:, 0] = True
    states = np.zeros((b, k, n), dtype=np.int64)
    states[:, 0] = [1, -1]
    init_frac = np.tile(np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]]), (b, 1, 1))
    lengths = rng.uniform(3.0, 6.0, size=(b, 3))
    problem = pz.Problem(
        site_masks=jnp.asarray(masks),
        pattern_used=jnp.asarray(used),
        oxidation_states=jnp.asarray(states),
        site_radii=jnp.zeros((b, n, k, 98)),
        site_roles=jnp.full((b, n), -1),
        atom_mask=jnp.ones((b, n), dtype=bool),
        init_frac=jnp.asarray(init_frac),
        base_length=jnp.asarray(lengths.max(axis=1)),
        template_index=jnp.arange(b),
    )
    return problem, lengths, np.full((b, 3), 90.0)


def toy_predictor() -> Predictor:
    """property = mean_i p_i · w + 0.1 · cbrt(volume) + 0.05 · mean sin(2π frac): smooth in every input."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=98))

    def apply(params, lattice, frac, species, mask):
        per_atom = species @ params["w"]
        count = jnp.sum(mask, axis=1)
        chem = jnp.sum(jnp.where(mask, per_atom, 0.0), axis=1) / count
        volume = jnp.abs(jnp.linalg.det(lattice))
        geo = jnp.sum(jnp.where(mask[..., None], jnp.sin(2 * jnp.pi * frac), 0.0), axis=(1, 2)) / count
        return chem + 0.1 * jnp.cbrt(volume) + 0.05 * geo

    return Predictor(kind="toy", name="toy", units="", params={"w": weights}, apply=apply)

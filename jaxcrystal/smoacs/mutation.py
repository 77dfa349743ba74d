"""Copy-mutation: the evolutionary reset SMOACS applies at a few scheduled steps (smoacs.md §5.4), jittable.

Groups, from the losses of the step's forward pass:
* A (elite): main term 0, second term ≤ `elite_second_max`, tolerance term ≤ `elite_tolerance_max` (if any).
  Empty in maximization tasks (SMOACS: no main term can be 0).
* B: among the others, the max(1, ⌊top_ratio · |non-A|⌋) lowest total losses.
* C: the rest. Each C candidate is kept with probability `keep_prob` (SMOACS's `group_C_use_rate`, which the
  upstream code uses as a *skip* probability despite its name), otherwise it is overwritten by a donor drawn
  uniformly from A ∪ B: every variable and constant of the donor is copied, Gaussian noise of std `noise` is added
  to the scaled lengths, angles, pattern weights and coordinates, and the element logits restart uniform.

Unhealthy candidates (NaN/inf met earlier) rank last, so they are replaced from a donor unless kept.
Deliberate difference: SMOACS re-initializes the logits to `slot_index` (so slot 0 gets ~0, below its 1e-6 floor;
smoacs.md §10 item 11); here every replaced candidate restarts from the uniform 1/98.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxcrystal.smoacs.parametrization import Problem, Variables


@dataclasses.dataclass(frozen=True)
class CopyMutation:
    """Copy-mutation settings (defaults: SMOACS's Crystalformer perovskite preset)."""

    steps: tuple[int, ...] = (100, 150)
    top_ratio: float = 0.10
    keep_prob: float = 0.05
    noise: float = 7e-5
    elite_second_max: float = -0.5
    elite_tolerance_max: float = 0.0


def groups(main_term, second_term, tolerance_term, total, healthy, settings: CopyMutation, has_elite: bool):
    """Boolean [B] masks (elite, top) of groups A and B; C is the complement of their union."""
    elite = jnp.zeros_like(healthy)
    if has_elite:
        elite = healthy & (main_term <= 0.0) & (second_term <= settings.elite_second_max)
        if tolerance_term is not None:
            elite = elite & (tolerance_term <= settings.elite_tolerance_max)
    others = ~elite
    n_others = jnp.sum(others)
    n_top = jnp.maximum(1, jnp.floor(settings.top_ratio * n_others).astype(jnp.int32))
    score = jnp.where(others & healthy, total, jnp.inf)
    score = jnp.where(others, score, -jnp.inf)  # elite first, then the others by loss
    rank = jnp.argsort(jnp.argsort(score))
    n_elite = jnp.sum(elite)
    top = others & (rank < n_elite + n_top)
    return elite, top


def copy_mutate(
    rng, variables: Variables, problem: Problem, elite, top, settings: CopyMutation, mutate_angles: bool = True
):
    """Overwrites the replaced group-C candidates by noisy copies of donors from A ∪ B.

    `mutate_angles=False` (frozen angles, e.g. perovskites) copies the donor's angles without noise, as SMOACS.

    Returns:
      (variables, problem, replaced [B] bool).
    """
    k_keep, k_donor, k_noise = jax.random.split(rng, 3)
    b = elite.shape[0]
    pool = elite | top
    keep = jax.random.uniform(k_keep, (b,)) < settings.keep_prob
    replaced = ~pool & ~keep
    donor = jax.random.categorical(k_donor, jnp.where(pool, 0.0, -jnp.inf), shape=(b,))
    source = jnp.where(replaced, donor, jnp.arange(b))

    def take(x):
        return x[source]

    variables = jax.tree.map(take, variables)
    problem = jax.tree.map(take, problem)
    noise_keys = jax.random.split(k_noise, 4)

    def noisy(key, x):
        shape = (b,) + (1,) * (x.ndim - 1)
        eps = settings.noise * jax.random.normal(key, x.shape, x.dtype)
        return x + jnp.where(replaced.reshape(shape), eps, 0.0)

    variables = Variables(
        lengths=noisy(noise_keys[0], variables.lengths),
        angles=noisy(noise_keys[1], variables.angles) if mutate_angles else variables.angles,
        frac=noisy(noise_keys[2], variables.frac),
        logits=jnp.where(replaced[:, None, None], 1.0 / 98.0, variables.logits),
        pattern_weights=noisy(noise_keys[3], variables.pattern_weights),
    )
    return variables, problem, replaced

"""SMOACS variables and their decoding into a crystal batch (reference/smoacs.md §1).

Per candidate b (all arrays carry the candidate axis B first):

| variable          | shape         | decodes to                                                        |
|-------------------|---------------|-------------------------------------------------------------------|
| `lengths`         | `[B, 3]`      | a, b, c = clip(s · base_b, length_range) Å                        |
| `angles`          | `[B, 3]`      | α, β, γ = 30° + 120° · clip(t, 0, 1)                              |
| `frac`            | `[B, N, 3]`   | fractional coords, clipped to the template ± ε window if one is set |
| `logits`          | `[B, N, 98]`  | element logits θ                                                  |
| `pattern_weights` | `[B, K]`      | oxidation-pattern weights o, shared by the atoms of a candidate   |

The species distribution is the SMOACS three-softmax mixture: per pattern k an element softmax restricted to the
elements that may take the oxidation state pattern k gives the site, a softmax over the candidate's patterns, their
mixture, and a final sharpening softmax, all at temperature τ. At τ → 0 every atom takes an element of its own
state in the *same* pattern, so the discrete crystal is charge-neutral by construction.

Two masking modes:
* `"exact"` (default): forbidden elements (and dummy patterns) get probability exactly 0 at every τ, Z ≥ 87 is
  excluded through the masks, no 1e-6 floor. The predictors only ever see allowed elements.
* `"smoacs"`: the upstream arithmetic — forbidden elements get logit 0 (not −∞), so early in the run most of the
  mass sits on forbidden elements (smoacs.md §1.6); θ and o are floored at 1e-6; columns Z ≥ 87 are zeroed.

Coordinates are *not* wrapped into [0, 1) here: the predictors are periodic, and unwrapped coordinates keep bond
vectors continuous while a graph topology (neighbour index + image offset) is frozen. Output files wrap them.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrystal.crystal import lattice_from_parameters

MAX_Z = 86  # elements above Rn are never proposed (as SMOACS)
_BLOCKED = -1e9  # logit of a forbidden choice: exp underflows to exactly 0 in float32 and float64


class Problem(NamedTuple):
    """Per-candidate constants of a batch; copy-mutation moves them together with the variables.

    Attributes:
      site_masks: [B, N, K, 98] bool, element e allowed at atom i under pattern k.
      pattern_used: [B, K] bool, False for dummy patterns that pad a template's patterns up to K.
      oxidation_states: [B, K, N] int, the state pattern k assigns to atom i (0 for padding).
      site_radii: [B, N, K, 98] Å, ionic radius of element e at atom i's site under pattern k (0 if unused).
      site_roles: [B, N] int, 0 = A, 1 = B, 2 = X, -1 = none / padding.
      atom_mask: [B, N] bool, real atoms.
      init_frac: [B, N, 3] template fractional coordinates (centre of the ε window).
      base_length: [B] Å, the template's largest lattice length (scale of `lengths`).
      template_index: [B] int, index of the template (lineage) in the run's template list.
    """

    site_masks: jax.Array
    pattern_used: jax.Array
    oxidation_states: jax.Array
    site_radii: jax.Array
    site_roles: jax.Array
    atom_mask: jax.Array
    init_frac: jax.Array
    base_length: jax.Array
    template_index: jax.Array


class Variables(NamedTuple):
    """The optimized tensors of a batch (see the module docstring)."""

    lengths: jax.Array  # [B, 3] scaled
    angles: jax.Array  # [B, 3] scaled
    frac: jax.Array  # [B, N, 3]
    logits: jax.Array  # [B, N, 98]
    pattern_weights: jax.Array  # [B, K]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static decoding settings.

    Attributes:
      length_range: (min, max) lattice length in Å (SMOACS: (2, 10) · n for an n x n x n supercell).
      coord_window: ε, the largest displacement of a fractional coordinate from the template (None = free).
      optimize_angles: False keeps the template angles (perovskites).
      mask_mode: "exact" or "smoacs" (module docstring).
    """

    length_range: tuple[float, float] = (2.0, 10.0)
    coord_window: float | None = None
    optimize_angles: bool = True
    mask_mode: str = "exact"


def initial_variables(lattice_lengths, lattice_angles, problem: Problem) -> Variables:
    """SMOACS initialization: s = abc / max(abc), t = (angle − 30)/120, θ = 1/98, o = pattern_used.

    Args:
      lattice_lengths: [B, 3] template lengths, Å.
      lattice_angles: [B, 3] template angles, degrees.
      problem: the batch's `Problem`.
    """
    lengths = jnp.asarray(lattice_lengths) / jnp.asarray(problem.base_length)[:, None]
    angles = (jnp.asarray(lattice_angles) - 30.0) / 120.0
    b, n = problem.atom_mask.shape
    logits = jnp.full((b, n, 98), 1.0 / 98.0)
    return Variables(
        lengths, angles, jnp.asarray(problem.init_frac), logits, problem.pattern_used.astype(lengths.dtype)
    )


def jitter_coordinates(variables: Variables, problem: Problem, std: float, rng) -> Variables:
    """Displaces the starting coordinates of real atoms by seeded Gaussian noise of `std` (fractional units).

    Templates sit at symmetric points where many gradient components vanish exactly; there Adam's first steps
    turn round-off (~1e-8 in float32) into full ±lr moves, so the trajectory would depend on the last bits of the
    arithmetic (device count, batch layout). A seeded displacement far above round-off but far below the
    coordinate window (default 1e-4) makes the symmetry breaking part of the seed instead.
    """
    if not std:
        return variables
    noise = std * jax.random.normal(rng, variables.frac.shape, variables.frac.dtype)
    return variables._replace(frac=variables.frac + jnp.where(problem.atom_mask[..., None], noise, 0.0))


def decode_lattice(variables: Variables, problem: Problem, geometry: Geometry):
    """Lattice rows [B, 3, 3] Å from the scaled lengths and angles."""
    low, high = geometry.length_range
    lengths = jnp.clip(variables.lengths * problem.base_length[:, None], low, high)
    angles = 30.0 + 120.0 * jnp.clip(variables.angles, 0.0, 1.0)
    return lattice_from_parameters(lengths, angles)


def decode_frac(variables: Variables, problem: Problem, geometry: Geometry):
    """Fractional coordinates [B, N, 3] (unwrapped), clipped to the template ± ε window when one is set."""
    if geometry.coord_window is None:
        return variables.frac
    eps = geometry.coord_window
    return jnp.clip(variables.frac, problem.init_frac - eps, problem.init_frac + eps)


def _masked_softmax(logits, allowed, axis=-1):
    return jax.nn.softmax(jnp.where(allowed, logits, _BLOCKED), axis=axis)


def species_distribution(variables: Variables, problem: Problem, tau, mask_mode: str = "exact"):
    """The soft species p [B, N, 98] and the pattern probabilities w [B, N, K] at temperature τ."""
    masks = problem.site_masks  # [B, N, K, 98]
    used = problem.pattern_used[:, None, :]  # [B, 1, K]
    theta = variables.logits[:, :, None, :]  # [B, N, 1, 98]
    weights = jnp.broadcast_to(variables.pattern_weights[:, None, :], used.shape[:1] + masks.shape[1:3])
    if mask_mode == "exact":
        allowed = masks & (jnp.arange(98) < MAX_Z)
        q = _masked_softmax(theta / tau, allowed)  # [B, N, K, 98]
        w = _masked_softmax(weights / tau, used)  # [B, N, K]
        r = jnp.einsum("bnk,bnke->bne", w, q)
        reachable = jnp.any(allowed & used[..., None], axis=2)  # [B, N, 98]
        p = _masked_softmax(r / tau, reachable)
    elif mask_mode == "smoacs":
        theta = jnp.where(jnp.arange(98) < MAX_Z, theta, 0.0)
        theta = jnp.maximum(theta, 1e-6)
        q = jax.nn.softmax(theta * masks / tau, axis=-1)
        w = jax.nn.softmax(used * jnp.maximum(weights, 1e-6) / tau, axis=-1)
        r = jnp.einsum("bnk,bnke->bne", w, q)
        p = jax.nn.softmax(r / tau, axis=-1)
    else:
        raise ValueError(f"mask_mode must be 'exact' or 'smoacs', got {mask_mode!r}")
    return p, w


def decode(variables: Variables, problem: Problem, geometry: Geometry, tau):
    """(lattice [B,3,3], frac [B,N,3], species [B,N,98], mask [B,N]) and pattern probabilities [B,N,K]."""
    species, patterns = species_distribution(variables, problem, tau, geometry.mask_mode)
    lattice = decode_lattice(variables, problem, geometry)
    frac = decode_frac(variables, problem, geometry)
    return (lattice, frac, species, problem.atom_mask), patterns


def discretize(variables: Variables, problem: Problem):
    """The τ → 0 limit, taken exactly: one pattern per candidate, one allowed element per atom.

    Returns:
      (elements [B, N] int Z-1, pattern [B] int, oxidation states [B, N] int). The pattern is the used one with
      the largest weight; every atom takes its largest-logit element among those allowed under that pattern, so
      the composition is neutral whenever the pattern is.
    """
    weights = jnp.where(problem.pattern_used, variables.pattern_weights, -jnp.inf)
    pattern = jnp.argmax(weights, axis=-1)  # [B]
    allowed = jnp.take_along_axis(problem.site_masks, pattern[:, None, None, None], axis=2)[:, :, 0, :]
    allowed = allowed & (jnp.arange(98) < MAX_Z)
    elements = jnp.argmax(jnp.where(allowed, variables.logits, -jnp.inf), axis=-1)
    states = jnp.take_along_axis(problem.oxidation_states, pattern[:, None, None], axis=1)[:, 0, :]
    return elements, pattern, states


def site_radius(species, patterns, problem: Problem):
    """Expected ionic radius per atom [B, N] Å: Σ_e p_ie Σ_k w_ik ρ_iek (smoacs.md §4.4)."""
    return jnp.einsum("bne,bnk,bnke->bn", species, patterns, problem.site_radii)


def project(variables: Variables, problem: Problem, geometry: Geometry) -> Variables:
    """Puts raw variables back inside their boxes after an update.

    SMOACS leaves them outside, where the clip gives zero gradient for good (e.g. its lattice_lr = 9.0 run pins
    every length at a bound, smoacs.md §10 item 3); projecting keeps the gradient alive.
    """
    low, high = geometry.length_range
    base = problem.base_length[:, None]
    lengths = jnp.clip(variables.lengths, low / base, high / base)
    angles = jnp.clip(variables.angles, 0.0, 1.0)
    frac = decode_frac(variables, problem, geometry)
    return variables._replace(lengths=lengths, angles=angles, frac=frac)


def as_numpy(tree):
    """Host copy of a pytree of arrays."""
    return jax.tree.map(np.asarray, tree)

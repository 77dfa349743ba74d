"""The hand-written backward pass of the periodic attention equals autodiff of its definition.

The reference below is the attention written as plainly as possible (softmax over key atom × translation,
basis from K exponentials) and differentiated by JAX; `periodic_attention` must agree with it in value and in
the gradient of a random linear functional with respect to every float input, with padding atoms, adaptive
boxes, several blocks and both gradient modes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrystal.models.periodic_attention import block_plan, periodic_attention, translation_grid

RANGES = (2, 1, 2)
CENTERS = np.arange(1, 9) * 0.8
WIDTH = 0.8


def reference(q, k, v, gamma, lattice, frac, mask, box, exact):
    shifts = jnp.asarray(translation_grid(RANGES), q.dtype)
    image = frac[:, None, :, None, :] - frac[:, :, None, None, :] + shifts  # [B, Nq, Nk, M, 3]
    r = jnp.einsum("bqnmc,bcd->bqnmd", image, lattice)
    d2 = jnp.sum(r**2, -1)
    dist = jnp.where(d2 > 0, jnp.sqrt(jnp.where(d2 > 0, d2, 1.0)), 0.0)
    if not exact:
        dist = jax.lax.stop_gradient(dist)
    basis = jnp.exp(-0.5 * ((dist[..., None] - CENTERS) / WIDTH) ** 2)
    logits = jnp.einsum("bqhc,bnhc->bqhn", q, k)[..., None] / np.sqrt(q.shape[-1])
    logits = logits + gamma[..., None, None] * d2[:, :, None]
    inside = jnp.all(jnp.abs(shifts)[None, None, None] <= box[:, :, :, None, :], -1)  # [B, Nq, H, M]
    valid = mask[:, None, None, :, None] & inside[:, :, :, None, :]
    logits = jnp.where(valid, logits, -1e30)
    w = jax.nn.softmax(logits.reshape(logits.shape[:3] + (-1,)), -1).reshape(logits.shape)
    agg_v = jnp.einsum("bqhnm,bnhc->bqhc", w, v)
    agg_basis = jnp.einsum("bqhnm,bqnmk->bqhk", w, basis)
    return agg_v, agg_basis


def inputs(seed=0, b=3, n=5, h=2, d=4):
    rng = np.random.default_rng(seed)
    lattice = 3.0 * np.eye(3) + rng.normal(scale=0.3, size=(b, 3, 3))
    frac = rng.uniform(size=(b, n, 3))
    mask = np.ones((b, n), bool)
    mask[1, 3:] = False  # a padded crystal
    q, k, v = (rng.normal(size=(b, n, h, d)) for _ in range(3))
    gamma = -rng.uniform(0.2, 1.0, size=(b, n, h))
    box = rng.integers(0, 3, size=(b, n, h, 3))
    floats = tuple(jnp.asarray(x, jnp.float64) for x in (q, k, v, gamma, lattice, frac))
    return floats, jnp.asarray(mask), jnp.asarray(box, jnp.int32)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2, 7])
def test_custom_backward_equals_autodiff(exact, chunk_size, x64):
    floats, mask, box = inputs()
    probe_v, probe_b = (jnp.asarray(np.random.default_rng(1).normal(size=s)) for s in ((3, 5, 2, 4), (3, 5, 2, 8)))

    def loss(fn, *xs):
        agg_v, agg_basis = fn(*xs)
        real = mask[..., None, None]  # padding query rows are meaningless by contract
        return jnp.sum(jnp.where(real, agg_v * probe_v, 0)) + jnp.sum(jnp.where(real, agg_basis * probe_b, 0))

    def ours(q, k, v, gamma, lattice, frac):
        return periodic_attention(
            q, k, v, gamma, lattice, frac, mask, ranges=RANGES, box=box, centers=CENTERS, width=WIDTH,
            exact_basis_gradient=exact, chunk_size=chunk_size,
        )  # fmt: skip

    def theirs(q, k, v, gamma, lattice, frac):
        return reference(q, k, v, gamma, lattice, frac, mask, box, exact)

    np.testing.assert_allclose(loss(ours, *floats), loss(theirs, *floats), rtol=1e-13)
    got = jax.jit(jax.grad(lambda *xs: loss(ours, *xs), argnums=tuple(range(6))))(*floats)
    want = jax.grad(lambda *xs: loss(theirs, *xs), argnums=tuple(range(6)))(*floats)
    for name, g, w in zip(("q", "k", "v", "gamma", "lattice", "frac"), got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-12 * scale, name


def test_block_plan_balances_blocks():
    # 128 five-atom crystals, 125 translations, 64 basis functions, float32: at most 41 crystals fit 32 MiB;
    # four blocks of 32 (no padding), not 41 + 41 + 41 + 5.
    assert block_plan(128, 5, 125, 64, 4) == (32, 5)
    assert block_plan(8, 135, 125, 64, 4, chunk_size=100) == (1, 68)  # 2 blocks of 68 query rows for 135 atoms
    for b, chunk in [(7, 10), (100, 30), (128, 41), (3, 2)]:
        c, _ = block_plan(b, 1, 1, 1, 4, chunk_size=chunk)
        blocks = -(-b // c)
        assert c <= chunk and blocks == -(-b // min(chunk, b)) and blocks * c - b < blocks

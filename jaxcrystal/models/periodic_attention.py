"""Crystalformer's infinitely connected attention, evaluated in memory-bounded chunks.

For a query atom i and head h the attention runs over every key atom j *and* every lattice translation n of it
(the "infinitely connected" sum, truncated to a box of translations):

    d²_ijn = |(f_j - f_i + n) · A|²                          Å², A = lattice rows, n integer
    w_ijhn = softmax over (j, n) of  q_ih·k_jh / √D + γ_ih d²_ijn   (γ_ih < 0, Å⁻²)
    agg_v_ih     = Σ_jn w_ijhn v_jh                             [D]
    agg_basis_ih = Σ_jn w_ijhn φ(d_ijn)                         [K], φ_k(d) = exp(-(d - μ_k)² / (2 s²))

Crystalformer writes this as a softmax over keys of q·k/√D + α_ijh with α_ijh = logsumexp_n γ_ih d²_ijn, and a
value v_jh + P_h Σ_n softmax_n(γ_ih d²_ijn) φ(d_ijn); the joint softmax over (j, n) above is the same quantity
(exp(α) is the sum over n of the Gaussians), and the per-head projection P_h is applied by the caller after the
aggregation (exact, and K/D times cheaper than projecting every pair).

The dominant tensors are per (query, key, translation): the basis φ [Q, N, M, K] and the weights [Q, H, N, M].
They are never built for the whole batch: queries are processed in blocks of `chunk_size` (crystal, atom) rows
with `lax.map`, and each block is rematerialized (`jax.checkpoint`) in the backward pass, so the peak memory is
that of one block whatever the batch size.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# Automatic block size: the number of query rows whose basis tensor φ [rows, N, M, K] fits this many bytes.
AUTO_BLOCK_BYTES = 256 * 2**20

_MASKED_LOGIT = -1e30  # finite, so that fully masked (padding) rows stay NaN-free


def translation_grid(ranges) -> np.ndarray:
    """All integer translations n with |n_d| <= ranges[d], [M, 3] int, n_1 slowest; M = Π (2 R_d + 1)."""
    axes = [np.arange(-r, r + 1) for r in ranges]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3)


def inverse_plane_spacings(lattice):
    """1 / interplanar spacing of the three lattice-plane families, [..., 3] Å⁻¹ (= |b_d| / 2π).

    Args:
      lattice: [..., 3, 3] lattice vectors as rows, Å.
    """
    inverse = jnp.linalg.inv(lattice)  # columns are the reciprocal vectors / 2π
    return jnp.linalg.norm(inverse, axis=-2)


def safe_sqrt(x):
    """√x with a zero (not NaN) derivative at x = 0 (the self-image of an atom sits at distance 0)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _block(lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box, *, shifts, centers, width, exact_basis_gradient):
    """The attention of Q query atoms of one crystal.

    Args:
      lattice: [3, 3] rows, Å.
      frac_k, mask_k, k, v: keys of the crystal: [N, 3] fractional, [N] bool, [N, H, D], [N, H, D].
      frac_q, q, gamma: queries: [Q, 3] fractional, [Q, H, D], [Q, H] Å⁻² (negative).
      box: [Q, H, 3] int translation half-widths per query and head, or None (every translation in `shifts`).
      shifts: [M, 3] integer translations (constant).
      centers: [K] basis centres, Å; width: basis width, Å.
      exact_basis_gradient: False stops the gradient of the distance inside φ (upstream's autograd).

    Returns:
      agg_v [Q, H, D], agg_basis [Q, H, K].
    """
    dtype = q.dtype
    shifts_f = shifts.astype(dtype)
    frac_diff = frac_k[None, :, :] - frac_q[:, None, :]  # [Q, N, 3]
    image = frac_diff[:, :, None, :] + shifts_f  # [Q, N, M, 3]
    r = jnp.einsum("qnmc,cd->qnmd", image, lattice, precision=HIGHEST)
    d2 = jnp.sum(r * r, axis=-1)  # [Q, N, M]
    dist = safe_sqrt(d2)
    if not exact_basis_gradient:
        dist = jax.lax.stop_gradient(dist)
    basis = jnp.exp(-0.5 * jnp.square((dist[..., None] - centers) / width))  # [Q, N, M, K]

    scores = jnp.einsum("qhc,nhc->qhn", q, k, precision=HIGHEST) / jnp.sqrt(jnp.asarray(q.shape[-1], dtype))
    logits = scores[..., None] + gamma[:, :, None, None] * d2[:, None, :, :]  # [Q, H, N, M]
    valid = mask_k[None, None, :, None]
    if box is not None:
        inside = jnp.all(jnp.abs(shifts)[None, None, :, :] <= box[:, :, None, :], axis=-1)  # [Q, H, M]
        valid = valid & inside[:, :, None, :]
    logits = jnp.where(valid, logits, _MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=(2, 3))

    agg_v = jnp.einsum("qhn,nhc->qhc", jnp.sum(weights, axis=-1), v, precision=HIGHEST)
    agg_basis = jnp.einsum("qhnm,qnmk->qhk", weights, basis, precision=HIGHEST)
    return agg_v, agg_basis


def block_plan(num_crystals: int, num_atoms: int, num_shifts: int, num_basis: int, itemsize: int, chunk_size=None):
    """How the queries are split: (crystals per block C, query atoms per block Q).

    `chunk_size` is the number of (crystal, query atom) rows per block; None picks the largest block whose basis
    tensor φ [rows, N, M, K] fits `AUTO_BLOCK_BYTES`. A block holds whole crystals when `chunk_size >= N`,
    otherwise a near-equal slice of one crystal's atoms.
    """
    if chunk_size is None:
        chunk_size = AUTO_BLOCK_BYTES // (num_atoms * num_shifts * num_basis * itemsize)
    chunk_size = max(1, int(chunk_size))
    if chunk_size >= num_atoms:
        return max(1, min(num_crystals, chunk_size // num_atoms)), num_atoms
    num_query_blocks = math.ceil(num_atoms / chunk_size)
    return 1, math.ceil(num_atoms / num_query_blocks)


def _pad_axis(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def periodic_attention(
    q,
    k,
    v,
    gamma,
    lattice,
    frac,
    mask,
    *,
    ranges,
    box=None,
    centers,
    width: float,
    exact_basis_gradient: bool = True,
    chunk_size=None,
):
    """Infinitely connected attention of every atom, aggregated before any projection.

    Args:
      q, k, v: [B, N, H, D] per-head queries, keys, values.
      gamma: [B, N, H] Gaussian exponents γ_ih, Å⁻² (negative).
      lattice: [B, 3, 3] rows, Å. frac: [B, N, 3] fractional. mask: [B, N] bool, False for padding atoms.
      ranges: static (R_1, R_2, R_3): translations n with |n_d| <= R_d are summed.
      box: None, or [B, N, H, 3] int per-query, per-head half-widths (only translations inside both `ranges`
        and the box count): the adaptive truncation.
      centers: [K] basis centres, Å. width: basis width, Å.
      exact_basis_gradient: False reproduces upstream's gradient, which omits dφ/dd.
      chunk_size: (crystal, atom) query rows per block; None = automatic (see `block_plan`).

    Returns:
      agg_v [B, N, H, D] and agg_basis [B, N, H, K]; rows of padding atoms are finite but meaningless.
    """
    num_crystals, num_atoms, num_heads, head_dim = q.shape
    shifts = translation_grid(ranges)
    centers = jnp.asarray(centers, q.dtype)
    crystals_per_block, queries_per_block = block_plan(
        num_crystals, num_atoms, len(shifts), centers.shape[0], q.dtype.itemsize, chunk_size
    )
    num_crystal_blocks = math.ceil(num_crystals / crystals_per_block)
    num_query_blocks = math.ceil(num_atoms / queries_per_block)
    padded_b = num_crystal_blocks * crystals_per_block
    padded_n = num_query_blocks * queries_per_block
    if box is None:
        box = jnp.zeros((num_crystals, num_atoms, num_heads, 3), jnp.int32)
        use_box = False
    else:
        use_box = True

    def crystal_blocks(x, fill=0):
        x = _pad_axis(x, 0, padded_b, fill)
        return x.reshape((num_crystal_blocks, crystals_per_block) + x.shape[1:])

    def query_blocks(x):
        x = crystal_blocks(_pad_axis(x, 1, padded_n))
        x = x.reshape(x.shape[:2] + (num_query_blocks, queries_per_block) + x.shape[3:])
        return jnp.moveaxis(x, 2, 0)  # [query blocks, crystal blocks, C, Q, ...]

    eye = jnp.broadcast_to(jnp.eye(3, dtype=lattice.dtype), (padded_b - num_crystals, 3, 3))
    keys = (
        jnp.concatenate([lattice, eye]).reshape(num_crystal_blocks, crystals_per_block, 3, 3),
        crystal_blocks(frac),
        crystal_blocks(mask, False),
        crystal_blocks(k),
        crystal_blocks(v),
    )
    queries = tuple(query_blocks(x) for x in (frac, q, gamma, box))
    queries = tuple(jnp.moveaxis(x, 1, 0) for x in queries)  # [crystal blocks, query blocks, C, Q, ...]

    def block(crystal_keys, query_rows):
        frac_q, q_rows, gamma_rows, box_rows = query_rows
        return jax.vmap(
            lambda lat, fk, mk, kk, vv, fq, qq, gq, bq: _block(
                lat,
                fk,
                mk,
                kk,
                vv,
                fq,
                qq,
                gq,
                bq if use_box else None,
                shifts=shifts,
                centers=centers,
                width=width,
                exact_basis_gradient=exact_basis_gradient,
            )
        )(*crystal_keys, frac_q, q_rows, gamma_rows, box_rows)

    block = jax.checkpoint(block)

    def crystal_block(args):
        crystal_keys, query_rows = args
        return jax.lax.map(lambda rows: block(crystal_keys, rows), query_rows)

    agg_v, agg_basis = jax.lax.map(crystal_block, (keys, queries))

    def unblock(x):  # [crystal blocks, query blocks, C, Q, ...] -> [B, N, ...]
        x = jnp.moveaxis(x, 1, 2)
        x = x.reshape((padded_b, padded_n) + x.shape[4:])
        return x[:num_crystals, :num_atoms]

    return unblock(agg_v), unblock(agg_basis)

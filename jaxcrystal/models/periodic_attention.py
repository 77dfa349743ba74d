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
with `lax.map`, and the backward pass of a block (`_make_block`, a hand-written VJP) rebuilds them from the block's
inputs, so the peak memory is that of one block whatever the batch size.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# Automatic block size: the number of query rows whose basis tensor φ [rows, N, M, K] fits this many bytes.
# 32 MiB is 7 rows of a 135-atom crystal with 125 translations; on a 2-core CPU, 8 rows per block gave the fastest
# forward+gradient of 2, 8 and 45 (`benchmarks/bench_crystalformer.py --chunk-size`). A GPU wants larger blocks.
AUTO_BLOCK_BYTES = 32 * 2**20

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


def gaussian_basis(dist, centers, width: float):
    """φ_k(d) = exp(-(d - μ_k)² / (2 s²)): [...] distances (Å) -> [..., K]; centres [K] Å, width s Å."""
    return jnp.exp(-0.5 * jnp.square((dist[..., None] - jnp.asarray(centers, dist.dtype)) / width))


def _geometry(lattice, frac_k, frac_q, shifts):
    """Bond vectors from every query to every image of every key.

    r_qnm = (f_n - f_q) A + t_m A, built as the sum of the two products so that no [Q, N, M, 3] x [3, 3] product
    is needed. Returns (within-cell vectors [Q, N, 3] fractional, r [Q, N, M, 3] Å, d² [Q, N, M] Å²).
    """
    frac_diff = frac_k[None, :, :] - frac_q[:, None, :]  # [Q, N, 3]
    cell_part = jnp.einsum("qnc,cd->qnd", frac_diff, lattice, precision=HIGHEST)
    shift_part = jnp.einsum("mc,cd->md", shifts.astype(frac_q.dtype), lattice, precision=HIGHEST)
    r = cell_part[:, :, None, :] + shift_part
    return frac_diff, r, jnp.sum(r * r, axis=-1)


def _logits(k, mask_k, q, gamma, box, d2, shifts):
    """Attention logits [Q, H, N, M]: q·k/√D + γ d², `_MASKED_LOGIT` outside the key mask and the box."""
    scores = jnp.einsum("qhc,nhc->qhn", q, k, precision=HIGHEST) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    logits = scores[..., None] + gamma[:, :, None, None] * d2[:, None, :, :]
    valid = mask_k[None, None, :, None]
    if box is not None:
        inside = jnp.all(jnp.abs(shifts)[None, None, :, :] <= box[:, :, None, :], axis=-1)  # [Q, H, M]
        valid = valid & inside[:, :, None, :]
    return jnp.where(valid, logits, _MASKED_LOGIT)


def _make_block(shifts, centers, width: float, exact_basis_gradient: bool, with_box: bool):
    """The attention of Q query atoms of one crystal, with a hand-written backward pass (`jax.custom_vjp`).

    The returned function maps
      lattice [3, 3] rows Å; keys frac_k [N, 3], mask_k [N] bool, k [N, H, D], v [N, H, D];
      queries frac_q [Q, 3], q [Q, H, D], gamma [Q, H] Å⁻² (negative), box [Q, H, 3] int (ignored unless
      `with_box`: per-query, per-head translation half-widths)
    to (agg_v [Q, H, D], agg_basis [Q, H, K]).

    The forward pass keeps only the inputs and the softmax statistics [Q, H] for the backward pass, which
    rebuilds distances, weights w and basis φ (p = key atom n and translation m) and needs a single contraction
    with φ, for the cotangents ḡ [Q, H, K] of agg_basis and ḡv [Q, H, D] of agg_v:
      Gb_hp = Σ_k ḡ_hk φ_pk,   Gμ_hp = Σ_k ḡ_hk μ_k φ_pk          (one [2H, K] x [K, P] product)
      G_hp  = Gb_hp + Σ_c ḡv_hc v_nhc
      ∂L/∂logit_hp = w_hp (G_hp - Σ_p' w_hp' G_hp')     (the inner sum is ḡ·agg_basis + ḡv·agg_v)
      ∂L/∂d_p      = Σ_h w_hp (Gμ_hp - d_p Gb_hp) / s²  (dφ_k/dd = (μ_k - d) φ_k / s²; absent for "smoacs")
    so the [Q, N, M, K] tensor ∂L/∂φ is never formed. Autodiff of the same forward pass materializes it and
    re-evaluates φ's exponentials; this backward pass is exact and made forward+gradient 1.5x faster (8 x 135
    atoms, same blocks). Being a `custom_vjp`, it supports reverse mode only (`jax.grad`, not `jax.jvp`).
    """
    shifts = np.asarray(shifts)
    centers_np = np.asarray(centers)

    def forward(lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box):
        _, _, d2 = _geometry(lattice, frac_k, frac_q, shifts)
        dist = safe_sqrt(d2)
        logits = _logits(k, mask_k, q, gamma, box if with_box else None, d2, shifts)
        peak = jnp.max(logits, axis=(2, 3))  # [Q, H]
        unnormalized = jnp.exp(logits - peak[:, :, None, None])
        total = jnp.sum(unnormalized, axis=(2, 3))
        weights = unnormalized / total[:, :, None, None]
        basis = gaussian_basis(dist, centers_np, width)  # [Q, N, M, K]
        agg_v = jnp.einsum("qhn,nhc->qhc", jnp.sum(weights, axis=-1), v, precision=HIGHEST)
        agg_basis = jnp.einsum("qhnm,qnmk->qhk", weights, basis, precision=HIGHEST)
        return (agg_v, agg_basis), (peak, total)

    @jax.custom_vjp
    def block(lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box):
        return forward(lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box)[0]

    def block_fwd(lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box):
        outputs, stats = forward(lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box)
        return outputs, (lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box, stats, outputs)

    def block_bwd(residuals, cotangents):
        lattice, frac_k, mask_k, k, v, frac_q, q, gamma, box, (peak, total), (agg_v, agg_basis) = residuals
        g_v, g_basis = cotangents  # [Q, H, D], [Q, H, K]
        dtype = q.dtype
        centers = jnp.asarray(centers_np, dtype)
        heads = q.shape[1]

        frac_diff, r, d2 = _geometry(lattice, frac_k, frac_q, shifts)
        dist = safe_sqrt(d2)
        logits = _logits(k, mask_k, q, gamma, box if with_box else None, d2, shifts)
        weights = jnp.exp(logits - peak[:, :, None, None]) / total[:, :, None, None]  # [Q, H, N, M]
        basis = gaussian_basis(dist, centers_np, width)

        rows = jnp.concatenate([g_basis, g_basis * centers], axis=1)  # [Q, 2H, K]
        projected = jnp.einsum("qjk,qnmk->qjnm", rows, basis, precision=HIGHEST)
        g_b, g_mu = projected[:, :heads], projected[:, heads:]  # [Q, H, N, M]
        g_vn = jnp.einsum("qhc,nhc->qhn", g_v, v, precision=HIGHEST)
        expected = jnp.sum(g_basis * agg_basis, axis=-1) + jnp.sum(g_v * agg_v, axis=-1)  # Σ_p w G, [Q, H]
        g_logits = weights * (g_b + g_vn[..., None] - expected[:, :, None, None])

        g_scores = jnp.sum(g_logits, axis=-1) / jnp.sqrt(jnp.asarray(q.shape[-1], dtype))  # [Q, H, N]
        g_q = jnp.einsum("qhn,nhc->qhc", g_scores, k, precision=HIGHEST)
        g_k = jnp.einsum("qhn,qhc->nhc", g_scores, q, precision=HIGHEST)
        g_gamma = jnp.sum(g_logits * d2[:, None], axis=(2, 3))
        g_vv = jnp.einsum("qhn,qhc->nhc", jnp.sum(weights, axis=-1), g_v, precision=HIGHEST)

        g_d2 = jnp.sum(g_logits * gamma[:, :, None, None], axis=1)
        if exact_basis_gradient:
            g_dist = jnp.sum(weights * (g_mu - dist[:, None] * g_b), axis=1) / width**2  # [Q, N, M]
            positive = d2 > 0
            g_d2 = g_d2 + jnp.where(positive, g_dist / (2 * jnp.where(positive, dist, 1.0)), 0.0)
        g_r = 2 * r * g_d2[..., None]  # [Q, N, M, 3]
        g_cell_part, g_shift_part = jnp.sum(g_r, axis=2), jnp.sum(g_r, axis=(0, 1))  # [Q, N, 3], [M, 3]
        g_lattice = jnp.einsum("qnc,qnd->cd", frac_diff, g_cell_part, precision=HIGHEST) + jnp.einsum(
            "mc,md->cd", shifts.astype(dtype), g_shift_part, precision=HIGHEST
        )
        g_diff = jnp.einsum("qnd,cd->qnc", g_cell_part, lattice, precision=HIGHEST)  # [Q, N, 3]
        g_frac_k = jnp.sum(g_diff, axis=0)
        g_frac_q = -jnp.sum(g_diff, axis=1)
        return g_lattice, g_frac_k, None, g_k, g_vv, g_frac_q, g_q, g_gamma, None

    block.defvjp(block_fwd, block_bwd)
    return block


def block_plan(num_crystals: int, num_atoms: int, num_shifts: int, num_basis: int, itemsize: int, chunk_size=None):
    """How the queries are split: (crystals per block C, query atoms per block Q).

    `chunk_size` is the number of (crystal, query atom) rows per block; None picks the largest block whose basis
    tensor φ [rows, N, M, K] fits `AUTO_BLOCK_BYTES`. A block holds whole crystals when `chunk_size >= N`,
    otherwise a near-equal slice of one crystal's atoms; blocks are as equal as possible, so that padding stays
    below one crystal (or atom) per block.
    """
    if chunk_size is None:
        chunk_size = AUTO_BLOCK_BYTES // (num_atoms * num_shifts * num_basis * itemsize)
    chunk_size = max(1, int(chunk_size))
    if chunk_size >= num_atoms:
        largest = max(1, min(num_crystals, chunk_size // num_atoms))
        return math.ceil(num_crystals / math.ceil(num_crystals / largest)), num_atoms  # equal blocks, least padding
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
    crystals_per_block, queries_per_block = block_plan(
        num_crystals, num_atoms, len(shifts), len(centers), q.dtype.itemsize, chunk_size
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

    attend = _make_block(shifts, centers, width, exact_basis_gradient, use_box)

    def block(crystal_keys, query_rows):
        return jax.vmap(attend)(*crystal_keys, *query_rows)

    def crystal_block(args):
        crystal_keys, query_rows = args
        return jax.lax.map(lambda rows: block(crystal_keys, rows), query_rows)

    agg_v, agg_basis = jax.lax.map(crystal_block, (keys, queries))

    def unblock(x):  # [crystal blocks, query blocks, C, Q, ...] -> [B, N, ...]
        x = jnp.moveaxis(x, 1, 2)
        x = x.reshape((padded_b, padded_n) + x.shape[4:])
        return x[:num_crystals, :num_atoms]

    return unblock(agg_v), unblock(agg_basis)

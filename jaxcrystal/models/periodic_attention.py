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

This module computes it in that two-stage form (`_make_block`): the per-pair sums over translations are
reductions of an expression of d², and only the keys' softmax is over [Q, H, N].

The dominant tensors are per (query, key, translation): the basis φ [Q, N, M, K] and the translation weights
[Q, H, N, M]. They are never built for the whole batch: queries are processed in blocks of `chunk_size`
(crystal, atom) rows with `lax.map`, and the backward pass of a block (a hand-written VJP) rebuilds them from the
block's inputs, so the peak memory is that of one block whatever the batch size. A block keeps two [Q, H, N]
statistics for its backward pass: the per-pair sums S over translations and the per-pair means of d² under them
(∂L/∂γ needs Σ_nm c P d²; summed in the forward pass it spares the backward pass a sum over (key, translation), which
XLA:CPU splits into slow windowed sums); the keys' softmax is recomputed from S. The basis, which is below e⁻⁴⁰
beyond `basis_cutoff` (16 Å for Crystalformer's default), can be restricted to a window of translations around
each pair (`window`): for a 12 Å cell with the ±2 box, 27 of the 125 translations. Each block takes the cheapest
exact variant (`attention_branches`): cells with short axes a window with whole axes there, or the whole box; with
per-query boxes, blocks of crystals whose boxes all fit a smaller grid than `ranges` run on that grid (`grids`).
"""

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# Automatic block size: about the number of query rows whose basis tensor φ [rows, N, M, K] takes this many bytes
# (rounded to a multiple of the CPU threads, see `block_plan`). 32 MiB is 7.8 rows of a 135-atom crystal with 125
# translations; on 2-core CPUs 4-8 rows per block gave the fastest forward+gradient of 1 to 45
# (`benchmarks/bench_crystalformer.py --chunk-size`). A GPU wants larger blocks.
AUTO_BLOCK_BYTES = 32 * 2**20

_MASKED_LOGIT = -1e30  # finite, so that fully masked (padding) rows stay NaN-free

# Beyond `basis_cutoff` every basis function is below exp(-BASIS_NEGLIGIBLE) (4e-18): the basis window's bound.
BASIS_NEGLIGIBLE = 40.0


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


def basis_cutoff(centers, width: float) -> float:
    """The distance (Å) beyond which every basis function is below e^-`BASIS_NEGLIGIBLE`: max μ + s √(2·40)."""
    return float(np.max(centers)) + width * math.sqrt(2 * BASIS_NEGLIGIBLE)


def window_sizes(lattice, cutoff: float) -> np.ndarray:
    """Translations per axis a basis window needs for each cell: [B, 3] int (host).

    Seen from any query atom, the images of a key atom closer than `cutoff` have |(f_n - f_q + t)_d| <= cutoff·ρ_d
    (ρ_d: inverse spacing of the lattice planes d), so at most floor(2·cutoff·ρ_d) + 1 consecutive integers t_d.

    Args:
      lattice: [..., 3, 3] rows, Å (concrete). cutoff: Å, see `basis_cutoff`.
    """
    spacings_inv = np.asarray(inverse_plane_spacings(jnp.asarray(lattice, jnp.float32)), np.float64).reshape(-1, 3)
    return np.floor(2 * cutoff * spacings_inv * (1 + 1e-4)).astype(int) + 1


def window_size(lattice, cutoff: float) -> np.ndarray:
    """The window that serves every one of these cells: [3] int, the maximum of `window_sizes`."""
    return window_sizes(lattice, cutoff).max(axis=0)


def window_covers(lattice, window, cutoff):
    """[...] bool, jittable: True where `window` (W_1, W_2, W_3) translations per axis hold every image closer than
    `cutoff` (Å, a float or [...] per cell; see `window_size`; 1e-4 relative slack against rounding)."""
    cutoff = jnp.asarray(cutoff)[..., None]
    needed = jnp.floor(2 * cutoff * inverse_plane_spacings(lattice) * (1 + 1e-4)) + 1
    return jnp.all(needed <= jnp.asarray(window, needed.dtype), axis=-1)


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


def _window_geometry(lattice, frac_diff, offsets, full_axes, ranges, cutoff: float):
    """Bond vectors to the images of a per-pair window of translations, the only ones the basis needs.

    The window of pair (q, n) starts at the first translation that can be within `cutoff`,
    first_d = ceil(-(f_n - f_q)_d - cutoff·ρ_d) (or -R_d on `full_axes`), and holds first + offsets.
    Returns (first [Q, N, 3], translations t [Q, N, W, 3], r [Q, N, W, 3] Å, d² [Q, N, W] Å²), t as floats.
    """
    dtype = frac_diff.dtype
    reach = cutoff * jax.lax.stop_gradient(inverse_plane_spacings(lattice))  # [3]
    first = jnp.ceil(-jax.lax.stop_gradient(frac_diff) - reach)
    first = jnp.where(full_axes, -jnp.asarray(ranges, dtype), first)
    base = jnp.einsum("qnc,cd->qnd", frac_diff + first, lattice, precision=HIGHEST)
    offset_part = jnp.einsum("wc,cd->wd", offsets.astype(dtype), lattice, precision=HIGHEST)
    r = base[:, :, None, :] + offset_part
    translations = first[:, :, None, :] + offsets.astype(dtype)
    return first, translations, r, jnp.sum(r * r, axis=-1)


def _inside_box(box, translations, axes):
    """Translations inside each (query, head) box on `axes` (a non-empty static tuple of axes; the box holds every
    translation on the others): [Q, H, 1, M] for shared translations [M, 3], [Q, H, N, M] for per-pair
    translations [Q, N, M, 3] (floats); box [Q, H, 3] int half-widths."""
    axes = list(axes)
    box, translations = box[..., axes].astype(translations.dtype), translations[..., axes]
    if translations.ndim == 2:
        return jnp.all(jnp.abs(translations)[None, None] <= box[:, :, None, :], axis=-1)[:, :, None, :]
    return jnp.all(jnp.abs(translations)[:, None] <= box[:, :, None, None, :], axis=-1)


def _geometry_vjp(lattice, frac_diff, shared_shifts, g_r):
    """Cotangents (lattice [3, 3], frac_diff [Q, N, 3]) of r = frac_diff A + shared_shifts A from g_r [Q, N, M, 3].

    `frac_diff` here is the per-pair fractional part of r (f_n - f_q, plus the window start for a window) and
    `shared_shifts` [M, 3] the part shared by all pairs.
    """
    g_pair, g_shared = jnp.sum(g_r, axis=2), jnp.sum(g_r, axis=(0, 1))  # [Q, N, 3], [M, 3]
    g_lattice = jnp.einsum("qnc,qnd->cd", frac_diff, g_pair, precision=HIGHEST) + jnp.einsum(
        "mc,md->cd", shared_shifts.astype(g_r.dtype), g_shared, precision=HIGHEST
    )
    return g_lattice, jnp.einsum("qnd,cd->qnc", g_pair, lattice, precision=HIGHEST)


def _window_offsets(window, ranges):
    """(whole axes [3] bool, offsets [W, 3] int) of a window of (W_1, W_2, W_3) translations on a grid of half-widths
    `ranges`: an axis the window spans entirely is the whole axis."""
    full_axes = np.asarray(window) >= 2 * ranges + 1
    window = np.where(full_axes, 2 * ranges + 1, window)
    offsets = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij"), axis=-1).reshape(-1, 3)
    return full_axes, offsets


def _make_block(
    shifts, centers, width: float, exact_basis_gradient: bool, box_axes: tuple, window=None, softmax_window=None
):
    """The attention of Q query atoms of one crystal, with a hand-written backward pass (`jax.custom_vjp`).

    The returned function maps
      lattice [3, 3] rows Å; keys frac_k [N, 3], mask_k [N] bool, k [N, H, D], v [N, H, D]; reach [] Å (the
      softmax window's, see below);
      queries frac_q [Q, 3], q [Q, H, D], gamma [Q, H] Å⁻² (negative), box [Q, H, 3] int (per-query, per-head
      translation half-widths, tested on `box_axes` only: none when it is empty)
    to (agg_v [Q, H, D], agg_basis [Q, H, K]).

    The softmax over (key n, translation m) is taken in two stages, as upstream writes it: per pair
      P_nm = exp(γ (d²_nm - d²_n,min)) / S_n,   S_n = Σ_m exp(γ (d²_nm - d²_n,min))   (m in the box)
      α_n  = γ d²_n,min + log S_n,   w_n = softmax_n(q·k_n / √D + α_n),   weight of a triple = w_n P_nm
    so that every [Q, H, N, M] quantity is a reduction over m of an expression of d² [Q, N, M] (XLA fuses them),
    and the backward pass needs two such reductions:
      ∂L/∂(γ d²)_nm = c_n P_nm  +  w_n P_nm Gb_nm,   c_n = ∂L/∂logit_n - w_n Σ_m P_nm Gb_nm
    with, for the cotangents ḡ [Q, H, K] of agg_basis and ḡv [Q, H, D] of agg_v,
      Gb_hp = Σ_k ḡ_hk φ_pk,   Gμ_hp = Σ_k ḡ_hk μ_k φ_pk          (one [2H, K] x [K, P] product)
      ∂L/∂logit_n = w_n (G_n - Σ_n' w_n' G_n'),   G_n = ḡv·v_n + Σ_m P_nm Gb_nm
      ∂L/∂d_p      = Σ_h w P (Gμ - d Gb) / s²  (dφ_k/dd = (μ_k - d) φ_k / s²; absent for "smoacs").
    The [Q, N, M, K] tensor ∂L/∂φ is never formed, and the forward pass keeps only its inputs, S and w.

    `window`: None, or (W_1, W_2, W_3) translations per axis: the basis terms (φ, Gb, Gμ) then run only over each
    pair's window of translations (`_window_geometry`), which holds every image closer than `basis_cutoff` if
    the cell is large enough (`window_covers`; the caller checks). The terms left out have φ < e⁻⁴⁰, so
    agg_basis changes by less than e⁻⁴⁰ (the weights sum to 1) and its derivatives by as little. The softmax
    (S, α, w, agg_v) runs over the whole box, or with `softmax_window` (W_1, W_2, W_3) over each pair's window of
    translations closer than `reach` (`softmax_reach`; the caller checks that the window holds them, and that the
    grid and boxes hold each pair's rounded image, `rounded_image_in_boxes`): each term left out is below e⁻⁴⁰ S.
    Without a basis window the basis then runs on the softmax window (its other terms have weights P < e⁻⁴⁰).
    Being a `custom_vjp`, it supports reverse mode only (`jax.grad`, not `jax.jvp`).
    """
    shifts = np.asarray(shifts)
    centers_np = np.asarray(centers)
    ranges = shifts.max(axis=0)
    windowed = window is not None and any(w < 2 * r + 1 for w, r in zip(window, ranges, strict=True))
    if windowed:
        full_axes, offsets = _window_offsets(window, ranges)
        cutoff = basis_cutoff(centers_np, width)
    softmax_windowed = softmax_window is not None and any(
        w < 2 * r + 1 for w, r in zip(softmax_window, ranges, strict=True)
    )
    if softmax_windowed:
        softmax_full_axes, softmax_offsets = _window_offsets(softmax_window, ranges)

    def pair_factors(gamma, d2, d2_min, inside):
        """exp(γ (d² - d²_min)) inside the box, [Q, H, N, M] (≤ 1 on the grid)."""
        factors = jnp.exp(gamma[:, :, None, None] * (d2 - d2_min[..., None])[:, None])
        return factors if inside is None else jnp.where(inside, factors, 0.0)

    def box_geometry(lattice, frac_k, frac_q, box, reach):
        """The softmax's triples: (f_n - f_q [Q, N, 3], their per-pair fractional part [Q, N, 3], shared
        translations [M, 3], r [Q, N, M, 3], d² [Q, N, M], d²_min [Q, N], inside [Q, H or 1, N or 1, M] or None):
        the whole grid's, or the softmax window's."""
        if not softmax_windowed:
            frac_diff, r, d2 = _geometry(lattice, frac_k, frac_q, shifts)
            inside = _inside_box(box, shifts.astype(d2.dtype), box_axes) if box_axes else None
            return frac_diff, frac_diff, shifts, r, d2, jnp.min(d2, axis=-1), inside
        frac_diff = frac_k[None, :, :] - frac_q[:, None, :]
        first, translations, r, d2 = _window_geometry(
            lattice, frac_diff, softmax_offsets, softmax_full_axes, ranges, reach
        )
        inside = jnp.all(jnp.abs(translations) <= ranges, axis=-1)  # in the grid, [Q, N, W]
        d2_min = jnp.min(jnp.where(inside, d2, jnp.finfo(d2.dtype).max), axis=-1)
        inside = inside[:, None]
        if box_axes:
            inside = inside & _inside_box(box, translations, box_axes)
        return frac_diff, frac_diff + first, softmax_offsets, r, d2, d2_min, inside

    def basis_triples(lattice, gamma, box, softmax_triples, pair_total):
        """The triples the basis runs over: (per-pair fractional part [Q, N, 3], shared translations [M', 3],
        r [Q, N, M', 3], d² [Q, N, M'], P [Q, H, N, M']): the softmax's (`box_geometry`), or the basis window's."""
        frac_diff, pair_part, shared, r, d2, d2_min, inside = softmax_triples
        if not windowed:
            return pair_part, shared, r, d2, pair_factors(gamma, d2, d2_min, inside) / pair_total[..., None]
        first, translations, r, d2 = _window_geometry(lattice, frac_diff, offsets, full_axes, ranges, cutoff)
        valid = jnp.all(jnp.abs(translations) <= ranges, axis=-1)[:, None]  # in the grid, [Q, 1, N, W]
        if box_axes:
            valid = valid & _inside_box(box, translations, box_axes)
        factors = jnp.exp(gamma[:, :, None, None] * (d2 - d2_min[..., None])[:, None])
        return frac_diff + first, offsets, r, d2, jnp.where(valid, factors, 0.0) / pair_total[..., None]

    def key_weights(q, k, mask_k, gamma, d2_min, pair_total):
        """w [Q, H, N]: the softmax over keys of q·k/√D + α, α = γ d²_min + log S (logsumexp over translations)."""
        alpha = gamma[:, :, None] * d2_min[:, None] + jnp.log(pair_total)
        scores = jnp.einsum("qhc,nhc->qhn", q, k, precision=HIGHEST) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
        return jax.nn.softmax(jnp.where(mask_k, scores + alpha, _MASKED_LOGIT), axis=-1)

    def forward(lattice, frac_k, mask_k, k, v, reach, frac_q, q, gamma, box):
        softmax_triples = box_geometry(lattice, frac_k, frac_q, box, reach)
        _, _, _, _, d2, d2_min, inside = softmax_triples
        tiny = jnp.finfo(d2.dtype).tiny  # S ≥ 1 unless the box excludes the nearest image
        factors = pair_factors(gamma, d2, d2_min, inside)  # summed only (fused) unless it is the basis's P
        pair_total = jnp.maximum(jnp.sum(factors, axis=-1), tiny)  # S [Q, H, N]
        # Σ_m P d² / S [Q, H, N], the per-pair mean of d² that ∂L/∂γ needs (module docstring)
        pair_d2 = jnp.sum(factors * d2[:, None], axis=-1) / pair_total
        weights = key_weights(q, k, mask_k, gamma, d2_min, pair_total)
        if windowed:
            _, _, _, d2_b, p_b = basis_triples(lattice, gamma, box, softmax_triples, pair_total)
        else:
            d2_b, p_b = d2, factors / pair_total[..., None]
        basis = gaussian_basis(safe_sqrt(d2_b), centers_np, width)  # [Q, N, M', K]
        agg_v = jnp.einsum("qhn,nhc->qhc", weights, v, precision=HIGHEST)
        agg_basis = jnp.einsum("qhnm,qnmk->qhk", weights[..., None] * p_b, basis, precision=HIGHEST)
        return (agg_v, agg_basis), (pair_total, pair_d2)

    @jax.custom_vjp
    def block(lattice, frac_k, mask_k, k, v, reach, frac_q, q, gamma, box):
        return forward(lattice, frac_k, mask_k, k, v, reach, frac_q, q, gamma, box)[0]

    def block_fwd(lattice, frac_k, mask_k, k, v, reach, frac_q, q, gamma, box):
        outputs, stats = forward(lattice, frac_k, mask_k, k, v, reach, frac_q, q, gamma, box)
        return outputs, (lattice, frac_k, mask_k, k, v, reach, frac_q, q, gamma, box, stats, outputs)

    def block_bwd(residuals, cotangents):
        lattice, frac_k, mask_k, k, v, reach, frac_q, q, gamma, box, stats, outputs = residuals
        (pair_total, pair_d2), (agg_v, agg_basis) = stats, outputs
        g_v, g_basis = cotangents  # [Q, H, D], [Q, H, K]
        heads = q.shape[1]
        softmax_triples = box_geometry(lattice, frac_k, frac_q, box, reach)
        _, box_part, box_shared, r, d2, d2_min, inside = softmax_triples
        pair_part, shared, r_b, d2_b, p_b = basis_triples(lattice, gamma, box, softmax_triples, pair_total)
        weights = key_weights(q, k, mask_k, gamma, d2_min, pair_total)  # recomputed: [Q, H, N] less to keep

        dist_b = safe_sqrt(d2_b)
        basis = gaussian_basis(dist_b, centers_np, width)
        rows = jnp.concatenate([g_basis, g_basis * jnp.asarray(centers_np, d2.dtype)], axis=1)  # [Q, 2H, K]
        projected = jnp.einsum("qjk,qnmk->qjnm", rows, basis, precision=HIGHEST)
        g_b, g_mu = projected[:, :heads], projected[:, heads:]  # Gb, Gμ [Q, H, N, M']
        basis_term = jnp.sum(p_b * g_b, axis=-1)  # Σ_m P Gb = ḡ·(Σ_m P φ), [Q, H, N]
        pair_g = jnp.einsum("qhc,nhc->qhn", g_v, v, precision=HIGHEST) + basis_term  # G_n
        expected = jnp.sum(g_basis * agg_basis, axis=-1) + jnp.sum(g_v * agg_v, axis=-1)  # Σ_n w G, [Q, H]
        g_logits = weights * (pair_g - expected[..., None])  # [Q, H, N]
        coefficient = g_logits - weights * basis_term

        # The box part: ∂L/∂(γ d²) = c P on every triple of the box.
        p_box = p_b if not windowed else pair_factors(gamma, d2, d2_min, inside) / pair_total[..., None]
        g_gamma = jnp.sum(coefficient * pair_d2, axis=-1)  # Σ_nm c P d²
        g_d2 = jnp.sum((coefficient * gamma[..., None])[..., None] * p_box, axis=1)  # [Q, N, M]

        # The basis part: ∂L/∂(γ d²) = w P Gb, and dφ/dd.
        triple_weights = weights[..., None] * p_b
        g_gamma_d2_b = triple_weights * g_b
        g_gamma = g_gamma + jnp.sum(g_gamma_d2_b * d2_b[:, None], axis=(2, 3))
        g_d2_b = jnp.sum(g_gamma_d2_b * gamma[:, :, None, None], axis=1)
        if exact_basis_gradient:
            g_dist = jnp.sum(triple_weights * (g_mu - dist_b[:, None] * g_b), axis=1) / width**2
            positive = d2_b > 0
            g_d2_b = g_d2_b + jnp.where(positive, g_dist / (2 * jnp.where(positive, dist_b, 1.0)), 0.0)

        if windowed:
            g_lattice, g_diff = _geometry_vjp(lattice, box_part, box_shared, 2 * r * g_d2[..., None])
            g_lattice_b, g_diff_b = _geometry_vjp(lattice, pair_part, shared, 2 * r_b * g_d2_b[..., None])
            g_lattice, g_diff = g_lattice + g_lattice_b, g_diff + g_diff_b
        else:
            g_lattice, g_diff = _geometry_vjp(lattice, box_part, box_shared, 2 * r * (g_d2 + g_d2_b)[..., None])

        g_scores = g_logits / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
        g_q = jnp.einsum("qhn,nhc->qhc", g_scores, k, precision=HIGHEST)
        g_k = jnp.einsum("qhn,qhc->nhc", g_scores, q, precision=HIGHEST)
        g_vv = jnp.einsum("qhn,qhc->nhc", weights, g_v, precision=HIGHEST)
        g_frac_k, g_frac_q = jnp.sum(g_diff, axis=0), -jnp.sum(g_diff, axis=1)
        return g_lattice, g_frac_k, None, g_k, g_vv, None, g_frac_q, g_q, g_gamma, None

    block.defvjp(block_fwd, block_bwd)
    return block


def cpu_threads() -> int:
    """The threads XLA splits a loop over on the default backend: the schedulable CPUs on CPU, else 1."""
    if jax.default_backend() != "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def block_plan(
    num_crystals: int, num_atoms: int, num_shifts: int, num_basis: int, itemsize: int, chunk_size=None, threads=None
):
    """How the queries are split: (crystals per block C, query atoms per block Q).

    `chunk_size` is the number of (crystal, query atom) rows per block. A block holds whole crystals when
    `chunk_size >= N`, otherwise a near-equal slice of one crystal's atoms; blocks are as equal as possible, so that
    padding stays below one crystal (or atom) per block.

    None picks the block whose basis tensor φ [rows, N, M, K] takes about `AUTO_BLOCK_BYTES`, with its outer
    dimension (C, or Q when a block is a slice of one crystal) the multiple of `threads` (default: `cpu_threads()`)
    nearest that budget, when the budget holds `threads` of them: XLA:CPU splits a block's loops over its threads
    along that dimension, so an odd one leaves a thread idle part of the time. Measured on 2 threads (2026-12-05):
    8 x 135 atoms forward+gradient with 7-row blocks (the budget's 7.8 rounded down) 2.83-2.89 s, with 6- and
    8-row ones 2.48 and 2.55 s; one 1x1x1 Crystalformer optimization step (128 candidates) with blocks of 7 crystals
    0.92-0.96 s, of 8 0.79 s. Padding then stays below `threads` crystals (or atoms) per block.
    """
    align = 1  # the multiple the outer dimension is rounded to: `threads`, for automatic blocks only
    if chunk_size is None:
        threads = cpu_threads() if threads is None else int(threads)
        rows = AUTO_BLOCK_BYTES / (num_atoms * num_shifts * num_basis * itemsize)
        unit = num_atoms if rows >= num_atoms else 1  # blocks of whole crystals, or of query atoms
        units = rows / unit
        if units >= threads:
            align, units = threads, threads * round(units / threads)
        chunk_size = max(1, int(units)) * unit
        if chunk_size >= num_atoms > unit:  # atoms rounded up to one whole crystal per block
            align = 1
    chunk_size = max(1, int(chunk_size))
    whole_crystals = chunk_size >= num_atoms
    total = num_crystals if whole_crystals else num_atoms
    size = max(1, min(total, chunk_size // num_atoms if whole_crystals else chunk_size))
    aligned = size < total
    size = math.ceil(total / math.ceil(total / size))  # equal blocks, least padding
    if aligned:
        size += -size % align
    return (size, num_atoms) if whole_crystals else (1, size)


def _check_grids(grids, ranges) -> list:
    """`grids` as a list of int triples, each within the next and within `ranges` (which is left out)."""
    checked = []
    for grid in grids:
        grid = tuple(int(r) for r in grid)
        if len(grid) != 3 or min(grid) < 0:
            raise ValueError(f"attention grids must be triples of non-negative ints, got {grid}")
        if any(g > r for g, r in zip(grid, ranges, strict=True)) or (
            checked and any(a > b for a, b in zip(checked[-1], grid, strict=True))
        ):
            raise ValueError(f"attention grids must grow towards ranges {ranges}: got {grid} after {checked}")
        if grid != ranges and grid not in checked:
            checked.append(grid)
    return checked


class Branch(NamedTuple):
    """One way to evaluate a block: the translation grid (R_1, R_2, R_3), the basis window (W_1, W_2, W_3) and the
    softmax window (S_1, S_2, S_3), each None for the whole grid."""

    grid: tuple
    window: tuple | None
    softmax_window: tuple | None = None


def attention_branches(ranges, grids=(), window=None, softmax_window=None) -> tuple[list[Branch], bool]:
    """The static branches of `periodic_attention`, in the order they are tried, and whether cells are given
    sorted axes.

    For each grid (the smaller `grids` first, `ranges` last): the basis windows, each first with the softmax window
    of as many whole axes (if given), then the whole grid. With an isotropic grid and windows (W, W, W), (S, S, S)
    the axes of every cell are put in decreasing order of their inverse plane spacing (an exact relabelling, also
    the decreasing order of the windows they need), so that the windows (W, W, W), (F, W, W), (F, F, W) (F: the
    whole axis) serve cells with zero, one or two short axes; otherwise the windows are the ones given.
    """
    ranges = tuple(int(r) for r in ranges)
    window = None if window is None else tuple(int(w) for w in window)
    softmax_window = None if softmax_window is None else tuple(int(w) for w in softmax_window)
    given = [w for w in (window, softmax_window) if w is not None]
    sort_axes = bool(given) and len(set(ranges)) == 1 and all(len(set(w)) == 1 for w in given)

    def variants(window, full):  # with 0, 1, 2 whole axes when the axes are sorted; `full` for no window
        if window is None:
            return [full] * 3
        clipped = tuple(min(w, f) for w, f in zip(window, full, strict=True))
        return [full[:k] + clipped[k:] for k in range(3)] if sort_axes else [clipped]

    branches = []
    for grid in [*grids, ranges]:
        full = tuple(2 * r + 1 for r in grid)
        for basis, softmax in zip(variants(window, full), variants(softmax_window, full), strict=False):
            basis, softmax = (None if w == full else w for w in (basis, softmax))
            for branch in [Branch(grid, basis, softmax)] * (softmax is not None) + [Branch(grid, basis)]:
                if branch not in branches and branch != Branch(grid, None):
                    branches.append(branch)
        branches.append(Branch(grid, None))
    return branches, sort_axes


def axes_by_need(lattice):
    """[B, 3] int: each cell's axes in decreasing order of their inverse plane spacing, so of the window any cutoff
    needs on them (`window_covers`)."""
    return jnp.argsort(-inverse_plane_spacings(jax.lax.stop_gradient(lattice)), axis=-1, stable=True)


def softmax_reach(lattice, gamma, mask):
    """[B] Å: beyond this distance from a query atom, every image of a key atom has a translation factor below
    e^-`BASIS_NEGLIGIBLE` of the pair's sum S, for every head of every real atom (constant, no gradient).

    The image of a key at translation -round(f_n - f_q) is within D = ½ max |a_1 ± a_2 ± a_3| (the farthest point
    of the cell centred on the query); if it is inside the boxes (`rounded_image_in_boxes`), S ≥ exp(γ (D² - d²_min))
    and an image with d² > D² + 40 / |γ|_min has a factor exp(γ (d² - d²_min)) < e⁻⁴⁰ S.

    Args:
      lattice: [B, 3, 3] rows, Å. gamma: [B, N, H] Å⁻² (negative). mask: [B, N] bool.
    """
    lattice = jax.lax.stop_gradient(lattice)
    signs = np.array([[1, 1, 1], [1, 1, -1], [1, -1, 1], [1, -1, -1]], lattice.dtype)
    diagonals = jnp.einsum("sc,bcd->bsd", signs, lattice, precision=HIGHEST)
    half_diagonal_sq = 0.25 * jnp.max(jnp.sum(diagonals * diagonals, axis=-1), axis=-1)
    flattest = -jnp.max(jnp.where(mask[..., None], jax.lax.stop_gradient(gamma), -jnp.inf), axis=(1, 2))
    return jnp.sqrt(half_diagonal_sq + BASIS_NEGLIGIBLE / jnp.maximum(flattest, jnp.finfo(lattice.dtype).tiny))


def rounded_image_in_boxes(frac, mask, box, grid):
    """[B] bool: for every pair of real atoms, the image at translation -round(f_n - f_q), which lies within the
    half-diagonal D of `softmax_reach`, is inside the grid (R_1, R_2, R_3) and every box of the crystal (box
    [B, N, H, 3] int or None): the spread of the real atoms' fractional coordinates is below min(R_d, box_d) + ½ on
    each axis (frac [B, N, 3]; crystals with no real atom pass). Then every image a softmax window leaves out has
    a factor below e⁻⁴⁰ of the box's sum S."""
    high = jnp.max(jnp.where(mask[..., None], frac, -jnp.inf), axis=1)
    low = jnp.min(jnp.where(mask[..., None], frac, jnp.inf), axis=1)
    spread = jnp.where(jnp.any(mask, axis=1)[:, None], high - low, 0.0)
    limit = jnp.broadcast_to(jnp.asarray(grid), spread.shape)
    if box is not None:
        limit = jnp.minimum(limit, jnp.min(jnp.where(mask[:, :, None, None], box, np.iinfo(np.int32).max), (1, 2)))
    return jnp.all(spread < limit + 0.5, axis=-1)


def branch_fits(branches, lattice, mask, box, cutoff: float, reach=None, frac=None):
    """[B, branches] bool: which branches can evaluate each crystal exactly. A grid must hold every box of the
    crystal's real atoms (box [B, N, H, 3] int, or None: only the full grid exists), a basis window every image
    within the basis `cutoff` (`window_covers`), a softmax window every image within `reach` ([B] Å,
    `softmax_reach`) with the grid and the boxes each pair's rounded image (`rounded_image_in_boxes` of frac
    [B, N, 3]; None for cost estimates: fractional coordinates within the cell); the last branch (the whole
    `ranges` grid) fits all.
    """
    needed = None if box is None else jnp.max(jnp.where(mask[:, :, None, None], box, 0), axis=(1, 2))  # [B, 3]
    fits = []
    for grid, window, softmax_window in branches:
        fit = jnp.ones(lattice.shape[0], bool)
        if needed is not None:
            fit = fit & jnp.all(needed <= jnp.asarray(grid), axis=-1)
        for window_, cutoff_ in ((window, cutoff), (softmax_window, reach)):
            if window_ is not None:
                checked = [w if w < 2 * r + 1 else np.inf for w, r in zip(window_, grid, strict=True)]
                fit = fit & window_covers(lattice, checked, cutoff_)
        if softmax_window is not None and frac is not None:
            fit = fit & rounded_image_in_boxes(frac, mask, box, grid)
        fits.append(fit)
    return jnp.stack(fits, axis=-1).at[:, -1].set(True)


def first_fit(fits):
    """[...] int32: the first branch that fits, from [..., branches] bool (`branch_fits`)."""
    return jnp.argmax(fits, axis=-1).astype(jnp.int32)


def _branch_plan(lattice, frac, mask, box, ranges, cutoff: float, window, grids, softmax_window=None, reach=None):
    """(branches, lattice, frac and box with each cell's axes relabelled if the branches sort them, fits [B, branches]
    bool): what `periodic_attention` and `crystal_branches` decide before blocking. `box` may be None (no adaptive box),
    `frac` None (cost estimates, see `branch_fits`)."""
    grids = _check_grids(grids, ranges) if box is not None else []
    branches, sort_axes = attention_branches(ranges, grids, window, softmax_window)
    if sort_axes:  # relabel each cell's axes (rows of the lattice, columns of frac, box components)
        axes = axes_by_need(lattice)
        lattice = jnp.take_along_axis(lattice, axes[:, :, None], axis=1)
        frac = None if frac is None else jnp.take_along_axis(frac, axes[:, None, :], axis=2)
        box = None if box is None else jnp.take_along_axis(box, axes[:, None, None, :], axis=3)
    fits = branch_fits(branches, lattice, mask, box, cutoff, reach, frac)
    return branches, lattice, frac, box, fits


def crystal_branches(
    lattice, mask, box, *, ranges, cutoff: float, window=None, grids=(), per_block: int, softmax_window=None,
    reach=None,
):  # fmt: skip
    """[B] int (host): the branch of `attention_branches(ranges, grids, window, softmax_window)` each crystal runs in
    `periodic_attention` with `per_block` crystals per block (`block_plan`): crystals sorted by their first fitting
    branch, then each block takes the first branch that fits all of its crystals. For cost accounting
    (`cheapest_window`, benchmarks): fractional coordinates are taken to lie within the cell. `cutoff`:
    `basis_cutoff` of the centres and width; `reach` [B] Å: `softmax_reach`, or a bound of it."""
    ranges = tuple(int(r) for r in ranges)
    branches, _, _, _, fits = _branch_plan(
        lattice, None, mask, box, ranges, cutoff, window, grids, softmax_window, reach
    )
    fits = np.asarray(fits)
    order = np.argsort(np.asarray(first_fit(fits)), kind="stable") if per_block > 1 else np.arange(len(fits))
    sorted_fits = np.pad(fits[order], ((0, -len(fits) % per_block), (0, 0)), constant_values=True)
    block_fits = sorted_fits.reshape(-1, per_block, len(branches)).all(axis=1)
    taken = np.empty(len(fits), int)
    taken[order] = np.repeat(np.argmax(block_fits, axis=-1), per_block)[: len(fits)]
    return taken


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
    window=None,
    grids=(),
    box_floor: int = 0,
    softmax_window=None,
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
      window: None, or static (W_1, W_2, W_3): evaluate the distance basis only on a window of W_d translations
        per axis around each pair (`_make_block`); size it with `window_size`.
      grids: static smaller grids ((R_1, R_2, R_3), ...), each within the next and within `ranges`; only with
        `box`.
      box_floor: static int, boxes are raised to at least this half-width on every axis (Crystalformer's
        `lattice_range`). On the axes where a branch's grid equals it, every box that fits the grid equals it, so
        the per-translation box test is left out there (on a (2, 2, 2) grid with floor 2: no test at all).
      softmax_window: None, or static (S_1, S_2, S_3): take the softmax over translations (and the basis, without
        `window`) on a window of S_d translations per axis around each pair, the images closer than
        `softmax_reach` (`_make_block`).

    Each block of crystals runs the first of `attention_branches` (grid, windows) that evaluates all of its
    crystals exactly (`branch_fits`, `lax.switch`): a smaller grid when every box fits it (the translations left
    out lie outside every box), a basis window when it holds every image within `basis_cutoff`, a softmax window
    when it holds every image within `softmax_reach` (the terms left out are below e⁻⁴⁰), else the whole `ranges`
    grid. So results never depend on `window`, `softmax_window` or `grids` beyond e⁻⁴⁰. Crystals are sorted by the
    first branch that fits them, so that blocks share one.

    Returns:
      agg_v [B, N, H, D] and agg_basis [B, N, H, K]; rows of padding atoms are finite but meaningless.
    """
    num_crystals, num_atoms, num_heads, head_dim = q.shape
    ranges = tuple(int(r) for r in ranges)
    cutoff = basis_cutoff(centers, width)
    box = None if box is None else jnp.maximum(box, box_floor)
    reach = softmax_reach(lattice, gamma, mask)
    branches, lattice, frac, box, fits = _branch_plan(
        lattice, frac, mask, box, ranges, cutoff, window, grids, softmax_window, reach
    )
    crystals_per_block, queries_per_block = block_plan(
        num_crystals, num_atoms, int(np.prod([2 * r + 1 for r in ranges])), len(centers), q.dtype.itemsize, chunk_size
    )
    num_crystal_blocks = math.ceil(num_crystals / crystals_per_block)
    num_query_blocks = math.ceil(num_atoms / queries_per_block)
    padded_b = num_crystal_blocks * crystals_per_block
    padded_n = num_query_blocks * queries_per_block
    use_box = box is not None
    if not use_box:
        box = jnp.zeros((num_crystals, num_atoms, num_heads, 3), jnp.int32)
    order = None
    if len(branches) > 1 and crystals_per_block > 1:  # blocks of crystals that take the same branch
        order = jnp.argsort(first_fit(fits), stable=True)
        q, k, v, gamma, lattice, frac, mask, box, fits, reach = (
            jnp.take(x, order, axis=0) for x in (q, k, v, gamma, lattice, frac, mask, box, fits, reach)
        )

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
        crystal_blocks(reach),
    )
    queries = tuple(query_blocks(x) for x in (frac, q, gamma, box))
    queries = tuple(jnp.moveaxis(x, 1, 0) for x in queries)  # [crystal blocks, query blocks, C, Q, ...]
    block_levels = first_fit(jnp.all(crystal_blocks(fits, True), axis=1))  # [crystal blocks]

    def branch_fn(branch):
        box_axes = tuple(d for d in range(3) if use_box and branch.grid[d] > box_floor)
        block = jax.vmap(
            _make_block(
                translation_grid(branch.grid),
                centers,
                width,
                exact_basis_gradient,
                box_axes,
                branch.window,
                branch.softmax_window,
            )  # fmt: skip
        )
        return lambda crystal_keys, query_rows: jax.lax.map(lambda rows: block(*crystal_keys, *rows), query_rows)

    branch_fns = [branch_fn(branch) for branch in branches]

    def crystal_block(args):
        level, crystal_keys, query_rows = args
        if len(branch_fns) == 1:
            return branch_fns[0](crystal_keys, query_rows)
        return jax.lax.switch(level, branch_fns, crystal_keys, query_rows)

    agg_v, agg_basis = jax.lax.map(crystal_block, (block_levels, keys, queries))

    def unblock(x):  # [crystal blocks, query blocks, C, Q, ...] -> [B, N, ...]
        x = jnp.moveaxis(x, 1, 2)
        x = x.reshape((padded_b, padded_n) + x.shape[4:])[:num_crystals, :num_atoms]
        return x if order is None else jnp.take(x, jnp.argsort(order), axis=0)

    return unblock(agg_v), unblock(agg_basis)

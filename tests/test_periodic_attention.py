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

from jaxcrystal.models.periodic_attention import (
    AUTO_BLOCK_BYTES,
    Branch,
    _make_block,
    attention_branches,
    basis_cutoff,
    block_plan,
    crystal_branches,
    periodic_attention,
    rounded_image_in_boxes,
    softmax_reach,
    translation_grid,
    window_covers,
    window_size,
)

RANGES = (2, 1, 2)
CENTERS = np.arange(1, 9) * 0.8
WIDTH = 0.8


def reference(q, k, v, gamma, lattice, frac, mask, box, exact, centers=CENTERS, width=WIDTH, ranges=RANGES):
    shifts = jnp.asarray(translation_grid(ranges), q.dtype)
    image = frac[:, None, :, None, :] - frac[:, :, None, None, :] + shifts  # [B, Nq, Nk, M, 3]
    r = jnp.einsum("bqnmc,bcd->bqnmd", image, lattice)
    d2 = jnp.sum(r**2, -1)
    dist = jnp.where(d2 > 0, jnp.sqrt(jnp.where(d2 > 0, d2, 1.0)), 0.0)
    if not exact:
        dist = jax.lax.stop_gradient(dist)
    basis = jnp.exp(-0.5 * ((dist[..., None] - centers) / width) ** 2)
    logits = jnp.einsum("bqhc,bnhc->bqhn", q, k)[..., None] / np.sqrt(q.shape[-1])
    logits = logits + gamma[..., None, None] * d2[:, :, None]
    inside = jnp.all(jnp.abs(shifts)[None, None, None] <= box[:, :, :, None, :], -1)  # [B, Nq, H, M]
    valid = mask[:, None, None, :, None] & inside[:, :, :, None, :]
    logits = jnp.where(valid, logits, -1e30)
    w = jax.nn.softmax(logits.reshape(logits.shape[:3] + (-1,)), -1).reshape(logits.shape)
    agg_v = jnp.einsum("bqhnm,bnhc->bqhc", w, v)
    agg_basis = jnp.einsum("bqhnm,bqnmk->bqhk", w, basis)
    return agg_v, agg_basis


def inputs(seed=0, b=3, n=5, h=2, d=4, scales=(3.0, 3.0, 3.0), rattle=0.3):
    rng = np.random.default_rng(seed)
    lattice = np.asarray(scales)[:, None, None] * np.eye(3) + rng.normal(scale=rattle, size=(b, 3, 3))
    frac = rng.uniform(size=(b, n, 3))
    mask = np.ones((b, n), bool)
    mask[1, 3:] = False  # a padded crystal
    q, k, v = (rng.normal(size=(b, n, h, d)) for _ in range(3))
    gamma = -rng.uniform(0.2, 1.0, size=(b, n, h))
    box = rng.integers(0, 3, size=(b, n, h, 3))
    floats = tuple(jnp.asarray(x, jnp.float64) for x in (q, k, v, gamma, lattice, frac))
    return floats, jnp.asarray(mask), jnp.asarray(box, jnp.int32)


def probe_loss(mask, num_basis):
    """A random linear functional of (agg_v, agg_basis) over the real query rows."""
    b, n = mask.shape
    rng = np.random.default_rng(1)
    probe_v, probe_b = (jnp.asarray(rng.normal(size=s)) for s in ((b, n, 2, 4), (b, n, 2, num_basis)))

    def loss(fn, *xs):
        agg_v, agg_basis = fn(*xs)
        real = mask[..., None, None]  # padding query rows are meaningless by contract
        return jnp.sum(jnp.where(real, agg_v * probe_v, 0)) + jnp.sum(jnp.where(real, agg_basis * probe_b, 0))

    return loss


def assert_same_value_and_gradients(loss, ours, theirs, floats):
    np.testing.assert_allclose(loss(ours, *floats), loss(theirs, *floats), rtol=1e-13)
    got = jax.jit(jax.grad(lambda *xs: loss(ours, *xs), argnums=tuple(range(6))))(*floats)
    want = jax.grad(lambda *xs: loss(theirs, *xs), argnums=tuple(range(6)))(*floats)
    for name, g, w in zip(("q", "k", "v", "gamma", "lattice", "frac"), got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-12 * scale, name


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2, 7])
def test_custom_backward_equals_autodiff(exact, chunk_size, x64):
    floats, mask, box = inputs()
    loss = probe_loss(mask, len(CENTERS))

    def ours(q, k, v, gamma, lattice, frac):
        return periodic_attention(
            q, k, v, gamma, lattice, frac, mask, ranges=RANGES, box=box, centers=CENTERS, width=WIDTH,
            exact_basis_gradient=exact, chunk_size=chunk_size,
        )  # fmt: skip

    def theirs(q, k, v, gamma, lattice, frac):
        return reference(q, k, v, gamma, lattice, frac, mask, box, exact)

    assert_same_value_and_gradients(loss, ours, theirs, floats)
    got = jax.jit(jax.grad(lambda *xs: loss(ours, *xs), argnums=tuple(range(6))))(*floats)
    want = jax.grad(lambda *xs: loss(theirs, *xs), argnums=tuple(range(6)))(*floats)
    for name, g, w in zip(("q", "k", "v", "gamma", "lattice", "frac"), got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-12 * scale, name


# A short basis (cutoff 2 + 0.25·√80 = 4.24 Å) on 4 Å cells: a window of 3 translations per axis holds every image
# closer than the cutoff, where the grid has 5 x 3 x 5; the third, 2.6 Å crystal needs 4 and falls back.
WINDOW_CENTERS = np.arange(1, 5) * 0.5
WINDOW_WIDTH = 0.25
WINDOW = (3, 3, 3)
WINDOW_SCALES = (4.0, 4.2, 2.6)


def test_window_size_and_cover(x64):
    floats, _, _ = inputs(scales=WINDOW_SCALES, rattle=0.1)
    lattice = floats[4]
    cutoff = basis_cutoff(WINDOW_CENTERS, WINDOW_WIDTH)
    assert cutoff == pytest.approx(2 + 0.25 * np.sqrt(80))
    assert window_covers(lattice, WINDOW, cutoff).tolist() == [True, True, False]
    assert tuple(window_size(lattice[:2], cutoff)) == WINDOW
    assert tuple(window_size(lattice, cutoff)) == (4, 4, 4)
    # The bound itself: no image closer than the cutoff lies outside the window of the covered cells.
    shifts = translation_grid((4, 4, 4))
    for lat, frac in zip(np.asarray(lattice[:2]), np.asarray(floats[5][:2]), strict=True):
        diff = frac[None, :, None, :] - frac[:, None, None, :] + shifts  # [Q, N, M, 3]
        close = np.linalg.norm(diff @ lat, axis=-1) < cutoff
        first = np.ceil(-(frac[None, :] - frac[:, None]) - cutoff * np.linalg.norm(np.linalg.inv(lat), axis=0))
        offset = shifts[None, None] - first[:, :, None]
        assert np.all(~close | np.all((offset >= 0) & (offset < 3), axis=-1))


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_basis_window_equals_the_whole_box(exact, chunk_size, x64):
    """With the window: equal to the reference over the whole box, for covered cells and for the fallback."""
    floats, mask, box = inputs(scales=WINDOW_SCALES, rattle=0.1)
    loss = probe_loss(mask, len(WINDOW_CENTERS))

    def ours(q, k, v, gamma, lattice, frac):
        return periodic_attention(
            q, k, v, gamma, lattice, frac, mask, ranges=RANGES, box=box, centers=WINDOW_CENTERS,
            width=WINDOW_WIDTH, exact_basis_gradient=exact, chunk_size=chunk_size, window=WINDOW,
        )  # fmt: skip

    def theirs(q, k, v, gamma, lattice, frac):
        return reference(q, k, v, gamma, lattice, frac, mask, box, exact, WINDOW_CENTERS, WINDOW_WIDTH)

    assert_same_value_and_gradients(loss, ours, theirs, floats)


def test_windowed_block_alone(x64):
    """The windowed block itself (no fallback): exact where the window covers the cutoff, wrong where it does not."""
    floats, mask, box = inputs(scales=WINDOW_SCALES, rattle=0.1)
    q, k, v, gamma, lattice, frac = floats
    shifts = translation_grid(RANGES)
    args = (lattice, frac, mask, k, v, jnp.zeros(len(mask)), frac, q, gamma, box)
    windowed = jax.vmap(_make_block(shifts, WINDOW_CENTERS, WINDOW_WIDTH, True, (0, 1, 2), WINDOW))
    whole = jax.vmap(_make_block(shifts, WINDOW_CENTERS, WINDOW_WIDTH, True, (0, 1, 2)))
    too_small = jax.vmap(_make_block(shifts, WINDOW_CENTERS, WINDOW_WIDTH, True, (0, 1, 2), (1, 1, 1)))
    (v_win, b_win), (_, b_all), (_, b_small) = windowed(*args), whole(*args), too_small(*args)
    want_v, want_b = reference(q, k, v, gamma, lattice, frac, mask, box, True, WINDOW_CENTERS, WINDOW_WIDTH)
    np.testing.assert_allclose(v_win, want_v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b_all, want_b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b_win[:2], want_b[:2], rtol=1e-12, atol=1e-14)
    assert float(jnp.max(jnp.abs(b_small[:2] - want_b[:2]))) > 1e-2  # one translation per axis misses close images


def test_block_plan_balances_blocks():
    # 128 five-atom crystals, 125 translations, 64 basis functions, float32: about 42 crystals take 32 MiB;
    # four blocks of 32 (no padding), not 42 + 42 + 42 + 2.
    assert block_plan(128, 5, 125, 64, 4, threads=1) == (32, 5)
    assert block_plan(8, 135, 125, 64, 4, chunk_size=100) == (1, 68)  # 2 blocks of 68 query rows for 135 atoms
    for b, chunk in [(7, 10), (100, 30), (128, 41), (3, 2)]:
        c, _ = block_plan(b, 1, 1, 1, 4, chunk_size=chunk)
        blocks = -(-b // c)
        assert c <= chunk and blocks == -(-b // min(chunk, b)) and blocks * c - b < blocks


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize(
    "num_crystals, num_atoms, num_shifts", [(128, 5, 729), (128, 135, 125), (8, 135, 125), (3, 5, 125), (9, 60, 729)]
)
def test_automatic_blocks_are_split_evenly_over_threads(num_crystals, num_atoms, num_shifts, threads):
    """Automatic blocks: as few as the byte budget allows, rounded to the multiple of the threads nearest it (when it
    holds that many), with the outer dimension (crystals, or query atoms) a multiple of the threads."""
    crystals, queries = block_plan(num_crystals, num_atoms, num_shifts, 64, 4, threads=threads)
    rows = AUTO_BLOCK_BYTES / (num_atoms * num_shifts * 64 * 4)
    whole = rows >= num_atoms
    size, total, budget = (crystals, num_crystals, rows / num_atoms) if whole else (queries, num_atoms, rows)
    assert (queries == num_atoms) if whole else (crystals == 1)
    target = threads * round(budget / threads) if budget >= threads else max(1, int(budget))
    blocks = -(-total // size)
    assert blocks == -(-total // min(target, total))  # as few blocks as the (rounded) budget allows
    if budget >= threads and size < total:
        assert size % threads == 0 and blocks * size - total < blocks * threads
    else:
        assert blocks * size - total < blocks


def test_automatic_query_blocks_rounded_up_to_a_crystal():
    # 20 atoms, 343 translations: the budget is 19.1 query rows, the nearest even number a whole crystal.
    assert block_plan(7, 20, 343, 64, 4, threads=2) == (1, 20)
    assert block_plan(7, 20, 343, 64, 4, threads=1) == (1, 10)  # 19 rows: two blocks of 10


@pytest.mark.parametrize("chunk_size", [5, 10])
def test_smaller_grids_equal_the_whole_grid(chunk_size, x64):
    """Crystals whose boxes fit (1, 0, 1) and (1, 1, 1) run on those grids (one crystal per block, or two per block
    after sorting by grid); equal to the reference over the whole grid."""
    floats, mask, box = inputs()
    box = box.at[0].set(jnp.minimum(box[0], jnp.asarray([1, 0, 1], jnp.int32))).at[2].set(jnp.minimum(box[2], 1))
    grids = ((1, 0, 1), (1, 1, 1))
    lattice = floats[4]
    cutoff = basis_cutoff(CENTERS, WIDTH)
    taken = crystal_branches(lattice, mask, box, ranges=RANGES, cutoff=cutoff, grids=grids, per_block=1)
    assert taken.tolist() == [0, 2, 1]
    loss = probe_loss(mask, len(CENTERS))

    def ours(q, k, v, gamma, lattice, frac):
        return periodic_attention(
            q, k, v, gamma, lattice, frac, mask, ranges=RANGES, box=box, centers=CENTERS, width=WIDTH,
            chunk_size=chunk_size, grids=grids,
        )  # fmt: skip

    def theirs(q, k, v, gamma, lattice, frac):
        return reference(q, k, v, gamma, lattice, frac, mask, box, True)

    assert_same_value_and_gradients(loss, ours, theirs, floats)
    with pytest.raises(ValueError, match="grow towards"):
        periodic_attention(*floats[:6], mask, ranges=RANGES, box=box, centers=CENTERS, width=WIDTH, grids=grids[::-1])


@pytest.mark.parametrize("window", [None, WINDOW])
def test_box_floor_skips_only_redundant_box_tests(window, x64):
    """Boxes raised to the floor 1: crystal 0 runs on the grid (1, 1, 1), which then needs no box test, the others on
    (2, 1, 2), which needs it on axes 0 and 2 only (boxes 1 or 2 there); equal to the reference with the raised
    boxes, with and without a basis window."""
    floats, mask, box = inputs(scales=(4.0, 4.0, 4.0), rattle=0.05)
    box = box.at[0].set(jnp.minimum(box[0], 1))
    raised = jnp.maximum(box, 1)
    assert set(np.unique(raised[1:, :, :, [0, 2]]).tolist()) == {1, 2}
    args = dict(ranges=RANGES, window=window, grids=((1, 1, 1),))
    cutoff = basis_cutoff(WINDOW_CENTERS, WINDOW_WIDTH)
    taken = crystal_branches(floats[4], mask, raised, cutoff=cutoff, per_block=1, **args)
    branches = attention_branches(RANGES, args["grids"], window)[0]
    assert [branches[i].grid for i in taken] == [(1, 1, 1), RANGES, RANGES]
    loss = probe_loss(mask, len(WINDOW_CENTERS))

    def ours(q, k, v, gamma, lattice, frac):
        return periodic_attention(
            q, k, v, gamma, lattice, frac, mask, box=box, box_floor=1, centers=WINDOW_CENTERS, width=WINDOW_WIDTH,
            **args,
        )  # fmt: skip

    def theirs(q, k, v, gamma, lattice, frac):
        return reference(q, k, v, gamma, lattice, frac, mask, raised, True, WINDOW_CENTERS, WINDOW_WIDTH)

    assert_same_value_and_gradients(loss, ours, theirs, floats)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_window_variants_for_short_axes(chunk_size, x64):
    """Isotropic grid and window: cells with zero, one and two short axes (2.6 Å, not the leading axes) take the
    windows (3, 3, 3), (5, 3, 3) and (5, 5, 3) on their axes sorted by need; equal to the reference, also with all
    three crystals in one block (which then takes the widest)."""
    ranges = (2, 2, 2)
    floats, mask, box = inputs(scales=(4.0, 4.0, 4.0), rattle=0.05)
    axis_scale = np.array([[1, 1, 1], [1, 0.65, 1], [0.65, 1, 0.65]])
    floats = floats[:4] + (floats[4] * axis_scale[:, :, None], floats[5])
    assert attention_branches(ranges, window=WINDOW) == (
        [Branch(ranges, (3, 3, 3)), Branch(ranges, (5, 3, 3)), Branch(ranges, (5, 5, 3)), Branch(ranges, None)],
        True,
    )
    args = dict(ranges=ranges, centers=WINDOW_CENTERS, width=WINDOW_WIDTH, window=WINDOW)
    cutoff = basis_cutoff(WINDOW_CENTERS, WINDOW_WIDTH)
    taken = crystal_branches(floats[4], mask, box, ranges=ranges, cutoff=cutoff, window=WINDOW, per_block=1)
    assert taken.tolist() == [0, 1, 2]
    loss = probe_loss(mask, len(WINDOW_CENTERS))

    def ours(q, k, v, gamma, lattice, frac):
        return periodic_attention(q, k, v, gamma, lattice, frac, mask, box=box, chunk_size=chunk_size, **args)

    def theirs(q, k, v, gamma, lattice, frac):
        return reference(q, k, v, gamma, lattice, frac, mask, box, True, WINDOW_CENTERS, WINDOW_WIDTH, ranges)

    assert_same_value_and_gradients(loss, ours, theirs, floats)


# Softmax windows: γ in [-1, -0.2] Å⁻² reaches √(D² + 200) Å, 17-18 Å for the 12 Å cells, where a window of 3
# translations per axis holds every image that close (the grid has 5 x 3 x 5); the 7 Å crystal needs 5.
SOFTMAX_SCALES = (12.0, 12.5, 7.0)
SOFTMAX_WINDOW = (3, 3, 3)


def test_softmax_window_holds_every_non_negligible_image(x64):
    """The bound itself, on skewed cells: every image whose factor exp(γ (d² - d²_min)) exceeds e⁻⁴⁰ for the
    flattest head lies inside the window of the covered crystals, and many pairs keep more than one image."""
    floats, mask, _ = inputs(scales=SOFTMAX_SCALES, rattle=1.0)
    _, _, _, gamma, lattice, frac = floats
    reach = softmax_reach(lattice, gamma, mask)
    assert window_covers(lattice, SOFTMAX_WINDOW, reach).tolist() == [True, True, False]
    shifts = translation_grid((4, 4, 4))
    kept_more = 0
    for b in range(2):
        lat, f, flattest = np.asarray(lattice[b]), np.asarray(frac[b])[np.asarray(mask[b])], float(gamma[b].max())
        diff = f[None, :, None, :] - f[:, None, None, :] + shifts  # [Q, N, M, 3]
        d2 = np.sum((diff @ lat) ** 2, axis=-1)
        kept = flattest * (d2 - d2.min(axis=-1, keepdims=True)) > -40
        first = np.ceil(-(f[None, :] - f[:, None]) - float(reach[b]) * np.linalg.norm(np.linalg.inv(lat), axis=0))
        offset = shifts[None, None] - first[:, :, None]
        assert np.all(~kept | np.all((offset >= 0) & (offset < 3), axis=-1))
        kept_more += int(np.sum(kept.sum(axis=-1) > 1))
    assert kept_more > 10


def test_rounded_image_in_boxes():
    frac = jnp.asarray([[[0.1, 0.0, 0.0], [0.9, 0.6, 0.0]], [[0.0, 0.0, 0.0], [1.7, 0.0, 0.0]]])
    mask = jnp.asarray([[True, True], [True, False]])
    box = jnp.ones((2, 2, 1, 3), jnp.int32).at[0, 1, 0, 1].set(0)
    assert rounded_image_in_boxes(frac, mask, None, (1, 1, 1)).tolist() == [True, True]
    assert rounded_image_in_boxes(frac, mask, box, (1, 1, 1)).tolist() == [False, True]  # 0.6 needs a box of 1
    assert rounded_image_in_boxes(frac, mask.at[1, 1].set(True), None, (1, 1, 1)).tolist() == [True, False]


@pytest.mark.parametrize("window", [None, (2, 2, 2)])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("chunk_size", [2, 5])
def test_softmax_window_equals_the_whole_box(window, exact, chunk_size, x64):
    """With a softmax window (with and without a basis window; boxes within the grid, raised to 1): the 12 Å
    crystals take it, the 7 Å one falls back to the whole grid; values and gradients equal the reference."""
    floats, mask, box = inputs(scales=SOFTMAX_SCALES, rattle=0.3)
    box = jnp.minimum(box, jnp.asarray(RANGES, box.dtype))  # within the grid, so that smaller windows fit
    raised = jnp.maximum(box, 1)
    args = dict(ranges=RANGES, window=window, softmax_window=SOFTMAX_WINDOW)
    cutoff = basis_cutoff(WINDOW_CENTERS, WINDOW_WIDTH)
    reach = softmax_reach(floats[4], floats[3], mask)
    taken = crystal_branches(floats[4], mask, raised, cutoff=cutoff, per_block=1, reach=reach, **args)
    branches = attention_branches(RANGES, (), window, SOFTMAX_WINDOW)[0]
    assert [branches[i].softmax_window for i in taken] == [SOFTMAX_WINDOW] * 2 + [None]
    loss = probe_loss(mask, len(WINDOW_CENTERS))

    def ours(q, k, v, gamma, lattice, frac):
        return periodic_attention(
            q, k, v, gamma, lattice, frac, mask, box=box, box_floor=1, centers=WINDOW_CENTERS, width=WINDOW_WIDTH,
            exact_basis_gradient=exact, chunk_size=chunk_size, **args,
        )  # fmt: skip

    def theirs(q, k, v, gamma, lattice, frac):
        return reference(q, k, v, gamma, lattice, frac, mask, raised, exact, WINDOW_CENTERS, WINDOW_WIDTH)

    assert_same_value_and_gradients(loss, ours, theirs, floats)


def test_softmax_windowed_block_alone(x64):
    """The block with a softmax window and no fallback: equal to the reference for the covered crystals; a window of
    one translation per axis misses close images and is wrong."""
    floats, mask, box = inputs(scales=SOFTMAX_SCALES, rattle=0.3)
    q, k, v, gamma, lattice, frac = floats
    raised = jnp.maximum(box, 1)
    args = (lattice, frac, mask, k, v, softmax_reach(lattice, gamma, mask), frac, q, gamma, raised)
    shifts = translation_grid(RANGES)

    def block(softmax_window):
        make = _make_block(shifts, WINDOW_CENTERS, WINDOW_WIDTH, True, (0, 1, 2), None, softmax_window)
        return jax.vmap(make)(*args)

    (v_win, b_win), (v_small, _) = block(SOFTMAX_WINDOW), block((1, 1, 1))
    want_v, want_b = reference(q, k, v, gamma, lattice, frac, mask, raised, True, WINDOW_CENTERS, WINDOW_WIDTH)
    np.testing.assert_allclose(v_win[:2], want_v[:2], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b_win[:2], want_b[:2], rtol=1e-12, atol=1e-14)
    assert float(jnp.max(jnp.abs(v_small[:2] - want_v[:2]))) > 1e-2

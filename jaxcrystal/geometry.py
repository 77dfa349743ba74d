"""Periodic neighbour search: image boxes, k-nearest neighbours within a cutoff, differentiable bond lengths.

Conventions: `lattice` rows are the lattice vectors in Å, `frac` are fractional coordinates (any real values,
not necessarily wrapped into [0, 1)). A neighbour of atom i is a pair (j, n) with n an integer lattice
translation; its Cartesian position is `(frac[j] + n) @ lattice` and the bond vector is
`(frac[j] + n - frac[i]) @ lattice`. The atom itself (j = i, n = 0) is never its own neighbour; every other
periodic image of it is a candidate.

Image enumeration (exact, static shape). For a pair (i, j) let e = frac[j] - frac[i] and s = -floor(e), so
that e + s lies in [0, 1)^3. Candidate images are n = s + t with t in the static *image box*
`t_k in [-m_k, m_k - 1]`, (2 m_k)^3 translations. A bond shorter than r has fractional components
|f_k| <= r / h_k, where h_k is the cell height along axis k (the distance between the lattice planes spanned
by the other two vectors), so the box finds every neighbour within r exactly when `m_k > r / h_k` for
k = 1, 2, 3. The box is a static (compile-time) choice: `required_image_box` gives the smallest sufficient box
for given cells on the host, and the in-`jit` search raises its `overflow` flag for a crystal whose current
cell needs a bigger box (its neighbour list may then miss neighbours). This keeps shapes static while lattices
change inside an optimization; the optimizer can rebuild with a bigger box when the flag appears.

Selection rule (`nearest_neighbors`): all candidates within `cutoff`, sorted by distance; ties (equal within
round-off, see `tie_key`) are broken by the bond vector (`canonical_order`), and the first `capacity`
are kept. Slots beyond the number of candidates are invalid. CGCNN uses capacity 12; a builder with a
different tie rule (ALIGNN keeps every neighbour as close as the 12th) can ask for a larger capacity and use the
sorted `distance` field.

Memory: the search evaluates N x N x T candidate distances per crystal (T = (2m)^3 translations) in chunks
(`lax.map`) of `crystal_chunk` crystals x `atom_chunk` centre atoms, so the peak is about
`crystal_chunk * atom_chunk * N * T` candidates whatever the batch size.
"""

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrystal.errors import StructureError


class NeighborList(NamedTuple):
    """Neighbour topology of a batch, a pytree (all leaves batched on the leading axes `[...]`).

    Attributes:
      index: [..., N, K] int32 neighbour atom index j; in invalid slots the crystal's first real atom.
      image: [..., N, K, 3] int32 integer translation n: the neighbour sits at `(frac[j] + n) @ lattice`;
        zero in invalid slots.
      valid: [..., N, K] bool, True for a real neighbour within the cutoff (False for unused slots and for
        every slot of a padding atom).
      distance: [..., N, K] distance in Å at build time (sorted ascending per atom; `cutoff + 1` in invalid
        slots). Not differentiable: recompute bond lengths with `bond_distances` from the frozen topology.
      overflow: [...] bool, True when the static image box is too small for the crystal's cell (neighbours
        within the cutoff may be missing).
    """

    index: jnp.ndarray
    image: jnp.ndarray
    valid: jnp.ndarray
    distance: jnp.ndarray
    overflow: jnp.ndarray


# ----------------------------------------------------------------------------------------------------------
# Cells and image boxes


def cell_heights(lattice):
    """Heights of the cell [..., 3] in Å: h_k = volume / |a_i x a_j| (distance between lattice planes).

    Args:
      lattice: [..., 3, 3] rows, Å (numpy or JAX).
    """
    xp = jnp if isinstance(lattice, jax.Array) else np
    a, b, c = lattice[..., 0, :], lattice[..., 1, :], lattice[..., 2, :]
    cross = xp.stack([xp.cross(b, c), xp.cross(c, a), xp.cross(a, b)], axis=-2)
    volume = xp.abs(xp.sum(a * cross[..., 0, :], axis=-1))
    return volume[..., None] / xp.linalg.norm(cross, axis=-1)


def required_image_box(lattice, cutoff: float) -> tuple[int, int, int]:
    """Smallest image box (m_1, m_2, m_3) that finds every neighbour within `cutoff` for all given cells.

    m_k = floor(cutoff / h_k) + 1, maximized over the batch (host function, float64).

    Args:
      lattice: [3, 3] or [B, 3, 3] rows, Å.
      cutoff: Å.
    """
    lattice = np.asarray(lattice, dtype=np.float64).reshape(-1, 3, 3)
    heights = cell_heights(lattice)
    if not np.all(np.isfinite(heights)) or np.any(heights <= 0):
        raise StructureError("degenerate lattice: a cell has zero or non-finite volume")
    box = np.floor(cutoff / heights).astype(np.int64) + 1
    return tuple(int(m) for m in box.max(axis=0))


def normalize_box(box) -> tuple[int, int, int]:
    """An image box from an int (same on every axis) or a triple; each m_k >= 1."""
    box = (box,) * 3 if np.ndim(box) == 0 else tuple(box)
    if len(box) != 3 or any(int(m) != m or m < 1 for m in box):
        raise StructureError(f"image box must be a positive int or three positive ints, got {box!r}")
    return tuple(int(m) for m in box)


def box_translations(box) -> np.ndarray:
    """[T, 3] int32 translations t with t_k in [-m_k, m_k - 1], lexicographic order; T = 8 m_1 m_2 m_3."""
    ranges = [range(-m, m) for m in normalize_box(box)]
    return np.array(list(itertools.product(*ranges)), dtype=np.int32)


TIE_QUANTUM = {"float32": 1e-6, "float64": 1e-9}  # Å, a few round-off units at 8 Å in each precision
TIE_POOL = 36  # extra candidates the in-jit search orders canonically beyond the `capacity` nearest


def canonical_order(distance, vectors):
    """Candidate order: by `tie_key(distance)`, ties by the bond vector's quantized (x, y, z), lexicographic.

    The bond vector, not the neighbour's index or image label, decides ties, so the choice inside a symmetric
    shell does not depend on how coordinates are wrapped or on round-off. (The in-jit search applies it to its
    `capacity + TIE_POOL` nearest candidates; a tied shell reaching beyond them falls back to candidate order.)

    Args:
      distance: [M] Å (inf for non-candidates).
      vectors: [M, 3] Cartesian bond vectors, Å.
    Returns:
      [M] int permutation.
    """
    xp = jnp if isinstance(distance, jax.Array) else np
    q = xp.round(xp.where(xp.isfinite(distance)[:, None], vectors, 0.0) / _quantum(distance))
    return xp.lexsort((q[:, 2], q[:, 1], q[:, 0], tie_key(distance)))


def tie_key(distance):
    """Ranking key of candidate distances: distances equal within round-off rank as ties.

    Distances are bucketed to `TIE_QUANTUM` (1e-9 Å in float64, 1e-6 Å in float32: above round-off, below the
    1e-6 Å near-ties real cells have), so neighbours equidistant by symmetry tie exactly and are then ordered by
    their bond vector, whatever the last bits of the arithmetic (device layout, batch size, jit vs host).
    """
    xp = jnp if isinstance(distance, jax.Array) else np
    return xp.round(distance / _quantum(distance))


def _quantum(distance) -> float:
    return TIE_QUANTUM["float32"] if distance.dtype == np.float32 else TIE_QUANTUM["float64"]


# ----------------------------------------------------------------------------------------------------------
# Host search (float64 numpy)


def nearest_neighbors_np(lattice, frac, *, cutoff: float = 8.0, capacity: int = 12) -> NeighborList:
    """Reference host search for one crystal in float64 (no padding, image box chosen from the cell).

    Same selection rule as `nearest_neighbors`; invalid slots get index 0, image 0, distance cutoff + 1.

    Args:
      lattice: [3, 3] rows, Å.
      frac: [N, 3] fractional coordinates.
    Returns:
      `NeighborList` with index [N, K], image [N, K, 3], valid [N, K], distance [N, K] and overflow False.
    """
    lattice = np.asarray(lattice, dtype=np.float64)
    frac = np.asarray(frac, dtype=np.float64)
    n_atoms = frac.shape[0]
    trans = box_translations(required_image_box(lattice, cutoff)).astype(np.float64)
    diff = frac[None, :, :] - frac[:, None, :]  # [N, N, 3] (i, j)
    shift = -np.floor(diff)
    base, offsets = (diff + shift) @ lattice, trans @ lattice  # Cartesian [N, N, 3] and [T, 3]
    dist = np.sqrt(sum((base[:, :, None, k] + offsets[None, None, :, k]) ** 2 for k in range(3)))
    image = shift[:, :, None, :] + trans[None, None]
    is_self = (np.arange(n_atoms)[:, None, None] == np.arange(n_atoms)[None, :, None]) & np.all(image == 0, -1)
    dist = np.where(is_self | (dist > cutoff), np.inf, dist).reshape(n_atoms, -1)
    vectors = (base[:, :, None, :] + offsets[None, None]).reshape(n_atoms, -1, 3)
    order = np.stack([canonical_order(dist[i], vectors[i]) for i in range(n_atoms)])[:, :capacity]
    if order.shape[1] < capacity:  # fewer candidates than slots in the whole box (tiny N, huge cutoff)
        order = np.pad(order, ((0, 0), (0, capacity - order.shape[1])), constant_values=0)
    dist_k = np.take_along_axis(dist, order, axis=1)
    valid = np.isfinite(dist_k)
    n_trans = trans.shape[0]
    index = np.where(valid, order // n_trans, 0).astype(np.int32)
    image = image.reshape(n_atoms, -1, 3)[np.arange(n_atoms)[:, None], order]
    image = np.where(valid[..., None], image, 0).astype(np.int32)
    return NeighborList(index, image, valid, np.where(valid, dist_k, cutoff + 1.0), np.bool_(False))


# ----------------------------------------------------------------------------------------------------------
# In-jit search (static shapes)


def _crystal_neighbors(lattice, frac, mask, translations, subset, cutoff, capacity, atom_chunk):
    """One crystal: lattice [3, 3], frac [N, 3], mask [N] -> (index, image, valid, distance), [N, K] leaves.

    The candidates are the translations `translations[subset]` ([T, 3] int, a lexicographically ordered subset
    of the box's own ordered translations, static). Their Cartesian offsets are taken from those of the whole box,
    so that every candidate's distance has the same bits whichever subset is searched.
    """
    n_atoms = frac.shape[0]
    trans = jnp.asarray(translations[subset], dtype=frac.dtype)
    n_trans = trans.shape[0]
    cutoff2 = jnp.asarray(cutoff, frac.dtype) ** 2
    first_real = jnp.argmax(mask).astype(jnp.int32)
    offsets = (jnp.asarray(translations, dtype=frac.dtype) @ lattice)[subset]  # [T, 3] Cartesian translations

    def row(i):
        diff = frac - frac[i]  # [N, 3] over j
        shift = -jnp.floor(diff)
        base = (diff + shift) @ lattice  # [N, 3] Cartesian, then + the translation's Cartesian offset
        d2 = sum((base[:, None, k] + offsets[None, :, k]) ** 2 for k in range(3))  # [N, T]
        image = shift[:, None, :] + trans[None]
        is_self = (jnp.arange(n_atoms) == i)[:, None] & jnp.all(image == 0, axis=-1)
        ok = mask[:, None] & ~is_self & (d2 <= cutoff2) & mask[i]
        d = jnp.sqrt(jnp.where(ok, d2, jnp.inf)).reshape(-1)
        if d.shape[0] < capacity:  # fewer candidates than slots in the whole box (tiny N and box)
            d = jnp.pad(d, (0, capacity - d.shape[0]), constant_values=jnp.inf)
        # Two stages: the nearest `capacity + TIE_POOL` by quantized distance, then the canonical order among
        # them (distance bucket, then the bond vector), so symmetric shells resolve the same way everywhere.
        pool = min(d.shape[0], capacity + TIE_POOL)
        _, order = jax.lax.top_k(-tie_key(d), pool)
        vectors = base[order // n_trans % n_atoms] + offsets[order % n_trans]  # [pool, 3] Cartesian bonds
        order = order[canonical_order(d[order], vectors)[:capacity]]
        dist = d[order]
        valid = jnp.isfinite(dist)
        index = jnp.where(valid, order // n_trans, first_real).astype(jnp.int32)
        img = jnp.where(valid[:, None], image.reshape(-1, 3)[order % (n_atoms * n_trans)], 0).astype(jnp.int32)
        dist = jnp.where(valid, dist, cutoff + 1.0)
        return index, img, valid, dist

    return jax.lax.map(row, jnp.arange(n_atoms), batch_size=min(atom_chunk, n_atoms))


BOX_SLACK = 1e-4  # a smaller box is taken only when it holds the cutoff with this relative margin
# smaller_boxes="auto" searches the half box only from this many candidate distances per search (B N^2 (2m)^3):
# the half box is a second compiled branch (about 0.4 s per program on a 2-core CPU), which a 128 x 5-atom search
# in the (5, 5, 5) box (3.2 M, about 17 ms per search, 11 ms in the half box) did not win back in the 200-step main
# job; a 128 x 135-atom search in the (2, 2, 2) box (149 M, about 0.57 s) gains 0.26 s per search.
AUTO_LADDER_CANDIDATES = 2**24


def box_ladder(box) -> list[tuple[int, int, int]]:
    """The boxes `nearest_neighbors` may search, smaller first: the half box (ceil(m_k / 2) per axis, about 1/8 of
    the translations) and `box` itself. The half box's translations are a subset of the box's.

    Two rungs, because each one is compiled (about 0.4 s per program on a 2-core CPU): for the (5, 5, 5) box that
    2 Å cells need, cells of 2.7-4 Å fit the (3, 3, 3) half box, whose search takes about 0.6 of the time.
    """
    box = normalize_box(box)
    half = tuple(-(-m // 2) for m in box)
    return [box] if half == box else [half, box]


def search_ladder(box, num_crystals: int, num_atoms: int, smaller_boxes="auto") -> list[tuple[int, int, int]]:
    """The boxes a search of `num_crystals` x `num_atoms` atoms in `box` runs with `smaller_boxes` (True, False
    or "auto", see `nearest_neighbors`): `box_ladder(box)`, or `box` alone."""
    box = normalize_box(box)
    if smaller_boxes == "auto":
        smaller_boxes = num_crystals * num_atoms**2 * 8 * int(np.prod(box)) >= AUTO_LADDER_CANDIDATES
    return box_ladder(box) if smaller_boxes else [box]


def box_levels(lattice, cutoff: float, ladder):
    """[B] int32, jittable: per cell, the first box of `ladder` that finds every neighbour within `cutoff`
    (m_k h_k > cutoff (1 + `BOX_SLACK`) on every axis), else the last."""
    heights = cell_heights(lattice)  # [B, 3]
    fits = [jnp.all(jnp.asarray(b, heights.dtype) * heights > cutoff * (1 + BOX_SLACK), axis=-1) for b in ladder]
    fits = jnp.stack(fits, axis=-1).at[:, -1].set(True)
    return jnp.argmax(fits, axis=-1).astype(jnp.int32)


def nearest_neighbors(
    lattice,
    frac,
    mask,
    *,
    cutoff: float = 8.0,
    capacity: int = 12,
    box=3,
    atom_chunk: int = 32,
    crystal_chunk: int = 8,
    smaller_boxes="auto",
) -> NeighborList:
    """k-nearest periodic neighbours within `cutoff` with a static image box; jittable, batched.

    Padding atoms (mask False) are never neighbours and get only invalid slots. Not differentiable (integer
    topology); distances are in the dtype of `frac`.

    With `smaller_boxes`, each chunk of crystals searches the smallest box of `box_ladder(box)` that suffices for
    all of its cells (`box_levels`, `lax.switch`; crystals are sorted by the box they need, so that chunks share
    one). The result is the one the whole box gives, bit for bit: a box that suffices holds every candidate within
    the cutoff, with the same distances and in the same relative order, and the candidates beyond it do not count.
    For cells of 4 Å the (3, 3, 3) half box searches 216 of the 1000 translations of the (5, 5, 5) box that 2 Å
    cells need (128 x 5 atoms: 11 vs 17 ms here); 135-atom cells of 12 Å the (1, 1, 1) half of the (2, 2, 2) box
    (128 x 135 atoms: 0.31 vs 0.57 s).

    Args:
      lattice: [B, 3, 3] rows, Å.
      frac: [B, N, 3] fractional coordinates (need not be wrapped).
      mask: [B, N] bool, True for real atoms.
      cutoff: Å.
      capacity: K, neighbour slots per atom.
      box: static image box, int or (m_1, m_2, m_3); see the module docstring and `required_image_box`.
      atom_chunk: atoms searched at once per crystal.
      crystal_chunk: crystals searched at once; the peak memory is about
        crystal_chunk * atom_chunk * N * 8 m^3 * 4 values (e.g. 8 * 32 * 135 * 216 * 4 floats = 120 MB in float32).
      smaller_boxes: True: search the smallest sufficient box of `box_ladder(box)` per chunk; False: always `box`;
        "auto": True from `AUTO_LADDER_CANDIDATES` candidate distances per search (B N^2 (2m)^3; `search_ladder`).
    Returns:
      `NeighborList` with index [B, N, K], image [B, N, K, 3], valid [B, N, K], distance [B, N, K],
      overflow [B] (True when `box` itself is too small for the crystal's cell).
    """
    box = normalize_box(box)
    translations = box_translations(box)
    lattice = jnp.asarray(lattice)
    frac = jnp.asarray(frac, dtype=lattice.dtype)
    mask = jnp.asarray(mask, dtype=bool)
    num_crystals = lattice.shape[0]
    ladder = search_ladder(box, num_crystals, frac.shape[1], smaller_boxes)
    subsets = [np.flatnonzero(np.all((translations >= -np.array(b)) & (translations < b), axis=1)) for b in ladder]
    chunk = max(1, min(crystal_chunk, num_crystals))
    num_chunks = -(-num_crystals // chunk)
    overflow = jnp.any(jnp.asarray(box, lattice.dtype) * cell_heights(lattice) <= cutoff, axis=-1)
    levels = box_levels(lattice, cutoff, ladder) if len(ladder) > 1 else jnp.zeros(num_crystals, jnp.int32)
    order = None
    if len(ladder) > 1 and chunk > 1:  # chunks of crystals that need the same box
        order = jnp.argsort(levels, stable=True)
        lattice, frac, mask, levels = (jnp.take(x, order, axis=0) for x in (lattice, frac, mask, levels))

    def chunked(x, fill):
        pad = [(0, num_chunks * chunk - num_crystals)] + [(0, 0)] * (x.ndim - 1)
        x = jnp.pad(x, pad, constant_values=fill)
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    def search(subset):
        def one(lat, fr, m):
            return _crystal_neighbors(lat, fr, m, translations, subset, cutoff, capacity, atom_chunk)

        return jax.vmap(one)

    searches = [search(subset) for subset in subsets]

    def chunk_search(args):
        level, lat, fr, m = args
        if len(searches) == 1:
            return searches[0](lat, fr, m)
        return jax.lax.switch(jnp.max(level), searches, lat, fr, m)

    # padding crystals: no real atoms, level 0
    chunks = (chunked(levels, 0), chunked(lattice, 0.0), chunked(frac, 0.0), chunked(mask, False))
    found = jax.lax.map(chunk_search, chunks)
    found = [x.reshape((num_chunks * chunk,) + x.shape[2:])[:num_crystals] for x in found]
    if order is not None:
        inverse = jnp.argsort(order)
        found = [jnp.take(x, inverse, axis=0) for x in found]
    return NeighborList(*found, overflow)


# ----------------------------------------------------------------------------------------------------------
# Differentiable bond lengths from a frozen topology


def bond_vectors(lattice, frac, neighbors: NeighborList):
    """Bond vectors [B, N, K, 3] in Å: `(frac[j] + n - frac[i]) @ lattice`; differentiable in lattice, frac.

    Args:
      lattice: [B, 3, 3] rows, Å.
      frac: [B, N, 3] fractional.
      neighbors: topology with index [B, N, K] and image [B, N, K, 3].
    """
    frac_j = jax.vmap(lambda f, idx: f[idx])(frac, neighbors.index)  # [B, N, K, 3]
    delta = frac_j + neighbors.image.astype(frac.dtype) - frac[:, :, None, :]
    return jnp.einsum("bnkx,bxy->bnky", delta, lattice)


def bond_distances(lattice, frac, neighbors: NeighborList, fill: float):
    """Bond lengths [B, N, K] in Å from a frozen topology; `fill` (a constant) in invalid slots.

    The square root is only taken on valid slots, so invalid (possibly zero-length) slots give zero
    gradients, not NaN.
    """
    vec = bond_vectors(lattice, frac, neighbors)
    d2 = jnp.sum(vec**2, axis=-1)
    safe = jnp.where(neighbors.valid, d2, 1.0)
    return jnp.where(neighbors.valid, jnp.sqrt(safe), jnp.asarray(fill, d2.dtype))

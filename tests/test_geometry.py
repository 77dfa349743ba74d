"""Periodic neighbour search: against CGCNN's reference graphs and pymatgen, host vs jit, images, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from pymatgen.core import Lattice, Structure

from jaxcrystal import geometry

CASES = np.load(FIXTURES / "cgcnn" / "cases_small.npz")
NAMES = [str(n) for n in CASES["case_names"]]


def case(name):
    return CASES[f"{name}__lattice"], CASES[f"{name}__frac"]


def reference(name):
    get = lambda key: CASES[f"{name}__{key}"]  # noqa: E731
    return geometry.NeighborList(get("nbr_idx"), get("nbr_image"), get("nbr_mask"), get("nbr_dist"), False)


def neighbour_set(nl, i, below=np.inf):
    """{(j, image)} of atom i's valid neighbours closer than `below` Å."""
    index, image, valid, dist = (np.asarray(x)[i] for x in nl[:4])
    return {
        (int(j), tuple(map(int, n))) for j, n, v, d in zip(index, image, valid, dist, strict=True) if v and d < below
    }


@pytest.mark.parametrize("name", NAMES)
def test_host_search_reproduces_cgcnn_reference_graph(name):
    lattice, frac = case(name)
    ours, ref = geometry.nearest_neighbors_np(lattice, frac), reference(name)
    np.testing.assert_array_equal(ours.valid, ref.valid)
    # slot order inside a shell tied within `TIE_QUANTUM` follows the bond vector (CGCNN sums over slots)
    np.testing.assert_allclose(np.sort(ours.distance), np.sort(ref.distance), rtol=0, atol=1e-10)  # 9.0 unused
    for i in range(len(frac)):
        last = ref.distance[i][ref.valid[i]].max()
        # identical neighbours, except for the choice among a shell tied at the 12th slot
        assert neighbour_set(ours, i, last - 1e-6) == neighbour_set(ref, i, last - 1e-6)
    # every chosen (index, image) really sits at the stated distance
    positions = (frac[ours.index] + ours.image) @ lattice
    lengths = np.linalg.norm(positions - (frac @ lattice)[:, None], axis=-1)
    np.testing.assert_allclose(lengths[ours.valid], ours.distance[ours.valid], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours.index[~ours.valid], 0)


def test_unused_slots_follow_cgcnn_convention():
    lattice, frac = case("n2_dimer_box10")
    ours = geometry.nearest_neighbors_np(lattice, frac)
    assert ours.valid.sum(axis=1).tolist() == [1, 1]
    assert np.all(ours.distance[:, 1:] == 9.0) and np.all(ours.index[:, 1:] == 0) and np.all(ours.image[:, 1:] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_jit_search_matches_host_search_in_float64(name, x64):
    lattice, frac = case(name)
    host = geometry.nearest_neighbors_np(lattice, frac)
    box = geometry.required_image_box(lattice, 8.0)
    search = jax.jit(lambda lat, fr, m: geometry.nearest_neighbors(lat, fr, m, box=box, atom_chunk=4))
    ours = search(lattice[None], frac[None], np.ones((1, len(frac)), bool))
    ours = geometry.NeighborList(*(np.asarray(x)[0] for x in ours))
    assert not ours.overflow
    np.testing.assert_allclose(ours.distance, host.distance, rtol=0, atol=1e-12)
    for i in range(len(frac)):
        last = host.distance[i][host.valid[i]].max()
        assert neighbour_set(ours, i, last - 1e-6) == neighbour_set(host, i, last - 1e-6)


def _random_cell(rng):
    lengths = rng.uniform(2.5, 7.0, 3)
    angles = rng.uniform(65, 115, 3)
    structure = Structure(Lattice.from_parameters(*lengths, *angles), ["Si"] * 4, rng.uniform(-1.5, 2.5, (4, 3)))
    return structure


@pytest.mark.parametrize("seed", range(4))
def test_distances_agree_with_pymatgen_on_skewed_cells(seed):
    """Independent check: the 12 shortest distances within 8 Å from pymatgen's neighbour search."""
    structure = _random_cell(np.random.default_rng(seed))
    ours = geometry.nearest_neighbors_np(structure.lattice.matrix, structure.frac_coords)
    for i, neighbors in enumerate(structure.get_all_neighbors(8.0)):
        expected = sorted(n.nn_distance for n in neighbors)[:12]
        np.testing.assert_allclose(ours.distance[i][: len(expected)], expected, rtol=0, atol=1e-9)


def test_image_box_sufficiency_and_overflow_flag():
    lattice, frac = case("srtio3_cubic5")  # a = 3.905 Å: 8 / 3.905 = 2.05 -> m = 3
    assert geometry.required_image_box(lattice, 8.0) == (3, 3, 3)
    np.testing.assert_allclose(geometry.cell_heights(lattice), 3.905, rtol=1e-12)
    mask = np.ones((1, len(frac)), bool)
    small = geometry.nearest_neighbors(lattice[None], frac[None], mask, box=2)
    exact = geometry.nearest_neighbors(lattice[None], frac[None], mask, box=3)
    large = geometry.nearest_neighbors(lattice[None], frac[None], mask, box=(4, 5, 3))
    assert bool(small.overflow[0]) and not bool(exact.overflow[0]) and not bool(large.overflow[0])
    np.testing.assert_array_equal(np.asarray(exact.distance), np.asarray(large.distance))
    assert geometry.required_image_box(case("srtio3_333_noisy135")[0], 8.0) == (1, 1, 1)


def test_unwrapped_coordinates_give_exact_images(x64):
    lattice, frac = case("triclinic6")
    shift = np.zeros_like(frac)
    shift[2] = [3, -2, 1]  # move atom 2 by a lattice vector: same crystal
    mask = np.ones((1, len(frac)), bool)
    a = geometry.nearest_neighbors(lattice[None], frac[None], mask, box=2)
    b = geometry.nearest_neighbors(lattice[None], (frac + shift)[None], mask, box=2)
    np.testing.assert_allclose(np.asarray(b.distance), np.asarray(a.distance), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(b.index), np.asarray(a.index))
    # images compensate the shift: neighbour j = 2 gets n - shift, centre i = 2 gets n + shift
    expected = np.asarray(a.image[0]) - shift[np.asarray(a.index[0])] + shift[:, None, :]
    valid = np.asarray(a.valid[0])
    np.testing.assert_array_equal(np.asarray(b.image[0])[valid], expected[valid])


def test_padding_atoms_do_not_change_real_atoms_and_chunking_is_exact(x64):
    lattice, frac = case("vse2_jvasp10")
    garbage = np.array([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [7.0, -3.0, 0.5]])
    padded = np.concatenate([frac, garbage])[None]
    mask = np.array([[True] * 3 + [False] * 3])
    ours = geometry.nearest_neighbors(lattice[None], padded, mask, box=3, atom_chunk=2)
    plain = geometry.nearest_neighbors(lattice[None], frac[None], mask[:, :3], box=3, atom_chunk=32)
    ours_real = geometry.NeighborList(*(np.asarray(x)[0, :3] for x in ours[:4]), False)
    plain = geometry.NeighborList(*(np.asarray(x)[0] for x in plain[:4]), False)
    np.testing.assert_array_equal(ours_real.valid, plain.valid)
    np.testing.assert_allclose(ours_real.distance, plain.distance, rtol=0, atol=1e-12)  # chunking: ulp-level
    for i in range(3):  # same neighbours up to the choice within exactly tied shells
        assert neighbour_set(ours_real, i, 3.0) == neighbour_set(plain, i, 3.0)
    assert not np.asarray(ours.valid)[0, 3:].any()
    assert np.all(np.asarray(ours.index)[0, 3:] == 0)  # the first real atom


def test_bond_distances_gradient_is_finite_with_zero_length_unused_slots(x64):
    """N2 in a box: atom 0's unused slots point at atom 0 itself with image 0 (zero vector)."""
    lattice, frac = case("n2_dimer_box10")
    graph = jax.tree.map(lambda x: jnp.asarray(x)[None], geometry.nearest_neighbors_np(lattice, frac))

    def total(lat, fr):
        return jnp.sum(geometry.bond_distances(lat, fr, graph, fill=9.0) ** 2)

    g_lat, g_frac = jax.grad(total, argnums=(0, 1))(jnp.asarray(lattice)[None], jnp.asarray(frac)[None])
    assert np.all(np.isfinite(g_lat)) and np.all(np.isfinite(g_frac))
    eps = 1e-6
    bumped = frac.copy()
    bumped[1, 2] += eps
    lower = frac.copy()
    lower[1, 2] -= eps
    fd = (total(lattice[None], bumped[None]) - total(lattice[None], lower[None])) / (2 * eps)
    np.testing.assert_allclose(g_frac[0, 1, 2], fd, rtol=1e-7)


def test_box_ladder_and_levels():
    assert geometry.box_ladder(5) == [(3, 3, 3), (5, 5, 5)]
    assert geometry.box_ladder((1, 3, 2)) == [(1, 2, 1), (1, 3, 2)]
    assert geometry.box_ladder(1) == [(1, 1, 1)]
    cubic = lambda a: np.eye(3) * a  # noqa: E731
    # 8 Å cutoff: the (3, 3, 3) half box serves cells with 3 h > 8 (with the slack); 8 / 3 Å is not enough
    lattices = [cubic(9.0), cubic(4.1), cubic(3.0), cubic(2.0), np.diag([9.0, 9.0, 2.5]), cubic(8 / 3), cubic(2.7)]
    levels = geometry.box_levels(jnp.asarray(np.stack(lattices)), 8.0, geometry.box_ladder(5))
    np.testing.assert_array_equal(np.asarray(levels), [0, 0, 0, 1, 1, 1, 0])


def test_auto_ladder_only_for_large_searches():
    # 128 x 5 atoms in the (5, 5, 5) box: 3.2 M candidate distances, one box; 128 x 135 in (2, 2, 2): 149 M, two
    assert geometry.search_ladder(5, 128, 5) == [(5, 5, 5)]
    assert geometry.search_ladder(2, 128, 135) == [(1, 1, 1), (2, 2, 2)]
    assert geometry.search_ladder(5, 128, 5, smaller_boxes=True) == [(3, 3, 3), (5, 5, 5)]
    assert geometry.search_ladder(2, 128, 135, smaller_boxes=False) == [(2, 2, 2)]
    assert geometry.search_ladder(1, 128, 135) == [(1, 1, 1)]


@pytest.mark.parametrize("crystal_chunk, dtype", [(1, "float32"), (3, "float32"), (8, "float32"), (3, "float64")])
def test_smaller_boxes_give_the_whole_box_result_bit_for_bit(crystal_chunk, dtype, request):
    """Cells from 2.2 to 12 Å, sheared, with padding atoms, searched in a (5, 5, 5) box: each chunk takes the
    half box when it suffices for all of its cells, and every leaf equals that of the search over the whole box.
    160 slots, so that some rows hold every candidate within the cutoff (a box too small would lose some)."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    rng = np.random.default_rng(7)
    lengths = [2.2, 12.0, 4.5, 3.1, 9.0, 6.0, 2.6]
    lattices = [np.eye(3) * a + rng.normal(0, 0.15 * a, (3, 3)) for a in lengths]
    # one real atom in cubic cells of 2.6 and 2.665 Å: they need the (4, 4, 4) box; the (3, 3, 3) one would lose
    # images at 7.8-8 Å (the self-images at 3 x 2.6 and 3 x 2.665 = 7.995 Å among them), and their rows are not full
    lattices = np.stack(lattices + [np.eye(3) * 2.6, np.eye(3) * 2.665])
    frac = rng.uniform(-0.5, 1.5, (len(lattices), 4, 3))
    mask = np.ones((len(lattices), 4), bool)
    mask[1, 3] = mask[4, 2:] = mask[-2:, 1:] = False
    levels = np.asarray(geometry.box_levels(jnp.asarray(lattices, dtype), 8.0, geometry.box_ladder(5)))
    assert set(levels.tolist()) == {0, 1}  # the chunks do take different boxes

    def search(smaller):
        return jax.jit(
            lambda lat, fr, m: geometry.nearest_neighbors(
                lat, fr, m, capacity=160, box=5, atom_chunk=3, crystal_chunk=crystal_chunk, smaller_boxes=smaller
            )
        )(jnp.asarray(lattices, dtype), jnp.asarray(frac, dtype), mask)

    adaptive, whole = search(True), search(False)
    valid = np.asarray(whole.valid)
    assert not np.asarray(whole.overflow).any()
    assert not valid[-2:, 0].all(axis=-1).any() and levels[-2:].tolist() == [1, 1]  # rows that end before the slots
    for field, a, b in zip(geometry.NeighborList._fields, adaptive, whole, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
    # and an insufficient box still reports its overflow
    small = geometry.nearest_neighbors(jnp.asarray(lattices), jnp.asarray(frac), mask, box=3)
    np.testing.assert_array_equal(np.asarray(small.overflow), levels > 0)

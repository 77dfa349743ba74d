"""Templates: perovskite site geometry and coordination, supercells, seeded sampling, folders."""

import numpy as np
import pytest
from conftest import FIXTURES

from jaxcrystal import templates
from jaxcrystal.templates import SITE_A, SITE_B, SITE_X


def _coordination(structure, roles, role, cutoff):
    """Number of X neighbours within `cutoff` Å of each site of `role`."""
    counts = []
    for i in np.flatnonzero(roles == role):
        neighbours = structure.get_neighbors(structure[i], cutoff)
        counts.append(sum(1 for n in neighbours if roles[n.index] == SITE_X))
    return np.array(counts)


@pytest.mark.parametrize("n", [1, 3])
def test_perovskite_sites_and_coordination(n):
    a = 4.0
    structure, roles = templates.perovskite_cell((a, a, a), supercell=n)
    assert len(structure) == 5 * n**3
    assert (roles == SITE_A).sum() == n**3 and (roles == SITE_B).sum() == n**3 and (roles == SITE_X).sum() == 3 * n**3
    # B: octahedral, 6 X at a/2; A: cuboctahedral, 12 X at a/sqrt(2); nothing closer.
    np.testing.assert_array_equal(_coordination(structure, roles, SITE_B, a / 2 + 0.01), 6)
    np.testing.assert_array_equal(_coordination(structure, roles, SITE_A, a / 2 + 0.01), 0)
    np.testing.assert_array_equal(_coordination(structure, roles, SITE_A, a / np.sqrt(2) + 0.01), 12)
    assert structure.lattice.abc == pytest.approx((n * a,) * 3)


def test_3x3x3_is_135_atoms_with_27_27_81():
    t = templates.random_perovskites(4, seed=0, supercell=3)
    assert t.site_roles.shape == (4, 135)
    for roles in t.site_roles:
        assert [(roles == r).sum() for r in (SITE_A, SITE_B, SITE_X)] == [27, 27, 81]
    lengths = np.array([s.lattice.abc for s in t.structures])
    assert lengths.min() >= 6.0 and lengths.max() <= 30.0


def test_random_perovskites_are_seeded_and_in_range():
    a = templates.random_perovskites(64, seed=7)
    b = templates.random_perovskites(64, seed=7)
    c = templates.random_perovskites(64, seed=8)
    la = np.array([s.lattice.abc for s in a.structures])
    np.testing.assert_array_equal(la, [s.lattice.abc for s in b.structures])
    assert not np.allclose(la, [s.lattice.abc for s in c.structures])
    assert la.min() >= 2.0 and la.max() <= 10.0 and la.std() > 1.0
    assert np.allclose([s.lattice.angles for s in a.structures], 90.0)


def test_templates_from_folder_are_sorted_and_general():
    t = templates.from_folder(FIXTURES / "structures")
    assert list(t.names) == sorted(t.names) and t.family == "general"
    assert (t.site_roles == templates.SITE_NONE).all()
    batch = t.batch()
    assert batch.num_crystals == len(t)
    sub = t.take([2, 0, 2])
    assert sub.names == (t.names[2], t.names[0], t.names[2])

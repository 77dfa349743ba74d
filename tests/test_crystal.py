"""CrystalBatch: round trips through pymatgen, POSCAR, CIF and ASE; padding; lattice parameters; validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from pymatgen.core import Lattice, Structure

from jaxcrystal.crystal import (
    CrystalBatch,
    concatenate,
    lattice_from_parameters,
    lattice_to_parameters,
    read_structure,
    read_structures,
    write_cif,
    write_poscar,
)
from jaxcrystal.errors import ElementError, StructureError

STRUCTURE_FILES = sorted((FIXTURES / "structures").glob("*.vasp"))


@pytest.fixture(scope="module")
def structures():
    return [read_structure(p) for p in STRUCTURE_FILES]


def _assert_same_structure(a: Structure, b: Structure, atol=1e-6):
    np.testing.assert_allclose(a.lattice.matrix, b.lattice.matrix, atol=atol)
    assert [s.symbol for s in a.species] == [s.symbol for s in b.species]
    diff = a.frac_coords - b.frac_coords
    np.testing.assert_allclose(diff - np.round(diff), 0.0, atol=atol)


def test_fixture_set_has_triclinic_and_several_sizes(structures):
    angles = np.array([s.lattice.angles for s in structures])
    assert np.any(np.all(np.abs(angles - 90) > 1, axis=1)), "need a triclinic cell"
    assert len({len(s) for s in structures}) >= 4


def test_pymatgen_round_trip_with_padding(structures):
    batch = CrystalBatch.from_structures(structures, pad_to=20)
    assert batch.frac.shape == (len(structures), 20, 3)
    assert batch.species.shape == (len(structures), 20, 98)
    np.testing.assert_array_equal(batch.mask.sum(1), [len(s) for s in structures])
    np.testing.assert_allclose(batch.species[batch.mask].sum(-1), 1.0)
    assert not batch.species[~batch.mask].any() and not batch.frac[~batch.mask].any()
    for original, back in zip(structures, batch.to_structures(), strict=True):
        _assert_same_structure(original, back, atol=1e-12)


def test_file_round_trips(structures, tmp_path):
    batch = CrystalBatch.from_structures(structures)
    for i, s in enumerate(batch.to_structures()):
        write_poscar(s, tmp_path / f"{i}.vasp")
        write_cif(s, tmp_path / f"{i}.cif")
    again = CrystalBatch.from_files([tmp_path / f"{i}.vasp" for i in range(len(structures))])
    np.testing.assert_allclose(again.lattice, batch.lattice, atol=1e-8)
    np.testing.assert_array_equal(again.species, batch.species)
    for original, from_cif in zip(
        structures, [read_structure(tmp_path / f"{i}.cif") for i in range(len(structures))], strict=True
    ):
        # CIF stores cell parameters, so the orientation may change: compare invariants.
        np.testing.assert_allclose(original.lattice.abc, from_cif.lattice.abc, atol=1e-5)
        np.testing.assert_allclose(original.lattice.angles, from_cif.lattice.angles, atol=1e-4)
        assert original.composition == from_cif.composition
        assert abs(original.volume - from_cif.volume) < 1e-3
    names = [name for name, _ in read_structures(tmp_path)]
    assert names == sorted(names) and len(names) == 2 * len(structures)


def test_ase_round_trip(structures):
    pytest.importorskip("ase")
    batch = CrystalBatch.from_structures(structures, pad_to=17)
    atoms = batch.to_ase()
    again = CrystalBatch.from_structures(atoms, pad_to=17)
    for k in range(4):
        np.testing.assert_allclose(np.asarray(again[k], float), np.asarray(batch[k], float), atol=1e-10)


def test_disordered_site_becomes_soft_species():
    s = Structure(Lattice.cubic(4.0), [{"Sr": 0.5, "Ba": 0.5}, "Ti"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    batch = CrystalBatch.from_structures([s])
    assert batch.species[0, 0, 37] == 0.5 and batch.species[0, 0, 55] == 0.5


def test_concatenate_and_subbatch(structures):
    a = CrystalBatch.from_structures(structures[:2])
    b = CrystalBatch.from_structures(structures[2:])
    both = concatenate([a, b])
    assert both.num_crystals == len(structures)
    np.testing.assert_array_equal(both[2:].mask[:, : b.num_sites], b.mask)
    assert isinstance(both[0], np.ndarray) and both[0].shape == (len(structures), 3, 3)


def test_batch_is_a_pytree(structures):
    batch = CrystalBatch.from_structures(structures)
    leaves, treedef = jax.tree.flatten(batch)
    assert len(leaves) == 4
    doubled = jax.jit(lambda b: b._replace(lattice=2 * b.lattice))(batch)
    assert isinstance(doubled, CrystalBatch)
    np.testing.assert_allclose(doubled.lattice, 2 * batch.lattice, rtol=1e-6)


@pytest.mark.parametrize(
    "params",
    [(3.0, 4.0, 5.0, 90.0, 90.0, 90.0), (5.1, 6.2, 7.3, 71.0, 83.0, 104.0), (4.0, 4.0, 6.0, 90.0, 90.0, 120.0)],
)
def test_lattice_parameters_round_trip(params):
    with jax.enable_x64(True):
        lengths, angles = np.array(params[:3]), np.array(params[3:])
        matrix = lattice_from_parameters(lengths, angles)
        expected = Lattice.from_parameters(*params, vesta=True).matrix  # a along x, b in the xy-plane
        np.testing.assert_allclose(matrix, expected, atol=1e-10)
        assert matrix[0, 1] == 0 and matrix[0, 2] == 0 and matrix[1, 2] == 0
        back_lengths, back_angles = lattice_to_parameters(matrix)
        np.testing.assert_allclose(back_lengths, lengths, atol=1e-10)
        np.testing.assert_allclose(back_angles, angles, atol=1e-8)


def test_lattice_parameter_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        x0 = jnp.array([5.1, 6.2, 7.3, 71.0, 83.0, 104.0])
        weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)))

        def f(x):
            return jnp.sum(weights * lattice_from_parameters(x[:3], x[3:]))

        grad = jax.grad(f)(x0)
        h = 1e-6
        fd = np.array([(f(x0.at[i].add(h)) - f(x0.at[i].add(-h))) / (2 * h) for i in range(6)])
        np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)
        # and the inverse map
        g_inv = jax.jacfwd(lambda x: jnp.concatenate(lattice_to_parameters(lattice_from_parameters(x[:3], x[3:]))))(x0)
        np.testing.assert_allclose(g_inv, np.eye(6), atol=1e-8)


def test_validation_errors_name_the_problem(tmp_path):
    good = CrystalBatch.from_structures([Structure(Lattice.cubic(4), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])])
    with pytest.raises(StructureError, match="volume"):
        CrystalBatch.from_structures([Structure(Lattice([[1, 0, 0], [2, 0, 0], [0, 0, 1]]), ["Na"], [[0, 0, 0]])])
    from jaxcrystal.crystal import validate

    with pytest.raises(StructureError, match="NaN"):
        validate(good._replace(frac=np.full_like(good.frac, np.nan)))
    with pytest.raises(StructureError, match="sum to"):
        validate(good._replace(species=good.species * 0.5))
    with pytest.raises(StructureError, match="species must have shape"):
        validate(good._replace(species=good.species[..., :90]))
    with pytest.raises(ElementError, match="Es"):
        CrystalBatch.from_structures([Structure(Lattice.cubic(4), ["Es"], [[0, 0, 0]])])
    truncated = tmp_path / "bad.vasp"
    truncated.write_text("NaCl\n1.0\n4 0 0\n0 4 0\n")
    with pytest.raises(StructureError, match="bad.vasp"):
        read_structure(truncated)
    garbage = tmp_path / "bad.cif"
    garbage.write_text("data_x\n_cell_length_a 4\nloop_\n_atom_site_label\n")
    with pytest.raises(StructureError, match="bad.cif"):
        read_structure(garbage)
    with pytest.raises(StructureError, match="no such file"):
        read_structure(tmp_path / "missing.vasp")

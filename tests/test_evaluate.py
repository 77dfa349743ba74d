"""Evaluation criteria, success logic, uniqueness and novelty on small real structures."""

import dataclasses
import itertools
import re

import numpy as np
import pandas as pd
import pytest
from evaluate_helpers import make_candidates, perovskite, rock_salt
from pymatgen.core import Lattice, Structure

import jaxcrystal.evaluate as ev
from jaxcrystal.errors import ConfigError, StructureError
from jaxcrystal.evaluate import Criteria, evaluate, summarize
from jaxcrystal.templates import perovskite_cell

PEROV = Criteria(main="band_gap", target=3.0, coord_window=0.15)
GENERAL = Criteria(main="band_gap", target=3.0, tolerance_window=None, angle_window=None)


def criteria_flags(df, criteria):
    """The criterion flags (all flags except success and healthy) of each row, NA read as 'not applicable'."""
    names = [c for c in criteria.flag_columns if c not in ("success", "healthy") and "_above_" not in c]
    return df[names]


# ----------------------------------------------------------------------------------------------------------
# single criteria


def test_min_bond_is_the_nearest_neighbour_distance():
    catio3, _ = perovskite("Ca", "Ti", "O", length=3.905)
    assert ev.min_interatomic_distance(catio3) == pytest.approx(3.905 / 2)  # Ti-O
    assert ev.min_interatomic_distance(rock_salt(length=5.64)) == pytest.approx(5.64 / 2)  # Na-Cl


def test_min_bond_counts_an_atom_and_its_own_image():
    one_atom = Structure(Lattice.orthorhombic(0.4, 3.0, 3.0), ["Na"], [[0, 0, 0]])
    assert ev.min_interatomic_distance(one_atom) == pytest.approx(0.4)
    two_atoms = Structure(Lattice.orthorhombic(0.45, 5.0, 5.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert ev.min_interatomic_distance(two_atoms) == pytest.approx(0.45)


def test_min_bond_of_overlapping_atoms_is_zero():
    s = Structure(Lattice.cubic(4.0), ["Na", "Cl", "Cl"], [[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5]])
    assert ev.min_interatomic_distance(s) == 0.0


def brute_force_min_distance(structure, reach=4):
    cart = structure.cart_coords
    images = np.array(list(itertools.product(range(-reach, reach + 1), repeat=3))) @ structure.lattice.matrix
    best = np.inf
    for i, j in itertools.product(range(len(structure)), repeat=2):
        d = np.linalg.norm(cart[j] + images - cart[i], axis=1)
        if i == j:
            d = d[d > 1e-9]
        best = min(best, d.min())
    return best


@pytest.mark.parametrize("seed", range(4))
def test_min_bond_matches_brute_force_in_sheared_cells(seed):
    rng = np.random.default_rng(seed)
    lattice = Lattice(np.diag(rng.uniform(2.0, 4.0, 3)) + np.triu(rng.uniform(-3.0, 3.0, (3, 3)), 1))
    s = Structure(lattice, ["Na", "Cl", "K"], rng.uniform(0, 1, (3, 3)))
    assert ev.min_interatomic_distance(s) == pytest.approx(brute_force_min_distance(s), rel=1e-9)


def test_periodic_displacement_wraps_across_the_boundary():
    got = ev.periodic_displacement([0.95, 1.2, -0.1, 0.3], [0.05, 0.0, 0.0, 0.6])
    np.testing.assert_allclose(got, [0.1, 0.2, 0.1, 0.3])


# ----------------------------------------------------------------------------------------------------------
# perovskite criteria


def moved(structure, roles, site, axis, start, end):
    """(template frac, unwrapped optimized frac, structure) where atom `site` moved from `start` to `end`."""
    init = structure.frac_coords.copy()
    init[site, axis] = start
    final = init.copy()
    final[site, axis] = end
    return init, final, Structure(structure.lattice, structure.species, final % 1.0)


def test_coordinate_window_uses_the_periodic_displacement():
    base, roles = perovskite()
    cases = [(0.05, 0.95, True), (0.95, 0.05, True), (0.9, 0.1, False), (0.0, -0.14, True), (0.0, 0.16, False)]
    for start, end, expected in cases:
        init, final, s = moved(base, roles, 2, 2, start, end)
        c = make_candidates([s], "perovskite", roles=[roles], init_frac=[init], frac_unwrapped=[final])
        df = evaluate(c, PEROV)
        assert bool(df["perov_coords"].iloc[0]) is expected, (start, end)
        assert bool(df["perov_success"].iloc[0]) is expected
        assert bool(df["success"].iloc[0]) is expected
    # a larger window accepts the 0.2 move across the boundary
    init, final, s = moved(base, roles, 2, 2, 0.9, 0.1)
    c = make_candidates([s], "perovskite", roles=[roles], init_frac=[init], frac_unwrapped=[final])
    assert bool(evaluate(c, Criteria("band_gap", 3.0, coord_window=0.25))["perov_coords"].iloc[0])


def test_tilted_perovskite_fails_the_angle_window():
    roles = perovskite()[1]
    tilted = [perovskite(angles=(angle, 90.0, 90.0))[0] for angle in (100.0, 94.0, 84.0)]
    c = make_candidates(tilted, "perovskite", roles=[roles] * 3, tolerance=np.full(3, 0.9))
    df = evaluate(c, PEROV)
    assert df["perov_angles"].tolist() == [False, True, False]
    assert df["perov_success"].tolist() == [False, True, False]
    assert df["success"].tolist() == [False, True, False]
    assert df["perov_coords"].all()


def test_tolerance_window_uses_the_goldschmidt_factor():
    structures, roles = zip(*(perovskite(a) for a in ("Ca", "Sr", "Ba")), strict=True)
    c = make_candidates(list(structures), "perovskite", roles=list(roles))
    df = evaluate(c, PEROV)
    # Shannon ionic radii, A XII / B VI / X VI: CaTiO3 0.966, SrTiO3 1.002 (just outside), BaTiO3 1.062
    np.testing.assert_allclose(df["tolerance"], [0.966, 1.0016, 1.0615], atol=5e-4)
    assert df["tolerance_success"].tolist() == [True, False, False]


def test_neutrality_for_perovskites_uses_smoacs_patterns():
    structures, roles = zip(*(perovskite(a, b) for a, b in (("Ca", "Ti"), ("K", "Nb"), ("Na", "Ti"))), strict=True)
    c = make_candidates(list(structures), "perovskite", roles=list(roles), tolerance=np.full(3, 0.9))
    df_perov = evaluate(c, PEROV)
    df_general = evaluate(make_candidates(list(structures), "general"), GENERAL)
    # KNbO3 is neutral (+1 +5 -6) but fits neither (+1,+2,-1) nor (+2,+4,-2): SMOACS's perovskite override.
    assert df_perov["is_neutral"].tolist() == [True, False, False]
    assert df_general["is_neutral"].tolist() == [True, True, False]


def test_neutrality_is_checked_for_135_atom_supercells():
    cell, roles = perovskite_cell((3.9, 3.9, 3.9), supercell=3)
    species = [{0: "Ca", 1: "Ti", 2: "O"}[int(r)] for r in roles]
    neutral = Structure(cell.lattice, species, cell.frac_coords)
    species[0] = "K"  # one K+ on an A site: the charge sum is -1 whatever the choice
    charged = Structure(cell.lattice, species, cell.frac_coords)
    c = make_candidates([neutral, charged], "perovskite", roles=[roles, roles], tolerance=np.full(2, 0.9))
    df = evaluate(c, Criteria("band_gap", 3.0, coord_window=0.05))
    assert df["is_neutral"].tolist() == [True, False]
    assert df["success"].tolist() == [True, False]


# ----------------------------------------------------------------------------------------------------------
# success logic


def test_each_perovskite_criterion_alone_breaks_success():
    base, roles = perovskite()
    overlap = Structure(base.lattice, base.species, np.vstack([base.frac_coords[:4], base.frac_coords[3] + 0.02]))
    tilted, _ = perovskite(angles=(90.0, 100.0, 90.0))
    init, final, shifted = moved(base, roles, 1, 0, 0.5, 0.7)
    knbo3, _ = perovskite("K", "Nb")
    cases = {  # name -> (structure, overrides, the only failing flag)
        "ok": (base, {}, None),
        "gap": (base, {"band_gap": 3.25}, "band_gap_success"),
        "eform_strict": (base, {"formation_energy": -0.5}, "formation_energy_success"),
        "tolerance": (base, {"tolerance": 1.02}, "tolerance_success"),
        "bond": (overlap, {"init": overlap.frac_coords}, "min_bond_ok"),
        "angle": (tilted, {}, "perov_angles"),
        "coords": (shifted, {"init": init, "final": final}, "perov_coords"),
        "neutral": (knbo3, {}, "is_neutral"),
        "unhealthy": (base, {"healthy": False}, None),
    }
    structures = [s for s, _, _ in cases.values()]
    get = lambda key, default: [o.get(key, default) for _, o, _ in cases.values()]  # noqa: E731
    c = make_candidates(
        structures,
        "perovskite",
        roles=[roles] * len(cases),
        band_gap=get("band_gap", 3.15),
        formation_energy=get("formation_energy", -0.51),
        tolerance=np.array(get("tolerance", 0.9)),
        init_frac=np.stack(get("init", base.frac_coords)),
        frac_unwrapped=np.stack([o.get("final", s.frac_coords) for s, o, _ in cases.values()]),
        healthy=get("healthy", True),
        names=list(cases),
    )
    df = evaluate(c, PEROV)
    assert df.loc["ok", "success"] and not df.drop(index="ok")["success"].any()
    flags = criteria_flags(df, PEROV).drop(columns="perov_success")
    for name, (_, _, failing) in cases.items():
        failed = [column for column in flags if not flags.loc[name, column]]
        assert failed == ([failing] if failing else []), name
    assert not df.loc["unhealthy", "healthy"]


def test_general_family_success_and_not_applicable_columns():
    nacl = rock_salt()
    nacl2 = Structure(Lattice.cubic(6.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]])
    overlap = rock_salt()
    overlap.replace(4, "Cl", [0.02, 0.0, 0.0])  # a Cl next to the Na at the origin
    df = evaluate(make_candidates([nacl, nacl2, overlap], "general"), GENERAL)
    assert df["success"].tolist() == [True, False, False]
    assert df["is_neutral"].tolist() == [True, False, True]
    assert df["min_bond_ok"].tolist() == [True, True, False]
    assert df["min_bond"].iloc[2] == pytest.approx(0.02 * 5.64)
    for column in ("tolerance_success", "perov_coords", "perov_angles", "perov_success"):
        assert df[column].isna().all()
    assert df["formula"].tolist() == ["NaCl", "NaCl2", "NaCl"]
    assert df["composition"].iloc[0] == "Na4 Cl4"
    assert df["ox_states"].iloc[0] == "Na+1*4 Cl-1*4"
    assert df["lattice_abc"].iloc[0] == "5.640 5.640 5.640"
    assert df["num_atoms"].tolist() == [8, 3, 8]


def test_maximization_columns_and_success():
    criteria = Criteria(main="band_gap", target=None, tolerance_window=None, angle_window=None)
    c = make_candidates([rock_salt()] * 3, "general", band_gap=[4.0, 12.0, 5.0], names=["a", "b", "c"])
    df = evaluate(c, criteria)
    assert "band_gap_success" not in df
    assert df["band_gap_above_3"].tolist() == [True, True, True]
    assert df["band_gap_above_5"].tolist() == [False, True, False]  # strict
    assert df["band_gap_above_10"].tolist() == [False, True, False]
    assert df["band_gap_above_15"].tolist() == [False, False, False]
    assert df["success"].all()  # thresholds are reported, not required


def test_switched_off_criteria():
    nacl2 = Structure(Lattice.cubic(6.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]])
    c = make_candidates([nacl2], "general", formation_energy=[3.0])
    criteria = Criteria("band_gap", 3.0, second=None, check_neutrality=False, tolerance_window=None)
    df = evaluate(c, criteria)
    assert df["is_neutral"].isna().all()
    assert "formation_energy_success" not in df
    assert df["success"].all()


def test_flag_columns_are_the_boolean_columns():
    base, roles = perovskite()
    df = evaluate(make_candidates([base], "perovskite", roles=[roles]), PEROV)
    assert set(PEROV.flag_columns) == {c for c in df if str(df[c].dtype) == "boolean"}


def test_columns_are_the_documented_ones():
    documented = re.findall(r"^\| `([^`]+)` \|", ev.__doc__, flags=re.MULTILINE)
    base, roles = perovskite()
    df = evaluate(make_candidates([base], "perovskite", roles=[roles]), PEROV)
    expected = set()
    for name in documented:
        if "<main>_above_" in name:
            continue  # maximization only
        for prop in ("band_gap", "formation_energy") if "<p>" in name else ("",):
            expected.add(
                name.replace("<main>", "band_gap").replace("<second>", "formation_energy").replace("<p>", prop)
            )
    assert set(df.columns) == expected


def test_bad_input_is_rejected():
    base, roles = perovskite()
    c = make_candidates([base], "perovskite", roles=[roles])
    with pytest.raises(ConfigError, match="tc"):
        evaluate(c, Criteria("tc", None))
    with pytest.raises(StructureError, match="tolerance"):
        evaluate(dataclasses.replace(c, tolerance=None), PEROV)
    with pytest.raises(StructureError, match="init_frac"):
        evaluate(dataclasses.replace(c, init_frac=np.zeros((1, 4, 3))), PEROV)
    with pytest.raises(StructureError, match="unique"):
        evaluate(make_candidates([base, base], "perovskite", roles=[roles] * 2, names=["x", "x"]), PEROV)


def test_bad_criteria_are_rejected():
    with pytest.raises(ConfigError, match="angle_window"):
        Criteria("band_gap", 1.0, angle_window=(95.0, 85.0))
    with pytest.raises(ConfigError, match="margin"):
        Criteria("band_gap", 1.0, margin=-0.1)


# ----------------------------------------------------------------------------------------------------------
# uniqueness and novelty


def shifted_origin(structure, shift):
    return Structure(structure.lattice, structure.species, (structure.frac_coords + shift) % 1.0)


def test_uniqueness_and_novelty():
    catio3, roles = perovskite("Ca")
    srtio3, _ = perovskite("Sr")
    batio3, _ = perovskite("Ba")
    structures = [catio3, shifted_origin(catio3, [0.5, 0.5, 0.5]), srtio3, batio3]
    c = make_candidates(
        structures, "perovskite", roles=[roles] * 4, tolerance=np.full(4, 0.9), formation_energy=[-1, -1, -1, 0]
    )
    df = evaluate(c, PEROV)
    assert df["success"].tolist() == [True, True, True, False]
    known = [perovskite("Ca", length=4.3)[0]]  # same structure type, other lattice constant
    out = summarize(df, PEROV, templates=known, reference=[rock_salt()])
    assert out["num_candidates"] == 4 and out["num_success"] == 3
    assert out["num_unique_success"] == 2 and out["success_unique_rate"] == pytest.approx(2 / 3)
    assert out["num_novel_success"] == 1 and out["success_novel_rate"] == pytest.approx(1 / 3)
    assert out["formation_energy_success"] == pytest.approx(3 / 4)
    assert "band_gap_above_3" not in out
    assert ev.unique_groups(structures) == [[0, 1], [2], [3]]


def test_summary_without_successes_and_na_columns():
    nacl2 = Structure(Lattice.cubic(6.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.0, 0.5, 0.5]])
    df = evaluate(make_candidates([nacl2], "general"), GENERAL)
    out = summarize(df, GENERAL)
    assert out["num_success"] == 0 and out["num_unique_success"] == 0
    assert np.isnan(out["success_unique_rate"]) and np.isnan(out["success_novel_rate"])
    assert "perov_success" not in out  # applies nowhere
    with pytest.raises(ConfigError, match="structure"):
        summarize(pd.DataFrame(df.drop(columns="structure")), GENERAL)


def test_rank_puts_successes_first_then_closest_to_the_window():
    structures = [rock_salt()] * 4
    c = make_candidates(
        structures, "general", band_gap=[3.5, 3.1, 2.0, 2.9], formation_energy=[-1, -0.6, -1, 0], names=list("abcd")
    )
    df = evaluate(c, GENERAL)
    assert list(ev.rank(df, GENERAL)) == ["b", "d", "a", "c"]  # b succeeds; d fails E_f only (distance 0)
    maximize = Criteria("band_gap", None, tolerance_window=None, angle_window=None)
    assert list(ev.rank(evaluate(c, maximize), maximize)) == ["a", "b", "c", "d"]  # successes by largest gap


def test_coordinate_window_edge_in_float32_counts_as_inside():
    """The optimizer clips coordinates to template ± ε in float32; that edge must pass the ε check."""
    from jaxcrystal.evaluate import coordinates_within

    reference = np.array([[0.5, 0.0, 0.5]], dtype=np.float32)
    at_edge = np.clip(
        np.array([[0.9, -0.9, 0.66]], dtype=np.float32), reference - np.float32(0.15), reference + np.float32(0.15)
    )
    assert coordinates_within(at_edge.astype(np.float64), reference.astype(np.float64), np.array([True]), 0.15)
    beyond = at_edge + np.float32(1e-4)
    assert not coordinates_within(beyond.astype(np.float64), reference.astype(np.float64), np.array([True]), 0.15)

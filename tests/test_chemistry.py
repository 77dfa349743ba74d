"""Tests of jaxcrystal.chemistry: SMOACS table parity, neutrality, oxidation patterns, radii, tolerance."""

import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrystal import chemistry
from jaxcrystal.elements import SYMBOLS, atomic_number
from jaxcrystal.errors import ConfigError, ElementError, StructureError

TABLES = Path(__file__).resolve().parent / "fixtures" / "smoacs_tables"  # copied from SMOACS 87a7773 (MIT)


def _table(name: str) -> dict[int, np.ndarray]:
    with np.load(TABLES / f"{name}.npz") as data:
        return {int(key): data[key] for key in data.files}


MIXED = ["Mn", "Mn", "Fe", "Fe", "Co"] + ["O"] * 8  # four neutral patterns
GENERAL = _table("mask_dict_super_common")
IONIC = _table("ionic_mask_dict_super_common")
RADII = _table("ionic_radii_dict_super_common")


def test_fixture_tables_have_the_documented_keys():
    for table in (GENERAL, IONIC, RADII):
        assert tuple(sorted(table)) == chemistry.MASK_STATES
        assert all(v.shape == (98,) for v in table.values())


@pytest.mark.parametrize("state", chemistry.MASK_STATES)
def test_general_mask_equals_smoacs_table(state):
    ref = GENERAL[state]
    assert set(np.unique(ref)) <= {0.0, 1.0}
    ours = chemistry.oxidation_mask(state)
    diff = [SYMBOLS[z] for z in np.flatnonzero(ours != ref.astype(bool))]
    assert diff == [], f"state {state:+d}: elements differing from mask_dict_super_common: {diff}"


@pytest.mark.parametrize("state", chemistry.MASK_STATES)
def test_perovskite_mask_smoacs_convention_equals_smoacs_table(state):
    ours = chemistry.perovskite_mask(state, convention="smoacs")
    diff = [SYMBOLS[z] for z in np.flatnonzero(ours != IONIC[state].astype(bool))]
    assert diff == [], f"state {state:+d}: elements differing from ionic_mask_dict_super_common: {diff}"


@pytest.mark.parametrize("state", chemistry.MASK_STATES)
@pytest.mark.parametrize("site", ["A", "B", "X"])
def test_smoacs_radii_equal_smoacs_table(state, site):
    np.testing.assert_array_equal(chemistry.perovskite_radii(state, site, convention="smoacs"), RADII[state])


@pytest.mark.parametrize("state", chemistry.MASK_STATES)
def test_shannon_perovskite_mask_differs_from_smoacs_only_where_documented(state):
    smoacs = chemistry.perovskite_mask(state, convention="smoacs")
    shannon = chemistry.perovskite_mask(state, convention="shannon")
    assert not (smoacs & ~shannon).any()
    assert not (shannon & ~chemistry.oxidation_mask(state)).any()
    extra = {SYMBOLS[z] for z in np.flatnonzero(shannon & ~smoacs)}
    documented = {
        2: {"Ni"},
        3: {"Cr"},
        6: {"Cr"},
    }  # module docstring: pymatgen keeps these among low-spin radii
    assert extra == documented.get(state, set())


def test_state_sets_nest_and_match_known_chemistry():
    for sym in SYMBOLS:
        sc = set(chemistry.allowed_states(sym))
        ac = set(chemistry.allowed_states(sym, "all_common"))
        sm = set(chemistry.allowed_states(sym, "smact"))
        assert sc <= ac <= sm, sym
    assert chemistry.allowed_states("Fe") == (2, 3)
    assert chemistry.allowed_states(22) == (4,)
    assert chemistry.allowed_states("O") == (-2,)
    assert chemistry.allowed_states("He") == ()


def test_provenance_names_the_pinned_sources():
    sources = chemistry.data_provenance()
    assert (sources["pymatgen"]["name"], sources["pymatgen"]["version"]) == ("pymatgen", "2023.10.11")
    assert (sources["smact"]["name"].lower(), sources["smact"]["version"]) == ("smact", "2.5.5")
    for src in sources.values():
        assert src["license"] == "MIT"
        assert len(src["sha256"]) == 64 and int(src["sha256"], 16) >= 0


@pytest.mark.parametrize(
    "formula, neutral",
    [
        (["Sr", "Ti", "O", "O", "O"], True),
        (["Na", "Cl"], True),
        (["Fe", "Fe", "Fe", "O", "O", "O", "O"], True),  # Fe2+ Fe3+2 O4 (mixed valence)
        (["Na", "Cl", "Cl"], False),
        (["Sr", "Ti", "O", "O"], False),
        (["He", "O"], False),  # He has no allowed state
    ],
)
def test_neutrality(formula, neutral):
    assert chemistry.is_neutral(formula) is neutral
    assert chemistry.is_neutral([atomic_number(s) for s in formula]) is neutral
    assert chemistry.is_neutral(np.array([atomic_number(s) for s in formula])) is neutral
    assert (len(chemistry.neutral_assignments(formula)) > 0) is neutral


def test_perovskite_override():
    assert chemistry.is_neutral(["Sr", "Ti", "O", "O", "O"], perovskite=True)  # (-2,-2,-2,+2,+4)
    assert chemistry.is_neutral(["K", "Mg", "F", "F", "F"], perovskite=True)  # (-1,-1,-1,+1,+2)
    assert chemistry.is_neutral(["Ti", "Sr", "O", "O", "O"], perovskite=True)  # site order is not checked
    # La3+ Al3+ O3 is neutral, but not with the states of SMOACS's perovskite patterns
    assert chemistry.is_neutral(["La", "Al", "O", "O", "O"])
    assert not chemistry.is_neutral(["La", "Al", "O", "O", "O"], perovskite=True)
    assert not chemistry.is_neutral(["Na", "Cl"], perovskite=True)  # not 5 atoms per formula unit
    big = ["Sr"] * 27 + ["Ti"] * 27 + ["O"] * 81  # 3x3x3 SrTiO3
    assert chemistry.is_neutral(big, perovskite=True)
    assert not chemistry.is_neutral(["Sr"] * 27 + ["Ti"] * 27 + ["O"] * 80 + ["F"], perovskite=True)
    # the per-formula-unit rule needs every unit in the same pattern: 26 SrTiO3 + 1 KMgF3 cannot be split so
    mixed = ["Sr"] * 26 + ["K"] + ["Ti"] * 26 + ["Mg"] + ["O"] * 78 + ["F"] * 3
    assert chemistry.is_neutral(mixed)
    assert not chemistry.is_neutral(mixed, perovskite=True)


def _canonical(row, formula):
    """One sorted state multiset per element, elements by ascending Z."""
    elements = sorted(set(formula), key=atomic_number)
    return tuple(tuple(sorted(int(c) for c, s in zip(row, formula, strict=True) if s == el)) for el in elements)


def _brute_force_patterns(formula):
    """All per-atom neutral assignments (itertools.product, as SMOACS enumerates), reduced to `_canonical`."""
    options = [chemistry.allowed_states(s) for s in formula]
    return {_canonical(combo, formula) for combo in itertools.product(*options) if sum(combo) == 0}


@pytest.mark.parametrize(
    "formula",
    [
        ["Fe", "Fe", "Fe", "O", "O", "O", "O"],
        ["Mn", "O", "Mn", "O", "O"],
        ["Mn", "Fe", "Co", "O", "O", "O", "O", "O", "O"],
        MIXED,
        ["Cu", "Fe", "S", "S"],
        ["V", "Sb", "O", "O", "O", "O", "N"],
        ["Na", "Cl", "Cl"],
    ],
)
def test_neutral_patterns_match_brute_force(formula):
    patterns = chemistry.neutral_patterns(formula, max_patterns=1000)
    assert patterns.dtype == np.int64 and patterns.shape[1] == len(formula)
    assert (patterns.sum(axis=1) == 0).all()
    for row in patterns:
        for state, sym in zip(row, formula, strict=True):
            assert state in chemistry.allowed_states(sym)
        for el in set(formula):  # same-element atoms take their states in ascending atom order
            states = [c for c, s in zip(row, formula, strict=True) if s == el]
            assert states == sorted(states)
    canonical = [_canonical(row, formula) for row in patterns]
    assert len(set(canonical)) == len(canonical)  # no duplicates up to permutations within an element
    assert set(canonical) == _brute_force_patterns(formula)
    assert canonical == sorted(canonical)  # deterministic order: lexicographic, elements by ascending Z


def test_neutral_patterns_truncate_to_the_first_k():
    formula = MIXED
    everything = chemistry.neutral_patterns(formula, max_patterns=1000)
    assert len(everything) == 4
    np.testing.assert_array_equal(chemistry.neutral_patterns(formula, max_patterns=3), everything[:3])
    assert chemistry.neutral_patterns(["Na", "Cl", "Cl"]).shape == (0, 3)
    with pytest.raises(ConfigError):
        chemistry.neutral_patterns(formula, max_patterns=0)


def test_large_cell_is_enumerated_per_element_multiset():
    """135 atoms with two mixed-valence elements: count checked against a closed-form count."""
    formula = ["Fe"] * 27 + ["Mn"] * 27 + ["O"] * 81
    # Fe: a at +2, 27-a at +3; Mn: b at +2, c at +4, 27-b-c at +7; neutrality <=> a + 5b + 3c = 108
    expected = sum(1 for a in range(28) for b in range(28) for c in range(28 - b) if a + 5 * b + 3 * c == 108)
    assignments = chemistry.neutral_assignments(formula)
    assert len(assignments) == expected
    assert len({tuple(sorted(a.items())) for a in assignments}) == expected
    for a in assignments:
        assert sum(a["Fe"]) + sum(a["Mn"]) + sum(a["O"]) == 0 and len(a["Fe"]) == len(a["Mn"]) == 27
    patterns = chemistry.neutral_patterns(formula, max_patterns=10)
    assert patterns.shape == (10, 135) and (patterns.sum(axis=1) == 0).all()
    assert chemistry.is_neutral(formula)
    assert not chemistry.is_neutral(["Fe"] * 27 + ["O"] * 81)  # Fe states sum to at most 81 < 162


def test_site_element_masks_general():
    patterns = chemistry.neutral_patterns(MIXED, max_patterns=4)
    mask, used = chemistry.site_element_masks(patterns, max_patterns=10)
    assert mask.shape == (13, 98, 10) and mask.dtype == bool
    np.testing.assert_array_equal(used, np.arange(10) < 4)
    for k in range(4):
        for i in range(13):
            np.testing.assert_array_equal(mask[i, :, k], GENERAL[int(patterns[k, i])].astype(bool))
    assert not mask[:, :, 4:].any()


def test_site_element_masks_and_radii_perovskite():
    sites = ["A", "B", "X", "X", "X"]
    patterns = chemistry.perovskite_patterns(sites)
    np.testing.assert_array_equal(patterns, [[1, 2, -1, -1, -1], [2, 4, -2, -2, -2]])
    mask, used = chemistry.site_element_masks(patterns, table="perovskite", convention="smoacs")
    assert mask.shape == (5, 98, 2) and used.all()
    radii = chemistry.site_radii(patterns, sites, max_patterns=3, convention="smoacs")
    assert radii.shape == (5, 98, 3) and not radii[:, :, 2].any()
    for k in range(2):
        for i in range(5):
            np.testing.assert_array_equal(mask[i, :, k], IONIC[int(patterns[k, i])].astype(bool))
            np.testing.assert_array_equal(radii[i, :, k], RADII[int(patterns[k, i])])
    shannon = chemistry.site_radii(patterns, sites)
    np.testing.assert_array_equal(shannon > 0, chemistry.site_element_masks(patterns, table="perovskite")[0])
    assert shannon[0, atomic_number("Sr") - 1, 1] == 1.44  # A site: CN XII ionic radius


def test_site_element_masks_reject_bad_patterns():
    with pytest.raises(StructureError, match=r"pattern 0, atom 0.*-8"):
        chemistry.site_element_masks([[-8, 8]])
    with pytest.raises(ConfigError):
        chemistry.site_element_masks(np.zeros((3, 2), dtype=int) + [[1, -1]], max_patterns=2)
    with pytest.raises(StructureError):
        chemistry.site_element_masks(np.zeros((0, 2), dtype=int))
    with pytest.raises(StructureError):
        chemistry.site_radii([[1, -1]], ["A"])


# Shannon, Acta Cryst. A32 (1976) 751, Table 1, ionic radii in Å: Sr2+ XII 1.44, Ba2+ XII 1.61,
# Ti4+ VI 0.605, O2- VI 1.40; crystal radii (SMOACS convention, CN VI for every site): Sr2+ 1.32, Ba2+ 1.49,
# Ti4+ 0.745, O2- 1.26.
SHANNON_IONIC = {("Sr", 2, "XII"): 1.44, ("Ba", 2, "XII"): 1.61, ("Ti", 4, "VI"): 0.605, ("O", -2, "VI"): 1.40}
SHANNON_CRYSTAL_VI = {("Sr", 2): 1.32, ("Ba", 2): 1.49, ("Ti", 4): 0.745, ("O", -2): 1.26}


def test_shannon_radii_lookup():
    for (sym, state, cn), radius in SHANNON_IONIC.items():
        assert chemistry.shannon_radius(sym, state, cn) == radius
    for (sym, state), radius in SHANNON_CRYSTAL_VI.items():
        assert chemistry.shannon_radius(sym, state, "VI", kind="crystal") == radius
    assert chemistry.shannon_radius("Fe", 2, "VI") == 0.78  # high spin by default
    assert chemistry.shannon_radius("Fe", 2, "VI", spin="Low Spin") == 0.61
    with pytest.raises(ElementError, match="Ti\\+4 at CN XII"):
        chemistry.shannon_radius("Ti", 4, "XII")
    with pytest.raises(ElementError):
        chemistry.shannon_radius("Xx", 1, "VI")


def test_shannon_crystal_radii_are_ionic_plus_minus_0_14():
    """Extraction sanity: crystal = ionic ± 0.14 Å (cations / anions) in Shannon's table, bar one entry."""
    for sym in SYMBOLS:
        for state in range(-4, 9):
            for cn in chemistry._ROMAN:
                try:
                    ionic = chemistry.shannon_radius(sym, state, cn)
                except ElementError:
                    continue
                crystal = chemistry.shannon_radius(sym, state, cn, kind="crystal")
                if (sym, state, cn) != ("N", 5, "III"):  # Shannon lists 0.044 / -0.104
                    assert crystal - ionic == pytest.approx(math.copysign(0.14, state), abs=1e-9), (
                        sym,
                        state,
                        cn,
                    )


def test_site_radius_fallback_to_nearest_coordination():
    assert chemistry.site_radius("Li", 1, "A") == chemistry.shannon_radius("Li", 1, "VIII")  # no CN XII for Li+
    assert chemistry.site_radius("N", -3, "X") == chemistry.shannon_radius("N", -3, "IV")  # only CN IV tabulated
    with pytest.raises(ElementError):
        chemistry.site_radius("Sn", 2, "A")  # no Shannon radius for Sn2+
    with pytest.raises(ConfigError):
        chemistry.site_radius("Sr", 2, "A", convention="crystal")


def _goldschmidt(ra, rb, rx):
    return (ra + rx) / (math.sqrt(2.0) * (rb + rx))


def test_tolerance_factor_srtio3_batio3():
    r = SHANNON_IONIC
    t_sto = _goldschmidt(r["Sr", 2, "XII"], r["Ti", 4, "VI"], r["O", -2, "VI"])
    t_bto = _goldschmidt(r["Ba", 2, "XII"], r["Ti", 4, "VI"], r["O", -2, "VI"])
    assert chemistry.perovskite_tolerance("Sr", "Ti", "O") == pytest.approx(t_sto, rel=1e-12)
    assert chemistry.perovskite_tolerance("Ba", "Ti", "O") == pytest.approx(t_bto, rel=1e-12)
    assert round(t_sto, 2) == 1.00 and round(t_bto, 2) == 1.06  # the textbook values

    c = SHANNON_CRYSTAL_VI
    s_sto = _goldschmidt(c["Sr", 2], c["Ti", 4], c["O", -2])
    s_bto = _goldschmidt(c["Ba", 2], c["Ti", 4], c["O", -2])
    assert chemistry.perovskite_tolerance("Sr", "Ti", "O", convention="smoacs") == pytest.approx(s_sto, rel=1e-12)
    assert chemistry.perovskite_tolerance("Ba", "Ti", "O", convention="smoacs") == pytest.approx(s_bto, rel=1e-12)
    assert round(s_sto, 2) == 0.91 and round(s_bto, 2) == 0.97  # reference/smoacs.md §4.4


def test_tolerance_factor_is_differentiable_and_broadcasts():
    ra, rb, rx = 1.44, 0.605, 1.40
    grads = jax.grad(lambda r: chemistry.tolerance_factor(r[0], r[1], r[2]))(jnp.array([ra, rb, rx]))
    s = math.sqrt(2.0) * (rb + rx)
    expected = [1 / s, -(ra + rx) / (s * (rb + rx)), (rb - ra) / (s * (rb + rx))]
    np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-5)
    t = jax.jit(chemistry.tolerance_factor)(jnp.ones((4, 1)), jnp.full((1, 3), 0.6), 1.4)
    assert t.shape == (4, 3)
    np.testing.assert_allclose(np.asarray(t), _goldschmidt(1.0, 0.6, 1.4), rtol=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ElementError, match="Xx"):
        chemistry.is_neutral(["Xx", "O"])
    with pytest.raises(ElementError):
        chemistry.is_neutral([0, 8])
    with pytest.raises(StructureError):
        chemistry.is_neutral([])
    with pytest.raises(StructureError):
        chemistry.neutral_patterns("NaCl")
    with pytest.raises(ConfigError, match="state_set"):
        chemistry.allowed_states("Fe", "loose")
    with pytest.raises(ConfigError):
        chemistry.perovskite_patterns(["A", "Q"])


def test_assignments_are_per_element_multisets():
    assignments = chemistry.neutral_assignments(["Fe", "O", "Fe", "O", "Fe", "O", "O"])
    assert assignments == [{"O": (-2, -2, -2, -2), "Fe": (2, 3, 3)}]
    assert list(assignments[0]) == ["O", "Fe"]  # elements by ascending Z
    formula = MIXED
    everything = chemistry.neutral_assignments(formula)
    assert chemistry.neutral_assignments(formula, limit=2) == everything[:2]
    rows = chemistry.neutral_patterns(formula, max_patterns=1000)
    assert [tuple(a.values()) for a in everything] == [_canonical(r, formula) for r in rows]

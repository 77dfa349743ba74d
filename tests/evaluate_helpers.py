"""Builders of small real `Candidates` batches for the evaluation and result-writer tests."""

import numpy as np
from pymatgen.core import Lattice, Structure

from jaxcrystal import chemistry
from jaxcrystal.evaluate import Candidates
from jaxcrystal.templates import SITE_NONE, perovskite_cell

TEST_STATES = {"Na": 1, "Cl": -1, "Ti": 4, "O": -2}  # oxidation states recorded for the tests; others +2


def perovskite(a: str = "Ca", b: str = "Ti", x: str = "O", length: float = 3.9, angles=(90.0, 90.0, 90.0)):
    """Cubic-setting ABX3 (A at the corner, B at the body centre, X on the face centres) and its site roles."""
    cell, roles = perovskite_cell((length, length, length))
    lattice = Lattice.from_parameters(length, length, length, *angles)
    species = [{0: a, 1: b, 2: x}[int(r)] for r in roles]
    return Structure(lattice, species, cell.frac_coords), roles


def rock_salt(cation: str = "Na", anion: str = "Cl", length: float = 5.64) -> Structure:
    """Conventional 8-atom rock-salt cell."""
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(length), [cation, anion], [[0, 0, 0], [0.5, 0.5, 0.5]])


def make_candidates(
    structures,
    family: str,
    *,
    roles=None,
    band_gap=None,
    formation_energy=None,
    tolerance=None,
    init_frac=None,
    frac_unwrapped=None,
    healthy=None,
    names=None,
) -> Candidates:
    """A `Candidates` batch from structures; defaults make every property criterion pass (gap 3.0, E_f −1.0)."""
    b = len(structures)
    n = max(len(s) for s in structures)
    mask = np.zeros((b, n), dtype=bool)
    frac = np.zeros((b, n, 3))
    site_roles = np.full((b, n), SITE_NONE, dtype=np.int64)
    ox = np.zeros((b, n), dtype=np.int64)
    for i, s in enumerate(structures):
        mask[i, : len(s)] = True
        frac[i, : len(s)] = s.frac_coords
        if roles is not None:
            site_roles[i, : len(s)] = roles[i]
        ox[i, : len(s)] = [TEST_STATES.get(site.specie.symbol, 2) for site in s]
    if tolerance is None and family == "perovskite":
        tolerance = np.array([perovskite_tolerance(s) for s in structures])
    band_gap = np.full(b, 3.0) if band_gap is None else np.asarray(band_gap, dtype=float)
    formation_energy = np.full(b, -1.0) if formation_energy is None else np.asarray(formation_energy, dtype=float)
    names = names or [f"batch000_cand{i:03d}__{s.composition.reduced_formula}" for i, s in enumerate(structures)]
    return Candidates(
        names=list(names),
        template_names=[f"template{i}" for i in range(b)],
        structures=list(structures),
        frac_unwrapped=frac if frac_unwrapped is None else np.asarray(frac_unwrapped, dtype=float),
        init_frac=frac.copy() if init_frac is None else np.asarray(init_frac, dtype=float),
        mask=mask,
        site_roles=site_roles,
        oxidation_states=ox,
        predictions={"band_gap": band_gap, "formation_energy": formation_energy},
        soft_predictions={"band_gap": band_gap + 0.01, "formation_energy": formation_energy + 0.01},
        tolerance=tolerance,
        loss=np.linspace(0.0, 1.0, b),
        healthy=np.ones(b, dtype=bool) if healthy is None else np.asarray(healthy, dtype=bool),
        family=family,
    )


def perovskite_tolerance(structure: Structure) -> float:
    """Goldschmidt t of an A B X3 cell with states (+2, +4, −2), Shannon ionic radii."""
    a, b, x = (structure[i].specie.symbol for i in range(3))
    return chemistry.perovskite_tolerance(a, b, x)

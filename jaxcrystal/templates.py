"""Starting structures for the optimizer: perovskite cells, user files and the shipped Materials Project set.

A template contributes geometry (lattice, fractional coordinates), an atom count and, through
`jaxcrystal.chemistry`, the charge-neutral oxidation patterns its sites may take. Its own elements are kept for
reference (novelty checks, output names) but the optimizer starts every site from a uniform distribution.

Perovskite ABX3 uses the textbook cubic setting:

| site | fractional position                       | coordination          | SMOACS patterns p1 / p2 |
|------|-------------------------------------------|-----------------------|-------------------------|
| A    | (0, 0, 0) cube corner                     | 12 X at a/√2          | +1 / +2                 |
| B    | (½, ½, ½) body centre                     | 6 X at a/2 (octahedron) | +2 / +4               |
| X    | (½, ½, 0), (½, 0, ½), (0, ½, ½) face centres | 2 B at a/2          | −1 / −2                 |

SMOACS's `create_dataset.py` puts the X atoms at the edge midpoints instead, which makes its "A" site octahedral
and its "B" site 12-fold: A and B are swapped relative to the geometry (reference/smoacs.md §3.2, §10 item 5).
"""

import dataclasses
from pathlib import Path

import numpy as np
from pymatgen.core import Lattice, Structure

from jaxcrystal.crystal import CrystalBatch, read_structures
from jaxcrystal.errors import ConfigError, StructureError

SITE_A, SITE_B, SITE_X, SITE_NONE = 0, 1, 2, -1

# Placeholder elements that only label the sites of a geometric template (SrTiO3).
_PEROVSKITE_LABELS = {SITE_A: "Sr", SITE_B: "Ti", SITE_X: "O"}
_PEROVSKITE_UNIT_SITES = (
    (SITE_A, (0.0, 0.0, 0.0)),
    (SITE_B, (0.5, 0.5, 0.5)),
    (SITE_X, (0.5, 0.5, 0.0)),
    (SITE_X, (0.5, 0.0, 0.5)),
    (SITE_X, (0.0, 0.5, 0.5)),
)
# SMOACS's random cubic cells: a, b, c ~ U[2, 10] Å per unit cell (times n for an n x n x n supercell).
UNIT_LENGTH_RANGE = (2.0, 10.0)


@dataclasses.dataclass(frozen=True)
class Templates:
    """A set of templates of one family.

    Attributes:
      names: [B] template names (file names, MP ids or generated names).
      structures: [B] pymatgen `Structure`s (with the template's own or placeholder elements).
      site_roles: [B, N] int, SITE_A / SITE_B / SITE_X for perovskites, SITE_NONE otherwise (and for padding).
      family: "perovskite" or "general".
      supercell: n for an n x n x n perovskite supercell (1 otherwise).
    """

    names: tuple[str, ...]
    structures: tuple[Structure, ...]
    site_roles: np.ndarray
    family: str
    supercell: int = 1

    def __len__(self) -> int:
        return len(self.names)

    def batch(self, pad_to: int | None = None) -> CrystalBatch:
        """The templates as a `CrystalBatch` (their own elements one-hot)."""
        return CrystalBatch.from_structures(list(self.structures), pad_to=pad_to)

    def take(self, indices) -> "Templates":
        """The templates at `indices` (repeats allowed), in that order."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        return Templates(
            tuple(self.names[i] for i in indices),
            tuple(self.structures[i] for i in indices),
            self.site_roles[indices],
            self.family,
            self.supercell,
        )


def perovskite_cell(lengths=(4.0, 4.0, 4.0), supercell: int = 1) -> tuple[Structure, np.ndarray]:
    """Cubic-setting ABX3 cell (orthorhombic if the lengths differ), optionally an n x n x n supercell.

    Args:
      lengths: (a, b, c) of the *unit* cell, Å.
      supercell: n; the result has 5 n³ atoms, ordered all A, then all B, then all X.

    Returns:
      (structure with Sr/Ti/O placeholders, site roles [5 n³]).
    """
    n = int(supercell)
    if n < 1:
        raise ConfigError(f"supercell must be >= 1, got {supercell}")
    shifts = np.array([(i, j, k) for i in range(n) for j in range(n) for k in range(n)], dtype=float)
    roles, coords = [], []
    for role in (SITE_A, SITE_B, SITE_X):
        for site_role, position in _PEROVSKITE_UNIT_SITES:
            if site_role == role:
                coords.extend((np.asarray(position) + shifts) / n)
                roles.extend([role] * len(shifts))
    lattice = Lattice.orthorhombic(*(n * float(x) for x in lengths))
    species = [_PEROVSKITE_LABELS[r] for r in roles]
    return Structure(lattice, species, np.asarray(coords)), np.asarray(roles, dtype=np.int64)


def random_perovskites(num: int, seed: int, supercell: int = 1) -> Templates:
    """`num` perovskite templates with a, b, c drawn independently from U[2, 10] Å (times n), seeded.

    SMOACS samples its 1x1x1 and 3x3x3 sets the same way (unseeded); angles stay 90°.
    """
    rng = np.random.default_rng(seed)
    low, high = UNIT_LENGTH_RANGE
    structures, roles = [], []
    for _ in range(int(num)):
        structure, site_roles = perovskite_cell(rng.uniform(low, high, size=3), supercell)
        structures.append(structure)
        roles.append(site_roles)
    names = tuple(f"perovskite{supercell}x{supercell}x{supercell}_{i:04d}" for i in range(int(num)))
    return Templates(names, tuple(structures), np.stack(roles), "perovskite", supercell)


def from_structures(named_structures, family: str = "general") -> Templates:
    """Templates from (name, Structure) pairs; `family="perovskite"` needs A/B/X roles and is not inferred."""
    if family != "general":
        raise ConfigError("user structures are general templates; use random_perovskites for perovskites")
    named_structures = list(named_structures)
    if not named_structures:
        raise StructureError("no template structures given")
    n = max(len(s) for _, s in named_structures)
    roles = np.full((len(named_structures), n), SITE_NONE, dtype=np.int64)
    return Templates(
        tuple(name for name, _ in named_structures),
        tuple(s for _, s in named_structures),
        roles,
        "general",
    )


def from_folder(folder: str | Path) -> Templates:
    """General templates from every POSCAR/CIF file of a folder, sorted by file name."""
    return from_structures(read_structures(folder))


def materials_project_set() -> Templates:
    """The shipped set of small charge-neutral Materials Project structures (`jaxcrystal/data/README.md`)."""
    path = Path(__file__).parent / "data" / "mp_templates.json"
    if not path.is_file():
        raise StructureError(f"{path}: the shipped template set is missing from this installation")
    import json

    records = json.loads(path.read_text())["structures"]
    return from_structures((r["material_id"], Structure.from_dict(r["structure"])) for r in records)

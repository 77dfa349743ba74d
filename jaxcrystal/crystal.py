"""The one crystal representation of jaxcrystal: a padded batch of (lattice, frac, species, mask).

| field     | shape         | meaning                                                            |
|-----------|---------------|--------------------------------------------------------------------|
| `lattice` | `[B, 3, 3]`   | lattice vectors as rows, Å (pymatgen convention)                   |
| `frac`    | `[B, N, 3]`   | fractional coordinates                                             |
| `species` | `[B, N, 98]`  | probability over Z = 1..98 (column Z-1); one-hot for real crystals |
| `mask`    | `[B, N]` bool | True for real atoms, False for padding                             |

`CrystalBatch` is a `NamedTuple`, hence a JAX pytree: it passes through `jit`, `vmap` and `grad` as is, and
unpacks as `lattice, frac, species, mask = batch`. Host constructors return float64 numpy arrays; JAX casts
them to its default dtype when they enter a jitted function.

Example:
    >>> from pymatgen.core import Lattice, Structure
    >>> nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> batch = CrystalBatch.from_structures([nacl], pad_to=4)
    >>> batch.frac.shape, batch.mask.tolist()
    ((1, 4, 3), [[True, True, False, False]])
    >>> batch.to_structures()[0].formula
    'Na1 Cl1'
"""

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from pymatgen.core import Lattice, Structure

from jaxcrystal.elements import NUM_ELEMENTS, SYMBOLS, atomic_number
from jaxcrystal.errors import StructureError
from jaxcrystal.geometry import cell_heights, nearest_neighbors_np

MIN_VOLUME = 1e-3  # Å^3; a cell smaller than this is degenerate
MIN_SEPARATION = 0.1  # Å; two atoms (or an atom and its own image) closer than this are duplicates


class CrystalBatch(NamedTuple):
    """A padded batch of crystals (see the module docstring for shapes and units)."""

    lattice: np.ndarray  # [B, 3, 3] rows, Å
    frac: np.ndarray  # [B, N, 3] fractional
    species: np.ndarray  # [B, N, 98] probabilities over Z = 1..98
    mask: np.ndarray  # [B, N] bool

    @property
    def num_crystals(self) -> int:
        return int(self.lattice.shape[0])

    @property
    def num_sites(self) -> int:
        """N, the padded number of atom slots per crystal."""
        return int(self.frac.shape[1])

    @classmethod
    def from_structures(cls, structures, pad_to: int | None = None) -> "CrystalBatch":
        """Builds a batch from pymatgen `Structure`s or ASE `Atoms` (mixed lists are fine).

        Disordered sites become soft species with the site occupancies as probabilities (normalized). Raises
        `StructureError` for a malformed crystal (see `validate`) and for atoms closer than 0.1 Å (periodic images
        included: duplicated or overlapping sites), naming the crystal, the atoms and their distance.

        Args:
          structures: a sequence of `Structure` / `Atoms`, or a single one.
          pad_to: number of atom slots N; default the largest atom count. Raises if a crystal has more atoms.
        """
        if isinstance(structures, Structure) or _is_ase_atoms(structures):
            structures = [structures]
        structures = [_as_structure(s) for s in structures]
        if not structures:
            raise StructureError("from_structures needs at least one structure")
        counts = [len(s) for s in structures]
        n = max(counts) if pad_to is None else int(pad_to)
        if max(counts) > n:
            raise StructureError(f"pad_to={n} is smaller than the largest crystal ({max(counts)} atoms)")
        b = len(structures)
        lattice = np.zeros((b, 3, 3))
        frac = np.zeros((b, n, 3))
        species = np.zeros((b, n, NUM_ELEMENTS))
        mask = np.zeros((b, n), dtype=bool)
        for i, s in enumerate(structures):
            lattice[i] = s.lattice.matrix
            frac[i, : len(s)] = s.frac_coords
            species[i, : len(s)] = _species_of(s)
            mask[i, : len(s)] = True
        batch = cls(lattice, frac, species, mask)
        validate(batch)
        for i, s in enumerate(structures):
            check_separation(lattice[i], frac[i, : len(s)], where=f"crystal {i}")
        return batch

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], pad_to: int | None = None) -> "CrystalBatch":
        """Reads POSCAR / CIF files (see `read_structure`) into one batch."""
        return cls.from_structures([read_structure(p) for p in paths], pad_to=pad_to)

    def to_structures(self) -> list[Structure]:
        """pymatgen `Structure`s: species by argmax, padding dropped."""
        lattice, frac, species, mask = (np.asarray(x) for x in self)
        elements = np.argmax(species, axis=-1)
        return [
            Structure(
                Lattice(lattice[i]),
                [SYMBOLS[z] for z in elements[i][mask[i]]],
                frac[i][mask[i]],
            )
            for i in range(lattice.shape[0])
        ]

    def to_ase(self) -> list:
        """ASE `Atoms` (species by argmax, padding dropped); needs the optional `ase` package."""
        from pymatgen.io.ase import AseAtomsAdaptor

        return [AseAtomsAdaptor.get_atoms(s) for s in self.to_structures()]

    def pad(self, num_sites: int) -> "CrystalBatch":
        """The same crystals with `num_sites` atom slots (padding slots are zero and masked out)."""
        extra = int(num_sites) - self.num_sites
        if extra < 0:
            raise StructureError(f"cannot pad {self.num_sites} atom slots down to {num_sites}")
        lattice, frac, species, mask = (np.asarray(x) for x in self)
        return CrystalBatch(
            lattice,
            np.pad(frac, ((0, 0), (0, extra), (0, 0))),
            np.pad(species, ((0, 0), (0, extra), (0, 0))),
            np.pad(mask, ((0, 0), (0, extra))),
        )

    def __getitem__(self, index):
        """Integer -> a field (NamedTuple behaviour); slice or index array -> a sub-batch of crystals."""
        if isinstance(index, int):
            return tuple.__getitem__(self, index)
        return CrystalBatch(*(np.asarray(x)[index] for x in self))


def concatenate(batches: Sequence[CrystalBatch]) -> CrystalBatch:
    """Stacks batches along B, padding all to the largest N."""
    n = max(b.num_sites for b in batches)
    padded = [b.pad(n) for b in batches]
    return CrystalBatch(*(np.concatenate([np.asarray(p[k]) for p in padded]) for k in range(4)))


def check_shapes(lattice, frac, species, mask, num_species: int = NUM_ELEMENTS) -> None:
    """Raises `StructureError` unless the shapes are [B, 3, 3], [B, N, 3], [B, N, num_species], [B, N]."""
    if lattice.ndim != 3 or lattice.shape[1:] != (3, 3):
        raise StructureError(f"lattice must have shape [B, 3, 3], got {lattice.shape}")
    b = lattice.shape[0]
    if frac.ndim != 3 or frac.shape[0] != b or frac.shape[2] != 3:
        raise StructureError(f"frac must have shape [B={b}, N, 3], got {frac.shape}")
    n = frac.shape[1]
    if species.shape != (b, n, num_species):
        raise StructureError(f"species must have shape [{b}, {n}, {num_species}], got {species.shape}")
    if mask.shape != (b, n):
        raise StructureError(f"mask must have shape [{b}, {n}], got {mask.shape}")


def validate(batch: CrystalBatch) -> None:
    """Raises `StructureError` naming the problem if a (host) batch is malformed.

    Checks: shapes agree; lattices finite with volume > 1e-3 Å^3 (a left-handed cell is accepted);
    coordinates finite; species non-negative, finite and summing to 1 on real atoms; padding slots finite (their
    values are ignored, but NaN would leak through masked arithmetic); every crystal has an atom.
    """
    lattice, frac, species, mask = (np.asarray(x) for x in batch)
    check_shapes(lattice, frac, species, mask)
    b = lattice.shape[0]
    for i in range(b):
        if not np.all(np.isfinite(lattice[i])):
            raise StructureError(f"crystal {i}: lattice contains NaN or inf")
        volume = abs(np.linalg.det(lattice[i]))
        if volume < MIN_VOLUME:
            raise StructureError(f"crystal {i}: lattice volume {volume:.3g} Å^3 is zero or degenerate")
        real = mask[i].astype(bool)
        if not real.any():
            raise StructureError(f"crystal {i} has no atoms (mask is all False)")
        if not np.all(np.isfinite(frac[i][real])):
            raise StructureError(f"crystal {i}: fractional coordinates contain NaN or inf")
        p = species[i][real]
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise StructureError(f"crystal {i}: species must be finite, non-negative probabilities")
        finite = np.isfinite(frac[i]).all(-1) & np.isfinite(species[i]).all(-1)
        if not finite.all():  # real atoms were checked above: a padding slot
            slot = int(np.flatnonzero(~finite)[0])
            raise StructureError(f"crystal {i}: padding slot {slot} holds NaN or inf; padding must be finite (zeros)")
        sums = p.sum(-1)
        if not np.allclose(sums, 1.0, atol=1e-5):
            worst = int(np.argmax(np.abs(sums - 1.0)))
            raise StructureError(f"crystal {i}, atom {worst}: species probabilities sum to {sums[worst]:.6g}, not 1")


def check_separation(lattice, frac, min_distance: float = MIN_SEPARATION, where: str = "crystal") -> None:
    """Raises `StructureError` naming the closest pair if two atoms (or an atom and its own periodic image) are
    closer than `min_distance` Å.

    Args:
      lattice: [3, 3] rows, Å (finite, non-degenerate).
      frac: [n, 3] fractional coordinates of the real atoms.
    """
    height = float(np.min(cell_heights(np.asarray(lattice, dtype=np.float64))))
    if height < min_distance:  # lattice planes closer than the threshold: no physical cell, and a huge image box
        raise StructureError(f"{where}: the cell is flat (a height of {height:.3g} Å between lattice planes)")
    nearest = nearest_neighbors_np(lattice, frac, cutoff=min_distance, capacity=1)
    close = np.flatnonzero(nearest.valid[:, 0])
    if close.size:
        i = int(close[np.argmin(nearest.distance[close, 0])])
        j = int(nearest.index[i, 0])
        other = "its own periodic image" if i == j else f"atom {j}"
        raise StructureError(
            f"{where}: atom {i} and {other} are {nearest.distance[i, 0]:.3g} Å apart (closer than {min_distance} Å: "
            "duplicated or overlapping atoms)"
        )


# ----------------------------------------------------------------------------------------------------------
# Lattice parameters <-> matrix (differentiable)


def lattice_from_parameters(lengths, angles_deg):
    """Lattice rows from (a, b, c) in Å and (alpha, beta, gamma) in degrees, standard setting.

    a along x, b in the xy-plane:
      a1 = (a, 0, 0); a2 = (b cos γ, b sin γ, 0);
      a3 = (c cos β, c (cos α − cos β cos γ)/sin γ, c sqrt(1 − cos²β − ((cos α − cos β cos γ)/sin γ)²)).
    Impossible angle triples give NaN in the last row (the square root of a negative number).

    Args:
      lengths: [..., 3] Å.
      angles_deg: [..., 3] degrees (alpha = angle(b, c), beta = angle(a, c), gamma = angle(a, b)).

    Returns:
      [..., 3, 3] lattice vectors as rows, Å.
    """
    lengths = jnp.asarray(lengths)
    angles = jnp.deg2rad(jnp.asarray(angles_deg))
    a, b, c = lengths[..., 0], lengths[..., 1], lengths[..., 2]
    cos_a, cos_b, cos_g = jnp.cos(angles[..., 0]), jnp.cos(angles[..., 1]), jnp.cos(angles[..., 2])
    sin_g = jnp.sin(angles[..., 2])
    cy = (cos_a - cos_b * cos_g) / sin_g
    cz = jnp.sqrt(1.0 - cos_b**2 - cy**2)
    zero = jnp.zeros_like(a)
    row1 = jnp.stack([a, zero, zero], axis=-1)
    row2 = jnp.stack([b * cos_g, b * sin_g, zero], axis=-1)
    row3 = jnp.stack([c * cos_b, c * cy, c * cz], axis=-1)
    return jnp.stack([row1, row2, row3], axis=-2)


def lattice_to_parameters(lattice):
    """(a, b, c) in Å and (alpha, beta, gamma) in degrees of lattice rows [..., 3, 3]; differentiable."""
    lattice = jnp.asarray(lattice)
    lengths = jnp.linalg.norm(lattice, axis=-1)

    def angle(i, j):
        cos = jnp.sum(lattice[..., i, :] * lattice[..., j, :], axis=-1) / (lengths[..., i] * lengths[..., j])
        return jnp.rad2deg(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))

    angles = jnp.stack([angle(1, 2), angle(0, 2), angle(0, 1)], axis=-1)
    return lengths, angles


# ----------------------------------------------------------------------------------------------------------
# Files


def read_structure(path: str | Path) -> Structure:
    """Reads one POSCAR/CONTCAR/.vasp or CIF file; raises `StructureError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise StructureError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".cif":
            from pymatgen.io.cif import CifParser

            structures = CifParser(str(path)).parse_structures(primitive=False)
            if not structures:
                raise ValueError("no structure in the CIF")
            structure = structures[0]
        else:
            from pymatgen.io.vasp import Poscar

            structure = Poscar.from_str(path.read_text(), read_velocities=False).structure
    except StructureError:
        raise
    except Exception as err:  # pymatgen raises many types for malformed files
        hint = " (the file ends early: truncated?)" if isinstance(err, IndexError) else ""
        raise StructureError(f"{path}: cannot parse as {_kind(path)}: {err}{hint}") from None
    try:
        CrystalBatch.from_structures([structure])
    except StructureError as err:
        raise type(err)(f"{path}: {err}") from None
    return structure


def read_structures(folder: str | Path) -> list[tuple[str, Structure]]:
    """All POSCAR/CIF files of a folder, sorted by file name, as (name, Structure) pairs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StructureError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_structure_file(p))
    if not files:
        raise StructureError(f"{folder}: no POSCAR (.vasp, POSCAR*, CONTCAR*) or .cif files")
    return [(p.name, read_structure(p)) for p in files]


def write_poscar(structure: Structure, path: str | Path, comment: str | None = None) -> None:
    """Writes a POSCAR (direct coordinates)."""
    from pymatgen.io.vasp import Poscar

    Path(path).write_text(Poscar(structure, comment=comment).get_str(significant_figures=10))


def write_cif(structure: Structure, path: str | Path) -> None:
    """Writes a P1 CIF."""
    from pymatgen.io.cif import CifWriter

    CifWriter(structure).write_file(str(path))


# ----------------------------------------------------------------------------------------------------------
# helpers


def _is_structure_file(path: Path) -> bool:
    name = path.name.upper()
    return path.suffix.lower() in (".vasp", ".cif", ".poscar") or name.startswith(("POSCAR", "CONTCAR"))


def _kind(path: Path) -> str:
    return "CIF" if path.suffix.lower() == ".cif" else "POSCAR"


def _is_ase_atoms(obj) -> bool:
    if not type(obj).__module__.startswith(("ase", "pymatgen.io.ase")):
        return False  # avoids importing ASE (optional) for other objects
    from ase import Atoms

    return isinstance(obj, Atoms)


def _as_structure(obj) -> Structure:
    if isinstance(obj, Structure):
        return obj
    if _is_ase_atoms(obj):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_structure(obj)
    raise StructureError(f"expected a pymatgen Structure or ASE Atoms, got {type(obj).__name__}")


def _species_of(structure: Structure) -> np.ndarray:
    """[n, 98] species probabilities of a (possibly disordered) structure."""
    out = np.zeros((len(structure), NUM_ELEMENTS))
    for i, site in enumerate(structure):
        total = 0.0
        for specie, occupancy in site.species.items():
            element = getattr(specie, "element", specie)
            z = atomic_number(str(getattr(element, "symbol", element)))
            out[i, z - 1] += occupancy
            total += occupancy
        if total <= 0:
            raise StructureError(f"site {i} has no species")
        out[i] /= total
    return out

"""The element vocabulary: Z = 1..98 (H .. Cf), column Z-1 of every species array."""

import numpy as np

from jaxcrystal.errors import ElementError

NUM_ELEMENTS = 98

SYMBOLS: tuple[str, ...] = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne",
    "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar", "K", "Ca",
    "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn",
    "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr",
    "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn",
    "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd",
    "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb",
    "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th",
    "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk", "Cf",
)  # fmt: skip

_Z_OF_SYMBOL = {symbol: z for z, symbol in enumerate(SYMBOLS, start=1)}


def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol ("Ti" -> 22); raises `ElementError` outside H..Cf."""
    z = _Z_OF_SYMBOL.get(str(symbol).strip())
    if z is None:
        raise ElementError(f"unknown element symbol {symbol!r}: jaxcrystal covers H (Z=1) .. Cf (Z=98)")
    return z


def symbol(z: int) -> str:
    """Element symbol of an atomic number (22 -> "Ti"); raises `ElementError` outside 1..98."""
    if not 1 <= int(z) <= NUM_ELEMENTS:
        raise ElementError(f"atomic number {z} is outside the vocabulary Z = 1..{NUM_ELEMENTS}")
    return SYMBOLS[int(z) - 1]


def one_hot(atomic_numbers) -> np.ndarray:
    """[N] atomic numbers -> [N, 98] one-hot float64 species (column Z-1)."""
    z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    for value in z:
        symbol(value)  # validates the range with a clear message
    out = np.zeros((z.size, NUM_ELEMENTS))
    out[np.arange(z.size), z - 1] = 1.0
    return out

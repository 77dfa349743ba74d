"""Chemistry: oxidation states, element masks, neutral oxidation patterns, ionic radii, tolerance factor.

Everything here is host-side numpy except `tolerance_factor`, which also takes jax arrays and is differentiable.

Data: `jaxcrystal/data/oxidation_states.json`, built by `scripts/build_oxidation_tables.py` from the data files
of pymatgen 2023.10.11 (`periodic_table.json`) and SMACT 2.5.5 (`oxidation_states.txt`), both MIT-licensed; the
file records the package versions and the sha256 of both sources. These are the versions SMOACS pins, so the
tables below reproduce the SMOACS masks exactly (tested element by element against its `*_super_common.npz`).
Newer pymatgen releases changed a few entries; building from pymatgen 2026.10.24 would differ exactly here:
C common states (-4, 4) -> (-4..4), adding C to the -3, -2, +2, +3 masks; Re common (4,) -> (4, 7), adding Re
to the +7 general and perovskite masks; Mn's `Element.ionic_radii` losing +4..+7, dropping Mn from the +4 and +7
"smoacs" perovskite masks. (Br, Kr and Xe common states changed too, without effect on the intersections.)

Oxidation-state sets per element (`state_set=`), as used by SMOACS:
- "super_common": pymatgen ICSD ∩ pymatgen oxidation states ∩ SMACT ∩ pymatgen common. The element masks
  (`oxidation_mask`, SMOACS `mask_dict_super_common.npz`) and the paper's neutrality check (§7.3).
- "all_common": pymatgen ICSD ∩ pymatgen oxidation states ∩ SMACT (SMOACS MEGNet template patterns, §3.3).
- "smact": SMACT's default list alone (SMOACS "loose" patterns of the superconductor templates).

Radius conventions for perovskite sites (`convention=`):
- "shannon" (default): Shannon (1976) *ionic* radii at the coordination of an ideal cubic ABX3 perovskite,
  A: CN XII, B: CN VI, X: CN VI, as in Goldschmidt's definition. High spin where Shannon lists both. When the
  site's coordination is not tabulated for an ion, the tabulated one closest to it is used (ties: the higher),
  e.g. Li+ on A uses CN VIII, N3- on X uses CN IV. Non-positive radii (H+) are ignored.
- "smoacs": pymatgen's `Element.ionic_radii` for every site, as SMOACS does (`ionic_radii_dict_super_common`):
  mostly Shannon *crystal* radii at CN VI (so the A cation is taken 6-coordinated), with pymatgen's quirks:
  a few ions at another CN (N3- CN IV, Mn5+ CN IV, Br5+ CN IIIPY) and some ions absent (Ni2+, Cr3+, Cr6+,
  which pymatgen lists only among low-spin radii). Use it to reproduce SMOACS numbers.

The perovskite mask of a state is the general mask restricted to elements with a radius in the chosen
convention. Both conventions leave out C4-, Si4-, P3-, As3-, Sb3-, H-, H+, S2+ and Sn2+ (no positive radius
tabulated); "shannon" keeps Ni2+, Cr3+ and Cr6+, which "smoacs" leaves out; otherwise the two masks are equal.
"""

import functools
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxcrystal.elements import NUM_ELEMENTS, SYMBOLS, atomic_number, symbol
from jaxcrystal.errors import ConfigError, ElementError, StructureError

DATA_FILE = Path(__file__).parent / "data" / "oxidation_states.json"

STATE_SETS = ("super_common", "all_common", "smact")
MASK_STATES: tuple[int, ...] = (-4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7)  # the keys of the SMOACS mask tables
RADIUS_CONVENTIONS = ("shannon", "smoacs")
SITE_COORDINATION = {"A": "XII", "B": "VI", "X": "VI"}  # ideal cubic perovskite ABX3
PEROVSKITE_PATTERNS = {"A": (1, 2), "B": (2, 4), "X": (-1, -2)}  # SMOACS's two patterns p1, p2 per site
PEROVSKITE_FORMULA_STATES = ((-1, -1, -1, 1, 2), (-2, -2, -2, 2, 4))  # sorted multisets of one ABX3 unit

_SOURCES_OF_SET = {
    "super_common": ("icsd", "pymatgen", "smact", "common"),
    "all_common": ("icsd", "pymatgen", "smact"),
    "smact": ("smact",),
}
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10, "XI": 11}
_ROMAN |= {"XII": 12, "XIV": 14, "IIIPY": 3, "IVPY": 4, "IVSQ": 4}


@functools.cache
def _data() -> dict:
    with open(DATA_FILE) as f:
        return json.load(f)


def data_provenance() -> dict:
    """Sources of the tables: {"pymatgen"|"smact": {name, version, license, file, sha256}}."""
    return _data()["sources"]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _symbol_of(element) -> str:
    """Validated symbol of a symbol or atomic number."""
    if isinstance(element, str):
        return symbol(atomic_number(element))
    if isinstance(element, int | np.integer):
        return symbol(int(element))
    raise ElementError(f"expected an element symbol or atomic number, got {element!r}")


@functools.cache
def _state_table(state_set: str) -> tuple[tuple[int, ...], ...]:
    """[98] sorted allowed states per element, index Z-1."""
    _check_choice("state_set", state_set, STATE_SETS)
    out = []
    for sym in SYMBOLS:
        entry = _data()["elements"][sym]
        sets = [set(entry[source]) for source in _SOURCES_OF_SET[state_set]]
        out.append(tuple(sorted(set.intersection(*sets))))
    return tuple(out)


def allowed_states(element, state_set: str = "super_common") -> tuple[int, ...]:
    """Sorted oxidation states an element (symbol or Z) may take in `state_set`; () if none."""
    return _state_table(state_set)[atomic_number(_symbol_of(element)) - 1]


def oxidation_mask(state: int, state_set: str = "super_common") -> np.ndarray:
    """[98] bool over Z-1: elements that may carry oxidation `state` (SMOACS `mask_dict_super_common`)."""
    return np.array([int(state) in states for states in _state_table(state_set)])


def shannon_radius(element, state: int, coordination: str, kind: str = "ionic", spin: str | None = None) -> float:
    """Shannon (1976) radius in Å of an ion at a coordination number in Roman numerals ("VI", "XII", "IVSQ").

    kind: "ionic" or "crystal" (crystal = ionic + 0.14 Å for cations, - 0.14 Å for anions).
    spin: "High Spin" / "Low Spin" where Shannon distinguishes them; None takes high spin if listed.
    Raises `ElementError` naming the tabulated coordinations when the entry does not exist.
    """
    _check_choice("kind", kind, ("crystal", "ionic"))
    sym = _symbol_of(element)
    by_cn = _data()["elements"][sym]["shannon"].get(str(int(state)), {})
    if coordination not in by_cn:
        listed = ", ".join(by_cn) or "none"
        raise ElementError(f"no Shannon radius for {sym}{int(state):+d} at CN {coordination} (tabulated: {listed})")
    by_spin = by_cn[coordination]
    if spin is None:
        spin = "High Spin" if "High Spin" in by_spin else next(iter(by_spin))
    if spin not in by_spin:
        raise ElementError(f"no {spin!r} Shannon radius for {sym}{int(state):+d} at CN {coordination}")
    return by_spin[spin][0 if kind == "crystal" else 1]


def _site_radius_or_none(sym: str, state: int, site: str, convention: str) -> float | None:
    entry = _data()["elements"][sym]
    if convention == "smoacs":
        return entry["ionic_radii"].get(str(state))
    target = _ROMAN[SITE_COORDINATION[site]]
    candidates = [cn for cn in entry["shannon"].get(str(state), {}) if shannon_radius(sym, state, cn) > 0]
    if not candidates:
        return None
    best = min(candidates, key=lambda cn: (abs(_ROMAN[cn] - target), -_ROMAN[cn], len(cn)))
    return shannon_radius(sym, state, best)


def site_radius(element, state: int, site: str, convention: str = "shannon") -> float:
    """Radius in Å of an ion on perovskite site "A", "B" or "X" in a radius convention (module docstring)."""
    _check_choice("site", site, tuple(SITE_COORDINATION))
    _check_choice("convention", convention, RADIUS_CONVENTIONS)
    sym = _symbol_of(element)
    radius = _site_radius_or_none(sym, int(state), site, convention)
    if radius is None:
        raise ElementError(f"no {convention} radius for {sym}{int(state):+d} on a perovskite {site} site")
    return radius


def perovskite_radii(state: int, site: str, convention: str = "shannon") -> np.ndarray:
    """[98] float64 radii in Å on `site` of the elements of `perovskite_mask(state)`, 0 elsewhere.

    With convention="smoacs" this is SMOACS's `ionic_radii_dict_super_common` (same for every site).
    """
    _check_choice("site", site, tuple(SITE_COORDINATION))
    _check_choice("convention", convention, RADIUS_CONVENTIONS)
    allowed = oxidation_mask(state)
    out = np.zeros(NUM_ELEMENTS)
    for z in np.flatnonzero(allowed):
        out[z] = _site_radius_or_none(SYMBOLS[z], int(state), site, convention) or 0.0
    return out


def perovskite_mask(state: int, convention: str = "shannon") -> np.ndarray:
    """[98] bool: `oxidation_mask(state)` restricted to elements with a radius for `state` in `convention`.

    convention="smoacs" gives SMOACS's `ionic_mask_dict_super_common`. Availability does not depend on the site.
    """
    return perovskite_radii(state, "B", convention) > 0


def _composition(elements) -> tuple[list[int], list[tuple[int, int]]]:
    """Atomic numbers per atom and (Z, count) sorted by Z; rejects an empty or malformed list."""
    if isinstance(elements, str) or np.ndim(elements) != 1 or len(elements) == 0:
        raise StructureError(
            f"expected a non-empty 1-D sequence of element symbols or atomic numbers, got {elements!r}"
        )
    zs = [atomic_number(_symbol_of(e.item() if isinstance(e, np.generic) else e)) for e in elements]
    return zs, sorted(Counter(zs).items())


def _neutral_multisets(counts: list[tuple[int, int]], state_set: str) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Charge-neutral assignments as one sorted state multiset per element of `counts`, lexicographic order.

    Depth-first over atoms, each element's states non-decreasing (so no two results are permutations of each
    other), pruned by the sums the remaining atoms can still reach: every branch taken yields a result, so the
    first few results of a large cell come fast and `is_neutral` is polynomial in the atom count.
    """
    options = [_state_table(state_set)[z - 1] for z, _ in counts]
    if any(not states for states in options):
        return

    @functools.cache
    def sums(e: int, i: int, k: int) -> frozenset[int]:
        """Sums of k states of element e drawn (with repetition) from options[e][i:]."""
        if k == 0:
            return frozenset({0})
        if i == len(options[e]):
            return frozenset()
        s = options[e][i]
        return frozenset(s + x for x in sums(e, i, k - 1)) | sums(e, i + 1, k)

    tails = [frozenset({0})]  # tails[j]: sums reachable by the elements from len(counts) - j onward
    for e in reversed(range(len(counts))):
        tails.append(frozenset(a + b for a in sums(e, 0, counts[e][1]) for b in tails[-1]))
    tails.reverse()

    @functools.cache
    def feasible(e: int, i: int, k: int, target: int) -> bool:
        return any(target - x in tails[e + 1] for x in sums(e, i, k))

    def walk(e: int, i: int, k: int, partial: int, chosen: tuple[tuple[int, ...], ...], current: tuple[int, ...]):
        if k == 0:
            if e + 1 == len(counts):
                yield (*chosen, current)
            else:
                yield from walk(e + 1, 0, counts[e + 1][1], partial, (*chosen, current), ())
            return
        for j in range(i, len(options[e])):
            s = options[e][j]
            if feasible(e, j, k - 1, -(partial + s)):
                yield from walk(e, j, k - 1, partial + s, chosen, (*current, s))

    if 0 in tails[0]:
        yield from walk(0, 0, counts[0][1], 0, (), ())


def neutral_assignments(elements, state_set: str = "super_common", limit: int | None = None) -> list[dict]:
    """Charge-neutral oxidation-state assignments of a composition, as {symbol: sorted states of its atoms}.

    elements: [n] symbols or atomic numbers (one per atom). Per element only the multiset of states counts,
    so assignments differing by a permutation among same-element atoms appear once. Order: elements by
    ascending Z, states lexicographic. limit: stop after that many (None: all, many for big mixed cells).
    """
    _, counts = _composition(elements)
    out = []
    for multisets in _neutral_multisets(counts, state_set):
        if limit is not None and len(out) >= limit:
            break
        out.append({symbol(z): states for (z, _), states in zip(counts, multisets, strict=True)})
    return out


def neutral_patterns(elements, max_patterns: int = 10, state_set: str = "super_common") -> np.ndarray:
    """[P, n] int64 charge-neutral oxidation patterns of a template, P <= max_patterns (SMOACS §3.3 with K).

    Row k gives the state of every atom, in the order of `elements`. Atoms of one element receive the states of
    a multiset in ascending order along the atom order, so no two rows differ only by a permutation among
    same-element atoms. Rows come in the deterministic order of `neutral_assignments` (no string hashing).
    P = 0 when the composition admits no neutral assignment.
    """
    if max_patterns < 1:
        raise ConfigError(f"max_patterns must be >= 1, got {max_patterns}")
    zs, counts = _composition(elements)
    positions = {z: [i for i, zi in enumerate(zs) if zi == z] for z, _ in counts}
    rows = []
    for multisets in _neutral_multisets(counts, state_set):
        if len(rows) == max_patterns:
            break
        row = np.zeros(len(zs), dtype=np.int64)
        for (z, _), states in zip(counts, multisets, strict=True):
            row[positions[z]] = states
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(len(rows), len(zs))


def _perovskite_feasible(counts: list[tuple[int, int]], state_set: str, target: Counter) -> bool:
    """Can the atoms take exactly the state multiset `target` (each within its element's allowed states)?"""
    options = [set(_state_table(state_set)[z - 1]) for z, _ in counts]
    states = sorted(target)

    @functools.cache
    def fit(e: int, remaining: tuple[int, ...]) -> bool:
        if e == len(counts):
            return not any(remaining)

        def spread(j: int, left: int, rest: tuple[int, ...]) -> bool:
            """Distribute `left` atoms of element e over states[j:], then go on with the next element."""
            if j == len(states):
                return left == 0 and fit(e + 1, rest)
            if states[j] not in options[e]:
                return spread(j + 1, left, rest)
            return any(
                spread(j + 1, left - take, (*rest[:j], rest[j] - take, *rest[j + 1 :]))
                for take in range(min(left, rest[j]) + 1)
            )

        return spread(0, counts[e][1], remaining)

    return fit(0, tuple(target[s] for s in states))


def is_neutral(elements, state_set: str = "super_common", perovskite: bool = False) -> bool:
    """The paper's neutrality check of a discrete structure (SMOACS §7.3, `elec_neutral_check_SUPER_COMMON`).

    elements: [n] symbols or atomic numbers. True iff some assignment of allowed states (`state_set`, default
    the "super common" sets) to the atoms sums to zero; False if any element has no allowed state.
    perovskite=True applies SMOACS's perovskite override: neutral iff the atoms can take exactly the states of
    n/5 copies of (-1,-1,-1,+1,+2) or of (-2,-2,-2,+2,+4) (which site carries which state is not checked);
    for the 5-atom cell this is SMOACS's rule, for n/5 > 1 the same rule per formula unit. Fast for any cell
    size (SMOACS skips the check for supercells because its per-atom enumeration explodes).
    """
    _, counts = _composition(elements)
    if not perovskite:
        return next(_neutral_multisets(counts, state_set), None) is not None
    n_atoms = sum(c for _, c in counts)
    if n_atoms % 5:
        return False
    return any(
        _perovskite_feasible(counts, state_set, Counter({s: c * (n_atoms // 5) for s, c in Counter(unit).items()}))
        for unit in PEROVSKITE_FORMULA_STATES
    )


def perovskite_patterns(sites: Sequence[str]) -> np.ndarray:
    """[2, n] int64 SMOACS's two perovskite patterns for atoms labelled "A", "B", "X".

    p1 = (+1, +2, -1), p2 = (+2, +4, -2) for (A, B, X).
    """
    for site in sites:
        _check_choice("site", site, tuple(PEROVSKITE_PATTERNS))
    return np.array([[PEROVSKITE_PATTERNS[s][k] for s in sites] for k in range(2)], dtype=np.int64)


def _pattern_array(patterns, max_patterns: int | None) -> tuple[np.ndarray, int]:
    p = np.asarray(patterns)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0 or not np.issubdtype(p.dtype, np.integer):
        raise StructureError(f"patterns must be a non-empty [P, n] integer array, got shape {p.shape} {p.dtype}")
    k = p.shape[0] if max_patterns is None else max_patterns
    if p.shape[0] > k:
        raise ConfigError(f"{p.shape[0]} oxidation patterns do not fit in max_patterns={k}")
    return p.astype(np.int64), k


def site_element_masks(patterns, max_patterns: int | None = None, table: str = "general", convention: str = "shannon"):
    """Per-site element masks of oxidation patterns (SMOACS M and u, §1.4, §2.4).

    patterns: [P, n] int states per pattern and atom (`neutral_patterns`, `perovskite_patterns`).
    max_patterns: K >= P (default P); patterns P..K-1 are zero-filled dummies.
    table: "general" (`oxidation_mask`) or "perovskite" (`perovskite_mask` in `convention`).
    Returns (mask [n, 98, K] bool, used [K] bool): mask[i, :, k] = elements allowed at atom i in pattern k.
    Raises `StructureError` if a state of a pattern has no allowed element.
    """
    _check_choice("table", table, ("general", "perovskite"))
    p, k_max = _pattern_array(patterns, max_patterns)
    lookup = functools.cache(oxidation_mask if table == "general" else lambda s: perovskite_mask(s, convention))
    mask = np.zeros((p.shape[1], NUM_ELEMENTS, k_max), dtype=bool)
    for k, row in enumerate(p):
        for i, state in enumerate(row):
            mask[i, :, k] = lookup(int(state))
            if not mask[i, :, k].any():
                raise StructureError(f"pattern {k}, atom {i}: no element of the {table} table takes state {state:+d}")
    return mask, np.arange(k_max) < p.shape[0]


def site_radii(patterns, sites: Sequence[str], max_patterns: int | None = None, convention: str = "shannon"):
    """[n, 98, K] float64 radii in Å per atom, element and pattern (SMOACS ρ, §2.4), 0 where not allowed.

    patterns: [P, n] int; sites: [n] "A" / "B" / "X" labels of the atoms; dummy patterns P..K-1 are zero.
    """
    p, k_max = _pattern_array(patterns, max_patterns)
    if len(sites) != p.shape[1]:
        raise StructureError(f"{len(sites)} site labels for patterns over {p.shape[1]} atoms")
    lookup = functools.cache(lambda s, site: perovskite_radii(s, site, convention))
    out = np.zeros((p.shape[1], NUM_ELEMENTS, k_max))
    for k, row in enumerate(p):
        for i, (state, site) in enumerate(zip(row, sites, strict=True)):
            out[i, :, k] = lookup(int(state), site)
    return out


def tolerance_factor(r_a, r_b, r_x):
    """Goldschmidt tolerance factor t = (r_A + r_X) / (√2 (r_B + r_X)); radii in Å, any broadcastable shapes.

    Pure arithmetic: on jax arrays it is traceable and differentiable in all three radii (SMOACS §4.4 applies
    it to pattern-mixed site radii); on numpy arrays or floats it stays on the host in their precision.
    """
    return (r_a + r_x) / (2.0**0.5 * (r_b + r_x))


def perovskite_tolerance(a, b, x, states: tuple[int, int, int] = (2, 4, -2), convention: str = "shannon") -> float:
    """Tolerance factor of the perovskite ABX3 with the given (A, B, X) oxidation states (`site_radius`)."""
    radii = [site_radius(el, s, site, convention) for el, s, site in zip((a, b, x), states, "ABX", strict=True)]
    return float(tolerance_factor(*radii))

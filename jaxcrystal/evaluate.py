"""Evaluation of optimized candidates: criteria, success flags, uniqueness and novelty (reference/smoacs.md §7).

The optimizer hands over one finished batch as `Candidates` (already discretized: one element per atom, the
predictors re-run on the one-hot structures). `evaluate` computes every criterion per candidate and returns a
`pandas.DataFrame` (one row per candidate, index = candidate names); `summarize` turns the rows of a whole run
into rates, the number of distinct successes (pymatgen `StructureMatcher`) and the novel ones.

Columns of the evaluation frame (and of `result.csv`, which has all of them except `structure`):

| column | meaning |
|---|---|
| `success` | all applicable criteria hold (see below) |
| `<main>_success` | window task: abs(`<main>_onehot` − target) ≤ margin (inclusive); absent for maximization |
| `<main>_above_<x>` | maximization task: `<main>_onehot` > x for every x in `maximize_thresholds` |
| `<second>_success` | `<second>_onehot` < `second_max` (strict); absent without a second criterion |
| `is_neutral` | charge neutrality by the oxidation-state check (below); empty when the check is off |
| `min_bond_ok` | `min_bond` ≥ `Criteria.min_bond` (SMOACS's `minbond_less_than_0.5`, which means the same) |
| `min_bond` | shortest interatomic distance in Å, periodic images included (an atom and its own image too) |
| `tolerance_success` | perovskites: Goldschmidt t within `tolerance_window` (inclusive); empty otherwise |
| `perov_coords` | perovskites: each coordinate within ε of the template's (periodic displacement); else empty |
| `perov_angles` | perovskites: the three lattice angles within `angle_window` (inclusive); empty otherwise |
| `perov_success` | perovskites: `perov_coords` and `perov_angles` (each when its window is set); else empty |
| `tolerance` | Goldschmidt tolerance factor of the discrete structure (perovskites) |
| `<p>_onehot` | every predicted property re-predicted on the one-hot structure (its units) |
| `<p>_soft` | every property on the final soft distribution (the last optimization step) |
| `loss` | final training loss |
| `formula` | reduced formula, e.g. `SrTiO3` |
| `composition` | full cell formula, e.g. `Sr27 Ti27 O81` |
| `ox_states` | oxidation states of the chosen pattern as `Element+state*count`, e.g. `Sr+2*1 Ti+4*1 O-2*3` |
| `lattice_abc` | a, b, c in Å, a string with 3 decimals |
| `lattice_angles` | alpha, beta, gamma in degrees, a string with 3 decimals |
| `num_atoms` | atoms in the cell |
| `healthy` | False if the candidate hit NaN/inf during optimization and was frozen |
| `template` | name of the template the candidate started from |
| `structure` | the pymatgen `Structure` (in memory only; not written to CSV) |

Flags that do not apply are `pandas.NA` in a nullable `boolean` column (written as empty CSV cells).

`success` is the conjunction of: `healthy`, `<main>_success` (window tasks), `<second>_success` (when set),
`is_neutral` (when the check is on), `min_bond_ok`, and for perovskites `tolerance_success` and `perov_success`.

Deliberate differences from SMOACS (reference/smoacs.md §10):

- Defaults are the paper's: window ±0.2, E_form < −0.5 eV/atom (SMOACS's CLI uses ±2.0 and < 1.0; item 2), and
  the Tc thresholds 3/5/10/15 K (the code uses 5/10/15/20; item 27).
- `success` includes the bond-length check (item 17) and neutrality for every family, 3×3×3 perovskites included
  (SMOACS skips it there because its per-atom enumeration explodes): `jaxcrystal.chemistry.is_neutral`
  enumerates state multisets per element, pruned by reachable sums (milliseconds for 135 atoms).
- The coordinate window uses the true periodic displacement abs(Δ − round(Δ)) (SMOACS's 3-argument `np.minimum`
  bug, item 16), and the README's 85–95° angle condition is checked (item 16).
- Uniqueness and novelty compare structures with `StructureMatcher` (SMOACS compares element lists and, through
  a bug, always reports 0; item 18). `result.csv` has no duplicated column and includes `<second>_success`,
  `perov_coords` and the loss (item 20).

Neutrality (the paper's check, `jaxcrystal.chemistry.is_neutral`): each atom may take any state of the
icsd ∩ pymatgen ∩ SMACT ∩ common oxidation states of its element; the structure is neutral when some choice sums
to zero. For perovskites (SMOACS's override) the states must moreover form n/5 copies of one ABX3 pattern,
(−1, −1, −1, +1, +2) or (−2, −2, −2, +2, +4); as in SMOACS, which atom takes which state is not tied to a site.
"""

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from jaxcrystal import chemistry
from jaxcrystal.errors import ConfigError, StructureError

FLAG_COLUMNS_FIXED = (
    "success",
    "is_neutral",
    "min_bond_ok",
    "tolerance_success",
    "perov_coords",
    "perov_angles",
    "perov_success",
    "healthy",
)


@dataclasses.dataclass(frozen=True)
class Criteria:
    """Evaluation criteria; the defaults are the paper's (band gap ± 0.2 eV, E_form < −0.5 eV/atom).

    Attributes:
      main: name of the main objective's property, e.g. "band_gap", "tc", "bulk_modulus".
      target: window centre; None for a maximization task.
      margin: evaluation window half-width (paper: ±0.2 eV; bulk modulus task: ±10 GPa).
      second: second property name, or None.
      second_max: success needs second < second_max (strict); None = no criterion.
      tolerance_window: (low, high) for the Goldschmidt factor, inclusive; perovskites only; None = no check.
      min_bond: Å; the shortest interatomic distance must be at least this.
      coord_window: ε in fractional units of the template cell (perovskites): each coordinate's periodic
        displacement from the template must be ≤ ε; None = no check.
      angle_window: (low, high) degrees for the three lattice angles of perovskites, inclusive; None = no check.
      check_neutrality: whether `is_neutral` is computed and required.
      maximize_thresholds: thresholds of the `<main>_above_<x>` columns for maximization tasks.
    """

    main: str
    target: float | None
    margin: float = 0.2
    second: str | None = "formation_energy"
    second_max: float | None = -0.5
    tolerance_window: tuple[float, float] | None = (0.8, 1.0)
    min_bond: float = 0.5
    coord_window: float | None = None
    angle_window: tuple[float, float] | None = (85.0, 95.0)
    check_neutrality: bool = True
    maximize_thresholds: tuple[float, ...] = (3.0, 5.0, 10.0, 15.0)

    def __post_init__(self):
        if self.margin < 0:
            raise ConfigError(f"Criteria.margin must be >= 0, got {self.margin}")
        if self.min_bond < 0:
            raise ConfigError(f"Criteria.min_bond must be >= 0, got {self.min_bond}")
        if self.coord_window is not None and self.coord_window < 0:
            raise ConfigError(f"Criteria.coord_window must be >= 0, got {self.coord_window}")
        for name in ("tolerance_window", "angle_window"):
            window = getattr(self, name)
            if window is not None and (len(window) != 2 or window[0] > window[1]):
                raise ConfigError(f"Criteria.{name} must be (low, high) with low <= high, got {window}")

    @property
    def flag_columns(self) -> tuple[str, ...]:
        """The boolean columns of the evaluation frame for these criteria."""
        names = list(FLAG_COLUMNS_FIXED)
        if self.target is not None:
            names.insert(1, f"{self.main}_success")
        else:
            names[1:1] = [above_column(self.main, x) for x in self.maximize_thresholds]
        if self.second is not None and self.second_max is not None:
            names.insert(names.index("is_neutral"), f"{self.second}_success")
        return tuple(names)


@dataclasses.dataclass(frozen=True)
class Candidates:
    """One finished batch of B candidates, host numpy arrays (N = padded atom slots).

    Attributes:
      names: [B] output names, e.g. "batch000_cand003__<template name>".
      template_names: [B] names of the templates the candidates started from.
      structures: [B] discretized pymatgen `Structure`s (one element per atom), frac wrapped into [0, 1).
      frac_unwrapped: [B, N, 3] optimized fractional coordinates before wrapping.
      init_frac: [B, N, 3] template fractional coordinates (after any copy-mutation).
      mask: [B, N] bool, real atoms; the real atoms of row b are, in order, the sites of `structures[b]`.
      site_roles: [B, N] int, 0 = A, 1 = B, 2 = X, -1 = none.
      oxidation_states: [B, N] int, the pattern's state of each atom chosen at discretization.
      predictions: property -> [B], re-predicted on the one-hot structures.
      soft_predictions: property -> [B], on the final soft distribution.
      tolerance: [B] Goldschmidt t of the discrete structure (perovskites), or None.
      loss: [B] final training loss.
      healthy: [B] bool, False if the candidate hit NaN/inf and was frozen.
      family: "perovskite" or "general".
    """

    names: list[str]
    template_names: list[str]
    structures: list[Structure]
    frac_unwrapped: np.ndarray
    init_frac: np.ndarray
    mask: np.ndarray
    site_roles: np.ndarray
    oxidation_states: np.ndarray
    predictions: dict[str, np.ndarray]
    soft_predictions: dict[str, np.ndarray]
    tolerance: np.ndarray | None
    loss: np.ndarray
    healthy: np.ndarray
    family: str

    def __len__(self) -> int:
        return len(self.names)

    def validate(self) -> None:
        """Raises `StructureError` naming the field whose shape or length disagrees."""
        b = len(self.names)
        if self.family not in ("perovskite", "general"):
            raise StructureError(f"Candidates.family must be 'perovskite' or 'general', got {self.family!r}")
        if len(set(self.names)) != b:
            duplicates = sorted(n for n, k in Counter(self.names).items() if k > 1)
            raise StructureError(f"Candidates.names must be unique; repeated: {duplicates[:5]}")
        for field in ("template_names", "structures"):
            if len(getattr(self, field)) != b:
                raise StructureError(f"Candidates.{field} has {len(getattr(self, field))} entries, expected {b}")
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or mask.shape[0] != b:
            raise StructureError(f"Candidates.mask must have shape [B={b}, N], got {mask.shape}")
        n = mask.shape[1]
        shapes = {"frac_unwrapped": (b, n, 3), "init_frac": (b, n, 3), "site_roles": (b, n)}
        shapes["oxidation_states"] = (b, n)
        for field, shape in shapes.items():
            if np.shape(getattr(self, field)) != shape:
                raise StructureError(
                    f"Candidates.{field} must have shape {shape}, got {np.shape(getattr(self, field))}"
                )
        vectors = {"loss": self.loss, "healthy": self.healthy}
        vectors.update({f"predictions[{k!r}]": v for k, v in self.predictions.items()})
        vectors.update({f"soft_predictions[{k!r}]": v for k, v in self.soft_predictions.items()})
        if self.tolerance is not None:
            vectors["tolerance"] = self.tolerance
        for field, value in vectors.items():
            if np.shape(value) != (b,):
                raise StructureError(f"Candidates.{field} must have shape [{b}], got {np.shape(value)}")
        counts = mask.sum(axis=1)
        for i, s in enumerate(self.structures):
            if len(s) != counts[i]:
                raise StructureError(f"candidate {self.names[i]}: {len(s)} sites but mask has {counts[i]} atoms")


def above_column(main: str, threshold: float) -> str:
    """Name of the maximization column for `threshold`, e.g. "tc_above_5"."""
    return f"{main}_above_{threshold:g}"


# ----------------------------------------------------------------------------------------------------------
# Single criteria (pure functions, usable on their own)


def min_interatomic_distance(structure: Structure) -> float:
    """Shortest distance in Å between two atoms, periodic images included (also an atom and its own image).

    Two distinct atoms at the same position give 0. A one-atom cell gives its shortest lattice vector.
    """
    # Upper bounds that are real distances: minimum-image pair distances and the reduced lattice vectors.
    bound = float(np.min(np.linalg.norm(structure.lattice.get_lll_reduced_lattice().matrix, axis=1)))
    if len(structure) > 1:
        distances = structure.distance_matrix
        bound = min(bound, float(np.min(distances[~np.eye(len(structure), dtype=bool)])))
    if bound < 1e-8:
        return 0.0
    # The true minimum is <= bound, so an exhaustive neighbour search within the bound contains it.
    _, _, _, distances = structure.get_neighbor_list(r=bound + 1e-6, exclude_self=True)
    return float(min(bound, distances.min())) if len(distances) else bound


def periodic_displacement(frac, reference) -> np.ndarray:
    """[..., 3] element-wise periodic distance between fractional coordinates, in [0, 0.5].

    0.95 vs 0.05 is a displacement of 0.1; 1.2 vs 0.0 is 0.2.
    """
    delta = np.asarray(frac, dtype=float) - np.asarray(reference, dtype=float)
    return np.abs(delta - np.round(delta))


FLOAT32_SLACK = 1e-6  # fractional units (~1e-5 Å): rounding of float32 coordinates at a window's edge


def coordinates_within(frac, reference, mask, window: float) -> bool:
    """True if every real atom's coordinates moved at most `window` (fractional, periodic) from `reference`.

    Args:
      frac: [N, 3] fractional coordinates (wrapped or not).
      reference: [N, 3] template fractional coordinates.
      mask: [N] bool, real atoms.
      window: ε in fractional units.
    """
    mask = np.asarray(mask, dtype=bool)
    # Optimized coordinates are float32 and clipped to reference ± window in float32: allow its rounding (~6e-8).
    return bool(np.all(periodic_displacement(frac, reference)[mask] <= window + FLOAT32_SLACK))


def angles_within(structure: Structure, window: tuple[float, float]) -> bool:
    """True if alpha, beta and gamma are all within [low, high] degrees."""
    angles = np.asarray(structure.lattice.angles)
    return bool(np.all((angles >= window[0] - 1e-9) & (angles <= window[1] + 1e-9)))


def format_ox_states(symbols, states) -> str:
    """`Element+state*count` groups in order of first appearance, e.g. "Sr+2*1 Ti+4*1 O-2*3"."""
    groups = Counter((str(s), int(q)) for s, q in zip(symbols, states, strict=True))
    return " ".join(f"{s}{q:+d}*{n}" for (s, q), n in groups.items())


# ----------------------------------------------------------------------------------------------------------
# Per-candidate evaluation


def evaluate(c: Candidates, criteria: Criteria) -> pd.DataFrame:
    """Every criterion of every candidate of one batch (columns in the module docstring), index = `c.names`."""
    c.validate()
    for prop in (criteria.main, criteria.second):
        if prop is not None and prop not in c.predictions:
            raise ConfigError(f"criteria need property {prop!r}, but predictions has {sorted(c.predictions)}")
    perovskite = c.family == "perovskite"
    if perovskite and criteria.tolerance_window is not None and c.tolerance is None:
        raise StructureError("perovskite candidates need Candidates.tolerance for the tolerance window")
    b = len(c)
    healthy = np.asarray(c.healthy, dtype=bool)
    rows = {}

    main = np.asarray(c.predictions[criteria.main], dtype=float)
    if criteria.target is not None:
        rows[f"{criteria.main}_success"] = np.abs(main - criteria.target) <= criteria.margin
    else:
        for x in criteria.maximize_thresholds:
            rows[above_column(criteria.main, x)] = main > x
    if criteria.second is not None and criteria.second_max is not None:
        rows[f"{criteria.second}_success"] = np.asarray(c.predictions[criteria.second], float) < criteria.second_max

    symbols = [[site.specie.symbol for site in s] for s in c.structures]
    mask = np.asarray(c.mask, dtype=bool)
    neutral = [pd.NA] * b
    if criteria.check_neutrality:
        neutral = [chemistry.is_neutral(symbols[i], perovskite=perovskite) for i in range(b)]
    rows["is_neutral"] = neutral

    min_bond = np.array([min_interatomic_distance(s) if _finite(s) else np.nan for s in c.structures])
    rows["min_bond_ok"] = min_bond >= criteria.min_bond
    rows["min_bond"] = min_bond

    na = [pd.NA] * b
    tolerance = np.full(b, np.nan) if c.tolerance is None else np.asarray(c.tolerance, dtype=float)
    rows["tolerance_success"] = na
    rows["perov_coords"] = na
    rows["perov_angles"] = na
    rows["perov_success"] = na
    if perovskite:
        if criteria.tolerance_window is not None:
            low, high = criteria.tolerance_window
            rows["tolerance_success"] = (tolerance >= low) & (tolerance <= high)
        parts = []
        if criteria.coord_window is not None:
            rows["perov_coords"] = [
                coordinates_within(c.frac_unwrapped[i], c.init_frac[i], mask[i], criteria.coord_window)
                for i in range(b)
            ]
            parts.append(np.asarray(rows["perov_coords"], dtype=bool))
        if criteria.angle_window is not None:
            rows["perov_angles"] = [angles_within(s, criteria.angle_window) for s in c.structures]
            parts.append(np.asarray(rows["perov_angles"], dtype=bool))
        rows["perov_success"] = np.logical_and.reduce(parts) if parts else np.ones(b, dtype=bool)
    rows["tolerance"] = tolerance

    for prop, values in c.predictions.items():
        rows[f"{prop}_onehot"] = np.asarray(values, dtype=float)
    for prop, values in c.soft_predictions.items():
        rows[f"{prop}_soft"] = np.asarray(values, dtype=float)
    rows["loss"] = np.asarray(c.loss, dtype=float)
    rows["formula"] = [s.composition.reduced_formula for s in c.structures]
    rows["composition"] = [s.composition.formula for s in c.structures]
    rows["ox_states"] = [format_ox_states(symbols[i], np.asarray(c.oxidation_states[i])[mask[i]]) for i in range(b)]
    rows["lattice_abc"] = [_three(s.lattice.abc) for s in c.structures]
    rows["lattice_angles"] = [_three(s.lattice.angles) for s in c.structures]
    rows["num_atoms"] = [len(s) for s in c.structures]
    rows["healthy"] = healthy
    rows["template"] = list(c.template_names)
    rows["structure"] = list(c.structures)

    df = pd.DataFrame(rows, index=pd.Index(list(c.names), name="name"))
    for column in criteria.flag_columns:
        if column != "success":
            df[column] = df[column].astype("boolean")
    required = [name for name in criteria.flag_columns if name not in ("success", "healthy")]
    required = [name for name in required if "_above_" not in name]
    success = pd.Series(healthy, index=df.index)
    for name in required:
        success &= df[name].fillna(True).astype(bool)  # not applicable = no constraint
    df.insert(0, "success", success.astype("boolean"))
    return df


def _finite(structure: Structure) -> bool:
    return bool(np.all(np.isfinite(structure.lattice.matrix)) and np.all(np.isfinite(structure.frac_coords)))


def _three(values) -> str:
    return " ".join(f"{float(v):.3f}" for v in values)


# ----------------------------------------------------------------------------------------------------------
# Run summary


def rank(df: pd.DataFrame, criteria: Criteria) -> pd.Index:
    """Candidate names best first: successes, then distance to the main window (or the largest value for
    maximization), then the lowest second property."""
    main = df[f"{criteria.main}_onehot"].astype(float)
    if criteria.target is not None:
        key_main = (np.abs(main - criteria.target) - criteria.margin).clip(lower=0.0)
    else:
        key_main = -main
    keys = pd.DataFrame(
        {
            "failed": ~df["success"].fillna(False).astype(bool),
            "main": key_main.fillna(np.inf),
            "second": (
                df[f"{criteria.second}_onehot"].astype(float).fillna(np.inf)
                if criteria.second is not None and f"{criteria.second}_onehot" in df
                else 0.0
            ),
        },
        index=df.index,
    )
    return keys.sort_values(["failed", "main", "second"], kind="stable").index


def unique_groups(structures: list[Structure], matcher: StructureMatcher | None = None) -> list[list[int]]:
    """Indices of `structures` grouped by `StructureMatcher` (default settings: ltol 0.2, stol 0.3, 5°,
    primitive cell, volume scaling): a structure joins the first group whose first member it matches;
    structures with different reduced formulas never share a group."""
    matcher = matcher or StructureMatcher()
    groups: list[list[int]] = []
    by_formula: dict[str, list[list[int]]] = {}
    for i, s in enumerate(structures):
        candidates = by_formula.setdefault(s.composition.reduced_formula, [])
        for group in candidates:
            if matcher.fit(structures[group[0]], s):
                group.append(i)
                break
        else:
            candidates.append([i])
            groups.append(candidates[-1])
    return groups


def novel_mask(structures: list[Structure], known: list[Structure], matcher: StructureMatcher | None = None):
    """[len(structures)] bool: True where a structure matches none of `known` (compared within one formula)."""
    matcher = matcher or StructureMatcher()
    known_by_formula: dict[str, list[Structure]] = {}
    for s in known:
        known_by_formula.setdefault(s.composition.reduced_formula, []).append(s)
    return np.array(
        [
            not any(matcher.fit(s, k) for k in known_by_formula.get(s.composition.reduced_formula, []))
            for s in structures
        ],
        dtype=bool,
    )


def summarize(
    df: pd.DataFrame,
    criteria: Criteria,
    templates: list[Structure] | None = None,
    reference: list[Structure] | None = None,
) -> dict:
    """Rates over a run's evaluation frame (the concatenated `evaluate` frames) plus uniqueness and novelty.

    Returns a dict with `num_candidates`, `num_success`, the mean of every flag column over the candidates where
    it applies (key = column name; omitted when it applies nowhere), and
    - `num_unique_success`, `success_unique_rate`: `StructureMatcher` groups among successes (groups/successes);
    - `num_novel_success`, `success_novel_rate`: successes matching none of `templates` + `reference`
      (novel successes / successes). Rates are NaN without successes.
    Uniqueness and novelty need the `structure` column of `evaluate`'s frame.
    """
    out: dict = {"num_candidates": len(df), "num_success": int(df["success"].fillna(False).astype(bool).sum())}
    for column in criteria.flag_columns:
        if column in df:
            values = df[column].dropna()
            if len(values):
                out[column] = float(values.astype(bool).mean())
    if "structure" not in df:
        raise ConfigError("summarize needs the 'structure' column of evaluate()'s frame for uniqueness")
    successes = list(df.loc[df["success"].fillna(False).astype(bool), "structure"])
    n = len(successes)
    groups = unique_groups(successes) if n else []
    novel = novel_mask(successes, list(templates or []) + list(reference or [])) if n else np.zeros(0, bool)
    out["num_unique_success"] = len(groups)
    out["success_unique_rate"] = len(groups) / n if n else float("nan")
    out["num_novel_success"] = int(novel.sum())
    out["success_novel_rate"] = float(novel.mean()) if n else float("nan")
    return out

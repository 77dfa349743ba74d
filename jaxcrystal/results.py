"""Result folder of an optimization run, written incrementally and atomically (reference/smoacs.md §7).

Layout of `out_dir`:

| file | written by | content |
|---|---|---|
| `config.json` | `ResultWriter.__init__` | the run configuration as given (everything needed to rerun) |
| `result.csv` | `write_batch` | one row per candidate so far, `jaxcrystal.evaluate` columns (no `structure`) |
| `result.npz` | `write_batch` | arrays of all batches so far, concatenated over candidates (below) |
| `poscar/<name>.vasp` | `write_batch` | each candidate's discretized structure, direct coordinates |
| `cif/<name>.cif` | `write_batch` | the same as a P1 CIF |
| `result_summary.csv` | `finalize` | one row: rates of every flag, uniqueness, novelty (`evaluate.summarize`) |
| `history_img.png` | `finalize` | trajectories of the 20 best: main property, second property, loss |

In the plot the target window and the second criterion are dashed lines. A finished batch is on disk before
the next starts. Every file is written to a temporary file in the same folder (`.<name>.<random>.tmp`) and
moved into place with `os.replace`, so after a crash of the process each file is either the previous complete
version or the new complete one (no fsync: a power loss may still lose data).

`result.npz` arrays (B = candidates of all batches so far, N = largest atom count, padding masked out):
`names`, `template_names`, `batch_index` [B]; `lattice` [B, 3, 3] Å rows; `frac` [B, N, 3] wrapped fractional
coordinates of the structures; `frac_unwrapped`, `init_frac` [B, N, 3]; `atomic_numbers` [B, N] (0 = padding);
`mask` [B, N] bool; `site_roles` [B, N] (-1 = none / padding); `oxidation_states` [B, N]; `prediction_<p>`,
`soft_prediction_<p>` [B]; `tolerance` [B] (NaN when not computed); `loss` [B]; `healthy` [B] bool;
`history_<key>` [steps, B] (e.g. `history_loss`, `history_band_gap`; NaN-padded if batches ran different steps).
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from jaxcrystal.crystal import write_cif, write_poscar
from jaxcrystal.errors import ConfigError, StructureError
from jaxcrystal.evaluate import Candidates, Criteria, rank, summarize

OUTPUT_FILES = ("config.json", "result.csv", "result.npz", "result_summary.csv", "history_img.png")
OUTPUT_FOLDERS = ("poscar", "cif")
TOP_K_PLOT = 20


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls `write(temporary_path)` for a temporary file next to `path`, then moves it onto `path`.

    The temporary file is removed if `write` raises, so no partial file is ever left under either name.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_file_name(name: str) -> str:
    """`name` with every character outside letters, digits, '.', '_', '+', '-' replaced by '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", str(name)).lstrip(".")
    if not cleaned:
        raise StructureError(f"candidate name {name!r} gives an empty file name")
    return cleaned


class ResultWriter:
    """Writes a run's result folder batch by batch (layout in the module docstring).

    Usage:
        writer = ResultWriter(out_dir, config)
        for i, batch in enumerate(batches):
            writer.write_batch(i, candidates, evaluate(candidates, criteria), history)
        summary = writer.finalize(criteria, templates, reference)
    """

    def __init__(self, out_dir: str | Path, config: dict, overwrite: bool = False):
        """Creates `out_dir` and writes `config.json`.

        Refuses (`ConfigError`) an existing non-empty folder unless `overwrite`; with `overwrite` only this
        module's outputs (`OUTPUT_FILES`, `poscar/`, `cif/`) are removed, other files are left alone.
        """
        self.out_dir = Path(out_dir)
        text = json.dumps(config, indent=2, default=_json_default)  # fails before anything is touched
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"{self.out_dir}: exists and is not a folder")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()):
            if not overwrite:
                raise ConfigError(f"{self.out_dir}: folder exists and is not empty (choose another or overwrite)")
            for name in OUTPUT_FILES:
                (self.out_dir / name).unlink(missing_ok=True)
            for name in OUTPUT_FOLDERS:
                shutil.rmtree(self.out_dir / name, ignore_errors=True)
        for name in OUTPUT_FOLDERS:
            (self.out_dir / name).mkdir(parents=True, exist_ok=True)
        atomic_write(self.out_dir / "config.json", lambda p: p.write_text(text + "\n"))
        self._frames: list[pd.DataFrame] = []
        self._arrays: list[dict[str, np.ndarray]] = []
        self._histories: list[dict[str, np.ndarray]] = []
        self._file_names: set[str] = set()

    @property
    def results(self) -> pd.DataFrame:
        """The evaluation frames of all batches written so far, concatenated (with the `structure` column)."""
        if not self._frames:
            raise ConfigError("no batch has been written yet")
        return pd.concat(self._frames)

    def write_batch(self, index: int, candidates: Candidates, df: pd.DataFrame, history: dict[str, np.ndarray]):
        """Writes one evaluated batch: its POSCAR/CIF files, then `result.csv` and `result.npz` of all batches.

        Args:
          index: batch number, 0, 1, 2, ... in order.
          candidates: the batch (`jaxcrystal.evaluate.Candidates`).
          df: `evaluate(candidates, criteria)`, index = `candidates.names`.
          history: key -> [steps, B] arrays ("loss", property names, "tolerance", ...), same keys every batch.
        """
        if index != len(self._frames):
            raise ConfigError(f"write_batch: expected batch index {len(self._frames)}, got {index}")
        candidates.validate()
        if list(df.index) != list(candidates.names):
            raise StructureError("write_batch: the frame's index must be the candidates' names, in order")
        b = len(candidates)
        history = {k: np.asarray(v, dtype=float) for k, v in history.items()}
        for key, values in history.items():
            if values.ndim != 2 or values.shape[1] != b:
                raise StructureError(f"history[{key!r}] must have shape [steps, B={b}], got {values.shape}")
        if self._histories and set(history) != set(self._histories[0]):
            raise StructureError(f"history keys {sorted(history)} differ from batch 0's {sorted(self._histories[0])}")

        file_names = [safe_file_name(name) for name in candidates.names]
        for name, file_name in zip(candidates.names, file_names, strict=True):
            if file_name in self._file_names or file_names.count(file_name) > 1:
                raise StructureError(f"candidate {name!r}: output file name {file_name!r} is used twice")
        for name, file_name, structure in zip(candidates.names, file_names, candidates.structures, strict=True):
            poscar = self.out_dir / "poscar" / f"{file_name}.vasp"
            atomic_write(poscar, lambda p, s=structure, n=name: write_poscar(s, p, comment=n))
            atomic_write(self.out_dir / "cif" / f"{file_name}.cif", lambda p, s=structure: write_cif(s, p))
        self._file_names.update(file_names)

        self._frames.append(df)
        self._arrays.append(_batch_arrays(index, candidates))
        self._histories.append(history)
        table = self.results.drop(columns=["structure"], errors="ignore")
        atomic_write(self.out_dir / "result.csv", lambda p: table.to_csv(p))
        arrays = _concatenate(self._arrays)
        for key in self._histories[0]:
            arrays[f"history_{key}"] = _concatenate_history([h[key] for h in self._histories])
        atomic_write(self.out_dir / "result.npz", lambda p: _save_npz(p, arrays))

    def finalize(self, criteria: Criteria, templates=None, reference=None) -> pd.DataFrame:
        """Writes `result_summary.csv` and `history_img.png`; returns the summary as a one-row frame.

        templates / reference: structures a success must not match to count as novel (see `summarize`).
        """
        df = self.results
        summary = pd.DataFrame([summarize(df, criteria, templates, reference)])
        atomic_write(self.out_dir / "result_summary.csv", lambda p: summary.to_csv(p, index=False))
        history = {key: _concatenate_history([h[key] for h in self._histories]) for key in self._histories[0]}
        atomic_write(self.out_dir / "history_img.png", lambda p: plot_history(p, df, history, criteria))
        return summary


def plot_history(path: str | Path, df: pd.DataFrame, history: dict[str, np.ndarray], criteria: Criteria) -> None:
    """PNG of the trajectories of the `TOP_K_PLOT` best candidates (`jaxcrystal.evaluate.rank`).

    Panels: the main property with the target window dashed, the second property with its criterion dashed, and
    the loss, each when its history is present. `history[key]` is [steps, B] in the row order of `df`.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    columns = [df.index.get_loc(name) for name in rank(df, criteria)[:TOP_K_PLOT]]
    panels = [(criteria.main, criteria.main)]
    if criteria.second is not None:
        panels.append((criteria.second, criteria.second))
    panels.append(("loss", "loss"))
    panels = [(key, title) for key, title in panels if key in history]
    fig = Figure(figsize=(5 * max(len(panels), 1), 4), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels, strict=False):
        values = history[key][:, columns]
        ax.plot(np.arange(values.shape[0]), values, linewidth=0.8)
        if key == criteria.main and criteria.target is not None:
            for y in (criteria.target - criteria.margin, criteria.target + criteria.margin):
                ax.axhline(y, color="k", linestyle="--", linewidth=1.0)
        if key == criteria.second and criteria.second_max is not None:
            ax.axhline(criteria.second_max, color="k", linestyle="--", linewidth=1.0)
        ax.set_title(f"{title} (top {len(columns)})")
        ax.set_xlabel("step")
    fig.savefig(path, format="png", dpi=100)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise ConfigError(f"config.json: a value of type {type(value).__name__} is not JSON-serializable: {value!r}")


def _batch_arrays(index: int, c: Candidates) -> dict[str, np.ndarray]:
    b, n = np.shape(c.mask)
    lattice = np.stack([s.lattice.matrix for s in c.structures])
    frac = np.zeros((b, n, 3))
    numbers = np.zeros((b, n), dtype=np.int64)
    mask = np.asarray(c.mask, dtype=bool)
    for i, s in enumerate(c.structures):
        frac[i, mask[i]] = s.frac_coords
        numbers[i, mask[i]] = [site.specie.Z for site in s]
    arrays = {
        "names": np.array(c.names, dtype=str),
        "template_names": np.array(c.template_names, dtype=str),
        "batch_index": np.full(b, index, dtype=np.int64),
        "lattice": lattice,
        "frac": frac,
        "frac_unwrapped": np.asarray(c.frac_unwrapped, dtype=float),
        "init_frac": np.asarray(c.init_frac, dtype=float),
        "atomic_numbers": numbers,
        "mask": mask,
        "site_roles": np.asarray(c.site_roles, dtype=np.int64),
        "oxidation_states": np.asarray(c.oxidation_states, dtype=np.int64),
        "tolerance": np.full(b, np.nan) if c.tolerance is None else np.asarray(c.tolerance, dtype=float),
        "loss": np.asarray(c.loss, dtype=float),
        "healthy": np.asarray(c.healthy, dtype=bool),
    }
    arrays.update({f"prediction_{k}": np.asarray(v, dtype=float) for k, v in c.predictions.items()})
    arrays.update({f"soft_prediction_{k}": np.asarray(v, dtype=float) for k, v in c.soft_predictions.items()})
    return arrays


_PAD_VALUES = {"site_roles": -1}


def _concatenate(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates per-batch arrays along the candidate axis, padding the atom axis to the largest N."""
    keys = list(batches[0])
    for i, arrays in enumerate(batches):
        if list(arrays) != keys:
            raise StructureError(f"batch {i} has arrays {sorted(arrays)}, batch 0 has {sorted(keys)}")
    n = max(a["mask"].shape[1] for a in batches)
    out = {}
    for key in keys:
        parts = [a[key] for a in batches]
        if parts[0].ndim >= 2 and key != "lattice":
            widths = [[(0, 0), (0, n - p.shape[1])] + [(0, 0)] * (p.ndim - 2) for p in parts]
            parts = [np.pad(p, w, constant_values=_PAD_VALUES.get(key, 0)) for p, w in zip(parts, widths, strict=True)]
        out[key] = np.concatenate(parts)
    return out


def _concatenate_history(parts: list[np.ndarray]) -> np.ndarray:
    """[steps, B_total]: batch histories side by side, NaN-padded to the longest."""
    steps = max(p.shape[0] for p in parts)
    return np.concatenate([np.pad(p, ((0, steps - p.shape[0]), (0, 0)), constant_values=np.nan) for p in parts], axis=1)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)

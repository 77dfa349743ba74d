"""Sanity check of the embedded CGCNN models on public Materials Project data (matminer 0.2.6 datasets).

* band-gap model vs the PBE band gaps of the MP dielectric set (Petousis et al., 1,056 structures);
* formation-energy-per-atom model vs MP formation energies of FLLA-2015 (Faber et al., 3,938 structures).

Both sets overlap with the models' training data (MP 2017), so the numbers are a plausibility check, not a
benchmark. Usage (from the repository root):

    python scripts/cgcnn_sanity_mae.py [--data ../shared/data/datasets/matminer_0.2.6] [--limit N]

Prints MAE, median absolute error and the number of structures per task (float32, default image box grown to
what each cell needs).
"""

import argparse
import ast
import gzip
import io
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from pymatgen.core import Structure

from jaxcrystal import CrystalBatch, geometry, load_predictor
from jaxcrystal.models.cgcnn import RADIUS

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "datasets" / "matminer_0.2.6"


def read_csv(path: Path) -> pd.DataFrame:
    with gzip.open(path, "rt") as handle:
        return pd.read_csv(io.StringIO(handle.read()), comment="#")


def dielectric(data: Path):
    frame = read_csv(data / "dielectric_constant.csv.gz")
    structures = [Structure.from_str(poscar, fmt="poscar") for poscar in frame["poscar"]]
    return structures, frame["band_gap"].to_numpy(float)


def flla(data: Path):
    frame = read_csv(data / "flla_2015.csv.gz")
    structures = [Structure.from_dict(ast.literal_eval(text)) for text in frame["structure"]]
    return structures, frame["formation_energy_per_atom"].to_numpy(float)


def predict(name: str, structures, batch_size: int = 64) -> np.ndarray:
    """Predictions for a list of structures, batched by (padded size bucket, image box) to limit recompiles."""
    out = np.empty(len(structures))
    keys = []
    for s in structures:
        box = max(geometry.required_image_box(s.lattice.matrix, RADIUS))
        keys.append((int(2 ** np.ceil(np.log2(max(len(s), 4)))), max(box, 3)))
    predictors = {}
    for key in sorted(set(keys)):
        if key[1] not in predictors:
            predictors[key[1]] = load_predictor("cgcnn", name, image_box=key[1])
        pred = predictors[key[1]]
        apply = jax.jit(pred.apply)
        members = [i for i, k in enumerate(keys) if k == key]
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            chunk = chunk + chunk[:1] * (batch_size - len(chunk))  # fixed batch shape: repeat the first one
            batch = CrystalBatch.from_structures([structures[i] for i in chunk], pad_to=key[0])
            values = np.asarray(apply(pred.params, *batch))
            out[chunk] = values
    return out


def report(task: str, name: str, structures, target, limit):
    if limit:
        structures, target = structures[:limit], target[:limit]
    start = time.perf_counter()
    prediction = predict(name, structures)
    error = np.abs(prediction - target)
    print(
        f"{task}: model {name}, n = {len(target)}, MAE = {error.mean():.3f}, median AE = {np.median(error):.3f} "
        f"({time.perf_counter() - start:.0f} s)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the matminer 0.2.6 CSVs")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N structures of each set")
    args = parser.parse_args()
    report("MP dielectric set, PBE band gap (eV)", "band-gap", *dielectric(args.data), args.limit)
    report("FLLA-2015, formation energy (eV/atom)", "formation-energy-per-atom", *flla(args.data), args.limit)


if __name__ == "__main__":
    main()

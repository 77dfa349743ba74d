"""Rebuilds `jaxcrystal/data/mp_templates.json`: small charge-neutral Materials Project structures.

SMOACS draws 256 neutral structures with at most 10 atoms from the MEGNet MP-2018 set, which cannot be obtained
here. This script takes the same kind of set from the Materials Project data shipped in the PyPI sdist
`matminer==0.2.6` (FLLA 2015, dielectric and elastic-tensor CSVs): structures with at most 10 sites, every element
in H..Rn, charge-neutral by the paper's "super common" oxidation-state check, with at least one neutral oxidation
pattern, unique by material id; 256 of them drawn with a fixed seed.

    pip download --no-deps --no-binary :all: matminer==0.2.6 -d /tmp/mm
    python scripts/build_mp_templates.py /tmp/mm/matminer-0.2.6.tar.gz

Materials Project data: CC BY 4.0 (attribution in the output file); matminer: BSD-style licence (LBNL).
"""

import argparse
import ast
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Structure
from pymatgen.io.vasp import Poscar

from jaxcrystal import chemistry

MEMBERS = {
    "flla_2015": "matminer-0.2.6/matminer/datasets/flla_2015.csv",
    "dielectric_constant": "matminer-0.2.6/matminer/datasets/dielectric_constant.csv",
    "elastic_tensor": "matminer-0.2.6/matminer/datasets/elastic_tensor.csv",
}
SDIST_SHA256 = "5122e34dd652a2a235d04dc15553bb090cbb66db6c9083f560207e06b4bd169c"
MAX_SITES = 10
NUM_TEMPLATES = 256
SEED = 42
OUT = Path(__file__).resolve().parents[1] / "jaxcrystal" / "data" / "mp_templates.json"


def _structure(row, name: str) -> Structure:
    if name == "flla_2015":
        return Structure.from_dict(ast.literal_eval(row["structure"]))
    return Poscar.from_str(row["poscar"]).structure


def candidates(sdist: Path):
    with tarfile.open(sdist) as tar:
        for name, member in MEMBERS.items():
            raw = tar.extractfile(member).read()
            frame = pd.read_csv(io.BytesIO(raw), skiprows=1)
            yield name, hashlib.sha256(raw).hexdigest(), frame


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="matminer-0.2.6.tar.gz from PyPI")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    digest = hashlib.sha256(args.sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{args.sdist}: sha256 {digest} is not the matminer 0.2.6 sdist ({SDIST_SHA256})")
    kept, files = {}, {}
    for name, file_digest, frame in candidates(args.sdist):
        files[MEMBERS[name]] = file_digest
        for _, row in frame.iterrows():
            mp_id = row["material_id"]
            if mp_id in kept or int(row["nsites"]) > MAX_SITES:
                continue
            structure = _structure(row, name)
            symbols = [site.specie.symbol for site in structure]
            if any(site.specie.Z > 86 for site in structure) or not chemistry.is_neutral(symbols):
                continue
            if len(chemistry.neutral_patterns(symbols, max_patterns=1)) == 0:
                continue
            kept[mp_id] = (name, structure)
    ids = sorted(kept)
    chosen = sorted(np.random.default_rng(SEED).choice(len(ids), size=NUM_TEMPLATES, replace=False))
    records = [
        {"material_id": ids[i], "source": kept[ids[i]][0], "structure": kept[ids[i]][1].as_dict()} for i in chosen
    ]
    payload = {
        "description": (
            f"{NUM_TEMPLATES} charge-neutral Materials Project structures with <= {MAX_SITES} sites, drawn "
            f"(seed {SEED}) from {len(ids)} eligible ones; built by scripts/build_mp_templates.py"
        ),
        "source": {"package": "matminer==0.2.6 (PyPI sdist)", "sha256": SDIST_SHA256, "files": files},
        "licence": (
            "Materials Project data, CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/): A. Jain et al., "
            "APL Materials 1, 011002 (2013); datasets of Faber et al. 2015 (FLLA), Petousis et al. 2017 "
            "(dielectric) and de Jong et al. 2015 (elastic), as redistributed by matminer (BSD-style, LBNL)."
        ),
        "structures": records,
    }
    args.out.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
    print(f"wrote {len(records)} of {len(ids)} eligible structures to {args.out}")


if __name__ == "__main__":
    main()

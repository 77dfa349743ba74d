"""Rebuild `jaxcrystal/data/oxidation_states.json` from the pymatgen and SMACT data files.

jaxcrystal reads only the derived JSON at run time; this script is run once, by hand, when the tables are to be
regenerated. It reads the data files directly (not through the packages' Python APIs), so any version of either
package can be used, installed or as a downloaded wheel:

    pip download --no-deps pymatgen==2023.10.11 smact==2.5.5 -d /tmp/chem_src
    python scripts/build_oxidation_tables.py \
        --pymatgen /tmp/chem_src/pymatgen-2023.10.11-*.whl --smact /tmp/chem_src/SMACT-2.5.5-*.whl

These are the versions SMOACS pins (pymatgen ==2023.10.11, smact ==2.5.5) and the committed JSON is built from
them, so our "super common" tables reproduce the SMOACS masks exactly. Without arguments the installed packages
are used. The script prints, for information, where the tables it read differ from the installed pymatgen's.

Extracted per element (H..Cf, Z = 1..98):
- "icsd", "pymatgen", "common": pymatgen's "ICSD oxidation states", "Oxidation states" and
  "Common oxidation states";
- "smact": SMACT's default oxidation-state list (`smact/data/oxidation_states.txt`);
- "ionic_radii": pymatgen's "Ionic radii" {state: Å} (`Element.ionic_radii`, SMOACS's radius table);
- "shannon": pymatgen's Shannon (1976) table {state: {CN: {spin: [crystal radius, ionic radius]}}} in Å.
"""

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxcrystal.elements import SYMBOLS  # noqa: E402

PYMATGEN_MEMBERS = ("pymatgen/core/periodic_table.json", "pymatgen/core/periodic_table.json.gz")
SMACT_MEMBER = "smact/data/oxidation_states.txt"
PYMATGEN_DISTS = ("pymatgen-core", "pymatgen")  # newer releases ship the data in pymatgen-core


def _metadata(text: str) -> dict:
    headers = HeaderParser().parsestr(text)
    licence = headers.get("License-Expression") or headers.get("License") or ""
    return {"name": headers["Name"], "version": headers["Version"], "license": licence.splitlines()[0]}


def _from_wheel(wheel: Path, members: tuple[str, ...]) -> tuple[dict, str, bytes]:
    """(package metadata, member path, member bytes) of the first of `members` present in a wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        member = next((m for m in members if m in names), None)
        if member is None:
            raise SystemExit(f"{wheel}: none of {members} in the wheel")
        return _metadata(archive.read(meta).decode()), member, archive.read(member)


def _from_installed(distributions: tuple[str, ...], members: tuple[str, ...]) -> tuple[dict, str, bytes]:
    """Same as `_from_wheel` for the installed distribution (first of `distributions`) that owns the member."""
    for name in distributions:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        owned = {str(f) for f in dist.files or ()}
        for member in members:
            if member in owned:
                return (
                    _metadata(dist.read_text("METADATA")),
                    member,
                    Path(dist.locate_file(member)).read_bytes(),
                )
    raise SystemExit(f"no installed {' / '.join(distributions)} holds {members}: pass the path of a downloaded wheel")


def _source(meta: dict, member: str, raw: bytes) -> dict:
    return {**meta, "file": member, "sha256": hashlib.sha256(raw).hexdigest()}


def _pymatgen_table(member: str, raw: bytes) -> dict:
    return json.loads(gzip.decompress(raw) if member.endswith(".gz") else raw)


def _smact_table(raw: bytes) -> dict[str, list[int]]:
    """SMACT's `oxidation_states.txt`: one line per element, "Fe -2 -1 +1 +2 ...", '#' starts a comment."""
    table = {}
    for line in raw.decode().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            table[fields[0]] = sorted(int(v) for v in fields[1:])
    return table


def _states(values) -> list[int]:
    return sorted({int(v) for v in values or ()})


def _shannon(entry: dict | None) -> dict:
    """{state: {CN: {spin: [crystal, ionic]}}}, keys kept as pymatgen spells them ('' = no spin distinction)."""
    out = {}
    for state, by_cn in (entry or {}).items():
        if not state.lstrip("-").isdigit():  # drop malformed keys (newer pymatgen files have a '' state for Eu)
            continue
        out[str(int(state))] = {
            cn: {spin: [r["crystal_radius"], r["ionic_radius"]] for spin, r in sorted(by_spin.items())}
            for cn, by_spin in sorted(by_cn.items())
        }
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def build(pymatgen_src: tuple[dict, str, bytes], smact_src: tuple[dict, str, bytes]) -> dict:
    periodic = _pymatgen_table(pymatgen_src[1], pymatgen_src[2])
    smact = _smact_table(smact_src[2])
    elements = {}
    for sym in SYMBOLS:
        entry = periodic[sym]
        radii = entry.get("Ionic radii") or {}
        elements[sym] = {
            "icsd": _states(entry.get("ICSD oxidation states")),
            "pymatgen": _states(entry.get("Oxidation states")),
            "common": _states(entry.get("Common oxidation states")),
            "smact": _states(smact.get(sym)),
            "ionic_radii": {str(int(k)): v for k, v in sorted(radii.items(), key=lambda kv: int(kv[0]))},
            "shannon": _shannon(entry.get("Shannon radii")),
        }
    return {
        "format": 1,
        "description": (
            "Oxidation-state sets and ionic radii for Z = 1..98, extracted from pymatgen's periodic_table.json "
            "and SMACT's default oxidation_states.txt by scripts/build_oxidation_tables.py. Radii in angstrom."
        ),
        "sources": {
            "pymatgen": _source(*pymatgen_src),
            "smact": _source(*smact_src),
        },
        "elements": elements,
    }


def _report_drift(table: dict) -> None:
    """Print where the installed pymatgen's tables differ from the ones just extracted (information only)."""
    try:
        installed = _pymatgen_table(*_from_installed(PYMATGEN_DISTS, PYMATGEN_MEMBERS)[1:])
    except SystemExit:
        return
    fields = {
        "icsd": "ICSD oxidation states",
        "pymatgen": "Oxidation states",
        "common": "Common oxidation states",
    }
    for sym, ours in table["elements"].items():
        theirs = installed[sym]
        for key, name in fields.items():
            if ours[key] != _states(theirs.get(name)):
                print(f"  installed pymatgen differs: {sym} {name}: {ours[key]} -> {_states(theirs.get(name))}")
        radii = {str(int(k)): v for k, v in (theirs.get("Ionic radii") or {}).items()}
        if set(radii) != set(ours["ionic_radii"]):
            print(f"  installed pymatgen differs: {sym} Ionic radii: {ours['ionic_radii']} -> {radii}")


def _dumps(table: dict) -> str:
    """JSON text with one line per element, so that a rebuild shows up as a readable per-element diff."""
    head = {k: v for k, v in table.items() if k != "elements"}
    lines = json.dumps(head, indent=1)[:-2].splitlines()
    rows = [f"  {json.dumps(sym)}: {json.dumps(entry)}" for sym, entry in table["elements"].items()]
    return "\n".join([*lines[:-1], lines[-1] + ",", ' "elements": {', ",\n".join(rows), " }", "}"]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pymatgen", type=Path, help="pymatgen wheel (default: the installed pymatgen)")
    parser.add_argument("--smact", type=Path, help="smact wheel (default: the installed smact)")
    parser.add_argument("--out", type=Path, default=REPO / "jaxcrystal" / "data" / "oxidation_states.json")
    args = parser.parse_args(argv)
    pmg = (
        _from_wheel(args.pymatgen, PYMATGEN_MEMBERS)
        if args.pymatgen
        else _from_installed(PYMATGEN_DISTS, PYMATGEN_MEMBERS)
    )
    smact = _from_wheel(args.smact, (SMACT_MEMBER,)) if args.smact else _from_installed(("smact",), (SMACT_MEMBER,))
    table = build(pmg, smact)
    args.out.write_text(_dumps(table))
    for name, src in table["sources"].items():
        print(f"{name}: {src['name']} {src['version']} ({src['license']}) {src['file']} sha256={src['sha256']}")
    print(f"wrote {args.out}")
    _report_drift(table)


if __name__ == "__main__":
    main()

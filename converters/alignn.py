"""ALIGNN checkpoints (figshare zips, folders, ALIGNN-FF) -> jaxcrystal weights (`.npz`), without torch or DGL.

Sources accepted by `read_checkpoint`:
  * a figshare zip: members are scanned in order; one whose name contains both "checkpoint_" and "pt", or
    contains "best_model.pt", becomes the checkpoint (the last match wins, as in alignn's `get_figshare_model`)
    and one containing "config.json" the config. The checkpoint may be an ignite dict `{"model": state_dict,
    "optimizer": ..., ...}` (old layout, `checkpoint_*.pt`) or a bare state_dict (newer `best_model.pt`).
    `member` restricts the scan to one folder of the archive, e.g. `alignn/ff/alignnff_wt10` inside the PyPI
    wheel `alignn-2023.7.1-py2.py3-none-any.whl` (the ALIGNN-FF checkpoint).
  * a folder with `config.json` and `best_model.pt` or `checkpoint_*.pt` (same rule over the sorted names).
The pickles are read by `converters.torch_reader` (restricted unpickler: nothing is executed; unknown globals
such as a pickled learning-rate scheduler become inert objects and are ignored).

Config: `config.json["model"]` gives the architecture (`name` "alignn" -> BatchNorm property model, or
"alignn_atomwise" -> ALIGNN-FF with LayerNorm), with alignn's defaults for missing keys and an error for unknown
keys (alignn's pydantic config forbids them). The graph settings sit at the top level: `neighbor_strategy`
must be "k-nearest", `max_neighbors` 12 and `atom_features` "cgcnn"; `use_canonize` (default True) is kept.

Name mapping (torch -> Flax): a numeric path component joins the previous one with "_"
(`alignn_layers.0.node_update.src_gate` -> `alignn_layers_0/node_update/src_gate`, `edge_embedding.1.layer.0`
-> `edge_embedding_1/layer_0`); Linear `weight` [out, in] -> `kernel` [in, out]; norm `weight`/`bias` ->
`scale`/`bias`; BatchNorm `running_mean`/`running_var` -> batch_stats `mean`/`var` (`num_batches_tracked` is
dropped); RBF `centers` -> params `centers` plus `gamma` = 1 / mean(diff(centers)) (`rbf_gamma`, float64) as alignn
computes it; a 0-d `fc.bias` (link "log") becomes shape [1]. Every expected key must be present with its
shape, and no other key may remain.

Converted weights: one `.npz` (`params/...`, `batch_stats/...` under '/'-joined Flax paths, plus
`__metadata__`, a JSON string: format tag, model config, graph settings, source name and sha256), written
deterministically. CLI:

    python -m converters.alignn SRC OUT.npz [--member FOLDER]
"""

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from converters.torch_reader import read_torch_checkpoint
from jaxcrystal.errors import CheckpointError, ConfigError
from jaxcrystal.weights_file import read_weights_file, weights_bytes

FORMAT = "jaxcrystal-alignn-v1"

_COMMON = {
    "name": None,
    "alignn_layers": 4,
    "gcn_layers": 4,
    "atom_input_features": 92,
    "edge_input_features": 80,
    "triplet_input_features": 40,
    "embedding_features": 64,
    "hidden_features": 256,
    "output_features": 1,
    "link": "identity",
    "zero_inflated": False,
    "classification": False,
    "extra_features": 0,
}
DEFAULTS = {
    "alignn": {**_COMMON, "num_classes": 2},
    "alignn_atomwise": {
        **_COMMON,
        "alignn_layers": 2,
        "gcn_layers": 2,
        "atom_input_features": 1,
        "hidden_features": 64,
        "grad_multiplier": -1,
        "calculate_gradient": True,
        "atomwise_output_features": 0,
        "graphwise_weight": 1.0,
        "gradwise_weight": 1.0,
        "stresswise_weight": 0.0,
        "atomwise_weight": 0.0,
        "force_mult_natoms": False,
        "energy_mult_natoms": True,
        "include_pos_deriv": False,
        "use_cutoff_function": False,
        "inner_cutoff": 3.0,
        "stress_multiplier": 1.0,
        "add_reverse_forces": True,
        "lg_on_fly": True,
        "batch_stress": True,
        "multiply_cutoff": False,
        "use_penalty": True,
        "exponent": 5,
        "penalty_factor": 0.1,
        "penalty_threshold": 1.0,
        "additional_output_features": 0,
        "additional_output_weight": 0.0,
    },
}
# Known figshare / wheel model names -> (target, units).
TARGETS = {
    "mp_e_form_alignn": ("formation energy per atom (MP)", "eV/atom"),
    "mp_gappbe_alignn": ("band gap (MP PBE)", "eV"),
    "jv_supercon_tc_alignn": ("superconducting Tc (JARVIS)", "K"),
    "jv_ehull_alignn": ("energy above hull (JARVIS-DFT)", "eV/atom"),
    "jv_bulk_modulus_kv_alignn": ("Voigt bulk modulus (JARVIS-DFT)", "GPa"),
    "alignnff_wt10": ("total energy per atom (ALIGNN-FF, JARVIS OptB88vdW)", "eV/atom"),
}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_checkpoint(name: str) -> bool:
    return ("checkpoint_" in name and "pt" in name) or "best_model.pt" in name


def _select(names, where):
    """(checkpoint name, config name) by alignn's rule: the last matching name wins."""
    ckpt = cfg = None
    for name in names:
        if _is_checkpoint(name):
            ckpt = name
        if "config.json" in name:
            cfg = name
    if ckpt is None or cfg is None:
        missing = "checkpoint (checkpoint_*.pt / best_model.pt)" if ckpt is None else "config.json"
        raise CheckpointError(f"{where}: no {missing} found")
    return ckpt, cfg


def read_checkpoint(source, member: str | None = None) -> tuple[dict, dict, dict]:
    """Reads an ALIGNN zip or folder (see the module docstring).

    Returns:
      (config.json as a dict, state_dict {key: numpy array}, info {"source", "checkpoint", "sha256", "name"}).
    """
    path = Path(source)
    where = str(path)
    if path.is_dir():
        base = path / member if member else path
        names = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        ckpt, cfg = _select(names, str(base))
        blob, cfg_text, model_name = (base / ckpt).read_bytes(), (base / cfg).read_text(), base.name
    elif path.is_file():
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if member:
                    prefix = member.rstrip("/") + "/"
                    names = [n for n in names if n.startswith(prefix)]
                ckpt, cfg = _select(names, where + (f"::{member}" if member else ""))
                blob, cfg_text = archive.read(ckpt), archive.read(cfg).decode()
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"{where}: not a zip archive ({exc})") from exc
        model_name = Path(ckpt).parent.name or path.stem
    else:
        raise CheckpointError(f"{where}: no such file or folder")
    try:
        config = json.loads(cfg_text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}::{cfg}: invalid JSON ({exc})") from exc
    obj = read_torch_checkpoint(blob, name=f"{where}::{ckpt}")
    state = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{where}::{ckpt}: neither a state_dict nor a dict with a 'model' state_dict")
    info = {"source": path.name, "checkpoint": ckpt, "sha256": sha256_bytes(blob), "name": model_name}
    return config, dict(state), info


def model_config(config: dict, where: str = "config.json") -> tuple[dict, dict]:
    """Validates `config.json` -> (model hyper-parameters for `jaxcrystal.models.alignn.ALIGNN`, graph settings)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConfigError(f"{where}: no 'model' section")
    model = config["model"]
    kind = model.get("name")
    if kind not in DEFAULTS:
        raise ConfigError(f"{where}: model name {kind!r} is not 'alignn' or 'alignn_atomwise'")
    unknown = sorted(set(model) - set(DEFAULTS[kind]))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in 'model' (alignn forbids extra keys)")
    cfg = {**DEFAULTS[kind], **model}
    checks = [
        (cfg["classification"], "classification models are not supported"),
        (cfg["extra_features"] != 0, "extra_features is not supported"),
        (cfg["atom_input_features"] != 92, "atom_input_features must be 92 (CGCNN features)"),
        (cfg["link"] not in ("identity", "log", "logit"), f"unknown link {cfg['link']!r}"),
        (kind == "alignn_atomwise" and cfg.get("use_cutoff_function"), "use_cutoff_function is not supported"),
    ]
    for bad, message in checks:
        if bad:
            raise ConfigError(f"{where}: {message}")
    graph = {
        "neighbor_strategy": config.get("neighbor_strategy", "k-nearest"),
        "max_neighbors": config.get("max_neighbors", 12),
        "atom_features": config.get("atom_features", "cgcnn"),
        "cutoff": config.get("cutoff", 8.0),
        "use_canonize": bool(config.get("use_canonize", True)),
    }
    expected = {"neighbor_strategy": "k-nearest", "max_neighbors": 12, "atom_features": "cgcnn"}
    for key, value in expected.items():
        if graph[key] != value:
            raise ConfigError(f"{where}: {key} = {graph[key]!r} is not supported (expected {value!r})")
    hyper = {
        "alignn_layers": int(cfg["alignn_layers"]),
        "gcn_layers": int(cfg["gcn_layers"]),
        "edge_input_features": int(cfg["edge_input_features"]),
        "triplet_input_features": int(cfg["triplet_input_features"]),
        "embedding_features": int(cfg["embedding_features"]),
        "hidden_features": int(cfg["hidden_features"]),
        "output_features": int(cfg["output_features"]),
        # ALIGNNAtomWise returns fc(mean) without a link
        "link": cfg["link"] if kind == "alignn" else "identity",
        "norm": "batch" if kind == "alignn" else "layer",
    }
    return hyper, graph


def _expected(hyper: dict) -> dict:
    """torch key -> shape for the configuration (norm weights/bias, and running stats for BatchNorm)."""
    h, emb, batch = hyper["hidden_features"], hyper["embedding_features"], hyper["norm"] == "batch"
    shapes: dict = {}

    def linear(prefix, n_in, n_out):
        shapes[f"{prefix}.weight"] = (n_out, n_in)
        shapes[f"{prefix}.bias"] = (n_out,)

    def norm(prefix, n):
        shapes[f"{prefix}.weight"] = shapes[f"{prefix}.bias"] = (n,)
        if batch:
            shapes[f"{prefix}.running_mean"] = shapes[f"{prefix}.running_var"] = (n,)

    def mlp(prefix, n_in, n_out):
        linear(f"{prefix}.layer.0", n_in, n_out)
        norm(f"{prefix}.layer.1", n_out)

    def eggc(prefix):
        for name in ("src_gate", "dst_gate", "edge_gate", "src_update", "dst_update"):
            linear(f"{prefix}.{name}", h, h)
        norm(f"{prefix}.bn_edges", h)
        norm(f"{prefix}.bn_nodes", h)

    mlp("atom_embedding", 92, h)
    shapes["edge_embedding.0.centers"] = (hyper["edge_input_features"],)
    mlp("edge_embedding.1", hyper["edge_input_features"], emb)
    mlp("edge_embedding.2", emb, h)
    shapes["angle_embedding.0.centers"] = (hyper["triplet_input_features"],)
    mlp("angle_embedding.1", hyper["triplet_input_features"], emb)
    mlp("angle_embedding.2", emb, h)
    for i in range(hyper["alignn_layers"]):
        eggc(f"alignn_layers.{i}.node_update")
        eggc(f"alignn_layers.{i}.edge_update")
    for i in range(hyper["gcn_layers"]):
        eggc(f"gcn_layers.{i}")
    linear("fc", h, hyper["output_features"])
    return shapes


def _flax_path(torch_key: str) -> tuple[str, list[str], str]:
    """torch key -> (collection, module path, leaf)."""
    *modules, leaf = torch_key.split(".")
    path: list[str] = []
    for part in modules:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    if leaf == "running_mean":
        return "batch_stats", path, "mean"
    if leaf == "running_var":
        return "batch_stats", path, "var"
    return "params", path, leaf


def rbf_gamma(centers: np.ndarray) -> np.float64:
    """alignn's γ = 1 / mean(diff(centers)): the mean in float32 over the float32 buffer, the reciprocal as a
    Python float (float64; 9.874999751686126 and 19.500001162290644 for the default centres). Stored in
    float64; a float32 model rounds it (to 9.875 and 19.500002), as torch does with a float32 tensor."""
    spacing = np.mean(np.diff(np.asarray(centers, dtype=np.float32)), dtype=np.float32)
    return np.float64(1.0 / float(spacing))


def convert_state_dict(state: dict, hyper: dict, where: str = "checkpoint") -> dict:
    """state_dict (numpy) -> Flax variables {"params": ..., "batch_stats": ...} (float32), checked strictly."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if hyper["link"] == "log" and "fc.bias" in state and state["fc.bias"].shape == ():
        state["fc.bias"] = state["fc.bias"].reshape(1)
    shapes = _expected(hyper)
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        raise CheckpointError(
            f"{where}: state_dict does not match the config: missing {missing[:5]}, "
            f"unexpected {extra[:5]} ({len(missing)} / {len(extra)} keys)"
        )
    variables: dict = {"params": {}, "batch_stats": {}} if hyper["norm"] == "batch" else {"params": {}}
    for key, shape in shapes.items():
        value = np.asarray(state[key])
        if value.shape != shape:
            raise CheckpointError(f"{where}: {key} has shape {value.shape}, expected {shape}")
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{where}: {key} has dtype {value.dtype}, expected floating point")
        value = value.astype(np.float32)  # gamma below stays float64
        collection, path, leaf = _flax_path(key)
        if leaf == "weight":
            leaf = "kernel" if value.ndim == 2 else "scale"
            value = value.T if value.ndim == 2 else value
        node = variables[collection]
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(value)
        if leaf == "centers":
            node["gamma"] = np.asarray(rbf_gamma(value))
    return variables


def convert(source, member: str | None = None) -> tuple[dict, dict]:
    """Reads and converts an ALIGNN checkpoint -> (Flax variables of numpy arrays, metadata dict)."""
    config, state, info = read_checkpoint(source, member)
    where = f"{info['source']}::{info['checkpoint']}"
    hyper, graph = model_config(config, where)
    variables = convert_state_dict(state, hyper, where)
    target, units = TARGETS.get(info["name"], ("unknown", ""))
    metadata = {
        "format": FORMAT,
        "kind": "alignn",
        "name": info["name"],
        "target": target,
        "units": units,
        "model": config["model"]["name"],
        "hyperparameters": hyper,
        "graph": graph,
        "source_file": info["source"],
        "source_checkpoint": info["checkpoint"],
        "source_sha256": info["sha256"],
    }
    return variables, metadata


def read_weights(path) -> tuple[dict, dict]:
    """Reads converted ALIGNN weights -> (nested variables of numpy arrays, metadata)."""
    return read_weights_file(path, FORMAT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.alignn", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="figshare zip, wheel, or folder with config.json + checkpoint")
    parser.add_argument("out", help="output .npz")
    parser.add_argument("--member", default=None, help="folder inside the archive (e.g. alignn/ff/alignnff_wt10)")
    args = parser.parse_args(argv)
    variables, metadata = convert(args.source, args.member)
    Path(args.out).write_bytes(weights_bytes(variables, metadata))
    print(
        f"{args.out}: {metadata['model']} {metadata['name']} ({metadata['hyperparameters']}) from "
        f"{metadata['source_file']}::{metadata['source_checkpoint']} sha256 {metadata['source_sha256']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

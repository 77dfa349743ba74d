"""Crystalformer Lightning `.ckpt` + `default.json` → jaxcrystal parameters (no torch needed).

The SWA copy (`swa_model.module.*`) is used, as upstream's demo.py and SMOACS do, and the target normalization
is folded into the last head layer (W ← W·std, b ← b·std + mean, at run time in the compute dtype), so the
model outputs physical units.

Converted weights are one `.npz`: the parameters under their '/'-joined Flax paths, plus `__metadata__`, a JSON
string (format tag, architecture config, target, units, target mean/std, source file and sha256).

CLI:
    python -m converters.crystalformer CKPT --config default.json --out DIR_OR_FILE
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from converters.torch_reader import read_torch_checkpoint
from jaxcrystal.errors import CheckpointError, ConfigError
from jaxcrystal.models.crystalformer import CrystalformerConfig
from jaxcrystal.weights_file import read_weights_file, weights_bytes

FORMAT = "jaxcrystal-crystalformer-v1"
SWA_PREFIX = "swa_model.module."
DEFAULT_FILENAME = "crystalformer.npz"

# upstream target name → (our name, units)
TARGETS = {
    "bandgap": ("band-gap", "eV"),
    "e_form": ("formation-energy-per-atom", "eV/atom"),
}


def expected_shapes(config: CrystalformerConfig) -> dict:
    """Upstream state-dict key → shape for this architecture (the SWA-stripped model keys)."""
    d, h, dh, f, k = config.model_dim, config.head_num, config.head_dim, config.ff_dim, config.value_pe_dist_real
    shapes = {"input_embeddings.weight": (d, config.num_species)}
    for layer in range(config.num_layers):
        p = f"encoder.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.gauss_scale": (2,),
                p + "self_attn.atten_scale": (1,),
                p + "self_attn.q_proj_weight": (d, d),
                p + "self_attn.k_proj_weight": (d, d),
                p + "self_attn.v_proj_weight": (d, d),
                p + "self_attn.in_proj_bias": (3 * d,),
                p + "self_attn.lattice_pos_weights": (d,),
                p + "self_attn.pe_dist_proj": (1, h, dh, k),
                p + "self_attn.out_proj.weight": (d, d),
                p + "self_attn.out_proj.bias": (d,),
                p + "linear1.weight": (f, d),
                p + "linear1.bias": (f,),
                p + "linear2.weight": (d, f),
                p + "linear2.bias": (d,),
            }
        )
    widths = (d, *config.embedding_dim, 1)
    for i in range(len(widths) - 1):
        torch_index = 3 * i  # Sequential[Linear, norm (Identity), ReLU, Linear, ...]
        shapes[f"mlp.{torch_index}.weight"] = (widths[i + 1], widths[i])
        shapes[f"mlp.{torch_index}.bias"] = (widths[i + 1],)
    return shapes


def check_state_dict(model_sd: dict, config: CrystalformerConfig, source: str = "checkpoint") -> None:
    """Raises CheckpointError naming the first missing / unexpected / mis-shaped key."""
    expected = expected_shapes(config)
    missing = [key for key in expected if key not in model_sd]
    unexpected = [key for key in model_sd if key not in expected]
    if missing:
        raise CheckpointError(
            f"{source}: key {missing[0]!r} (shape {expected[missing[0]]}) required by the config "
            f"(num_layers={config.num_layers}, model_dim={config.model_dim}) is missing"
            + (f"; {len(missing)} keys missing in all" if len(missing) > 1 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: key {unexpected[0]!r} with shape {tuple(np.shape(model_sd[unexpected[0]]))} is not in the "
            f"config's architecture (num_layers={config.num_layers}); {len(unexpected)} unexpected keys in all"
        )
    for key, shape in expected.items():
        if tuple(np.shape(model_sd[key])) != shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(np.shape(model_sd[key]))}, the config expects {shape}"
            )


def state_dict_to_params(model_sd: dict, config: CrystalformerConfig, target_mean=0.0, target_std=1.0) -> dict:
    """Upstream model state dict (numpy, SWA prefix stripped) → Flax params (float32).

    The target mean/std go next to the last head layer, which folds them in the compute dtype (float32 exactly as
    upstream's demo.py; float64 when the model runs in float64).
    """
    check_state_dict(model_sd, config)
    sd = {key: np.asarray(value, np.float32) for key, value in model_sd.items()}
    d, h, dh = config.model_dim, config.head_num, config.head_dim
    params = {"embedding": {"kernel": sd["input_embeddings.weight"].T}}
    for layer in range(config.num_layers):
        p = f"encoder.layers.{layer}."
        gauss_scale = sd[p + "self_attn.gauss_scale"]
        if not gauss_scale[0] > 0:
            raise CheckpointError(
                f"key {p}self_attn.gauss_scale = {gauss_scale.tolist()}: the scale must be positive (an "
                "untrained model normalizes with batch statistics, which a fixed predictor cannot reproduce)"
            )
        bias = sd[p + "self_attn.in_proj_bias"].reshape(3, h, dh)
        attn = {
            name: {"kernel": sd[p + f"self_attn.{name}_proj_weight"].T.reshape(d, h, dh), "bias": bias[i]}
            for i, name in enumerate("qkv")
        }
        attn["out"] = {
            "kernel": sd[p + "self_attn.out_proj.weight"].T.reshape(h, dh, d),
            "bias": sd[p + "self_attn.out_proj.bias"],
        }
        attn["sigma_w"] = sd[p + "self_attn.lattice_pos_weights"].reshape(h, dh)
        attn["gauss_scale"] = gauss_scale
        attn["pe_proj"] = sd[p + "self_attn.pe_dist_proj"][0]
        params[f"layer_{layer}_attn"] = attn
        for name, torch_name in (("ffn1", "linear1"), ("ffn2", "linear2")):
            params[f"layer_{layer}_{name}"] = {
                "kernel": sd[p + f"{torch_name}.weight"].T,
                "bias": sd[p + f"{torch_name}.bias"],
            }
    num_head = len(config.embedding_dim) + 1
    for i in range(num_head):
        params[f"head_{i}"] = {"kernel": sd[f"mlp.{3 * i}.weight"].T, "bias": sd[f"mlp.{3 * i}.bias"]}
    last = params[f"head_{num_head - 1}"]
    last["target_std"] = np.asarray(target_std, np.float32).reshape(1)
    last["target_mean"] = np.asarray(target_mean, np.float32).reshape(1)
    return params


def convert_checkpoint(path, config=None) -> tuple[dict, dict]:
    """Reads a Crystalformer Lightning `.ckpt` → (params, metadata).

    Args:
      path: the `.ckpt` file.
      config: upstream hyper-parameters: a path to default.json, a dict, or None to use the checkpoint's own
        `hyper_parameters`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    checkpoint = read_torch_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    sd = checkpoint["state_dict"]
    hparams = checkpoint.get("hyper_parameters") or {}
    if config is None:
        if not hparams:
            raise ConfigError(f"{path}: the checkpoint stores no hyper_parameters; pass config=default.json")
        config_dict, config_source = dict(hparams), f"{path.name}:hyper_parameters"
    elif isinstance(config, dict):
        config_dict, config_source = dict(config), "config dict"
    else:
        config_path = Path(config)
        try:
            config_dict = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{config_path}: cannot read the Crystalformer config JSON ({err})") from err
        config_source = str(config_path)
    arch = CrystalformerConfig.from_hparams(config_dict)

    model_sd = {key[len(SWA_PREFIX) :]: value for key, value in sd.items() if key.startswith(SWA_PREFIX)}
    if not model_sd:
        raise CheckpointError(
            f"{path}: not a Crystalformer checkpoint: no '{SWA_PREFIX}*' keys (the SWA weights upstream loads)"
        )
    check_state_dict(model_sd, arch, source=f"{path.name} (config {config_source})")
    for key in ("target_mean", "target_std"):
        if key not in sd:
            raise CheckpointError(f"{path}: state_dict has no {key!r}")
    mean = np.asarray(sd["target_mean"], np.float32).reshape(-1)
    std = np.asarray(sd["target_std"], np.float32).reshape(-1)
    if mean.shape != (1,) or std.shape != (1,):
        raise CheckpointError(f"{path}: target_mean {mean.shape} / target_std {std.shape}: expected one target")
    params = state_dict_to_params(model_sd, arch, mean, std)

    target = hparams.get("targets", config_dict.get("targets", "bandgap"))
    target = target if isinstance(target, str) else target[0]
    name, units = TARGETS.get(target, (target, "target units"))
    metadata = {
        "format": FORMAT,
        "config": arch.to_dict(),
        "target": target,
        "name": name,
        "units": units,
        "target_mean": float(mean[0]),
        "target_std": float(std[0]),
        "source": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return params, metadata


def save_converted(params: dict, metadata: dict, out) -> Path:
    """Writes converted weights; `out` is a `.npz` file or a directory (then `crystalformer.npz` inside)."""
    out = Path(out)
    if out.suffix != ".npz":
        out.mkdir(parents=True, exist_ok=True)
        out = out / DEFAULT_FILENAME
    out.write_bytes(weights_bytes(params, metadata))
    return out


def load_converted(path) -> tuple[dict, dict]:
    """Reads `save_converted` output → (params, metadata)."""
    return read_weights_file(Path(path), FORMAT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.crystalformer",
        description="Convert a Crystalformer Lightning .ckpt (SWA weights, target fold) to jaxcrystal weights.",
    )
    parser.add_argument("checkpoint", help="upstream .ckpt file")
    parser.add_argument("--config", help="upstream default.json (default: the checkpoint's hyper_parameters)")
    parser.add_argument("--out", required=True, help="output .npz file or directory")
    args = parser.parse_args(argv)
    try:
        params, metadata = convert_checkpoint(args.checkpoint, args.config)
        out = save_converted(params, metadata, args.out)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = metadata["config"]
    print(f"wrote {out}: {config['num_layers']} layers, target {metadata['target']} ({metadata['units']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

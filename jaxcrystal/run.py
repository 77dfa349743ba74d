"""`python -m jaxcrystal.run`: the SMOACS optimizer from the command line.

Example (the default run: 128 perovskite candidates, band gap 2.0 eV ± 0.2 with low formation energy, embedded
CGCNN models):

    python -m jaxcrystal.run --task bg_and_eform --structure perovskite --target 2.0 --out results/perov
"""

import argparse
import os
import sys

import jax

from jaxcrystal import presets
from jaxcrystal.errors import ConfigError, JaxCrystalError
from jaxcrystal.smoacs.driver import RunConfig, optimize, resume


def _weights(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        prop, sep, source = item.partition("=")
        if not sep or not prop or not source:
            raise ConfigError(f"--weights expects PROPERTY=PATH (e.g. band_gap=model.ckpt), got {item!r}")
        if prop in out:
            raise ConfigError(f"--weights gives {prop!r} twice")
        out[prop] = source
    return out


def _model_options(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--model-option expects [KIND.]OPTION=VALUE (e.g. chunk_size=64), got {item!r}")
        booleans = {"true": True, "false": False}
        out[key] = int(value) if value.lstrip("-").isdigit() else booleans.get(value.lower(), value)
    return out


def _use_compile_cache(folder: str) -> None:
    """Keeps the compiled XLA programs in `folder` (JAX's persistent compilation cache), so that a later run with the
    same shapes, options and jaxlib loads them instead of compiling again; 'none': compile every time."""
    if folder.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))


def parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="python -m jaxcrystal.run",
        description="Design crystals by gradient descent through property predictors (SMOACS in JAX).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=presets.TASKS, default=d.task, help="objective preset (as SMOACS main.py)")
    p.add_argument("--structure", choices=presets.STRUCTURES, default=d.structure, help="template family")
    p.add_argument("--target", type=float, default=None, help="target of the main property (task default if unset)")
    p.add_argument("--model", choices=presets.MODELS, default=d.model, help="predictor kind for --weights")
    p.add_argument(
        "--weights",
        action="append",
        metavar="PROPERTY=PATH",
        help="checkpoint for a property (band_gap, formation_energy, bulk_modulus, tc, e_hull); repeatable; "
        "PATH may be prefixed with a kind, e.g. tc=alignn:jv_supercon_tc_alignn.zip",
    )
    p.add_argument("--model-config", default=None, help="Crystalformer default.json for --weights checkpoints")
    p.add_argument(
        "--model-option",
        action="append",
        metavar="[KIND.]OPTION=VALUE",
        help="predictor option, repeatable: memory/speed knobs such as chunk_size=64 (Crystalformer query rows per "
        "attention block, ALIGNN crystals per chunk), atom_chunk, crystal_chunk, or Crystalformer's "
        "truncation/gradient; KIND. limits it to one predictor kind",
    )
    p.add_argument("--templates", default=None, help="folder of POSCAR/CIF templates (with --structure none)")
    p.add_argument("--num-candidates", type=int, default=d.num_candidates)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="candidates optimized together")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-margin", type=float, default=None, help="training margin of the main window")
    p.add_argument("--eval-margin", type=float, default=None, help="evaluation margin (paper: 0.2 eV)")
    p.add_argument("--second-coef", type=float, default=None, help="coefficient of the second property term")
    p.add_argument("--second-max", type=float, default=None, help="success needs second < this (E_form: -0.5)")
    p.add_argument("--min-bond", type=float, default=d.min_bond, help="shortest allowed bond, Å")
    p.add_argument("--tolerance-window", type=float, nargs=2, default=d.tolerance_window, metavar=("LOW", "HIGH"))
    p.add_argument("--tolerance-margin", type=float, default=d.tolerance_margin, help="0.1 = SMOACS's |t - 0.9|")
    p.add_argument("--mask-mode", choices=("exact", "smoacs"), default=d.mask_mode)
    p.add_argument("--radius-convention", choices=("shannon", "smoacs"), default=d.radius_convention)
    p.add_argument("--graph-refresh", default=d.graph_refresh, help="'every' step or N sine-scheduled rebuilds")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--init-jitter", type=float, default=d.init_jitter, help="seeded start displacement (0: none)")
    p.add_argument("--devices", type=int, default=None, help="shard candidates over N local devices (default all)")
    p.add_argument("--out", default="results/run", help="result folder")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (its config.json)")
    p.add_argument("--overwrite", action="store_true", help="reuse an existing non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--compile-cache",
        default=os.environ.get("JAXCRYSTAL_COMPILE_CACHE", "~/.cache/jaxcrystal/xla"),
        metavar="DIR",
        help="folder of compiled programs reused by later runs ('none': off; env JAXCRYSTAL_COMPILE_CACHE)",
    )
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _use_compile_cache(args.compile_cache)
    try:
        if args.resume:
            kept = ("resume", "quiet", "compile_cache")
            changed = [a for a in vars(args) if a not in kept and getattr(args, a) != p.get_default(a)]
            if changed:
                flags = ", ".join("--" + a.replace("_", "-") for a in changed)
                raise ConfigError(f"--resume takes every option from {args.resume}/config.json; drop {flags}")
            result = resume(args.resume, progress=not args.quiet)
        else:
            result = run(args)
    except JaxCrystalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.summary.items())
    print(f"results in {result.out}: {summary}")
    return 0


def run(args):
    """`optimize` with the options of parsed command-line arguments."""
    return optimize(
        args.task,
        out=args.out,
        overwrite=args.overwrite,
        progress=not args.quiet,
        structure=args.structure,
        target=args.target,
        model=args.model,
        weights=_weights(args.weights),
        model_config=args.model_config,
        model_options=_model_options(args.model_option),
        templates=args.templates,
        num_candidates=args.num_candidates,
        batch_size=args.batch_size,
        steps=args.steps,
        seed=args.seed,
        train_margin=args.train_margin,
        eval_margin=args.eval_margin,
        second_coef=args.second_coef,
        second_max=args.second_max,
        min_bond=args.min_bond,
        tolerance_window=tuple(args.tolerance_window),
        tolerance_margin=args.tolerance_margin,
        mask_mode=args.mask_mode,
        radius_convention=args.radius_convention,
        graph_refresh=args.graph_refresh,
        checkpoint_every=args.checkpoint_every,
        init_jitter=args.init_jitter,
        devices=args.devices,
    )


if __name__ == "__main__":
    sys.exit(main())

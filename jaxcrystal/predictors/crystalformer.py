"""`load(...)`: a Crystalformer `Predictor` from an upstream `.ckpt` or from converted weights.

    predictor = jaxcrystal.load_predictor("crystalformer", "megnet-bandgap-layer4.ckpt", config="default.json")
    y = predictor(lattice, frac, species, mask)          # [B], eV for band gap, eV/atom for formation energy

Options:
  truncation: "adaptive" (default; upstream's CUDA box, with which the released weights were trained) or
    "fixed" (upstream's pure-PyTorch 5×5×5 box, what SMOACS runs).
  gradient: "exact" (default) or "smoacs" (upstream's autograd, which drops the RBF-basis derivative).
  chunk_size: (crystal, atom) query rows per attention block; None = automatic (≈32 MiB basis per block).
  max_range: static bound (int or 3 ints) of the adaptive box. None: derived on the host from the lattice of each
    call (exact upstream behaviour), which needs a concrete lattice: under `jit`/`scan`, pass an int/tuple, e.g.
    `required_range(lattice_bounds, config)` for the smallest cell you will visit; `range_overflow(lattice,
    max_range, config)` (jittable) flags crystals whose box the bound may cut. The fixed box ignores it.
  basis_window: translations per axis on which the RBF distance basis is evaluated around each atom pair (an int
    or 3 ints; see `jaxcrystal.models.crystalformer`). "auto" (default): `required_window` of each call's lattice,
    or the whole box under `jit`/`scan` (a traced lattice), where a static value is needed: e.g.
    `required_window(start_lattices, config)`, or `cheapest_window` (jaxcrystal.models.crystalformer) for cells of
    mixed sizes; attention blocks with smaller cells take the window with whole axes for their short axes, or the
    whole box. None: the whole box always.
    Results agree with the whole box to rounding (the terms left out are < e⁻⁴⁰).
  softmax_window: the same for the softmax over translations (translations per axis around each pair, an int or 3
    ints): "auto" (default) `required_softmax_window` of each call's lattice, or the whole box under `jit`/`scan`,
    where `cheapest_softmax_window` (jaxcrystal.models.crystalformer) sizes one for cells of mixed sizes; None:
    the whole box always. Results agree with the whole box to rounding (the factors left out are < e⁻⁴⁰).
  smaller_grids: True (default): with adaptive truncation, attention blocks whose crystals' boxes all fit a grid
    smaller than `max_range` ((2, 2, 2), (3, 3, 3), ...) run on it; crystals are sorted into blocks by the grid
    they fit. Same results (the translations left out lie outside every box); it pays when `max_range` is sized
    for the smallest cell a run may reach and most cells are larger. False: always the whole `max_range` grid.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from converters.crystalformer import DEFAULT_FILENAME, convert_checkpoint, load_converted
from jaxcrystal.compile_options import compiler_options
from jaxcrystal.crystal import check_shapes
from jaxcrystal.errors import CheckpointError, ConfigError
from jaxcrystal.models.crystalformer import (
    GRADIENTS,
    TRUNCATIONS,
    Crystalformer,
    CrystalformerConfig,
    _normalize_range,
    _normalize_window,
    range_overflow,
    required_range,
    required_softmax_window,
    required_window,
)
from jaxcrystal.predictors.base import Predictor, check_variables

__all__ = ["load", "range_overflow", "required_range", "required_softmax_window", "required_window"]


def _read_source(source, config):
    path = Path(source)
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"{source}: no such Crystalformer checkpoint or converted-weights file (there are no embedded "
            "Crystalformer weights: give the upstream .ckpt with config=default.json, or converted .npz weights)"
        )
    if path.suffix == ".npz":
        params, metadata = load_converted(path)
        if config is not None:
            convert_config = config if isinstance(config, dict) else None
            if convert_config is None:
                try:
                    convert_config = json.loads(Path(config).read_text())
                except (OSError, json.JSONDecodeError) as err:
                    raise ConfigError(f"{config}: cannot read the Crystalformer config JSON ({err})") from err
            given = CrystalformerConfig.from_hparams(convert_config).to_dict()
            stored = CrystalformerConfig.from_dict(metadata["config"]).to_dict()
            diff = sorted(key for key in given if given[key] != stored[key])
            if diff:
                raise ConfigError(
                    f"{config}: config disagrees with the converted weights {path} on {diff[0]!r} "
                    f"({given[diff[0]]!r} vs {stored[diff[0]]!r})"
                )
        return params, metadata, path
    return (*convert_checkpoint(path, config), path)


def load(
    source,
    config=None,
    truncation: str = "adaptive",
    gradient: str = "exact",
    chunk_size: int | None = None,
    max_range=None,
    basis_window="auto",
    smaller_grids: bool = True,
    softmax_window="auto",
    **options,
) -> Predictor:
    """A Crystalformer predictor (see the module docstring for the options).

    Args:
      source: an upstream Lightning `.ckpt`, converted `.npz` weights, or a directory holding `crystalformer.npz`.
      config: upstream `default.json` (path or dict); for a `.ckpt` it defines the architecture (default: the
        checkpoint's `hyper_parameters`), for converted weights it is only checked against them.
    """
    if options:
        raise ConfigError(f"unknown Crystalformer options {sorted(options)}")
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if gradient not in GRADIENTS:
        raise ConfigError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if not isinstance(smaller_grids, bool):
        raise ConfigError(f"smaller_grids must be True or False, got {smaller_grids!r}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be a positive number of query rows, got {chunk_size}")
    static_range = None if max_range is None else _normalize_range(max_range)
    if basis_window != "auto":
        basis_window = _normalize_window(basis_window)
    if softmax_window != "auto":
        softmax_window = _normalize_window(softmax_window, "softmax_window")
    params, metadata, path = _read_source(source, config)
    arch = CrystalformerConfig.from_dict(metadata["config"])
    check_variables(params, _expected_params(arch), str(path))
    params = jax.tree.map(jnp.asarray, params)
    apply = make_apply(
        arch, truncation, gradient, chunk_size, static_range, basis_window, smaller_grids, softmax_window
    )
    return Predictor(
        kind="crystalformer",
        name=metadata["name"],
        units=metadata["units"],
        params=params,
        apply=apply,
        metadata={
            **metadata,
            "config": arch,
            "path": str(path),
            "truncation": truncation,
            "gradient": gradient,
            "chunk_size": chunk_size,
            "max_range": static_range,
            "basis_window": basis_window,
            "smaller_grids": smaller_grids,
            "softmax_window": softmax_window,
        },
    )


def make_apply(
    config: CrystalformerConfig,
    truncation="adaptive",
    gradient="exact",
    chunk_size=None,
    max_range=None,
    basis_window="auto",
    smaller_grids: bool = True,
    softmax_window="auto",
):
    """The pure function `(params, lattice [B,3,3] Å rows, frac [B,N,3], species [B,N,98], mask [B,N]) -> [B]`.

    The compute dtype is that of the inputs (float64 if any of lattice/frac/species is float64), parameters are
    cast to it. Padding atoms (mask False) do not affect the real atoms or the output.
    """

    def run(params, lattice, frac, species, mask, ranges, window, softmax):
        model = Crystalformer(
            config,
            truncation=truncation,
            gradient=gradient,
            max_range=ranges,
            chunk_size=chunk_size,
            basis_window=window,
            smaller_grids=smaller_grids,
            softmax_window=softmax,
        )
        return model.apply({"params": params}, lattice, frac, species, mask)

    static = ("ranges", "window", "softmax")
    nested = jax.jit(run, static_argnames=static)  # inside the caller's jit: its options apply
    top_level = jax.jit(run, static_argnames=static, compiler_options=compiler_options())

    def apply(params, lattice, frac, species, mask):
        lattice, frac, species = (jnp.asarray(a) for a in (lattice, frac, species))
        mask = jnp.asarray(mask, bool)
        check_shapes(lattice, frac, species, mask, config.num_species)
        dtype = jnp.result_type(lattice, frac, species, jnp.float32)
        lattice, frac, species = (a.astype(dtype) for a in (lattice, frac, species))
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        ranges = None
        if truncation == "adaptive":
            ranges = max_range
            if ranges is None:
                if isinstance(lattice, jax.core.Tracer):
                    raise ConfigError(
                        "Crystalformer truncation='adaptive' under jit/scan needs a static max_range: load(..., "
                        "max_range=R) with R from jaxcrystal.predictors.crystalformer.required_range(lattice, config)"
                    )
                ranges = required_range(lattice, config)
        grid = _normalize_range(ranges if truncation == "adaptive" else config.lattice_range)
        window = _effective_window(basis_window, required_window, lattice, grid, "basis_window")
        softmax = _effective_window(softmax_window, required_softmax_window, lattice, grid, "softmax_window")
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, lattice, frac, species, mask)))
        return (nested if traced else top_level)(params, lattice, frac, species, mask, ranges, window, softmax)

    def _effective_window(window, required, lattice, grid, name):
        """One compilation per effective window: "auto" resolved, clipped to the grid, None if it is the grid."""
        if window == "auto":
            window = None if isinstance(lattice, jax.core.Tracer) else required(lattice, config)
        if window is None:
            return None
        window = tuple(min(w, 2 * r + 1) for w, r in zip(_normalize_window(window, name), grid, strict=True))
        return None if window == tuple(2 * r + 1 for r in grid) else window

    return apply


def _expected_params(config: CrystalformerConfig):
    """Parameter shapes of the architecture (abstract `init` on a one-atom crystal, nothing computed)."""
    model = Crystalformer(config, truncation="fixed")
    lattice, frac = jnp.eye(3)[None] * 4.0, jnp.zeros((1, 1, 3))
    species, mask = jnp.zeros((1, 1, config.num_species)), jnp.ones((1, 1), bool)
    return jax.eval_shape(model.init, jax.random.key(0), lattice, frac, species, mask)["params"]

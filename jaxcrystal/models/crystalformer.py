"""Crystalformer (Taniai et al., ICLR 2024, omron-sinicx) as a Flax module.

Default ("latticeformer") configuration, for any depth and width:

    h⁰ = species · W_emb                                        [B, N, d]; soft species = weighted embedding
    per layer l (no LayerNorm: upstream's t_fixup_init removes them):
        q, k, v = h W_{q,k,v} + b                               [B, N, H, D], D = d / H
        a_ih    = (Σ_c q_ihc w_hc + t_l) · s_l                  gauss_scale = [s_l, t_l], frozen
        ρ_ih    = (1 - lb) · ELU(β a_ih / (1 - lb)) + 1         > lb
        γ_ih    = -ρ_ih / (2 r0²)                               Å⁻²; σ_ih = r0 / √ρ_ih
        o_ih    = agg_v_ih + P_h agg_basis_ih                   (see `periodic_attention`)
        h      += out_proj(o);  h += W₂ ReLU(W₁ h + b₁) + b₂
    y = MLP(mean over real atoms of h^L) · std + mean          [B], the target fold inside the last layer

Truncation of the lattice sum (`truncation`):
  * "adaptive": the per-(atom, head) box of upstream's CUDA kernels, with which the released weights were trained:
    R_d = max(lattice_range, ceil((c·σ_ih + 0.01) / spacing_d)), c = 3.5. Shapes need a static maximum, `max_range`
    (R_1, R_2, R_3); translations outside each (atom, head) box are masked. If the static maximum is smaller than
    a box, that box is silently cut: choose it with `required_range` (host) or check with `range_overflow`.
  * "fixed": upstream's pure-PyTorch path (what SMOACS runs): n ∈ {-R..R}³ with R = lattice_range = 2.
Gradient (`gradient`): "exact", or "smoacs" (upstream's autograd, which omits the derivative of the RBF distance
basis with respect to the distance; only coordinate and lattice gradients differ).
Basis window (`basis_window`): the RBF basis is < e⁻⁴⁰ beyond μ_K + √80·s (16 Å by default), while the box can
reach much further (±2 cells of a 12 Å supercell: 90 % of its triples lie beyond 16 Å). With a static window
(W_1, W_2, W_3) the basis is evaluated only on W_d translations per axis around each (query, key) pair, enough
for cells of `required_window`, and smaller cells take a wider window (whole axes for their short ones) or the
whole box (see `periodic_attention`). None evaluates the basis over the whole box. Softmax window
(`softmax_window`): the factors exp(γ (d² - d²_min)) of images farther than √(D² + 80 r0² / lb) (D: half the
cell's longest diagonal) are < e⁻⁴⁰ for any weights (γ ≤ -lb / (2 r0²)), so the softmax over translations can run
on a window of them too (`required_softmax_window`; 64 of the 125 translations of a 12 Å cell). Smaller grids
(`smaller_grids`, adaptive truncation): blocks whose boxes all fit a smaller grid than `max_range` run on it.

Fractional coordinates are wrapped to [0, 1) first (gradient unchanged); pairs use the unwrapped difference
f_j - f_i of the wrapped coordinates, as upstream does with its (wrapped) Cartesian positions.
"""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcrystal.elements import NUM_ELEMENTS
from jaxcrystal.errors import ConfigError
from jaxcrystal.models.periodic_attention import (
    HIGHEST,
    attention_branches,
    basis_cutoff,
    block_plan,
    crystal_branches,
    inverse_plane_spacings,
    periodic_attention,
    softmax_reach,
    window_size,
    window_sizes,
)

TRUNCATIONS = ("adaptive", "fixed")
GRADIENTS = ("exact", "smoacs")

# Hyper-parameters that must have exactly these values (the only configuration this port implements).
_REQUIRED = {
    "k_dim": 0,
    "v_dim": 0,
    "domain": "real",
    "gauss_state": "q",
    "normalize_gauss": True,
    "t_fixup_init": True,
    "t_activation": "relu",
    "use_cgcnn_feat": False,
    "value_pe_dist_reci": 0,
    "value_pe_wave_real": 0,
    "value_pe_wave_reci": 0,
    "value_pe_headed": True,
    "value_pe_condproj": "no",
    "exclude_self": False,
    "norm_func_mode": 0,
    "pooling": "avr",
    "pre_pooling_op": "no",
    "norm_type": "no",
    "minimum_range": True,
}


@dataclasses.dataclass(frozen=True)
class CrystalformerConfig:
    """The architecture hyper-parameters (hashable; the names follow upstream's default.json).

    Attributes:
      num_layers, model_dim, head_num, ff_dim: encoder depth, width d, heads H, FFN width.
      scale_real: r0 per layer (Å), used cyclically (layer l takes scale_real[l % len]).
      gauss_lb_real: lower bound lb of ρ. elu_beta: β of positive_func "elu=β".
      value_pe_dist_real: K, the number of RBF centres μ_k = k r_max / K, k = 1..K.
      value_pe_dist_max: r_max in Å, or a multiple of r0 if negative. value_pe_width_scale: basis width / μ_1.
      lattice_range: the fixed box half-width and the adaptive box minimum.
      adaptive_cutoff_sigma: the adaptive cutoff in units of σ_ih (negative, upstream convention).
      embedding_dim: hidden widths of the output MLP.
      num_species: width of the species input (98 elements).
    """

    num_layers: int = 4
    model_dim: int = 128
    head_num: int = 8
    ff_dim: int = 512
    scale_real: tuple = (1.4,)
    gauss_lb_real: float = 0.5
    elu_beta: float = 0.1
    value_pe_dist_real: int = 64
    value_pe_dist_max: float = -10.0
    value_pe_width_scale: float = 1.0
    lattice_range: int = 2
    adaptive_cutoff_sigma: float = -3.5
    embedding_dim: tuple = (128,)
    num_species: int = NUM_ELEMENTS

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.head_num

    def r0(self, layer: int) -> float:
        return float(self.scale_real[layer % len(self.scale_real)])

    def basis(self, layer: int):
        """(centres [K] Å, width Å) of the RBF distance basis of a layer."""
        r_max = self.value_pe_dist_max
        if r_max < 0:
            r_max = -r_max * self.r0(layer)
        step = r_max / self.value_pe_dist_real
        return np.arange(1, self.value_pe_dist_real + 1) * step, self.value_pe_width_scale * step

    def basis_cutoff(self) -> float:
        """The distance (Å) beyond which every layer's RBF basis is below e⁻⁴⁰ (`periodic_attention.basis_cutoff`)."""
        return max(basis_cutoff(*self.basis(layer)) for layer in range(self.num_layers))

    def softmax_reach_bound(self, lattice) -> np.ndarray:
        """[B] Å (host): `periodic_attention.softmax_reach` of these cells for any weights and atoms, from the
        flattest Gaussian any layer can use (|γ| > lb / (2 r0²)).

        Args:
          lattice: [B, 3, 3] or [3, 3] rows, Å.
        """
        lattice = jnp.asarray(lattice, jnp.float32).reshape(-1, 3, 3)
        flattest = min(self.gauss_lb_real / (2 * self.r0(layer) ** 2) for layer in range(self.num_layers))
        gamma = jnp.full((lattice.shape[0], 1, 1), -flattest, lattice.dtype)  # one atom, one head
        return np.asarray(softmax_reach(lattice, gamma, jnp.ones((lattice.shape[0], 1), bool)), np.float64)

    def max_sigma(self) -> float:
        """The widest Gaussian any layer can use, Å (ρ > lb)."""
        return max(self.r0(layer) for layer in range(self.num_layers)) / math.sqrt(self.gauss_lb_real)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CrystalformerConfig":
        """From our own `to_dict` output (converted-weights metadata)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"unknown Crystalformer config keys {unknown}")
        values = dict(values)
        for key in ("scale_real", "embedding_dim"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_hparams(cls, params: dict) -> "CrystalformerConfig":
        """From upstream's hyper-parameter dict (default.json or a checkpoint's `hyper_parameters`).

        Raises:
          ConfigError: naming the key, when the file asks for a variant this port does not implement.
        """
        for key, expected in _REQUIRED.items():
            if key in params and params[key] != expected:
                raise ConfigError(
                    f"Crystalformer config key {key!r} = {params[key]!r} is not supported (only {expected!r})"
                )
        func = params.get("positive_func", "elu=0.1")
        match = re.fullmatch(r"elu=([0-9.eE+-]+)", str(func))
        if match is None:
            raise ConfigError(f"Crystalformer config key 'positive_func' = {func!r} is not supported (only 'elu=β')")
        targets = params.get("targets", "bandgap")
        if not isinstance(targets, str) and len(targets) != 1:
            raise ConfigError(f"Crystalformer config key 'targets' = {targets!r}: only one target is supported")
        cutoff = float(params.get("adaptive_cutoff_sigma", -3.5))
        if cutoff >= 0:
            raise ConfigError(
                f"Crystalformer config key 'adaptive_cutoff_sigma' = {cutoff}: only negative values (units of σ)"
            )
        scale_real = params.get("scale_real", [1.4])
        scale_real = tuple(float(s) for s in (scale_real if isinstance(scale_real, list | tuple) else [scale_real]))
        embedding_dim = tuple(int(e) for e in params.get("embedding_dim", [128]))
        config = cls(
            num_layers=int(params.get("num_layers", 4)),
            model_dim=int(params.get("model_dim", 128)),
            head_num=int(params.get("head_num", 8)),
            ff_dim=int(params.get("ff_dim", 512)),
            scale_real=scale_real,
            gauss_lb_real=float(params.get("gauss_lb_real", 0.5)),
            elu_beta=float(match.group(1)),
            value_pe_dist_real=int(params.get("value_pe_dist_real", 64)),
            value_pe_dist_max=float(params.get("value_pe_dist_max", -10.0)),
            value_pe_width_scale=float(params.get("value_pe_width_scale", 1.0)),
            lattice_range=int(params.get("lattice_range", 2)),
            adaptive_cutoff_sigma=cutoff,
            embedding_dim=embedding_dim,
        )
        if config.model_dim % config.head_num:
            raise ConfigError(
                f"Crystalformer config: model_dim {config.model_dim} is not a multiple of head_num {config.head_num}"
            )
        if not 0 < config.gauss_lb_real < 1:
            raise ConfigError(f"Crystalformer config key 'gauss_lb_real' = {config.gauss_lb_real}: need 0 < lb < 1")
        return config


def required_range(lattice, config: CrystalformerConfig) -> tuple:
    """Host-side static bound for the adaptive box: (R_1, R_2, R_3) covering every atom, head and layer.

    Uses the widest possible Gaussian (σ_max = r0 / √lb), so the bound holds for any weights and inputs.

    Args:
      lattice: [B, 3, 3] or [3, 3] rows, Å (numpy or concrete JAX array).
    """
    spacings_inv = np.asarray(inverse_plane_spacings(jnp.asarray(lattice, jnp.float32)), np.float64)
    spacings_inv = spacings_inv.reshape(-1, 3).max(axis=0)
    cutoff = -config.adaptive_cutoff_sigma * config.max_sigma()
    # 1e-4 relative slack: float32 rounding of the spacing must not flip the ceiling below the true value.
    needed = np.ceil((cutoff + 0.01) * spacings_inv * (1 + 1e-4))
    return tuple(int(max(config.lattice_range, r)) for r in needed)


def range_overflow(lattice, max_range, config: CrystalformerConfig):
    """[B] bool, jittable: True where the adaptive box may need more than the static `max_range` (R_1, R_2, R_3)."""
    cutoff = -config.adaptive_cutoff_sigma * config.max_sigma()
    needed = jnp.ceil((cutoff + 0.01) * inverse_plane_spacings(lattice))
    return jnp.any(needed > jnp.asarray(max_range), axis=-1)


def required_window(lattice, config: CrystalformerConfig) -> tuple:
    """Host-side basis window (W_1, W_2, W_3) that holds every basis-relevant image for these cells (any layer).

    Args:
      lattice: [B, 3, 3] or [3, 3] rows, Å (numpy or concrete JAX array).
    """
    return tuple(int(w) for w in window_size(lattice, config.basis_cutoff()))


def required_softmax_window(lattice, config: CrystalformerConfig) -> tuple:
    """Host-side softmax window (S_1, S_2, S_3) that holds every image whose translation factor can reach e⁻⁴⁰ in
    these cells (any weights, `CrystalformerConfig.softmax_reach_bound`).

    Args:
      lattice: [B, 3, 3] or [3, 3] rows, Å (numpy or concrete JAX array).
    """
    lattice = np.asarray(lattice).reshape(-1, 3, 3)
    reach = config.softmax_reach_bound(lattice)
    return tuple(int(w) for w in np.max([window_sizes(c, r)[0] for c, r in zip(lattice, reach, strict=True)], 0))


def _window_search(lattice, config: CrystalformerConfig, grid, num_atoms: int, chunk_size, smaller_grids: bool):
    """What `cheapest_window` and `cheapest_softmax_window` weigh windows on: (grid, lattice [B, 3, 3], boxes
    [B, 1, 1, 3] (each cell's `required_range`), mask [B, 1], smaller grids, whole grid sizes, crystals per block)."""
    grid = tuple(int(r) for r in grid)
    lattice = np.asarray(lattice).reshape(-1, 3, 3)
    boxes = np.array([required_range(cell, config) for cell in lattice])[:, None, None, :]  # [B, 1 atom, 1 head, 3]
    mask = np.ones((len(lattice), 1), bool)
    grids = intermediate_grids(grid, config.lattice_range) if smaller_grids else ()
    full = tuple(2 * r + 1 for r in grid)
    per_block = block_plan(len(lattice), num_atoms, int(np.prod(full)), config.value_pe_dist_real, 4, chunk_size)[0]
    return grid, lattice, boxes, mask, grids, full, per_block


MIN_WINDOW_GAIN = 0.2  # `cheapest_window` picks no window unless it saves this share of the basis work


def cheapest_window(
    lattice, config: CrystalformerConfig, grid, num_atoms: int, chunk_size=None, smaller_grids: bool = False
) -> tuple:
    """Host-side basis window (W, W, W) with the least basis work for a batch of cells of different sizes.

    Each attention block runs the first of `attention_branches` that evaluates all of its crystals exactly
    (`periodic_attention`; blocks hold crystals sorted by branch, `block_plan`): on the smallest grid that holds
    their boxes (with `smaller_grids`: `intermediate_grids`, each cell's box taken as its `required_range`, the
    widest any weights can give), the window, or the window with one or two whole axes (F) for cells with short
    axes (isotropic grids), else the whole grid. A branch costs Π_d W_d translations per atom pair (the grid's for
    the whole grid); the W with the least total wins (the larger on ties), unless it saves less than
    `MIN_WINDOW_GAIN` of the whole grid's work: then no window (each window adds compiled branches). E.g.
    SMOACS's random 3x3x3 perovskites (axes of 6-30 Å, one crystal per block, grid (2, 2, 2)): W = 2, with
    (5, 2, 2) and (5, 5, 2) for cells with one or two axes below 16 Å; the 1x1x1 ones: no window.

    Args:
      lattice: [B, 3, 3] rows, Å (concrete). grid: the static box bound (R_1, R_2, R_3) of the calls.
      num_atoms, chunk_size: atoms per crystal and the attention's `chunk_size`, which set the blocks.
      smaller_grids: whether the calls use `intermediate_grids` (adaptive truncation, the predictor's default).
    """
    grid, lattice, boxes, mask, grids, full, per_block = _window_search(
        lattice, config, grid, num_atoms, chunk_size, smaller_grids
    )
    best_cost, best = None, None
    for w in range(1, max(full) + 1):
        window = (w,) * 3
        taken = crystal_branches(
            lattice, mask, boxes, ranges=grid, cutoff=config.basis_cutoff(), window=window, grids=grids,
            per_block=per_block,
        )  # fmt: skip
        branches = attention_branches(grid, grids, window)[0]
        costs = np.array([np.prod(b.window or [2 * r + 1 for r in b.grid]) for b in branches])
        cost = costs[taken].sum()
        if best_cost is None or cost <= best_cost:
            best_cost, best = cost, w
    if best_cost > (1 - MIN_WINDOW_GAIN) * cost:  # cost: that of the whole grid (the last w)
        best = max(full)
    return (best,) * 3


def cheapest_softmax_window(
    lattice, config: CrystalformerConfig, grid, num_atoms: int, window, chunk_size=None, smaller_grids: bool = False
):
    """Host-side softmax window (S, S, S) with the least softmax work, next to the basis window `window` (e.g. from
    `cheapest_window`), or None.

    As in `cheapest_window`: each block takes the first branch that fits all of its crystals, a softmax window
    fitting the cells whose `softmax_reach_bound` it holds (with one or two whole axes for cells with short ones); a
    branch costs Π_d S_d translations per atom pair (the grid's without a softmax window). The S with the least
    total wins (the larger on ties), unless it saves less than `MIN_WINDOW_GAIN` of the whole grid's work: then None.
    E.g. the benchmark's 135-atom cells (11.7 Å): S = 4 (64 of 125 translations).

    Args: as `cheapest_window`, and window: the basis window (W_1, W_2, W_3) of the calls, or None.
    """
    grid, lattice, boxes, mask, grids, full, per_block = _window_search(
        lattice, config, grid, num_atoms, chunk_size, smaller_grids
    )
    reach = config.softmax_reach_bound(lattice)
    best_cost, best = None, None
    for size in range(1, max(full) + 1):
        softmax_window = (size,) * 3
        taken = crystal_branches(
            lattice, mask, boxes, ranges=grid, cutoff=config.basis_cutoff(), window=window, grids=grids,
            per_block=per_block, softmax_window=softmax_window, reach=reach,
        )  # fmt: skip
        branches = attention_branches(grid, grids, window, softmax_window)[0]
        costs = np.array([np.prod(b.softmax_window or [2 * r + 1 for r in b.grid]) for b in branches])
        cost = costs[taken].sum()
        if best_cost is None or cost <= best_cost:
            best_cost, best = cost, size
    if best_cost > (1 - MIN_WINDOW_GAIN) * cost:  # cost: that of the whole grid (the last size)
        return None
    return (best,) * 3


def intermediate_grids(max_range, lattice_range: int) -> tuple:
    """The grids an adaptive box may fit before `max_range`: (R, R, R) clipped to `max_range` for R from
    `lattice_range` (the smallest box) up, e.g. (4, 4, 4), 2 -> ((2, 2, 2), (3, 3, 3))."""
    return tuple(tuple(min(size, r) for r in max_range) for size in range(lattice_range, max(max_range)))


def _normalize_window(window, name: str = "basis_window") -> tuple | None:
    if window is None:
        return None
    window = (int(window),) * 3 if isinstance(window, int | np.integer) else tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ConfigError(f"{name} must be None, a positive int or 3 positive ints, got {window}")
    return window


def _normalize_range(max_range) -> tuple:
    if isinstance(max_range, int | np.integer):
        return (int(max_range),) * 3
    max_range = tuple(int(r) for r in max_range)
    if len(max_range) != 3:
        raise ConfigError(f"max_range must be an int or 3 ints, got {max_range}")
    return max_range


class PeriodicAttention(nn.Module):
    """One self-attention block over the infinite crystal (module docstring, steps q/k/v to out_proj)."""

    config: CrystalformerConfig
    layer: int
    truncation: str
    gradient: str
    max_range: tuple | None
    chunk_size: int | None
    basis_window: tuple | None = None
    grids: tuple = ()
    softmax_window: tuple | None = None

    @nn.compact
    def __call__(self, h, lattice, frac, mask):
        """h [B, N, d] → ([B, N, d], γ [B, N, H] Å⁻², box [B, N, H, 3] int or None)."""
        cfg = self.config
        heads, head_dim = cfg.head_num, cfg.head_dim
        dense = dict(features=(heads, head_dim), precision=HIGHEST, param_dtype=h.dtype)
        q = nn.DenseGeneral(name="q", **dense)(h)
        k = nn.DenseGeneral(name="k", **dense)(h)
        v = nn.DenseGeneral(name="v", **dense)(h)
        sigma_w = self.param("sigma_w", nn.initializers.normal(head_dim**-0.5), (heads, head_dim), h.dtype)
        gauss_scale = self.param("gauss_scale", nn.initializers.constant(jnp.asarray([1.0, 0.0])), (2,), h.dtype)
        pe_proj = self.param(
            "pe_proj", nn.initializers.lecun_normal(), (heads, head_dim, cfg.value_pe_dist_real), h.dtype
        )

        gauss_scale = jax.lax.stop_gradient(gauss_scale)
        score = jnp.einsum("bnhc,hc->bnh", q, sigma_w, precision=HIGHEST)
        a = (score + gauss_scale[1]) * gauss_scale[0]
        lb = cfg.gauss_lb_real
        rho = (1 - lb) * jax.nn.elu(cfg.elu_beta * a / (1 - lb)) + 1
        r0 = cfg.r0(self.layer)
        gamma = -rho / (2 * r0**2)

        if self.truncation == "fixed":
            ranges, box = (cfg.lattice_range,) * 3, None
        else:
            ranges = self.max_range
            sigma = jax.lax.stop_gradient(r0 / jnp.sqrt(rho))
            cutoff = -cfg.adaptive_cutoff_sigma * sigma  # [B, N, H]
            spacing_inv = inverse_plane_spacings(jax.lax.stop_gradient(lattice))  # [B, 3]
            box = jnp.ceil((cutoff[..., None] + 0.01) * spacing_inv[:, None, None, :])
            box = jnp.maximum(box, cfg.lattice_range).astype(jnp.int32)  # [B, N, H, 3]

        centers, width = cfg.basis(self.layer)
        agg_v, agg_basis = periodic_attention(
            q,
            k,
            v,
            gamma,
            lattice,
            frac,
            mask,
            ranges=ranges,
            box=box,
            centers=centers,
            width=width,
            exact_basis_gradient=self.gradient == "exact",
            chunk_size=self.chunk_size,
            window=self.basis_window,
            grids=self.grids,
            box_floor=cfg.lattice_range,
            softmax_window=self.softmax_window,
        )
        out = agg_v + jnp.einsum("bnhk,hck->bnhc", agg_basis, pe_proj, precision=HIGHEST)
        out = nn.DenseGeneral(cfg.model_dim, axis=(-2, -1), name="out", precision=HIGHEST, param_dtype=h.dtype)(out)
        return out, gamma, box


class Crystalformer(nn.Module):
    """The property predictor: (lattice, frac, species, mask) → [B] (head output, target folded in by the converter).

    Attributes:
      config: architecture. truncation: "adaptive" | "fixed". gradient: "exact" | "smoacs".
      max_range: static (R_1, R_2, R_3) (or int) bound of the adaptive box; required for "adaptive".
      chunk_size: query rows per attention block (None = automatic), see `periodic_attention`.
      basis_window: static (W_1, W_2, W_3) translations per axis for the RBF basis, or None (the whole box); see
        the module docstring and `required_window`.
      softmax_window: static (S_1, S_2, S_3) translations per axis for the softmax over translations, or None (the
        whole box); see the module docstring and `required_softmax_window`.
      smaller_grids: with adaptive truncation, let attention blocks whose boxes all fit a smaller grid than
        `max_range` run on it (`intermediate_grids`; the same result, less work when most cells are larger than the
        smallest one `max_range` is sized for).

    Intermediates (`mutable=["intermediates"]`): embed, layer{l}, gamma_layer{l}, box_layer{l} (adaptive), pooled.
    """

    config: CrystalformerConfig
    truncation: str = "adaptive"
    gradient: str = "exact"
    max_range: tuple | int | None = None
    chunk_size: int | None = None
    basis_window: tuple | None = None
    smaller_grids: bool = True
    softmax_window: tuple | None = None

    @nn.compact
    def __call__(self, lattice, frac, species, mask):
        """lattice [B, 3, 3] rows Å, frac [B, N, 3], species [B, N, S], mask [B, N] bool → [B]."""
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if self.gradient not in GRADIENTS:
            raise ConfigError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        max_range, grids = None, ()
        if self.truncation == "adaptive":
            if self.max_range is None:
                raise ConfigError("truncation='adaptive' needs a static max_range (see required_range)")
            max_range = _normalize_range(self.max_range)
            if min(max_range) < self.config.lattice_range:
                raise ConfigError(f"max_range {max_range} is below lattice_range {self.config.lattice_range}")
            grids = intermediate_grids(max_range, self.config.lattice_range) if self.smaller_grids else ()
        cfg = self.config
        dtype = species.dtype
        frac = frac - jax.lax.stop_gradient(jnp.floor(frac))

        h = nn.Dense(cfg.model_dim, use_bias=False, name="embedding", precision=HIGHEST, param_dtype=dtype)(species)
        self.sow("intermediates", "embed", h)
        for layer in range(cfg.num_layers):
            attn = PeriodicAttention(
                cfg,
                layer,
                self.truncation,
                self.gradient,
                max_range,
                self.chunk_size,
                _normalize_window(self.basis_window),
                grids,
                _normalize_window(self.softmax_window, "softmax_window"),
                name=f"layer_{layer}_attn",
            )
            update, gamma, box = attn(h, lattice, frac, mask)
            h = h + update
            ff = nn.Dense(cfg.ff_dim, name=f"layer_{layer}_ffn1", precision=HIGHEST, param_dtype=dtype)(h)
            h = h + nn.Dense(cfg.model_dim, name=f"layer_{layer}_ffn2", precision=HIGHEST, param_dtype=dtype)(
                nn.relu(ff)
            )
            self.sow("intermediates", f"gamma_layer{layer}", gamma)
            if box is not None:
                self.sow("intermediates", f"box_layer{layer}", box)
            self.sow("intermediates", f"layer{layer}", h)

        weights = mask.astype(dtype)[..., None]
        pooled = jnp.sum(h * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
        self.sow("intermediates", "pooled", pooled)
        x = pooled
        for i, width in enumerate(cfg.embedding_dim):
            x = nn.relu(nn.Dense(width, name=f"head_{i}", precision=HIGHEST, param_dtype=dtype)(x))
        return TargetHead(name=f"head_{len(cfg.embedding_dim)}")(x)


class TargetHead(nn.Module):
    """The last head layer with upstream's target de-normalization folded into it, in the compute dtype.

    y = x · (W · std) + (b · std + mean): [B, F] → [B], physical units (demo.py and SMOACS fold the same way).
    """

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 1), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (1,), x.dtype)
        mean = self.param("target_mean", nn.initializers.zeros, (1,), x.dtype)
        std = self.param("target_std", nn.initializers.ones, (1,), x.dtype)
        kernel = kernel * std[None, :]
        bias = bias * std + mean
        return (jnp.matmul(x, kernel, precision=HIGHEST) + bias)[:, 0]

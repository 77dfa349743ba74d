"""ALIGNN predictors: `load(source, config=None, **options) -> Predictor`.

`source`: converted weights (`.npz` from `converters.alignn`), a figshare zip (old `checkpoint_*.pt` with
`{"model": ...}` or new bare `best_model.pt`), a folder with `config.json` + checkpoint, or an archive plus
`member=` folder (the ALIGNN-FF wheel: `member="alignn/ff/alignnff_wt10"`). Upstream files are converted in
memory (no torch, no DGL). The property models output their target with the link applied (no clipping);
ALIGNN-FF outputs the total energy per atom (eV/atom, `fc(mean)`, no bond-length penalty).

Options:
  image_box: static image box of the neighbour search (int or three ints, default 3; see
    `jaxcrystal.geometry`); a crystal whose cell needs a bigger box gets `graph.overflow = True`.
  neighbor_capacity: discoveries kept per atom (default 24).
  degree: per-atom degree budget D: edge capacity D*N, line-graph capacity D^2*N (default
    `jaxcrystal.alignn_graph.default_degree(N, canonize)`).
  atom_chunk: atoms searched at once per crystal (neighbour-search memory knob, default 32).
  smaller_boxes: True: each chunk of crystals searches the half image box when it suffices for its cells (the same
    graph as the whole box, bit for bit, in less time, for one more compiled branch); False: always `image_box`;
    "auto" (default): True for large searches (`jaxcrystal.geometry.AUTO_LADDER_CANDIDATES`).
  chunk_size: most crystals evaluated at once (default: as many as fit 2^18 line-graph slots; the batch is split
    into equal chunks of at most this size, so padding stays below one crystal per chunk); chunks run one after
    another under `jax.checkpoint`, so the backward pass keeps only one chunk's activations. Exact: candidates
    are independent (eval-mode normalization).
  remat: recompute each ALIGNN/GCN layer in the backward pass (default True; same numbers, less memory).

The graph (`build_graph`) follows upstream's k-nearest rule (`jaxcrystal.alignn_graph`); the image offsets refer
to the fractional coordinates as given, so pass the same unwrapped coordinates to `apply_with_graph`.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrystal import alignn_graph, geometry
from jaxcrystal.atom_features import cgcnn_atom_features
from jaxcrystal.errors import ConfigError
from jaxcrystal.models.alignn import ALIGNN
from jaxcrystal.predictors.base import Predictor, check_variables

_OPTIONS = (
    "image_box",
    "neighbor_capacity",
    "degree",
    "atom_chunk",
    "smaller_boxes",
    "chunk_size",
    "remat",
    "member",
)
TRIPLETS_PER_CHUNK = 1 << 18


def read(source, member: str | None = None) -> tuple[dict, dict]:
    """(variables as nested numpy dicts, metadata) from converted weights or an upstream checkpoint."""
    from converters import alignn as conv  # torch-free reader; imported lazily

    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        if member is not None:
            raise ConfigError("option 'member' applies to archives, not to converted .npz weights")
        return conv.read_weights(path)
    return conv.convert(path, member)


def flat_inputs(graph, lattice, frac, species, mask):
    """Flattens a batch [c, ...] into one graph: the positional inputs of `ALIGNN.__call__` (see there)."""
    _, length, cos = alignn_graph.bond_geometry(graph, lattice, frac)
    dtype = length.dtype
    c, n = mask.shape
    e = graph.src.shape[1]
    table = jnp.asarray(cgcnn_atom_features())
    atom_features = jnp.einsum("bnz,zf->bnf", species, table.astype(species.dtype)).reshape(c * n, -1)
    node_off = (jnp.arange(c, dtype=jnp.int32) * n)[:, None]
    edge_off = (jnp.arange(c, dtype=jnp.int32) * e)[:, None]
    edges = (
        (graph.src + node_off).reshape(-1),
        (graph.dst + node_off).reshape(-1),
        graph.edge_valid.reshape(-1).astype(dtype),
    )
    pairs = (
        (graph.lg_src + edge_off).reshape(-1),
        (graph.lg_dst + edge_off).reshape(-1),
        graph.lg_valid.reshape(-1).astype(dtype),
    )
    node_graph = jnp.repeat(jnp.arange(c, dtype=jnp.int32), n)
    return (
        atom_features,
        length.reshape(-1),
        cos.reshape(-1),
        edges,
        pairs,
        node_graph,
        mask.reshape(-1).astype(dtype),
        c,
    )


def _chunk_forward(module, variables, graph, lattice, frac, species, mask):
    out = module.apply(variables, *flat_inputs(graph, lattice, frac, species, mask))
    return out[:, 0] if module.output_features == 1 else out


def apply_with_graph(module, chunk_size, variables, graph, lattice, frac, species, mask):
    """The property [B] (or [B, F]) on a frozen topology; differentiable in lattice, frac and species."""
    lattice, frac = jnp.asarray(lattice), jnp.asarray(frac)
    species, mask = jnp.asarray(species), jnp.asarray(mask, dtype=bool)
    b = mask.shape[0]
    largest = chunk_size or max(1, TRIPLETS_PER_CHUNK // max(1, graph.lg_src.shape[1]))
    forward = functools.partial(_chunk_forward, module, variables)
    if b <= largest:
        return forward(graph, lattice, frac, species, mask)
    n_chunks = -(-b // largest)
    chunk = -(-b // n_chunks)  # equal chunks: fewer than n_chunks padding copies (not up to `largest` - 1)
    pad = n_chunks * chunk - b

    def split(x):  # [B, ...] -> [n_chunks, chunk, ...], padded with copies of the last crystal
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    xs = jax.tree.map(split, (graph, lattice, frac, species, mask))
    out = jax.lax.map(jax.checkpoint(lambda args: forward(*args)), xs)
    return out.reshape((n_chunks * chunk,) + out.shape[2:])[:b]


def host_graph(canonize: bool, lattice, frac, mask) -> alignn_graph.AlignnGraph:
    """The exact upstream graph of concrete crystals, built on the host (float64, no capacity limit).

    Args:
      canonize: the model's `use_canonize`.
      lattice: [B, 3, 3] rows, Å; frac: [B, N, 3]; mask: [B, N] bool.
    Returns:
      `AlignnGraph` padded to the largest crystal's edge and triplet counts (overflow False), atom indices
      referring to the slots of `frac`.
    """
    lattice, frac, mask = np.asarray(lattice, np.float64), np.asarray(frac, np.float64), np.asarray(mask, bool)
    graphs = []
    for lat, f, m in zip(lattice, frac, mask, strict=True):
        real = np.flatnonzero(m).astype(np.int32)
        g = alignn_graph.build_graph_np(lat, f[real], canonize=canonize)
        graphs.append({**g, "src": real[g["src"]], "dst": real[g["dst"]]})
    return alignn_graph.pad_graphs(graphs)


def _expected_variables(module: ALIGNN):
    """Shapes of the variables of `module` (abstract `init` on a one-bond graph, nothing computed)."""
    one, idx = jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
    atoms = jnp.zeros((1, cgcnn_atom_features().shape[1]))
    init = functools.partial(module.init, num_graphs=1)
    return jax.eval_shape(init, jax.random.key(0), atoms, one, one, (idx, idx, one), (idx, idx, one), idx, one)


def _apply(build, apply_graph, variables, lattice, frac, species, mask):
    return apply_graph(variables, build(lattice, frac, mask), lattice, frac, species, mask)


def load(source, config=None, **options) -> Predictor:
    """Loads an ALIGNN predictor (see the module docstring for `source` and `options`)."""
    if config is not None:
        raise ConfigError("ALIGNN reads config.json from its zip/folder; pass config=None")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown ALIGNN option(s) {unknown}; expected {', '.join(_OPTIONS)}")
    smaller_boxes = options.get("smaller_boxes", "auto")
    if not isinstance(smaller_boxes, bool) and smaller_boxes != "auto":
        raise ConfigError(f"smaller_boxes must be True, False or 'auto', got {smaller_boxes!r}")
    variables, metadata = read(source, options.get("member"))
    module = ALIGNN(**metadata["hyperparameters"], remat=bool(options.get("remat", True)))
    check_variables(variables, _expected_variables(module), str(source))
    build = functools.partial(
        alignn_graph.build_graph,
        canonize=metadata["graph"]["use_canonize"],
        neighbor_capacity=int(options.get("neighbor_capacity", 24)),
        degree=options.get("degree"),
        box=geometry.normalize_box(options.get("image_box", 3)),
        atom_chunk=int(options.get("atom_chunk", 32)),
        smaller_boxes=smaller_boxes,
    )
    chunk = options.get("chunk_size")
    apply_graph = functools.partial(apply_with_graph, module, None if chunk is None else int(chunk))
    return Predictor(
        kind="alignn",
        name=metadata["name"],
        units=metadata["units"],
        params=jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), variables),
        apply=functools.partial(_apply, build, apply_graph),
        build_graph=build,
        apply_with_graph=apply_graph,
        host_graph=functools.partial(host_graph, metadata["graph"]["use_canonize"]),
        metadata=metadata,
    )

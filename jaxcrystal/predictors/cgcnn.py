"""CGCNN predictors: `load(source, config=None, **options) -> Predictor`.

`source` is one of
  * the name of an embedded Materials Project model: "band-gap", "formation-energy-per-atom", "bulk-moduli",
    "shear-moduli", "efermi", "final-energy-per-atom", "poisson-ratio", "semi-metal-classification"
    (converted files `weights/cgcnn-<name>.npz`, no network access needed);
  * a path to converted weights (`.npz` written by `converters.cgcnn`);
  * a path to an upstream CGCNN checkpoint (`.pth.tar`), converted in memory (torch is not needed).

Options:
  image_box: static image box of the in-`jit` neighbour search (int or three ints, default 3), see
    `jaxcrystal.geometry`: it covers every cell whose heights exceed 8 Å / m (2.67 Å for m = 3) and costs
    (2m)^3 translations per atom pair; `jaxcrystal.geometry.required_image_box(lattices, 8.0)` gives the
    smallest box for given cells (a 3x3x3 perovskite supercell needs only 1). A crystal whose cell needs a
    bigger box gets `graph.overflow = True`.
  atom_chunk, crystal_chunk: atoms and crystals searched at once in the neighbour search (memory knobs,
    defaults 32 and 8; see `jaxcrystal.geometry.nearest_neighbors`).
  smaller_boxes: True: each chunk of crystals searches the half image box when it suffices for its cells (the same
    graph as the whole box, bit for bit, in less time, for one more compiled branch); False: always `image_box`;
    "auto" (default): True for large searches (`jaxcrystal.geometry.AUTO_LADDER_CANDIDATES`).

The graph (`build_graph`) is the upstream featurization: the 12 nearest neighbours within 8 Å (all periodic
images, ties broken by neighbour index then translation), unused slots filled with the first atom and a
distance of 9 Å. The semi-metal classifier outputs the probability of class 1 ("metal") of its two-class
LogSoftmax head.
"""

import functools
import importlib.resources
import io
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxcrystal import geometry
from jaxcrystal.errors import CheckpointError, ConfigError
from jaxcrystal.models.cgcnn import CGCNN, FILL_DISTANCE, MAX_NEIGHBORS, RADIUS
from jaxcrystal.predictors.base import Predictor, check_variables
from jaxcrystal.weights_file import read_weights_file

FORMAT = "jaxcrystal-cgcnn-v1"
EMBEDDED = (
    "band-gap",
    "bulk-moduli",
    "efermi",
    "final-energy-per-atom",
    "formation-energy-per-atom",
    "poisson-ratio",
    "semi-metal-classification",
    "shear-moduli",
)
_OPTIONS = ("image_box", "atom_chunk", "crystal_chunk", "smaller_boxes")


def weights_dir() -> Path:
    """The folder of the embedded weights: the installed `jaxcrystal_weights` package, else the repository's
    `weights/` (editable installs and source checkouts)."""
    try:
        installed = Path(str(importlib.resources.files("jaxcrystal_weights")))
        if (installed / "MANIFEST").exists():
            return installed
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "weights"


def read_weights(path, name: str | None = None) -> tuple[dict, dict]:
    """Reads converted CGCNN weights (a path or a binary file object; `name` for messages).

    Returns (variables as nested dicts of numpy arrays, metadata dict).
    """
    return read_weights_file(path, FORMAT, name)


def _resolve(source) -> tuple[dict, dict]:
    if isinstance(source, str) and source in EMBEDDED:
        path = weights_dir() / f"cgcnn-{source}.npz"
        if not path.exists():
            raise CheckpointError(f"embedded CGCNN weights {path} are missing (broken installation?)")
        return read_weights(path)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(
            f"{source!r} is neither an embedded CGCNN model ({', '.join(EMBEDDED)}) nor an existing file"
        )
    if path.name.endswith(".npz"):
        return read_weights(path)
    from converters.cgcnn import converted_bytes  # upstream checkpoints only: the torch-free reader

    blob, _ = converted_bytes(path.read_bytes(), str(path))
    return read_weights(io.BytesIO(blob), name=str(path))


def build_graph(
    lattice, frac, mask, *, image_box=3, atom_chunk=32, crystal_chunk=8, smaller_boxes="auto"
) -> geometry.NeighborList:
    """CGCNN topology: 12 nearest neighbours within 8 Å; [B, ...] leaves (see `geometry.NeighborList`)."""
    lattice, frac = jax.lax.stop_gradient(lattice), jax.lax.stop_gradient(frac)
    return geometry.nearest_neighbors(
        lattice,
        frac,
        mask,
        cutoff=RADIUS,
        capacity=MAX_NEIGHBORS,
        box=image_box,
        atom_chunk=atom_chunk,
        crystal_chunk=crystal_chunk,
        smaller_boxes=smaller_boxes,
    )


def _apply_with_graph(module, params, graph, lattice, frac, species, mask):
    lattice, frac, species = jnp.asarray(lattice), jnp.asarray(frac), jnp.asarray(species)
    mask = jnp.asarray(mask, dtype=bool)
    distances = geometry.bond_distances(lattice, frac, graph, fill=FILL_DISTANCE)
    out = module.apply(params, species, distances, graph.index, mask)
    return jnp.exp(out[:, 1]) if module.classification else out


def _apply(build, apply_with_graph, params, lattice, frac, species, mask):
    return apply_with_graph(params, build(lattice, frac, mask), lattice, frac, species, mask)


def _module(metadata: dict, source) -> CGCNN:
    try:
        return CGCNN(**metadata["hyperparameters"], classification=metadata["task"] == "classification")
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: metadata lacks valid CGCNN hyperparameters/task ({exc!r})") from exc


def _expected_variables(module: CGCNN):
    """Shapes of every variable collection of `module` (abstract `init` on a 2-atom crystal, nothing computed)."""
    n, k = 2, MAX_NEIGHBORS
    species, distances = jnp.zeros((1, n, 98)), jnp.zeros((1, n, k))
    index, mask = jnp.zeros((1, n, k), jnp.int32), jnp.ones((1, n), bool)
    return jax.eval_shape(module.init, jax.random.key(0), species, distances, index, mask)


@functools.cache
def _functions(module: CGCNN, box: tuple[int, int, int], chunks: tuple[int, int], smaller_boxes):
    """(build_graph, apply_with_graph, apply) for one architecture and search setting; cached so that models
    with the same architecture share the same function objects (and hence `jax.jit` compilations)."""
    build = functools.partial(
        build_graph, image_box=box, atom_chunk=chunks[0], crystal_chunk=chunks[1], smaller_boxes=smaller_boxes
    )
    apply_with_graph = functools.partial(_apply_with_graph, module)
    return build, apply_with_graph, functools.partial(_apply, build, apply_with_graph)


def load(source, config=None, **options) -> Predictor:
    """Loads a CGCNN predictor (see the module docstring for `source` and `options`)."""
    if config is not None:
        raise ConfigError("CGCNN takes no config file (its hyper-parameters are read from the checkpoint)")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown CGCNN option(s) {unknown}; expected {', '.join(_OPTIONS)}")
    box = geometry.normalize_box(options.get("image_box", 3))
    chunks = (int(options.get("atom_chunk", 32)), int(options.get("crystal_chunk", 8)))
    smaller_boxes = options.get("smaller_boxes", "auto")
    if not isinstance(smaller_boxes, bool) and smaller_boxes != "auto":
        raise ConfigError(f"smaller_boxes must be True, False or 'auto', got {smaller_boxes!r}")
    variables, metadata = _resolve(source)
    module = _module(metadata, source)
    expected = _expected_variables(module)
    unused = {"normalizer"} - set(expected)  # converted classifiers keep upstream's (unused) normalizer
    check_variables({k: v for k, v in variables.items() if k not in unused}, expected, str(source))
    build, apply_with_graph, apply = _functions(module, box, chunks, smaller_boxes)

    def host_graph(lattice, frac, mask):  # the box sized for the given cells, never smaller than `box`
        needed = geometry.required_image_box(lattice, RADIUS)
        sized = tuple(max(a, b) for a, b in zip(box, needed, strict=True))
        return _functions(module, sized, chunks, smaller_boxes)[0](lattice, frac, mask)

    return Predictor(
        kind="cgcnn",
        name=metadata["name"],
        units=metadata["units"],
        params=jax.tree.map(jnp.asarray, variables),
        apply=apply,
        build_graph=build,
        apply_with_graph=apply_with_graph,
        host_graph=host_graph,
        metadata={
            **metadata,
            "image_box": box,
            "atom_chunk": chunks[0],
            "crystal_chunk": chunks[1],
            "module": module,
            "smaller_boxes": smaller_boxes,
        },
    )

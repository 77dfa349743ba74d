"""Property-based fuzzing (hypothesis).

Predictors: for every valid crystal (random skewed, tiny or large lattices, either handedness, unwrapped
coordinates, one-hot or soft species, random padding) the prediction and its gradients with respect to lattice,
coordinates and species are finite, and padding slots change nothing. Parsers: mutated POSCAR / CIF text and
mutated checkpoint bytes either load or raise a `JaxCrystalError`; no other exception type, no hang.

Each property compiles its predictor once (fixed shapes: B = 1, N = 8 slots), so examples are cheap. The runs
are derandomized (reproducible in CI); `JAXCRYSTAL_FUZZ_SCALE=50 python -m pytest tests/test_fuzz.py` explores 50x
more random examples.
"""

import os
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, shared_path
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from converters.torch_reader import read_torch_checkpoint
from jaxcrystal.crystal import CrystalBatch, check_separation, read_structure, validate, write_cif
from jaxcrystal.errors import JaxCrystalError
from jaxcrystal.geometry import cell_heights, required_image_box
from jaxcrystal.predictors import load_predictor

SLOTS = 8
MIN_HEIGHT = 1.5  # Å, smallest distance between lattice planes generated
CGCNN_BOX = required_image_box(np.eye(3) * MIN_HEIGHT, 8.0)  # (6, 6, 6): covers every generated cell
PARSE_SECONDS = 5.0  # a single parse slower than this counts as a hang
SCALE = int(os.environ.get("JAXCRYSTAL_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """`examples` x SCALE examples, no deadline, derandomized unless scaled up."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# ----------------------------------------------------------------------------------------------------------
# Random valid crystals


@st.composite
def crystals(draw) -> CrystalBatch:
    """One crystal in N = 8 slots: lattice [1, 3, 3], frac [1, 8, 3], species [1, 8, 98], mask [1, 8]."""
    n = draw(st.integers(1, SLOTS))
    diag = np.array([draw(st.floats(MIN_HEIGHT, 20.0)) for _ in range(3)])
    shear = np.array([draw(st.floats(-2.5, 2.5)) for _ in range(3)])  # off-diagonals in units of the diagonal
    lattice = np.diag(diag)
    lattice[1, 0], lattice[2, 0], lattice[2, 1] = shear[0] * diag[0], shear[1] * diag[0], shear[2] * diag[1]
    lattice *= max(1.0, MIN_HEIGHT / cell_heights(lattice).min())  # very skewed cells keep heights >= 1.5 Å
    if draw(st.booleans()):
        lattice[0] *= -1.0  # left-handed basis
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    frac = np.zeros((SLOTS, 3))
    frac[:n] = rng.uniform(-1.0, 2.0, (n, 3))  # unwrapped coordinates are valid input
    species = np.zeros((SLOTS, 98))
    kind = draw(st.sampled_from(["one-hot", "soft", "peaked"]))
    if kind == "one-hot":
        species[np.arange(n), rng.integers(0, 98, n)] = 1.0
    else:
        species[:n] = rng.dirichlet(np.full(98, 1.0 if kind == "soft" else 0.02), n)
    frac[n:] = rng.uniform(-5.0, 5.0, (SLOTS - n, 3))  # padding holds arbitrary finite junk
    species[n:] = rng.uniform(0.0, 3.0, (SLOTS - n, 98))
    mask = np.arange(SLOTS) < n
    batch = CrystalBatch(lattice[None], frac[None], species[None], mask[None])
    validate(batch)
    try:
        check_separation(lattice, frac[:n])
    except JaxCrystalError:
        assume(False)  # overlapping atoms are invalid input (tested in test_bad_input)
    return batch


def value_and_grads(predictor):
    """jit of (lattice, frac, species, mask) -> (sum of predictions, grads wrt lattice, frac, species)."""

    def total(lattice, frac, species, mask):
        return jnp.sum(predictor.apply(predictor.params, lattice, frac, species, mask))

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))


def zero_padding(batch: CrystalBatch) -> CrystalBatch:
    keep = batch.mask[..., None]
    return batch._replace(frac=np.where(keep, batch.frac, 0.0), species=np.where(keep, batch.species, 0.0))


def check_finite_and_padding_inert(fn, batch: CrystalBatch, rtol: float):
    value, grads = fn(*batch)
    assert np.isfinite(float(value)), f"non-finite prediction for lattice {batch.lattice[0].tolist()}"
    for name, grad in zip(("lattice", "frac", "species"), grads, strict=True):
        assert np.all(np.isfinite(np.asarray(grad))), f"non-finite d/d{name} for lattice {batch.lattice[0].tolist()}"
    for grad in grads[1:]:
        assert np.all(np.asarray(grad)[~batch.mask] == 0.0)  # padding slots get no gradient
    clean, _ = fn(*zero_padding(batch))
    np.testing.assert_allclose(float(value), float(clean), rtol=rtol, atol=rtol)


@pytest.fixture(scope="module")
def cgcnn_fn():
    predictor = load_predictor("cgcnn", "band-gap", image_box=CGCNN_BOX)
    return jax.jit(predictor.build_graph), value_and_grads(predictor)


@fuzz(12)
@given(batch=crystals())
def test_cgcnn_finite_outputs_and_gradients(cgcnn_fn, batch):
    build_graph, fn = cgcnn_fn
    assert not bool(build_graph(batch.lattice, batch.frac, batch.mask).overflow[0])
    check_finite_and_padding_inert(fn, batch, rtol=1e-5)


@pytest.fixture(scope="module")
def crystalformer_fn():
    ckpt = shared_path("fixtures", "crystalformer", "random_bandgap.ckpt")
    config = shared_path("fixtures", "crystalformer", "default.json")
    return value_and_grads(load_predictor("crystalformer", ckpt, config=config, truncation="fixed"))


@fuzz(12)
@given(batch=crystals())
def test_crystalformer_finite_outputs_and_gradients(crystalformer_fn, batch):
    check_finite_and_padding_inert(crystalformer_fn, batch, rtol=1e-4)


@pytest.fixture(scope="module")
def alignn_fn():
    zip_path = shared_path("fixtures", "alignn", "random_eform_alignn.zip")
    return value_and_grads(load_predictor("alignn", zip_path, image_box=CGCNN_BOX))


@pytest.mark.slow
@fuzz(5)
@given(batch=crystals())
def test_alignn_finite_outputs_and_gradients(alignn_fn, batch):
    check_finite_and_padding_inert(alignn_fn, batch, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Parsers


def structure_texts(tmp_path_factory) -> dict[str, str]:
    texts = {p.name: p.read_text() for p in sorted((FIXTURES / "structures").glob("POSCAR-*.vasp"))}
    cif = tmp_path_factory.mktemp("cif") / "AlAs.cif"
    write_cif(read_structure(FIXTURES / "structures" / "POSCAR-JVASP-1372.vasp"), cif)
    texts["AlAs.cif"] = cif.read_text()
    return texts


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return structure_texts(tmp_path_factory)


JUNK = ["", "nan", "inf", "-1e308", "1e400", "0", "-3", "99999999999", "Xx", "Es", "H", "1 2", "#", "_", "'", "?"]


@st.composite
def text_mutations(draw, texts: list[str]):
    text = draw(st.sampled_from(texts))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "duplicate", "truncate", "token", "swap"]))
        if op == "drop":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "truncate":
            lines = lines[:i] + [lines[i][: draw(st.integers(0, len(lines[i])))]]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            tokens = lines[i].split() or [""]
            k = draw(st.integers(0, len(tokens) - 1))
            tokens[k] = draw(st.sampled_from(JUNK) | st.text(max_size=6))
            lines[i] = " ".join(tokens)
    return "\n".join(lines) + "\n"


def parse_cleanly(path):
    """read_structure either returns a structure that batches cleanly or raises a JaxCrystalError, quickly."""
    start = time.perf_counter()
    try:
        structure = read_structure(path)
    except JaxCrystalError as err:
        assert str(path) in str(err)
    else:
        CrystalBatch.from_structures([structure])
    assert time.perf_counter() - start < PARSE_SECONDS


@fuzz(60)
@given(data=st.data())
def test_read_structure_on_mutated_text(tmp_path, texts, data):
    name = data.draw(st.sampled_from(sorted(texts)))
    path = tmp_path / name
    path.write_text(data.draw(text_mutations([texts[name]])))
    parse_cleanly(path)


@fuzz(40)
@given(data=st.data())
def test_read_structure_on_mutated_bytes(tmp_path, texts, data):
    name = data.draw(st.sampled_from(sorted(texts)))
    raw = bytearray(texts[name].encode())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / name
    path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    parse_cleanly(path)


CHECKPOINTS = ["dtypes_legacy.pt", "dtypes_zip.pt", "namespace_zip.pt"]


def mutate_bytes(data, raw: bytes) -> bytes:
    raw = bytearray(raw)
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    if op == "truncate":
        return bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    for _ in range(data.draw(st.integers(1, 16))):
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            j = data.draw(st.integers(0, len(raw) - 1))
            raw[i : i + 4] = raw[j : j + 4]
    return bytes(raw)


@fuzz(120)
@given(data=st.data())
def test_read_torch_checkpoint_on_mutated_bytes(data):
    name = data.draw(st.sampled_from(CHECKPOINTS))
    raw = mutate_bytes(data, (FIXTURES / "torch_reader" / name).read_bytes())
    start = time.perf_counter()
    try:
        read_torch_checkpoint(raw, name=name)
    except JaxCrystalError as err:
        assert str(err).startswith(f"{name}: ")
    assert time.perf_counter() - start < PARSE_SECONDS


@fuzz(40)
@given(data=st.data())
def test_load_converted_weights_on_mutated_bytes(tmp_path, data):
    """Mutated converted CGCNN weights load (if still consistent) or raise a JaxCrystalError."""
    raw = mutate_bytes(data, (FIXTURES / "cgcnn" / "random_cgcnn.npz").read_bytes())
    path = tmp_path / "weights.npz"
    path.write_bytes(raw)
    try:
        load_predictor("cgcnn", path)
    except JaxCrystalError as err:
        assert str(path) in str(err)


def test_fixture_checkpoints_are_intact():
    """The mutation sources themselves parse (otherwise the fuzzing above would only see broken files)."""
    for name in CHECKPOINTS:
        assert read_torch_checkpoint(FIXTURES / "torch_reader" / name) is not None
    with zipfile.ZipFile(FIXTURES / "cgcnn" / "random_cgcnn.npz") as archive:
        assert archive.testzip() is None
    load_predictor("cgcnn", FIXTURES / "cgcnn" / "random_cgcnn.npz")

"""ALIGNN port: converter (both figshare layouts, folder, ALIGNN-FF wheel), outputs / activations / gradients vs
upstream PyTorch references, real ALIGNN-FF energies, invariances."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, shared_path

from converters import alignn as conv
from jaxcrystal import alignn_graph as ag
from jaxcrystal.atom_features import cgcnn_atom_features
from jaxcrystal.crystal import lattice_from_parameters, lattice_to_parameters
from jaxcrystal.errors import CheckpointError, ConfigError
from jaxcrystal.models.alignn import ALIGNN
from jaxcrystal.predictors import alignn as pa
from jaxcrystal.predictors import load_predictor

CKPTS = {
    "eform": "random_eform_alignn.zip",
    "gap": "random_gap_alignn_bestmodel.zip",
    "logk": "random_logk_alignn_small.zip",
}
CASES_JSON = json.loads((FIXTURES / "alignn" / "cases.json").read_text())
NAMES = [c["name"] for c in CASES_JSON["cases"]]
SMALL = [c["name"] for c in CASES_JSON["cases"] if c["num_atoms"] <= 6]
FF_REF = json.loads((FIXTURES / "alignn" / "alignnff_reference.json").read_text())


@pytest.fixture(scope="module")
def data():
    with np.load(FIXTURES / "alignn" / "cases.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def refs():
    with np.load(shared_path("fixtures", "alignn", "reference_outputs.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def converted():
    """name -> (variables, metadata) for the three fixture checkpoints (converted once)."""
    return {k: conv.convert(shared_path("fixtures", "alignn", v)) for k, v in CKPTS.items()}


def batch_inputs(data, names, dtype, ff=False):
    """Padded batch of fixture crystals with their *reference* graphs (frozen topology)."""
    pre = "ff_" if ff else ""
    graphs = [{k: data[f"{n}__{pre}{k}"] for k in ("src", "dst", "image", "lg_src", "lg_dst")} for n in names]
    graph = ag.pad_graphs(graphs)
    n_pad = max(len(data[f"{n}__frac"]) for n in names)
    lat = np.stack([data[f"{n}__lattice"] for n in names])
    frac, species = np.zeros((len(names), n_pad, 3)), np.zeros((len(names), n_pad, 98))
    mask = np.zeros((len(names), n_pad), bool)
    for b, n in enumerate(names):
        k = len(data[f"{n}__frac"])
        frac[b, :k], mask[b, :k] = data[f"{n}__frac"], True
        species[b, :k] = np.eye(98)[data[f"{n}__Z"] - 1] if ff else data[f"{n}__atom_dist"]
    return graph, jnp.asarray(lat, dtype), jnp.asarray(frac, dtype), jnp.asarray(species, dtype), jnp.asarray(mask)


def cast(variables, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype) if a.dtype.kind == "f" else jnp.asarray(a), variables)


def model_fn(variables, metadata, dtype, chunk_size=None):
    module = ALIGNN(**metadata["hyperparameters"])
    params = cast(variables, dtype)

    def f(graph, lat, frac, species, mask):
        return pa.apply_with_graph(module, chunk_size, params, graph, lat, frac, species, mask)

    return f


def check_gradients(refs, key, names, out, grads, suffix, mask):
    """Outputs and gradients vs references with the fixture README's tolerances (§8.1)."""
    rtol_out, rtol_g, atol_scale = (1e-12, 1e-10, 1e-12) if suffix == "f64" else (1e-5, 1e-3, 1e-5)
    errors = {}
    for b, n in enumerate(names):
        k = int(mask[b].sum())
        ref = float(refs[f"{key}__{n}__out_{suffix}"])
        scale = max(1.0, abs(ref))
        assert abs(float(out[b]) - ref) <= rtol_out * scale, (key, n, float(out[b]), ref)
        for what, g in zip(("lattice", "frac", "atom_dist"), grads, strict=True):
            g = np.asarray(g[b])
            g = g if what == "lattice" else g[:k]
            g_ref = refs[f"{key}__{n}__grad_{what}_f64"]
            err = np.abs(g - g_ref).max()
            if np.abs(g_ref).max() > 1e-8:  # skip blocks that are zero by symmetry (stored as ~1e-16 noise)
                errors[(n, what)] = err / np.abs(g_ref).max()
            assert err <= rtol_g * np.abs(g_ref).max() + atol_scale * scale, (key, n, what, err)
    return errors


def run_case_batch(converted, refs, key, names, dtype, suffix):
    variables, metadata = converted[key]
    f = model_fn(variables, metadata, dtype)
    graph, lat, frac, species, mask = batch_inputs_cached(names, dtype)

    def total(lat, frac, species):
        out = f(graph, lat, frac, species, mask)
        return jnp.sum(out), out

    grads, out = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(lat, frac, species)
    return check_gradients(refs, key, names, out, grads, suffix, np.asarray(mask))


_BATCH_CACHE: dict = {}


def batch_inputs_cached(names, dtype):
    key = (tuple(names), jnp.dtype(dtype).name)
    if key not in _BATCH_CACHE:
        with np.load(FIXTURES / "alignn" / "cases.npz") as npz:
            _BATCH_CACHE[key] = batch_inputs({k: npz[k] for k in npz.files}, names, dtype)
    return _BATCH_CACHE[key]


# ----------------------------------------------------------------------------------------------------------
# Converter


def test_converter_layouts_and_mapping(converted, tmp_path):
    """Old ignite layout, new bare best_model.pt, 2/2-layer H=128 log model with 0-d fc.bias; folder layout."""
    for variables, meta in converted.values():
        hp = meta["hyperparameters"]
        p = variables["params"]
        layers = sum(k.startswith("alignn_layers_") for k in p)
        assert (layers, sum(k.startswith("gcn_layers_") for k in p)) == (hp["alignn_layers"], hp["gcn_layers"])
        assert p["fc"]["bias"].shape == (1,) and p["fc"]["kernel"].shape == (hp["hidden_features"], 1)
        assert variables["batch_stats"]["alignn_layers_0"]["edge_update"]["bn_nodes"]["var"].shape == (
            hp["hidden_features"],
        )
        # gamma exactly as alignn computes it
        assert p["edge_embedding_0"]["gamma"] == CASES_JSON["rbf"]["edge_gamma"]
        assert p["angle_embedding_0"]["gamma"] == CASES_JSON["rbf"]["angle_gamma"]
        assert meta["graph"]["use_canonize"] is True
    assert converted["logk"][1]["hyperparameters"]["link"] == "log"
    assert (
        converted["logk"][1]["hyperparameters"]["alignn_layers"],
        converted["eform"][1]["hyperparameters"]["alignn_layers"],
    ) == (2, 4)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(converted["eform"][0]["params"]))
    assert n_params == 4_026_753 + 80 + 40 + 2  # + the RBF centre buffers and the two gammas
    # the same checkpoint as a folder
    src = shared_path("fixtures", "alignn", CKPTS["gap"])
    with zipfile.ZipFile(src) as archive:
        archive.extractall(tmp_path)
    folder_vars, _ = conv.convert(tmp_path / "random_gap_alignn_bestmodel")
    for a, b in zip(jax.tree.leaves(folder_vars), jax.tree.leaves(converted["gap"][0]), strict=True):
        assert np.array_equal(a, b)


def test_converter_cli_roundtrip(converted, tmp_path):
    out = tmp_path / "eform.npz"
    src = shared_path("fixtures", "alignn", CKPTS["logk"])
    subprocess.run([sys.executable, "-m", "converters.alignn", str(src), str(out)], check=True, capture_output=True)
    variables, meta = conv.read_weights(out)
    assert (
        meta["format"] == conv.FORMAT
        and meta["source_sha256"] == hashlib.sha256(zipfile.ZipFile(src).read(meta["source_checkpoint"])).hexdigest()
    )
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(converted["logk"][0]), strict=True):
        assert np.array_equal(a, b)
    assert out.read_bytes() == conv.weights_bytes(*conv.convert(src))  # deterministic


def test_converter_errors(tmp_path, converted):
    src = shared_path("fixtures", "alignn", CKPTS["logk"])
    with zipfile.ZipFile(src) as archive:
        archive.extractall(tmp_path)
    folder = tmp_path / "random_logk_alignn_small"
    config = json.loads((folder / "config.json").read_text())
    config["model"]["bogus"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="bogus"):
        conv.convert(folder)
    del config["model"]["bogus"]
    config["model"]["hidden_features"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        conv.convert(folder)
    (folder / "best_model.pt").unlink()
    with pytest.raises(CheckpointError, match="checkpoint"):
        conv.convert(folder)
    with pytest.raises(CheckpointError):
        conv.convert(tmp_path / "missing.zip")
    with pytest.raises(ConfigError, match="option"):
        load_predictor("alignn", src, bogus=1)


# ----------------------------------------------------------------------------------------------------------
# Parity with PyTorch (reference graphs, frozen topology)


@pytest.mark.parametrize(
    "key", ["eform", pytest.param("gap", marks=pytest.mark.slow), pytest.param("logk", marks=pytest.mark.slow)]
)
def test_outputs_and_gradients_float64(converted, refs, x64, key):
    """Every checkpoint on the six small cases (one padded batch): outputs to 1e-12 relative, gradients w.r.t.
    lattice, frac and species distribution to 1e-10 relative."""
    errors = run_case_batch(converted, refs, key, SMALL, jnp.float64, "f64")
    assert len(errors) == 3 * len(SMALL) - 2 and max(errors.values()) < 1e-10


def test_outputs_and_gradients_float32(converted, refs):
    run_case_batch(converted, refs, "gap", SMALL, jnp.float32, "f32")


@pytest.mark.slow
@pytest.mark.parametrize("key", ["eform", "logk"])
def test_outputs_and_gradients_float32_slow(converted, refs, key):
    run_case_batch(converted, refs, key, SMALL, jnp.float32, "f32")


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CKPTS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_cases(converted, refs, x64, key, dtype):
    """The 22-atom (frac < 0) and 135-atom cells, every checkpoint, float32 and float64."""
    suffix = "f64" if dtype == "float64" else "f32"
    run_case_batch(converted, refs, key, ["limncro_jvasp42300", "srtio3_333_noisy135"], jnp.dtype(dtype), suffix)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CKPTS))
def test_batch_all_cases_float32(converted, refs, key):
    variables, metadata = converted[key]
    graph, lat, frac, species, mask = batch_inputs_cached(NAMES, jnp.float32)
    out = jax.jit(model_fn(variables, metadata, jnp.float32, chunk_size=3))(graph, lat, frac, species, mask)
    ref = refs[f"{key}__batch_all_cases__out_f32"]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_intermediates_float64(converted, x64):
    """Per-layer activations of checkpoint (a) on VSe2 equal the PyTorch ones (float64)."""
    with np.load(shared_path("fixtures", "alignn", "intermediates.npz")) as npz:
        ref = {k: npz[k] for k in npz.files}
    variables, metadata = converted["eform"]
    graph, lat, frac, species, mask = batch_inputs_cached(["vse2_jvasp10"], jnp.float64)
    module = ALIGNN(**metadata["hyperparameters"])
    inputs = pa.flat_inputs(graph, lat, frac, species, mask)
    run = jax.jit(lambda v, *a: module.apply(v, *a, inputs[-1], mutable=["intermediates"]))
    out, state = run(cast(variables, jnp.float64), *inputs[:-1])
    sown = {}
    for path, value in jax.tree_util.tree_flatten_with_path(
        state["intermediates"], is_leaf=lambda x: isinstance(x, tuple)
    )[0]:
        sown["/".join(p.key for p in path)] = np.asarray(value[0])
    sown["output"] = np.asarray(out)
    for key, expected in ref.items():
        name = key.replace("alignn0_node_update_", "alignn_layers_0/node_update/")
        got = sown[name].reshape(expected.shape)
        scale = max(1.0, np.abs(expected).max())
        tol = 1e-7 if expected.dtype == np.float32 else 1e-12  # T-sized arrays are stored rounded to float32
        assert np.abs(got - expected).max() <= tol * scale, key


def test_lattice_parameter_gradients(converted, refs, x64):
    """Gradients w.r.t. (a, b, c) and (alpha, beta, gamma) in degrees, SMOACS's standard orientation."""
    variables, metadata = converted["logk"]
    f = model_fn(variables, metadata, jnp.float64)
    names = ["triclinic6", "srtio3_cubic5"]
    graph, lat, frac, species, mask = batch_inputs_cached(names, jnp.float64)
    abc, angles = lattice_to_parameters(lat)

    def total(abc, angles):
        return jnp.sum(f(graph, lattice_from_parameters(abc, angles), frac, species, mask))

    g_abc, g_ang = jax.jit(jax.grad(total, argnums=(0, 1)))(abc, angles)
    for b, n in enumerate(names):
        for what, g in (("abc", g_abc), ("angles_deg", g_ang)):
            g_ref = refs[f"logk__{n}__grad_{what}_f64"]
            np.testing.assert_allclose(g[b], g_ref, rtol=1e-8, atol=1e-9 * max(1.0, np.abs(g_ref).max()))


# ----------------------------------------------------------------------------------------------------------
# Predictor (in-jit graph) and invariances


@pytest.fixture(scope="module")
def gap_predictor():
    return load_predictor("alignn", shared_path("fixtures", "alignn", CKPTS["gap"]), image_box=3)


def predict_batch(predictor, lat, frac, species, mask):
    return jax.jit(predictor.apply)(predictor.params, lat, frac, species, mask)


def test_predictor_in_jit_graph_and_invariances(gap_predictor, refs, data):
    """load_predictor + in-jit graph (float32) on one padded batch: triclinic6, its permutation, integer shifts
    of its frac and its 2x1x1 supercell (all equal), cubic SrTiO3 (exact ties) and the 1-atom Xe (vs the
    single-crystal references)."""
    _, lat, frac, species, mask = batch_inputs(data, ["triclinic6"], jnp.float32)
    rng = np.random.default_rng(0)
    perm = rng.permutation(6)
    shift = jnp.asarray(rng.integers(-2, 3, (1, 6, 3)), jnp.float32)
    super_lat = lat.at[:, 0].multiply(2.0)
    half = jnp.asarray([0.5, 1.0, 1.0])
    super_frac = jnp.concatenate([frac * half, (frac + jnp.asarray([1.0, 0, 0])) * half], 1)

    def pad(x, n=12):
        return jnp.concatenate([x, jnp.zeros((x.shape[0], n - x.shape[1]) + x.shape[2:], x.dtype)], 1)

    _, lat2, frac2, species2, mask2 = batch_inputs(data, ["srtio3_cubic5", "xe_jvasp21210"], jnp.float32)
    lats = jnp.concatenate([lat, lat, lat, super_lat, lat2])
    fracs = jnp.concatenate([pad(frac), pad(frac[:, perm]), pad(frac + shift), super_frac, pad(frac2)])
    specs = jnp.concatenate(
        [pad(species), pad(species[:, perm]), pad(species), jnp.concatenate([species] * 2, 1), pad(species2)]
    )
    masks = jnp.concatenate([pad(mask), pad(mask), pad(mask), jnp.ones((1, 12), bool), pad(mask2)])
    graph = jax.jit(gap_predictor.build_graph)(lats, fracs, masks)
    assert not np.asarray(graph.overflow).any()
    out = predict_batch(gap_predictor, lats, fracs, specs, masks)
    names = ["triclinic6"] * 4 + ["srtio3_cubic5", "xe_jvasp21210"]
    np.testing.assert_allclose(out, [float(refs[f"gap__{n}__out_f32"]) for n in names], rtol=2e-6)


def test_chunking_and_padding_do_not_change_outputs(converted, x64):
    """chunk_size 2 (lax.map + checkpoint, padded last chunk) = one shot = eager; padding atoms are inert."""
    variables, metadata = converted["logk"]
    graph, lat, frac, species, mask = batch_inputs_cached(SMALL[:3], jnp.float64)
    junk = jnp.where(mask[..., None], species, 0.3)  # species and positions of padding atoms must not matter
    outs = [jax.jit(model_fn(variables, metadata, jnp.float64, c))(graph, lat, frac, junk, mask) for c in (None, 2)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-12)
    eager = model_fn(variables, metadata, jnp.float64)(graph, lat, frac, junk, mask)  # jit vs eager
    np.testing.assert_allclose(eager, outs[0], rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Real weights: ALIGNN-FF alignnff_wt10 from the PyPI wheel alignn==2023.7.1


def alignn_wheel() -> Path:
    """The cached wheel (downloaded once with `pip download --no-deps`), or skip when offline."""
    cache = Path(os.environ.get("JAXCRYSTAL_CACHE", Path.home() / ".cache" / "jaxcrystal"))
    wheel = cache / FF_REF["wheel"]
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "alignn==2023.7.1", "-d", str(cache)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"cannot download {FF_REF['wheel']} from PyPI (offline?): {exc}")
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != FF_REF["wheel_sha256"]:
        pytest.fail(f"{wheel}: sha256 differs from {FF_REF['wheel_sha256']}")
    return wheel


@pytest.fixture(scope="module")
def alignn_ff():
    wheel = alignn_wheel()
    with zipfile.ZipFile(wheel) as archive:
        assert (
            hashlib.sha256(archive.read(FF_REF["best_model_pt_member"])).hexdigest() == FF_REF["best_model_pt_sha256"]
        )
    return conv.convert(wheel, member="alignn/ff/alignnff_wt10")


def test_alignn_ff_energies_float64(alignn_ff, x64, data):
    """alignnff_wt10 energies per atom on the reference (non-canonized) graphs vs upstream (float64; float32 is
    covered by the in-jit predictor test)."""
    variables, metadata = alignn_ff
    assert metadata["hyperparameters"]["norm"] == "layer" and metadata["graph"]["use_canonize"] is False
    for dtype, suffix, tol in ((jnp.float64, "f64", 1e-8),):
        graph, lat, frac, species, mask = batch_inputs(data, SMALL, dtype, ff=True)
        out = jax.jit(model_fn(variables, metadata, dtype))(graph, lat, frac, species, mask)
        ref = [FF_REF["results"][n][f"energy_per_atom_eV_{suffix}"] for n in SMALL]
        np.testing.assert_allclose(out, ref, rtol=0, atol=tol)


def test_alignn_ff_predictor_in_jit_graph(data):
    """load_predictor on the wheel (member folder), non-canonized in-jit graph, float32."""
    predictor = load_predictor("alignn", alignn_wheel(), member="alignn/ff/alignnff_wt10", image_box=2)
    assert predictor.units == "eV/atom"
    names = ["triclinic6", "srtio3_cubic5", "vse2_jvasp10"]
    _, lat, frac, _, mask = batch_inputs(data, names, jnp.float32)
    species = batch_inputs(data, names, jnp.float32, ff=True)[3]
    out = predict_batch(predictor, lat, frac, species, mask)
    ref = [FF_REF["results"][n]["energy_per_atom_eV_f32"] for n in names]
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.slow
def test_alignn_ff_large_cases(alignn_ff, x64, data):
    variables, metadata = alignn_ff
    names = ["limncro_jvasp42300", "srtio3_333_noisy135"]
    graph, lat, frac, species, mask = batch_inputs(data, names, jnp.float64, ff=True)
    out = jax.jit(model_fn(variables, metadata, jnp.float64))(graph, lat, frac, species, mask)
    ref = [FF_REF["results"][n]["energy_per_atom_eV_f64"] for n in names]
    np.testing.assert_allclose(out, ref, atol=1e-8)


def test_atom_feature_table_matches_fixture(data):
    np.testing.assert_array_equal(cgcnn_atom_features(), data["atom_features_98x92"])


def test_predictor_from_converted_npz(tmp_path, converted, gap_predictor):
    out = tmp_path / "gap.npz"
    out.write_bytes(conv.weights_bytes(*converted["gap"]))
    predictor = load_predictor("alignn", out)
    assert predictor.metadata["hyperparameters"] == gap_predictor.metadata["hyperparameters"]
    for a, b in zip(jax.tree.leaves(predictor.params), jax.tree.leaves(gap_predictor.params), strict=True):
        assert np.array_equal(a, b)

"""Crystalformer port: parity with the upstream golden fixtures, converter, invariances.

The golden data (three random-weight Lightning checkpoints, 12-14 MB each, and `cases.npz`) are read from
../shared/fixtures/crystalformer; those tests skip when it is absent. The invariance tests use a small random model
and need nothing else.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path

import jaxcrystal
from converters.crystalformer import convert_checkpoint, main
from jaxcrystal.errors import CheckpointError, ConfigError
from jaxcrystal.models.crystalformer import (
    Crystalformer,
    CrystalformerConfig,
    cheapest_softmax_window,
    cheapest_window,
    intermediate_grids,
    range_overflow,
    required_range,
    required_softmax_window,
    required_window,
)
from jaxcrystal.models.periodic_attention import basis_cutoff, crystal_branches
from jaxcrystal.predictors.crystalformer import make_apply

CKPTS = {"bandgap": "default.json", "eform": "default.json", "layers7": "layers7.json"}
SMALL_CASES = ("nacl_conv", "srtio3_cubic", "triclinic11", "tiny_rhombo")
ACT_CASES = ("triclinic11", "tiny_rhombo")
SMALL_RANGE = 4  # adaptive box bound covering tiny_rhombo (interplanar spacing 1.80 Å)


def fixture_file(name):
    return shared_path("fixtures", "crystalformer", name)


@functools.cache
def cases():
    return dict(np.load(fixture_file("cases.npz")))


@functools.cache
def converted(ck):
    return convert_checkpoint(fixture_file(f"random_{ck}.ckpt"), fixture_file(CKPTS[ck]))


@functools.cache
def apply_fn(ck, truncation, gradient="exact", max_range=None):
    params, metadata = converted(ck)
    config = CrystalformerConfig.from_dict(metadata["config"])
    return make_apply(config, truncation, gradient, None, max_range), params


def padded(names, z=None):
    """The fixture crystals `names` as one padded batch (float64 numpy) and their atom counts."""
    z = cases() if z is None else z
    members = []
    for name in names:
        sizes, offset = z[f"{name}/sizes"], 0
        for b, size in enumerate(sizes):
            sl = slice(offset, offset + size)
            members.append((z[f"{name}/lattice"][b], z[f"{name}/frac"][sl], z[f"{name}/x"][sl]))
            offset += size
    n = max(len(m[1]) for m in members)
    lattice = np.stack([m[0] for m in members])
    frac = np.zeros((len(members), n, 3))
    species = np.zeros((len(members), n, 98))
    mask = np.zeros((len(members), n), bool)
    for b, (_, f, x) in enumerate(members):
        frac[b, : len(f)], species[b, : len(f)], mask[b, : len(f)] = f, x, True
    return (lattice, frac, species, mask), [len(m[1]) for m in members]


def cast(batch, dtype):
    lattice, frac, species, mask = batch
    return jnp.asarray(lattice, dtype), jnp.asarray(frac, dtype), jnp.asarray(species, dtype), jnp.asarray(mask)


def rel_err(got, ref, floor=0.0):
    """max |got - ref| / max(max |ref|, floor)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), floor))


# ---------------------------------------------------------------------------------------------------------------
# converter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ck", sorted(CKPTS))
def test_converter_reads_swa_copy_and_targets(ck):
    params, metadata = converted(ck)
    info = json.loads(fixture_file("cases.json").read_text())["checkpoints"][ck]
    config = CrystalformerConfig.from_dict(metadata["config"])
    assert config.num_layers == info["num_layers"]
    assert metadata["target_mean"] == pytest.approx(info["target_mean_float32"], rel=1e-7)
    assert metadata["target_std"] == pytest.approx(info["target_std_float32"], rel=1e-7)
    for layer, scale in enumerate(info["gauss_scale_per_layer"]):
        np.testing.assert_array_equal(params[f"layer_{layer}_attn"]["gauss_scale"], np.float32(scale))
    assert params["embedding"]["kernel"].shape == (98, 128)
    assert params["layer_0_attn"]["pe_proj"].shape == (8, 16, 64)


def test_converter_refuses_mismatched_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.4\..*num_layers=4"):
        convert_checkpoint(fixture_file("random_layers7.ckpt"), fixture_file("default.json"))
    narrow = json.loads(fixture_file("default.json").read_text()) | {"ff_dim": 256}
    with pytest.raises(CheckpointError, match=r"linear1\.weight.*\(512, 128\).*\(256, 128\)"):
        convert_checkpoint(fixture_file("random_bandgap.ckpt"), narrow)
    with pytest.raises(ConfigError, match="domain"):
        convert_checkpoint(fixture_file("random_bandgap.ckpt"), narrow | {"ff_dim": 512, "domain": "reci"})


def test_cli_writes_weights_that_load_predictor_accepts(tmp_path, capsys):
    ckpt, config = fixture_file("random_eform.ckpt"), fixture_file("default.json")
    assert main([str(ckpt), "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    assert "4 layers" in capsys.readouterr().out
    from_npz = jaxcrystal.load_predictor("crystalformer", tmp_path / "out", truncation="fixed")
    from_ckpt = jaxcrystal.load_predictor("crystalformer", ckpt, config=config, truncation="fixed")
    assert (from_npz.name, from_npz.units) == ("formation-energy-per-atom", "eV/atom")
    batch, _ = padded(["srtio3_cubic"])
    np.testing.assert_array_equal(from_npz(*cast(batch, jnp.float32)), from_ckpt(*cast(batch, jnp.float32)))
    np.testing.assert_allclose(
        from_npz(*cast(batch, jnp.float32)), cases()["srtio3_cubic/eform/out_fixed_f32"], rtol=0, atol=2e-6
    )
    with pytest.raises(ConfigError, match="num_layers"):
        jaxcrystal.load_predictor("crystalformer", tmp_path / "out", config=fixture_file("layers7.json"))
    assert main([str(fixture_file("random_layers7.ckpt")), "--config", str(config), "--out", str(tmp_path)]) == 2
    with pytest.raises(CheckpointError, match="no embedded"):
        jaxcrystal.load_predictor("crystalformer", "band-gap")


# ---------------------------------------------------------------------------------------------------------------
# parity with the upstream fixtures
# ---------------------------------------------------------------------------------------------------------------


def run_with_intermediates(ck, truncation, batch, max_range):
    params, metadata = converted(ck)
    config = CrystalformerConfig.from_dict(metadata["config"])
    model = Crystalformer(config, truncation=truncation, max_range=max_range)
    dtype = batch[0].dtype
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    out, state = jax.jit(lambda p, *b: model.apply({"params": p}, *b, mutable=["intermediates"]))(params, *batch)
    return out, {key: value[0] for key, value in state["intermediates"].items()}


@pytest.mark.parametrize("truncation", ["fixed", "adaptive"])
@pytest.mark.parametrize("ck", sorted(CKPTS))
def test_outputs_and_activations_float64(ck, truncation, x64):
    """The four single-crystal cases in one padded batch: outputs, and per-layer activations of the small ones."""
    z = cases()
    batch, sizes = padded(SMALL_CASES)
    out, acts = run_with_intermediates(ck, truncation, cast(batch, jnp.float64), SMALL_RANGE)
    for b, name in enumerate(SMALL_CASES):
        assert abs(float(out[b]) - z[f"{name}/{ck}/out_{truncation}_f64"][0]) < 1e-10, name
    for name in ACT_CASES:
        b, n = SMALL_CASES.index(name), sizes[SMALL_CASES.index(name)]
        prefix = f"{name}/{ck}/act_{truncation}_f64/"
        keys = [k[len(prefix) :] for k in z if k.startswith(prefix)]
        num_layers = CrystalformerConfig.from_dict(converted(ck)[1]["config"]).num_layers
        assert len(keys) == 2 + num_layers * (3 if truncation == "adaptive" else 2)  # embed, pooled, per layer
        for key in keys:
            got = acts[key][b] if key == "pooled" else acts[key][b, :n]
            if key.startswith("box"):
                np.testing.assert_array_equal(got, z[prefix + key], err_msg=f"{prefix}{key}")
            else:
                assert np.max(np.abs(np.asarray(got) - z[prefix + key])) < 1e-10, prefix + key


def float32_cases():
    default = [("bandgap", "fixed"), ("bandgap", "adaptive")]
    slow = [(ck, t) for ck in ("eform", "layers7") for t in ("fixed", "adaptive")]
    return [pytest.param(*p) for p in default] + [pytest.param(*p, marks=pytest.mark.slow) for p in slow]


@pytest.mark.parametrize(("ck", "truncation"), float32_cases())
def test_outputs_float32(ck, truncation):
    z = cases()
    apply, params = apply_fn(ck, truncation, max_range=SMALL_RANGE)
    batch, _ = padded(SMALL_CASES)
    out = np.asarray(apply(params, *cast(batch, jnp.float32)))
    assert out.dtype == np.float32
    for b, name in enumerate(SMALL_CASES):
        assert abs(out[b] - z[f"{name}/{ck}/out_{truncation}_f32"][0]) < 5e-6, name
        assert abs(out[b] - z[f"{name}/{ck}/out_{truncation}_f64"][0]) < 2e-5, name


GRADIENT_VARIANTS = ("exact_fixed_f64", "exact_adaptive_f64", "smoacs_fixed_f64", "smoacs_fixed_f32")
DEFAULT_GRADIENTS = {("bandgap", "exact_fixed_f64"), ("bandgap", "smoacs_fixed_f32")}


def gradient_cases():
    return [
        pytest.param(ck, v, marks=() if (ck, v) in DEFAULT_GRADIENTS else pytest.mark.slow)
        for ck in sorted(CKPTS)
        for v in GRADIENT_VARIANTS
    ]


def batch_gradient(ck, variant, batch):
    gradient, truncation, precision = variant.split("_")
    apply, params = apply_fn(ck, truncation, gradient, SMALL_RANGE)
    lattice, frac, species, mask = cast(batch, jnp.float64 if precision == "f64" else jnp.float32)
    grad = jax.jit(jax.grad(lambda *a: apply(params, *a, mask).sum(), argnums=(0, 1, 2)))
    return [np.asarray(g) for g in grad(lattice, frac, species)]


def check_gradients(ck, variant, names, grads, sizes, z):
    precision = variant.split("_")[-1]
    for b, name in enumerate(names):
        n = sizes[b]
        got = {"lattice": grads[0][b : b + 1], "frac": grads[1][b, :n], "x": grads[2][b, :n]}
        for key, value in got.items():
            assert np.isfinite(value).all()
            ref = z[f"{name}/{ck}/grad_{variant}/{key}"]
            if precision == "f64":
                assert np.max(np.abs(value - ref)) < 1e-10 * max(1.0, np.max(np.abs(ref))), (name, key)
            else:  # float32: within 1e-4 of the block's largest component (frac blocks of ideal crystals are ~0)
                assert rel_err(value, ref, floor=0.1) < 1e-4, (name, key)
                ref64 = z[f"{name}/{ck}/grad_{variant.replace('f32', 'f64')}/{key}"]
                assert rel_err(value, ref64, floor=0.1) < 1e-4, (name, key)


@pytest.mark.parametrize(("ck", "variant"), gradient_cases())
def test_gradients_small_cases(ck, variant, x64):
    """d(sum of outputs)/d(lattice, frac, species) for the four single-crystal cases, batched in one call."""
    batch, sizes = padded(SMALL_CASES)
    grads = batch_gradient(ck, variant, batch)
    check_gradients(ck, variant, SMALL_CASES, grads, sizes, cases())


def test_exact_gradient_matches_finite_differences_and_smoacs_does_not(x64):
    """Directional derivative along a random unit (frac, lattice) direction: triclinic11 / eform, float64 FD.

    (Smallest |ReLU input| there is 4.7e-5, so the ±1e-6 steps stay on one side of every kink.)
    """
    z = cases()
    batch, _ = padded(["triclinic11"])
    lattice, frac, species, mask = cast(batch, jnp.float64)
    rng = np.random.default_rng(0)
    d_lat, d_frac = rng.normal(size=lattice.shape), rng.normal(size=frac.shape)
    norm = np.sqrt(np.sum(d_lat**2) + np.sum(d_frac**2))
    d_lat, d_frac = d_lat / norm, d_frac / norm
    exact, params = apply_fn("eform", "fixed", "exact")
    smoacs, _ = apply_fn("eform", "fixed", "smoacs")
    f = jax.jit(lambda t: exact(params, lattice + t * d_lat, frac + t * d_frac, species, mask)[0])
    h = 1e-6
    fd = float((f(h) - f(-h)) / (2 * h))
    assert abs(float(f(0.0)) - z["triclinic11/eform/out_fixed_f64"][0]) < 1e-10
    for apply, agrees in ((exact, True), (smoacs, False)):
        g_lat, g_frac = jax.grad(lambda la, fr, a=apply: a(params, la, fr, species, mask)[0], argnums=(0, 1))(
            lattice, frac
        )
        directional = float(jnp.sum(g_lat * d_lat) + jnp.sum(g_frac * d_frac))
        assert (abs(directional - fd) < 1e-6 * abs(fd)) == agrees, (directional, fd)


@pytest.mark.slow
@pytest.mark.parametrize("ck", sorted(CKPTS))
def test_perovskite_supercell_and_mixed_batch(ck, x64):
    """perov333_soft (135 atoms): outputs, all gradient variants, FD directional derivatives; mixed_batch."""
    z = cases()
    batch, sizes = padded(["perov333_soft"])
    for truncation in ("fixed", "adaptive"):
        for dtype, tag, tol in ((jnp.float64, "f64", 1e-10), (jnp.float32, "f32", 5e-6)):
            apply, params = apply_fn(ck, truncation, max_range=2)
            out = apply(params, *cast(batch, dtype))
            assert abs(float(out[0]) - z[f"perov333_soft/{ck}/out_{truncation}_{tag}"][0]) < tol
    for variant in GRADIENT_VARIANTS:
        grads = batch_gradient(ck, variant, batch)
        check_gradients(ck, variant, ["perov333_soft"], grads, sizes, z)
        if variant.endswith("fixed_f64"):
            dd = f"perov333_soft/{ck}/dirderiv/"
            for k in range(3):
                directional = sum(
                    np.sum(g.reshape(z[f"{dd}dir{k}_{key}"].shape) * z[f"{dd}dir{k}_{key}"])
                    for g, key in zip(grads, ("lattice", "frac", "x"), strict=True)
                )
                fd, err = z[f"{dd}fd_fixed_f64"][k], z[f"{dd}fd_err_est"][k]
                if variant.startswith("exact") or k == 0:
                    assert abs(directional - fd) < max(10 * err, 1e-9), (variant, k)
    mixed, _ = padded(["mixed_batch"])
    for truncation in ("fixed", "adaptive"):
        apply, params = apply_fn(ck, truncation, max_range=SMALL_RANGE)
        out = np.asarray(apply(params, *cast(mixed, jnp.float64)))
        np.testing.assert_allclose(out, z[f"mixed_batch/{ck}/out_{truncation}_f64"], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# invariances (small random model, no fixtures needed)
# ---------------------------------------------------------------------------------------------------------------

TOY = CrystalformerConfig(num_layers=2, model_dim=16, head_num=2, ff_dim=32, value_pe_dist_real=16, embedding_dim=(16,))


@functools.cache
def toy_params():
    """Random parameters of the TOY model: N(0, 1/fan_in) weights, gauss_scale [1, 0], identity target fold."""
    model = Crystalformer(TOY, truncation="fixed")
    shapes = jax.eval_shape(model.init, jax.random.key(0), *toy_crystal())["params"]
    rng = np.random.default_rng(0)
    special = {"gauss_scale": np.array([1.0, 0.0]), "target_mean": np.zeros(1), "target_std": np.ones(1)}

    def init(path, leaf):
        name = path[-1].key
        if name in special:
            return jnp.asarray(special[name], jnp.float32)
        fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 16
        return jnp.asarray(rng.normal(scale=fan_in**-0.5, size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(init, shapes)


def toy_crystal(seed=0, n=4, a=7.5):
    """One random cubic-ish crystal [1, n] with soft species, float64 numpy."""
    rng = np.random.default_rng(seed)
    lattice = np.diag([a, a * 1.05, a * 0.97])[None] + rng.normal(scale=0.1, size=(1, 3, 3))
    frac = rng.uniform(size=(1, n, 3))
    species = rng.dirichlet(np.ones(98) * 0.05, size=(1, n))
    return lattice, frac, species, np.ones((1, n), bool)


@functools.cache
def toy_apply(truncation="fixed", gradient="exact", chunk_size=None, max_range=None):
    return functools.partial(make_apply(TOY, truncation, gradient, chunk_size, max_range), toy_params())


def test_atom_permutation_and_rigid_translation(x64):
    lattice, frac, species, mask = toy_crystal(n=6)
    apply = toy_apply()
    y = apply(lattice, frac, species, mask)
    perm = np.random.default_rng(1).permutation(6)
    np.testing.assert_allclose(apply(lattice, frac[:, perm], species[:, perm], mask), y, rtol=1e-12)
    shifted = frac + np.array([0.37, -0.81, 0.55])  # wraps through the cell boundary
    np.testing.assert_allclose(apply(lattice, shifted, species, mask), y, rtol=1e-9)
    assert abs(float(apply(lattice, frac + np.array([0.3, 0.0, 0.0]) * frac, species, mask)[0] - y[0])) > 1e-3


def test_supercell_gives_the_same_property(x64):
    lattice, frac, species, mask = toy_crystal(n=3)
    shifts = np.array([[i, j, 0] for i in range(2) for j in range(2)])
    super_frac = ((frac[0][None, :, :] + shifts[:, None, :]) / np.array([2, 2, 1])).reshape(1, -1, 3)
    super_lattice = lattice * np.array([2, 2, 1])[None, :, None]
    super_species = np.tile(species, (1, 4, 1))
    for truncation in ("fixed", "adaptive"):
        apply = toy_apply(truncation)
        y = apply(lattice, frac, species, mask)
        y_super = apply(super_lattice, super_frac, super_species, np.ones((1, 12), bool))
        np.testing.assert_allclose(y_super, y, rtol=1e-9)


def test_padded_batch_equals_single_crystals_and_gradients_are_finite(x64):
    """Three 4-atom crystals alone vs in one batch padded to 6 atoms (padding on top of real atoms: d = 0)."""
    crystals = [toy_crystal(seed=s, n=4) for s in (1, 2, 3)]
    apply = toy_apply("adaptive", max_range=2)
    lattice = np.concatenate([c[0] for c in crystals])
    rng = np.random.default_rng(5)
    frac = rng.uniform(size=(3, 6, 3))
    species = rng.uniform(size=(3, 6, 98))  # garbage species on padding atoms
    mask = np.zeros((3, 6), bool)
    for b, (_, f, s, _) in enumerate(crystals):
        frac[b, :4], species[b, :4], mask[b, :4] = f[0], s[0], True
        frac[b, 4] = f[0, 0]
    y = apply(lattice, frac, species, mask)
    np.testing.assert_allclose(y, [float(apply(*c)[0]) for c in crystals], rtol=1e-12)

    grad = jax.grad(lambda la, fr, sp, m: jnp.sum(apply(la, fr, sp, m)), argnums=(0, 1, 2))
    g_lat, g_frac, g_sp = (np.asarray(g) for g in grad(lattice, frac, species, mask))
    for g in (g_lat, g_frac, g_sp):
        assert np.isfinite(g).all()
    assert not np.any(g_frac[~mask]) and not np.any(g_sp[~mask])
    single = [np.asarray(g) for g in grad(*crystals[1])]
    np.testing.assert_allclose(g_lat[1], single[0][0], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g_frac[1, :4], single[1][0], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g_sp[1, :4], single[2][0], rtol=1e-10, atol=1e-13)


def test_chunking_jit_and_eager_agree(x64):
    """Blocks of 3 query rows (queries padded inside a crystal) or of 2 whole crystals vs eager and unblocked."""
    crystals = [toy_crystal(seed=s, n=5) for s in range(2)]
    lattice, frac, species, mask = (np.concatenate(p) for p in zip(*crystals, strict=True))
    model = Crystalformer(TOY, truncation="fixed", chunk_size=None)
    eager = model.apply({"params": toy_params()}, lattice, frac, species, mask)
    grads = []
    for chunk_size in (None, 3, 10):
        apply = toy_apply("fixed", chunk_size=chunk_size)
        np.testing.assert_allclose(jax.jit(apply)(lattice, frac, species, mask), eager, rtol=1e-12)
        if chunk_size != 10:
            grads.append(jax.grad(lambda f, a=apply: a(lattice, f, species, mask).sum())(frac))
    for g in grads[1:]:
        np.testing.assert_allclose(g, grads[0], rtol=1e-10, atol=1e-13)


def test_adaptive_range_bound_and_overflow_flag():
    rhombo = np.array([[2.2, 0, 0], [1.1, 1.905, 0], [1.1, 0.635, 1.796]])
    assert required_range(rhombo, CrystalformerConfig()) == (4, 4, 4)
    assert required_range(np.eye(3) * 5.64, CrystalformerConfig()) == (2, 2, 2)
    flags = range_overflow(jnp.stack([jnp.asarray(rhombo), jnp.eye(3) * 5.64]), (2, 2, 2), CrystalformerConfig())
    assert flags.tolist() == [True, False]
    apply = toy_apply("adaptive")
    with pytest.raises(ConfigError, match="static max_range"):
        jax.jit(apply)(*toy_crystal())


def test_basis_window_gives_the_whole_box_result(x64):
    """The basis window (auto, and static under jit with a cell too small for it) vs the whole box: equal values and
    input gradients; TOY's basis reaches 14 + 0.875·√80 = 21.8 Å, a 12 Å cell needs 4 of the 5 translations."""
    big, small = toy_crystal(seed=1, n=5, a=12.0), toy_crystal(seed=2, n=5, a=9.0)
    assert required_window(big[0], TOY) == (4, 4, 4) and required_window(small[0], TOY) == (5, 5, 5)
    lattice, frac, species, mask = (np.concatenate(p) for p in zip(big, small, strict=True))
    whole = functools.partial(make_apply(TOY, "fixed", basis_window=None), toy_params())
    auto = functools.partial(make_apply(TOY, "fixed"), toy_params())
    static = jax.jit(functools.partial(make_apply(TOY, "fixed", basis_window=4), toy_params()))

    def grads(apply, *crystal):
        return jax.grad(lambda la, fr, sp: apply(la, fr, sp, crystal[3]).sum(), argnums=(0, 1, 2))(*crystal[:3])

    np.testing.assert_allclose(auto(*big), whole(*big), rtol=1e-12)
    np.testing.assert_allclose(static(lattice, frac, species, mask), whole(lattice, frac, species, mask), rtol=1e-12)
    for got, want in zip(grads(auto, *big), grads(whole, *big), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    batch = (lattice, frac, species, mask)
    for got, want in zip(grads(static, *batch), grads(whole, *batch), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    with pytest.raises(ConfigError, match="basis_window"):
        make_apply(TOY, "fixed", basis_window=(4, 4))(toy_params(), *big)
    with pytest.raises(ConfigError, match="smaller_grids must be True or False, got 'no'"):
        jaxcrystal.load_predictor("crystalformer", "unused.npz", smaller_grids="no")


def test_softmax_window_gives_the_whole_box_result(x64):
    """The softmax window (auto, and static under jit next to a cell too small for it), alone and with a basis
    window, vs the whole box: equal values and input gradients. TOY's flattest Gaussian reaches √(D² + 313.6) Å:
    20.4 Å for a 12 Å cell (4 of the 5 translations), 19.5 Å for a 9 Å one (all 5)."""
    big, small = toy_crystal(seed=1, n=5, a=12.0), toy_crystal(seed=2, n=5, a=9.0)
    assert required_softmax_window(big[0], TOY) == (4, 4, 4) and required_softmax_window(small[0], TOY) == (5, 5, 5)
    batch = tuple(np.concatenate(p) for p in zip(big, small, strict=True))
    params = toy_params()
    whole = functools.partial(make_apply(TOY, "fixed", basis_window=None, softmax_window=None), params)
    auto = functools.partial(make_apply(TOY, "fixed", basis_window=None), params)
    static = jax.jit(functools.partial(make_apply(TOY, "fixed", basis_window=None, softmax_window=4), params))
    both = jax.jit(functools.partial(make_apply(TOY, "fixed", basis_window=4, softmax_window=4), params))

    def grads(apply, *crystal):
        return jax.grad(lambda la, fr, sp: apply(la, fr, sp, crystal[3]).sum(), argnums=(0, 1, 2))(*crystal[:3])

    for apply, crystals in ((auto, big), (static, batch), (both, batch)):
        np.testing.assert_allclose(apply(*crystals), whole(*crystals), rtol=1e-12)
        for got, want in zip(grads(apply, *crystals), grads(whole, *crystals), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    with pytest.raises(ConfigError, match="softmax_window"):
        make_apply(TOY, "fixed", softmax_window=(4, 4))(params, *big)


def test_cheapest_softmax_window():
    """12 Å cells need 4 translations per axis, 6 Å ones all 5: one crystal per block, S = 4 (3 x 64 + 125 <
    4 x 125); all four in one block falls back: no window; a window saving less than a fifth: none; with one
    short axis the (5, 4, 4) variant serves."""
    cells = np.stack([np.eye(3) * 12.0] * 3 + [np.eye(3) * 6.0])
    assert cheapest_softmax_window(cells, TOY, (2, 2, 2), 135, (4, 4, 4)) == (4, 4, 4)
    assert cheapest_softmax_window(cells, TOY, (2, 2, 2), 5, (5, 5, 5)) is None
    assert cheapest_softmax_window(cells[:3], TOY, (2, 2, 2), 5, None) == (4, 4, 4)
    mostly_small = np.stack([np.eye(3) * 6.0] * 9 + [np.eye(3) * 12.0])
    assert cheapest_softmax_window(mostly_small, TOY, (2, 2, 2), 135, (4, 4, 4)) is None
    short = np.stack([np.diag([12.0, 6.0, 12.0]), np.diag([6.0, 12.0, 12.0])])
    assert cheapest_softmax_window(short, TOY, (2, 2, 2), 135, (4, 4, 4)) == (4, 4, 4)


def test_cheapest_window_weighs_fallback_blocks():
    """TOY needs 4 translations per axis for a 12 Å cell and the whole 5 for a 6 Å one: with one crystal per
    block, W = 4 (3 x 64 + 125 < 4 x 125); with all four crystals in one block, the block falls back: W = 5."""
    cells = np.stack([np.eye(3) * 12.0] * 3 + [np.eye(3) * 6.0])
    assert cheapest_window(cells, TOY, (2, 2, 2), num_atoms=135) == (4, 4, 4)
    assert cheapest_window(cells, TOY, (2, 2, 2), num_atoms=5) == (5, 5, 5)
    assert cheapest_window(cells[:3], TOY, (2, 2, 2), num_atoms=5) == (4, 4, 4)
    # One short axis (any of them): the (5, 4, 4) variant on sorted axes, 80 translations instead of 125.
    short = np.stack([np.diag([12.0, 6.0, 12.0]), np.diag([6.0, 12.0, 12.0])])
    assert cheapest_window(short, TOY, (2, 2, 2), num_atoms=135) == (4, 4, 4)
    # A window that saves less than a fifth of the basis work is not taken: 9 x 125 + 64 vs 10 x 125.
    mostly_small = np.stack([np.eye(3) * 6.0] * 9 + [np.eye(3) * 12.0])
    assert cheapest_window(mostly_small, TOY, (2, 2, 2), num_atoms=135) == (5, 5, 5)
    # 7.5 Å cells on a grid sized for 2 Å ones: they run on the smaller (2, 2, 2) grid, where TOY's basis (6
    # translations per axis) needs all 5: no window; without smaller grids a window saves work on the 9³ grid.
    cells = np.stack([np.eye(3) * 7.5] * 4)
    assert cheapest_window(cells, TOY, (4, 4, 4), num_atoms=135, smaller_grids=True) == (9, 9, 9)
    assert cheapest_window(cells, TOY, (4, 4, 4), num_atoms=135) == (6, 6, 6)


def test_smaller_grids_give_the_whole_grid_result(x64):
    """Adaptive boxes on the grid the smallest of six cells needs ((5, 4, 4)); in the second layer three crystals
    fit (2, 2, 2), one (3, 3, 3) and two only (4, 4, 4). Sorted into blocks of two crystals by the grid they fit,
    values and input gradients equal those of the whole grid."""
    sizes = (7.5, 2.0, 7.0, 3.0, 7.2, 1.8)
    crystals = [toy_crystal(seed=s, n=3, a=a) for s, a in enumerate(sizes)]
    batch = tuple(np.concatenate(p) for p in zip(*crystals, strict=True))
    max_range = required_range(batch[0], TOY)
    grids = intermediate_grids(max_range, TOY.lattice_range)
    assert max_range == (5, 4, 4) and grids == ((2, 2, 2), (3, 3, 3), (4, 4, 4))
    model = Crystalformer(TOY, truncation="adaptive", max_range=max_range)
    _, state = model.apply({"params": toy_params()}, *batch, mutable=["intermediates"])
    box, cutoff = state["intermediates"]["box_layer1"][0], basis_cutoff(*TOY.basis(1))
    taken = crystal_branches(batch[0], batch[3], box, ranges=max_range, cutoff=cutoff, grids=grids, per_block=1)
    assert taken.tolist() == [0, 2, 0, 1, 0, 2]  # the grid of each crystal (no basis window here)

    def run(smaller_grids):
        apply = functools.partial(
            make_apply(TOY, "adaptive", chunk_size=6, max_range=max_range, smaller_grids=smaller_grids), toy_params()
        )
        value = apply(*batch)
        grads = jax.grad(lambda la, fr, sp: apply(la, fr, sp, batch[3]).sum(), argnums=(0, 1, 2))(*batch[:3])
        return value, grads

    (value, grads), (want_value, want_grads) = run(True), run(False)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)

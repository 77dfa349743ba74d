"""Tests for the torch-free checkpoint reader `converters.torch_reader`.

Fixture facts come from `../shared/fixtures/*/README.md` (CGCNN section 3, Crystalformer "Checkpoints", ALIGNN
section 3). Comparisons against `torch.load` run only when torch is importable.
"""

import hashlib
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converters.torch_reader import OpaqueObject, read_torch_checkpoint, read_torch_checkpoint_from_zip
from jaxcrystal.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch_reader"
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
RANDOM_CGCNN = FIXTURES / "random_cgcnn.pth.tar"  # zip format, torch 2.13 (copy of shared/fixtures/cgcnn)
BAND_GAP = FIXTURES / "band-gap.pth.tar"  # legacy format, original CGCNN release (copy of shared/data/weights)


def needs_shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{relative} not available (../shared is absent)")
    return path


def cgcnn_shapes(atom_fea_len: int, n_conv: int, h_fea_len: int, n_h: int, n_gauss: int = 41) -> dict:
    """Expected CGCNN state_dict shapes from the model recap in the CGCNN fixture README (section 4)."""
    f = atom_fea_len
    shapes = {"embedding.weight": (f, 92), "embedding.bias": (f,)}
    for k in range(n_conv):
        shapes |= {f"convs.{k}.fc_full.weight": (2 * f, 2 * f + n_gauss), f"convs.{k}.fc_full.bias": (2 * f,)}
        for bn, width in (("bn1", 2 * f), ("bn2", f)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"convs.{k}.{bn}.{name}"] = (width,)
    shapes |= {"conv_to_fc.weight": (h_fea_len, f), "conv_to_fc.bias": (h_fea_len,)}
    for k in range(n_h - 1):
        shapes |= {f"fcs.{k}.weight": (h_fea_len, h_fea_len), f"fcs.{k}.bias": (h_fea_len,)}
    return shapes | {"fc_out.weight": (1, h_fea_len), "fc_out.bias": (1,)}


def test_legacy_cgcnn_band_gap_matches_readme():
    assert hashlib.sha256(BAND_GAP.read_bytes()).hexdigest() == (
        "d269775b9be0995c046abed3dd6556c281a3eff7b2e1d73cf81b99e2a1d4aa6c"
    )
    ck = read_torch_checkpoint(BAND_GAP, strict=True)
    assert set(ck) == {"epoch", "state_dict", "best_mae_error", "optimizer", "normalizer", "args"}
    assert isinstance(ck["normalizer"]["mean"], float)  # legacy files store Python floats
    np.testing.assert_allclose(ck["normalizer"]["mean"], 2.353832, atol=5e-7)
    np.testing.assert_allclose(ck["normalizer"]["std"], 1.480239, atol=5e-7)
    args = {k: ck["args"][k] for k in ("task", "atom_fea_len", "n_conv", "h_fea_len", "n_h")}
    assert args == {"task": "regression", "atom_fea_len": 64, "n_conv": 4, "h_fea_len": 32, "n_h": 1}
    sd = ck["state_dict"]
    assert len(sd) == 46 and not any("num_batches_tracked" in k for k in sd)
    assert {k: v.shape for k, v in sd.items()} == cgcnn_shapes(64, 4, 32, 1)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    assert np.all(sd["convs.0.bn1.running_var"] > 0)  # variances of a trained BatchNorm


def test_zip_random_cgcnn_matches_readme():
    ck = read_torch_checkpoint(RANDOM_CGCNN, strict=True)
    mean, std = ck["normalizer"]["mean"], ck["normalizer"]["std"]
    assert isinstance(mean, np.ndarray) and mean.shape == () and mean.dtype == np.float32  # 0-d tensors
    np.testing.assert_allclose([mean, std], [-0.7312, 0.8843], rtol=1e-6)
    args = {k: ck["args"][k] for k in ("task", "atom_fea_len", "n_conv", "h_fea_len", "n_h")}
    assert args == {"task": "regression", "atom_fea_len": 48, "n_conv": 3, "h_fea_len": 64, "n_h": 2}
    sd = ck["state_dict"]
    assert len(sd) == 44
    tracked = {k: v for k, v in sd.items() if k.endswith("num_batches_tracked")}
    assert len(tracked) == 6 and all(v.dtype == np.int64 and v.shape == () for v in tracked.values())
    weights = {k: v.shape for k, v in sd.items() if k not in tracked}
    assert weights == cgcnn_shapes(48, 3, 64, 2)


@pytest.mark.parametrize(
    ("name", "layers", "entries"),
    [("random_bandgap.ckpt", 4, 125), ("random_eform.ckpt", 4, 125), ("random_layers7.ckpt", 7, 209)],
)
def test_crystalformer_lightning_checkpoints(name, layers, entries):
    ck = read_torch_checkpoint(needs_shared(f"fixtures/crystalformer/{name}"), strict=True)
    sd = ck["state_dict"]
    assert len(sd) == entries and list(sd)[:2] == ["target_std", "target_mean"]
    assert ck["hyper_parameters"]["num_layers"] == layers
    assert sd["swa_model.n_averaged"].dtype == np.int64 and sd["swa_model.n_averaged"].shape == ()
    prefix = "swa_model.module.encoder.layers."
    assert {k.split(".")[4] for k in sd if k.startswith(prefix)} == {str(i) for i in range(layers)}
    assert sd["swa_model.module.input_embeddings.weight"].shape == (128, 98)
    assert sd[prefix + "0.self_attn.pe_dist_proj"].shape == (1, 8, 16, 64)
    # The README states the live copy differs from the SWA copy in every other tensor.
    assert not np.array_equal(
        sd["model.mlp.0.weight"], sd["swa_model.module.mlp.0.weight"]
    ) or not np.array_equal(sd["model.mlp.0.bias"], sd["swa_model.module.mlp.0.bias"])


@pytest.mark.parametrize(
    ("name", "member", "entries", "n_params", "wrapped"),
    [
        ("random_eform_alignn.zip", "random_eform_alignn/checkpoint_300.pt", 279, 4_026_753, True),
        ("random_gap_alignn_bestmodel.zip", "random_gap_alignn_bestmodel/best_model.pt", 279, 4_026_753, False),
        ("random_logk_alignn_small.zip", "random_logk_alignn_small/best_model.pt", 159, 535_937, True),
    ],
)
def test_alignn_member_inside_zip(name, member, entries, n_params, wrapped):
    path = needs_shared(f"fixtures/alignn/{name}")
    obj = read_torch_checkpoint_from_zip(path, member, strict=True)
    sd = obj["model"] if wrapped else obj
    assert len(sd) == entries
    buffers = ("running_mean", "running_var", "num_batches_tracked", "centers")
    assert sum(v.size for k, v in sd.items() if not k.endswith(buffers)) == n_params
    assert all(
        v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, v in sd.items()
    )
    np.testing.assert_allclose(sd["edge_embedding.0.centers"], np.linspace(0, 8, 80), rtol=0, atol=5e-7)
    np.testing.assert_allclose(sd["angle_embedding.0.centers"], np.linspace(-1, 1, 40), rtol=0, atol=1e-7)
    assert sd["fc.bias"].shape == (() if "logk" in name else (1,))
    with zipfile.ZipFile(path) as archive:  # the same bytes read directly give the same arrays
        direct = read_torch_checkpoint(archive.read(member))
    direct = direct["model"] if wrapped else direct
    assert all(np.array_equal(direct[k], sd[k]) for k in sd)


def test_truncated_zip_and_garbage_raise_checkpoint_error(tmp_path):
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(RANDOM_CGCNN.read_bytes()[:150_000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=path.name):
            read_torch_checkpoint(path)


# ------------------------------------------------------------------------------------------------------------
# every dtype, views and shared storages (files written by torch 2.13 with make_dtype_fixtures.py)
# ------------------------------------------------------------------------------------------------------------


def flatten_arrays(obj, prefix="", out=None) -> dict:
    """{"a/0/b": array} for every array in nested dicts / lists / tuples (the layout of dtypes_expected.npz)."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for key, value in obj.items():
            flatten_arrays(value, f"{prefix}{key}/", out)
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            flatten_arrays(value, f"{prefix}{i}/", out)
    elif isinstance(obj, np.ndarray):
        out[prefix[:-1]] = obj
    return out


@pytest.mark.parametrize("name", ["dtypes_zip.pt", "dtypes_legacy.pt"])
def test_dtypes_views_and_shared_storages(name):
    ck = read_torch_checkpoint(FIXTURES / name, strict=True)
    expected = dict(np.load(FIXTURES / "dtypes_expected.npz"))
    got = flatten_arrays(ck)
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    assert got["bf16"].dtype == np.float32 and got["scalar_f32"].shape == () and got["empty"].shape == (0, 3)
    # Views of one storage: the reader must honour offsets and strides, and return independent arrays.
    np.testing.assert_array_equal(got["f32_transposed"], got["f32"].T)
    np.testing.assert_array_equal(got["f32_offset_view"], got["f32"][1, 2:])
    np.testing.assert_array_equal(got["f32_strided_view"], got["f32"][:, ::2])
    np.testing.assert_array_equal(got["f32_expanded"], np.broadcast_to(got["f32"][0, :3], (5, 3)))
    got["f32_transposed"][0, 0] += 1.0
    assert got["f32"][0, 0] != got["f32_transposed"][0, 0]
    assert ck["nested"]["shape"] == (4, 6) and ck["nested"]["items"][1] == (1, "a", None, 2.5)


def test_namespace_becomes_inert_placeholder():
    path = FIXTURES / "namespace_zip.pt"
    ck = read_torch_checkpoint(path)
    args = ck["args"]
    assert isinstance(args, OpaqueObject) and args.qualname == "argparse.Namespace" and not args.called
    assert args.state == {"atom_fea_len": 64, "task": "regression", "lr_milestones": [100]}
    np.testing.assert_array_equal(ck["weight"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
    with pytest.raises(CheckpointError, match=r"namespace_zip\.pt.*argparse\.Namespace"):
        read_torch_checkpoint(path, strict=True)


# ------------------------------------------------------------------------------------------------------------
# hand-assembled pickles (protocol 2 opcodes) and checkpoint writers, torch-free
# ------------------------------------------------------------------------------------------------------------


def g(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + f"{module}\n{name}\n".encode()


def s(text: str) -> bytes:  # BINUNICODE
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def i(value: int) -> bytes:  # BININT
    return b"J" + struct.pack("<i", value)


def tup(*items: bytes) -> bytes:  # MARK ... TUPLE
    return b"(" + b"".join(items) + b"t"


def call(func: bytes, *args: bytes) -> bytes:  # REDUCE
    return func + tup(*args) + b"R"


def dct(*pairs: tuple[bytes, bytes]) -> bytes:  # EMPTY_DICT MARK ... SETITEMS
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def pkl(body: bytes) -> bytes:  # PROTO 2 ... STOP
    return b"\x80\x02" + body + b"."


def tensor(key: str, shape: tuple, stride: tuple, numel: int, offset: int = 0, storage: str = "FloatStorage"):
    """Opcodes torch writes for a tensor: _rebuild_tensor_v2(persistent storage id, offset, size, stride)."""
    pid = tup(s("storage"), g("torch", storage), s(key), s("cpu"), i(numel)) + b"Q"
    dims = tup(*map(i, shape)), tup(*map(i, stride))
    return call(
        g("torch._utils", "_rebuild_tensor_v2"),
        pid,
        i(offset),
        *dims,
        b"\x89",
        call(g("collections", "OrderedDict")),
    )


STORAGE0 = np.arange(6, dtype="<f4")  # storage "0" of the hand-made checkpoints


def zip_checkpoint(path: Path, data_pkl: bytes, storages: dict | None = None) -> Path:
    storages = {"0": STORAGE0.tobytes()} if storages is None else storages
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", data_pkl)
        archive.writestr("evil/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"evil/data/{key}", raw)
    return path


def legacy_checkpoint(path: Path, main_pkl: bytes, little: bool = True, storages: dict | None = None) -> Path:
    """Legacy layout: magic, protocol, sys_info, object pickle, storage keys, (int64 count + bytes) per key."""
    storages = {"0": (6, STORAGE0.tobytes())} if storages is None else storages
    order = "<" if little else ">"
    head = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": little}]
    blob = (
        b"".join(pickle.dumps(x, protocol=2) for x in head)
        + main_pkl
        + pickle.dumps(list(storages), protocol=2)
    )
    for count, raw in storages.values():
        blob += struct.pack(order + "q", count) + raw
    path.write_bytes(blob)
    return path


def legacy_tensor(key: str, shape: tuple, stride: tuple, numel: int, view: bytes = b"N") -> bytes:
    pid = tup(s("storage"), g("torch", "FloatStorage"), s(key), s("cpu"), i(numel), view) + b"Q"
    return call(g("torch._utils", "_rebuild_tensor"), pid, i(0), tup(*map(i, shape)), tup(*map(i, stride)))


def test_hand_made_zip_and_legacy_checkpoints_read_back(tmp_path):
    zip_body = dct((s("w"), tensor("0", (2, 3), (3, 1), 6)), (s("wt"), tensor("0", (3, 2), (1, 3), 6)))
    legacy_body = dct(
        (s("w"), legacy_tensor("0", (2, 3), (3, 1), 6)), (s("wt"), legacy_tensor("0", (3, 2), (1, 3), 6))
    )
    zip_path = zip_checkpoint(tmp_path / "a.pt", pkl(zip_body))
    for path in (zip_path, legacy_checkpoint(tmp_path / "b.pt", pkl(legacy_body))):
        ck = read_torch_checkpoint(path, strict=True)
        np.testing.assert_array_equal(ck["w"], STORAGE0.reshape(2, 3))
        np.testing.assert_array_equal(ck["wt"], STORAGE0.reshape(2, 3).T)
    assert read_torch_checkpoint(zip_path.read_bytes())["w"].shape == (2, 3)  # bytes work as well as paths


def test_legacy_big_endian_and_storage_views(tmp_path):
    body = dct(
        (s("w"), legacy_tensor("0", (2, 3), (3, 1), 6)),
        (s("view"), legacy_tensor("0", (2,), (1,), 6, view=tup(s("v1"), i(3), i(2)))),  # elements 3 and 4
    )
    storages = {"0": (6, STORAGE0.astype(">f4").tobytes())}
    ck = read_torch_checkpoint(
        legacy_checkpoint(tmp_path / "be.pt", pkl(body), little=False, storages=storages)
    )
    np.testing.assert_array_equal(ck["w"], STORAGE0.reshape(2, 3))
    np.testing.assert_array_equal(ck["view"], [3.0, 4.0])
    assert ck["w"].dtype == np.float32 and ck["w"].dtype.isnative


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (tensor("0", (2, 4), (4, 1), 6), "outside its storage"),  # 8 elements from a 6-element storage
        (tensor("0", (3,), (1,), 6, offset=4), "outside its storage"),
        (tensor("0", (2,), (1,), 7), "has 24 bytes, expected 28"),  # storage shorter than declared
        (tensor("missing", (2,), (1,), 2), "missing"),
        (tensor("0", (2000, 2000), (0, 0), 6), "overlaps itself"),  # a stride-0 memory bomb
        (tup(s("not-a-storage"), i(1)) + b"Q", "persistent id"),
    ],
)
def test_malformed_tensors_raise(tmp_path, body, problem):
    path = zip_checkpoint(tmp_path / "bad.pt", pkl(body))
    with pytest.raises(CheckpointError, match=rf"bad\.pt: .*{problem}"):
        read_torch_checkpoint(path)

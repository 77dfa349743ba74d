"""Tests for the torch-free checkpoint reader `converters.torch_reader`.

Fixture facts come from `../shared/fixtures/*/README.md` (CGCNN section 3, Crystalformer "Checkpoints", ALIGNN
section 3). Comparisons against `torch.load` run only when torch is importable.
"""

import hashlib
import io
import json
import os
import pickle
import re
import struct
import subprocess
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
    assert not np.array_equal(sd["model.mlp.0.weight"], sd["swa_model.module.mlp.0.weight"]) or not np.array_equal(
        sd["model.mlp.0.bias"], sd["swa_model.module.mlp.0.bias"]
    )


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
    assert all(v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, v in sd.items())
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
    blob = b"".join(pickle.dumps(x, protocol=2) for x in head) + main_pkl + pickle.dumps(list(storages), protocol=2)
    for count, raw in storages.values():
        blob += struct.pack(order + "q", count) + raw
    path.write_bytes(blob)
    return path


def legacy_tensor(key: str, shape: tuple, stride: tuple, numel: int, view: bytes = b"N") -> bytes:
    pid = tup(s("storage"), g("torch", "FloatStorage"), s(key), s("cpu"), i(numel), view) + b"Q"
    return call(g("torch._utils", "_rebuild_tensor"), pid, i(0), tup(*map(i, shape)), tup(*map(i, stride)))


def test_hand_made_zip_and_legacy_checkpoints_read_back(tmp_path):
    zip_body = dct((s("w"), tensor("0", (2, 3), (3, 1), 6)), (s("wt"), tensor("0", (3, 2), (1, 3), 6)))
    legacy_body = dct((s("w"), legacy_tensor("0", (2, 3), (3, 1), 6)), (s("wt"), legacy_tensor("0", (3, 2), (1, 3), 6)))
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
    ck = read_torch_checkpoint(legacy_checkpoint(tmp_path / "be.pt", pkl(body), little=False, storages=storages))
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


# ------------------------------------------------------------------------------------------------------------
# malicious pickles: nothing may run, in either checkpoint format, strict or not
# ------------------------------------------------------------------------------------------------------------


class _SystemCall:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _PopenCall:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return subprocess.Popen, (["sh", "-c", self.command],)


def body_of(obj) -> bytes:
    """Opcodes of `pickle.dumps(obj, protocol=2)` without PROTO and STOP (so they can be embedded)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def payloads(command: str) -> dict[str, tuple[bytes, str, bool]]:
    """name -> (opcodes, offending global, True if the non-strict reader returns an inert object for it)."""
    run = s(command)
    system = call(g("os", "system"), run)
    py = s(f"__import__('os').system({command!r})")
    getattr_chain = call(call(g("builtins", "getattr"), call(g("builtins", "__import__"), s("os")), s("system")), run)
    return {
        "reduce_os_system": (body_of(_SystemCall(command)), "system", True),
        "reduce_subprocess_popen": (body_of(_PopenCall(command)), "subprocess.Popen", True),
        "builtins_eval": (call(g("builtins", "eval"), py), "builtins.eval", True),
        "builtins_exec": (call(g("builtins", "exec"), py), "builtins.exec", True),
        "py2_builtin_eval": (call(g("__builtin__", "eval"), py), "builtins.eval", True),
        "getattr_chain": (getattr_chain, "builtins.getattr", False),  # calling an opaque result is refused
        "inst_opcode": (b"(" + run + b"ios\nsystem\n", "os.system", True),
        "obj_opcode": (b"(" + g("os", "system") + run + b"o", "os.system", True),
        "stack_global": (s("os") + s("system") + b"\x93" + tup(run) + b"R", "os.system", True),
        "newobj_build": (g("os", "system") + tup() + b"\x81" + dct((s("cmd"), run)) + b"b", "os.system", True),
        "nested_in_ordereddict": (
            call(g("collections", "OrderedDict"), call(g("os", "system"), run)),
            "os.system",
            False,
        ),
        "nested_as_tensor_storage": (
            call(
                g("torch._utils", "_rebuild_tensor_v2"),
                call(g("os", "system"), run),
                i(0),
                tup(i(1)),
                tup(i(1)),
            ),
            "os.system",
            False,
        ),
        "reduce_on_reduce_result": (call(call(g("os", "popen"), run), s("r")), "os.popen", False),
        "rebuild_from_type_with_system": (
            call(
                g("torch._tensor", "_rebuild_from_type_v2"),
                g("os", "system"),
                g("torch", "Tensor"),
                tup(run),
                b"N",
            ),
            "os.system",
            False,
        ),
        "object_dtype_array": (
            call(g("numpy.core.multiarray", "_reconstruct"), g("numpy", "ndarray"), tup(i(0)), s("b"))
            + tup(
                i(1),
                tup(i(1)),
                call(g("numpy", "dtype"), s("O"), b"\x89", b"\x88"),
                b"\x89",
                b"](" + system + b"e",
            )
            + b"b",
            "unsupported dtype",  # numpy.dtype is allowed, the object dtype is refused before os.system is reached
            False,
        ),
    }


class _Recorder:
    """Stands in for every global in the control unpickler; records each call with its arguments."""

    def __init__(self, qualname: str, calls: list):
        self.qualname, self.calls = qualname, calls

    def __call__(self, *args):
        self.calls.append((self.qualname, args))
        return _Recorder(f"{self.qualname}()", self.calls)


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, calls: list):
        super().__init__(io.BytesIO(data))
        self.calls = calls

    def find_class(self, module, name):
        return _Recorder(f"{module}.{name}", self.calls)


@pytest.mark.parametrize("name", [n for n, (_, _, inert) in payloads("x").items() if n != "newobj_build"])
def test_control_payloads_would_call_the_command(name):
    """Control: with a normal unpickler each payload really calls a global with the command string."""
    calls: list = []
    try:
        _RecordingUnpickler(pkl(payloads("touch /nonexistent/marker")[name][0]), calls).load()
    except Exception:  # the recorders are not real objects; the calls made before that point are what matter
        pass
    assert any("touch /nonexistent/marker" in repr(args) for _, args in calls), calls


@pytest.mark.parametrize("embedding", ["zip", "legacy"])
@pytest.mark.parametrize("name", list(payloads("x")))
def test_malicious_pickles_never_execute(tmp_path, embedding, name):
    marker = tmp_path / "pwned"
    payload, offending, inert = payloads(f"touch {marker}")[name]
    if embedding == "zip":
        body = dct((s("w"), tensor("0", (2, 3), (3, 1), 6)), (s("evil"), payload))
        path = zip_checkpoint(tmp_path / "evil.pt", pkl(body))
    else:
        body = dct((s("w"), legacy_tensor("0", (2, 3), (3, 1), 6)), (s("evil"), payload))
        path = legacy_checkpoint(tmp_path / "evil.pth.tar", pkl(body))

    with pytest.raises(CheckpointError, match=re.escape(str(path))) as strict_error:
        read_torch_checkpoint(path, strict=True)
    assert offending in str(strict_error.value)
    if inert:
        ck = read_torch_checkpoint(path)
        np.testing.assert_array_equal(ck["w"], STORAGE0.reshape(2, 3))
        assert isinstance(ck["evil"], OpaqueObject)
    else:
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            read_torch_checkpoint(path)
    assert not marker.exists()


def test_allowed_globals_cannot_be_mutated(tmp_path):
    """BUILD on an allow-listed function must not change it (later loads would run attacker-chosen state)."""
    body = g("torch._utils", "_rebuild_tensor_v2") + tup(b"N", dct((s("__defaults__"), tup(i(1))))) + b"b"
    path = zip_checkpoint(tmp_path / "mutate.pt", pkl(body))
    with pytest.raises(CheckpointError, match="mutate.pt"):
        read_torch_checkpoint(path)
    np.testing.assert_array_equal(read_torch_checkpoint(RANDOM_CGCNN)["normalizer"]["mean"], np.float32(-0.7312))


def test_legacy_module_source_is_not_executed(tmp_path):
    """Old whole-model pickles carry ("module", class, file, source) persistent ids; the source is never run."""
    marker = tmp_path / "pwned"
    source = f"import os; os.system('touch {marker}')"
    module_pid = tup(s("module"), g("evil_models", "Net"), s("net.py"), s(source)) + b"Q"
    body = (
        module_pid + tup() + b"\x81" + dct((s("_parameters"), dct((s("w"), legacy_tensor("0", (6,), (1,), 6))))) + b"b"
    )
    ck = read_torch_checkpoint(legacy_checkpoint(tmp_path / "model.pt", pkl(body)))
    assert isinstance(ck, OpaqueObject) and ck.qualname == "evil_models.Net"
    np.testing.assert_array_equal(ck.state["_parameters"]["w"], STORAGE0)
    with pytest.raises(CheckpointError, match="evil_models.Net"):
        read_torch_checkpoint(tmp_path / "model.pt", strict=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------
# corrupted files, and all real CGCNN release files
# ------------------------------------------------------------------------------------------------------------


def corruptions(tmp_path: Path) -> dict[str, Path]:
    zip_bytes, legacy_bytes = RANDOM_CGCNN.read_bytes(), BAND_GAP.read_bytes()
    with zipfile.ZipFile(RANDOM_CGCNN) as archive:  # flip one byte inside the first stored tensor
        info = archive.getinfo(next(n for n in archive.namelist() if "/data/" in n))
    name_len, extra_len = struct.unpack("<HH", zip_bytes[info.header_offset + 26 : info.header_offset + 30])
    data_start = info.header_offset + 30 + name_len + extra_len  # local header: its extra field pads to 64 bytes
    flipped = bytearray(zip_bytes)
    flipped[data_start] ^= 0xFF
    files = {
        "truncated_zip.pth.tar": zip_bytes[: len(zip_bytes) // 2],
        "crc_error.pth.tar": bytes(flipped),
        "truncated_legacy.pth.tar": legacy_bytes[:-1000],
        "truncated_legacy_pickle.pth.tar": legacy_bytes[:5000],
        "garbage.pth.tar": np.random.default_rng(0).bytes(4096),
        "empty.pth.tar": b"",
        "plain_pickle.pkl": pickle.dumps({"a": 1}, protocol=2),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_corrupted_files_raise_checkpoint_error_naming_the_file(tmp_path):
    for name, path in corruptions(tmp_path).items():
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            read_torch_checkpoint(path)
        with pytest.raises(CheckpointError, match=re.escape(name)):
            read_torch_checkpoint(path.read_bytes(), name=name)
    with pytest.raises(CheckpointError, match="no_such_file.pt"):
        read_torch_checkpoint(tmp_path / "no_such_file.pt")
    with pytest.raises(CheckpointError, match=r"random_cgcnn\.pth\.tar::nope\.pt"):
        read_torch_checkpoint_from_zip(RANDOM_CGCNN, "nope.pt")


# sha256 of the original CGCNN release files, from the CGCNN fixture README (section 3.1).
CGCNN_RELEASE_SHA256 = {
    "band-gap": "d269775b9be0995c046abed3dd6556c281a3eff7b2e1d73cf81b99e2a1d4aa6c",
    "bulk-moduli": "0a3f66b9a0ee6acef11bb852717424a6c3560073239c17bdbea568cc43816dd3",
    "efermi": "5ed4ba15b5bd3e04ce6b0eca75f15bb6465557aada4097f11291ea1e7cd48afb",
    "final-energy-per-atom": "1afe9260a0b7bd01d2a0a752fbac12be5badea6a56e57aeea5877ae8f9a32c57",
    "formation-energy-per-atom": "e2f8bb910744f2c2f21d968285b6fd4316d795d0f3e7465ed0e3b4f3c92651a1",
    "poisson-ratio": "8d152338550b49ff6c3790cccdb892ee8bafe513bc49ab21955cdf7807e89513",
    "semi-metal-classification": "3791d48885afafb28c0797e22637b63ea591cf7fb27497ce537911261b92edc8",
    "shear-moduli": "34173bc59a0a8f9f74021155b304b74d9e709b1ff241d3f02e83031c9deb216c",
}


@pytest.mark.parametrize("model", sorted(CGCNN_RELEASE_SHA256))
def test_all_cgcnn_release_files(model):
    path = needs_shared(f"data/weights/cgcnn_f42ab233/pre-trained/{model}.pth.tar")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CGCNN_RELEASE_SHA256[model]
    ck = read_torch_checkpoint(path, strict=True)
    args = ck["args"]
    shapes = cgcnn_shapes(args["atom_fea_len"], args["n_conv"], args["h_fea_len"], args["n_h"])
    if args["task"] == "classification":  # two logits instead of one output
        shapes |= {"fc_out.weight": (2, args["h_fea_len"]), "fc_out.bias": (2,)}
    assert {k: v.shape for k, v in ck["state_dict"].items()} == shapes
    reference = SHARED / "fixtures" / "cgcnn" / "reference_outputs.json"
    documented = json.loads(reference.read_text())["checkpoints"].get(model) if reference.exists() else None
    if documented is not None:  # the three models used by the references: exact float64 values
        assert ck["normalizer"] == documented["normalizer"]
        assert (ck["epoch"], ck["best_mae_error"]) == (documented["epoch"], documented["best_mae_error"])


def test_values_equal_torch_load():
    """Every entry equals what torch.load(weights_only=True) returns (runs only where torch is installed)."""
    torch = pytest.importorskip("torch")
    paths = [RANDOM_CGCNN, BAND_GAP, FIXTURES / "dtypes_zip.pt", FIXTURES / "dtypes_legacy.pt"]
    paths += [p for p in sorted((SHARED / "fixtures" / "crystalformer").glob("*.ckpt"))]

    def plain(obj):
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple) and not isinstance(obj, torch.Size):
            return type(obj)(plain(v) for v in obj)
        if isinstance(obj, torch.Tensor):
            obj = obj.detach()
            return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
        return tuple(obj) if isinstance(obj, torch.Size) else obj

    for path in paths:
        ours, theirs = (
            read_torch_checkpoint(path, strict=True),
            plain(torch.load(path, map_location="cpu", weights_only=True)),
        )
        np.testing.assert_equal(ours, theirs, err_msg=str(path))
        want, got = flatten_arrays(theirs), flatten_arrays(ours)
        assert all(got[k].dtype == want[k].dtype for k in want), path


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", b"\x00" * (16 << 20))  # 16 MB of zeros compress to ~16 kB
    with pytest.raises(CheckpointError, match=r"bomb\.pt: .*would inflate"):
        read_torch_checkpoint(path)
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/best_model.pt", b"\x00" * (16 << 20))
    with pytest.raises(CheckpointError, match=r"outer\.zip::model/best_model\.pt: .*would inflate"):
        read_torch_checkpoint_from_zip(outer, "model/best_model.pt")


class _OneCycleLike:
    """Stands in for a 2021 OneCycleLR whose state_dict pickles its bound `anneal_func` method."""

    def __init__(self):
        self.total_steps = 300

    def cos(self, start, end, pct):
        return end + (start - end) / 2.0 * (1 + np.cos(np.pi * pct))


def test_pickled_bound_method_stays_inert(tmp_path):
    scheduler = _OneCycleLike()
    state = {"total_steps": 300, "anneal_func": scheduler.cos}  # pickles as getattr(<instance>, "cos")
    body = dct((s("model"), dct((s("w"), tensor("0", (6,), (1,), 6)))), (s("lr_scheduler"), body_of(state)))
    path = zip_checkpoint(tmp_path / "checkpoint_300.pt", pkl(body))
    ck = read_torch_checkpoint(path)
    np.testing.assert_array_equal(ck["model"]["w"], STORAGE0)
    anneal = ck["lr_scheduler"]["anneal_func"]
    assert anneal.qualname == "builtins.getattr" and anneal.called and anneal.args[1] == "cos"
    assert anneal.args[0].qualname.endswith("_OneCycleLike") and anneal.args[0].state == {"total_steps": 300}
    with pytest.raises(CheckpointError, match="checkpoint_300.pt: refusing global"):
        read_torch_checkpoint(path, strict=True)

"""Tests for the torch-free checkpoint reader `converters.torch_reader`.

Fixture facts come from `../shared/fixtures/*/README.md` (CGCNN section 3, Crystalformer "Checkpoints", ALIGNN
section 3). Comparisons against `torch.load` run only when torch is importable.
"""

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converters.torch_reader import read_torch_checkpoint, read_torch_checkpoint_from_zip
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

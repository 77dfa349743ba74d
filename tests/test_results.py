"""The incremental, atomic result writer."""

import json

import numpy as np
import pandas as pd
import pytest
from evaluate_helpers import make_candidates, perovskite, rock_salt

from jaxcrystal.crystal import read_structure
from jaxcrystal.errors import ConfigError, StructureError
from jaxcrystal.evaluate import Criteria, evaluate
from jaxcrystal.results import ResultWriter, atomic_write

CRITERIA = Criteria(main="band_gap", target=3.0, coord_window=0.15)
STEPS = 7


def batch(index, elements, gaps):
    structures, roles = zip(*(perovskite(a) for a in elements), strict=True)
    names = [f"batch{index:03d}_cand{i:03d}__perov/{a}" for i, a in enumerate(elements)]  # '/' must be sanitized
    c = make_candidates(list(structures), "perovskite", roles=list(roles), band_gap=gaps, names=names)
    b = len(elements)
    history = {
        "loss": np.linspace(1.0, 0.0, STEPS)[:, None] * np.ones(b),
        "band_gap": np.linspace(0.0, 1.0, STEPS)[:, None] * np.asarray(gaps, dtype=float),
        "formation_energy": np.full((STEPS, b), -1.0),
    }
    return c, evaluate(c, CRITERIA), history


def no_temporary_files(folder):
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_batches_are_on_disk_before_finalize(tmp_path):
    out = tmp_path / "run"
    config = {"task": "bg_and_eform", "target": 3.0, "seed": np.int64(3), "out": out, "criteria": CRITERIA}
    writer = ResultWriter(out, config)
    assert json.loads((out / "config.json").read_text())["criteria"]["angle_window"] == [85.0, 95.0]

    c0, df0, h0 = batch(0, ["Ca", "Sr", "Ba"], [3.0, 3.1, 5.0])
    writer.write_batch(0, c0, df0, h0)
    assert sorted(p.name for p in (out / "poscar").iterdir()) == [
        "batch000_cand000__perov_Ca.vasp",
        "batch000_cand001__perov_Sr.vasp",
        "batch000_cand002__perov_Ba.vasp",
    ]
    assert len(list((out / "cif").glob("*.cif"))) == 3
    back = read_structure(out / "poscar" / "batch000_cand002__perov_Ba.vasp")
    assert back.composition.reduced_formula == "BaTiO3"
    np.testing.assert_allclose(back.lattice.matrix, c0.structures[2].lattice.matrix, atol=1e-8)
    assert read_structure(out / "cif" / "batch000_cand000__perov_Ca.cif").composition.reduced_formula == "CaTiO3"
    table = pd.read_csv(out / "result.csv", index_col="name")
    assert list(table.index) == c0.names
    assert list(table.columns) == [c for c in df0.columns if c != "structure"]
    assert table["success"].tolist() == [True, False, False]
    assert not (out / "result_summary.csv").exists() and not (out / "history_img.png").exists()
    assert no_temporary_files(out)

    c1, df1, h1 = batch(1, ["Ca"], [3.05])
    writer.write_batch(1, c1, df1, h1)
    table = pd.read_csv(out / "result.csv", index_col="name")
    assert len(table) == 4 and table["success"].tolist() == [True, False, False, True]
    with np.load(out / "result.npz") as npz:
        assert list(npz["names"]) == c0.names + c1.names
        assert npz["lattice"].shape == (4, 3, 3) and npz["frac"].shape == (4, 5, 3)
        assert npz["atomic_numbers"][:, 0].tolist() == [20, 38, 56, 20]
        assert npz["batch_index"].tolist() == [0, 0, 0, 1]
        np.testing.assert_allclose(npz["prediction_band_gap"], [3.0, 3.1, 5.0, 3.05])
        assert npz["history_band_gap"].shape == (STEPS, 4)
        np.testing.assert_allclose(npz["history_band_gap"][-1], [3.0, 3.1, 5.0, 3.05])

    summary = writer.finalize(CRITERIA)
    written = pd.read_csv(out / "result_summary.csv")
    assert written.loc[0, "num_success"] == 2 and summary.loc[0, "num_success"] == 2
    assert written.loc[0, "success"] == pytest.approx(0.5)
    assert written.loc[0, "num_unique_success"] == 1  # the two CaTiO3 are one structure
    assert (out / "history_img.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert no_temporary_files(out)


def test_batches_with_different_atom_counts_are_padded(tmp_path):
    writer = ResultWriter(tmp_path / "run", {})
    c0, df0, h0 = batch(0, ["Ca"], [3.0])
    nacl = make_candidates([rock_salt()], "general", names=["batch001_cand000__NaCl"])
    general = Criteria("band_gap", 3.0, tolerance_window=None, angle_window=None)
    writer.write_batch(0, c0, df0, h0)
    writer.write_batch(1, nacl, evaluate(nacl, general), {k: v[:4] for k, v in h0.items()})
    with np.load(tmp_path / "run" / "result.npz") as npz:
        assert npz["frac"].shape == (2, 8, 3)
        assert npz["mask"].sum(axis=1).tolist() == [5, 8]
        assert npz["site_roles"][0].tolist() == [0, 1, 2, 2, 2, -1, -1, -1]
        assert np.isnan(npz["history_loss"][4:, 1]).all() and not np.isnan(npz["history_loss"][:, 0]).any()


def test_refuses_an_existing_folder_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    writer = ResultWriter(out, {"a": 1})
    writer.write_batch(0, *batch(0, ["Ca"], [3.0]))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        ResultWriter(out, {"a": 2})
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    ResultWriter(out, {"a": 2}, overwrite=True)
    assert json.loads((out / "config.json").read_text()) == {"a": 2}
    assert not (out / "result.csv").exists() and not list((out / "poscar").iterdir())
    assert (out / "notes.txt").read_text() == "mine"  # not ours: left alone
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        ResultWriter(tmp_path / "file", {})


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("complete\n")

    def crash(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"]


def test_bad_calls_are_rejected(tmp_path):
    writer = ResultWriter(tmp_path / "run", {})
    c, df, h = batch(0, ["Ca", "Sr"], [3.0, 3.0])
    with pytest.raises(ConfigError, match="batch index 0"):
        writer.write_batch(1, c, df, h)
    with pytest.raises(StructureError, match="history"):
        writer.write_batch(0, c, df, {"loss": np.zeros((STEPS, 3))})
    with pytest.raises(StructureError, match="index"):
        writer.write_batch(0, c, df.iloc[::-1], h)
    with pytest.raises(ConfigError, match="JSON"):
        ResultWriter(tmp_path / "other", {"f": object()})
    assert not (tmp_path / "other").exists()
    writer.write_batch(0, c, df, h)
    with pytest.raises(StructureError, match="used twice"):
        writer.write_batch(1, c, df, h)  # the same names again

"""End-to-end optimizer runs on the embedded CGCNN models (small sizes) and the command line."""

import json

import numpy as np
import pytest
from pymatgen.core import Element

import jaxcrystal
from jaxcrystal import run
from jaxcrystal.errors import ConfigError


def _states(ox_states: str) -> list[tuple[str, int, int]]:
    """'Sr+2*1 Ti+4*1 O-2*3' -> [(Sr, 2, 1), (Ti, 4, 1), (O, -2, 3)]."""
    out = []
    for token in ox_states.split():
        head, count = token.split("*")
        i = next(k for k in range(1, len(head)) if head[k] in "+-")
        out.append((head[:i], int(head[i:]), int(count)))
    return out


def _assert_neutral_by_pymatgen(table):
    """Independent check: every chosen state is one pymatgen knows for the element, and the cell sums to 0."""
    for ox in table["ox_states"]:
        states = _states(ox)
        assert sum(s * c for _, s, c in states) == 0, ox
        for symbol, state, _ in states:
            assert state in Element(symbol).oxidation_states, (symbol, state)


@pytest.fixture(scope="module")
def perovskite_runs(tmp_path_factory):
    kwargs = dict(structure="perovskite", target=2.0, num_candidates=8, steps=30, checkpoint_every=15, progress=False)
    first = jaxcrystal.optimize("bg_and_eform", seed=1, out=tmp_path_factory.mktemp("a") / "run", **kwargs)
    again = jaxcrystal.optimize("bg_and_eform", seed=1, **kwargs)
    return first, again


def test_perovskite_run_is_neutral_in_window_and_learns(perovskite_runs):
    result, _ = perovskite_runs
    table = result.table
    assert len(table) == 8 and table["healthy"].all()
    _assert_neutral_by_pymatgen(table)
    assert table["is_neutral"].all()
    # geometry: angles frozen at 90, coordinates within ±0.15 of the template (periodic)
    assert table["perov_angles"].all() and table["perov_coords"].all()
    np.testing.assert_allclose([s.lattice.angles for s in result.structures], 90.0, atol=1e-6)
    loss = result.history["loss"]
    assert loss.shape == (30, 8)
    assert loss[-5:].mean() < loss[:3].mean() - 0.5
    files = {p.name for p in result.out.iterdir()}
    assert {"result.csv", "result_summary.csv", "result.npz", "poscar", "cif", "history_img.png"} <= files
    config = json.loads((result.out / "config.json").read_text())
    assert config["seed"] == 1 and config["hyper_parameters"] == "Crystalformer_perov"


def test_same_seed_same_candidates(perovskite_runs):
    a, b = perovskite_runs
    assert list(a.table["formula"]) == list(b.table["formula"])
    np.testing.assert_array_equal(a.batch.lattice, b.batch.lattice)
    np.testing.assert_array_equal(a.batch.frac, b.batch.frac)
    np.testing.assert_array_equal(a.table["band_gap_onehot"], b.table["band_gap_onehot"])


def test_general_templates_bulk_modulus_run_is_neutral():
    result = jaxcrystal.optimize(
        "B_and_eform", structure="none", target=150.0, num_candidates=4, steps=8, seed=0, progress=False
    )
    _assert_neutral_by_pymatgen(result.table)
    assert result.table["is_neutral"].all()
    assert "bulk_modulus_onehot" in result.table
    assert np.all(result.table["bulk_modulus_onehot"] > 1.0)  # GPa (10**log10 output), not log units


def test_task_without_an_embedded_model_names_the_property():
    with pytest.raises(ConfigError, match="'tc'.*--weights tc="):
        jaxcrystal.optimize("tc_and_eform", structure="none", num_candidates=2, steps=2, progress=False)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert run.main(["--structure", "perovskite", "--templates", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "contradicts" in capsys.readouterr().err
    assert run.main(["--task", "tc_and_eform", "--target", "3", "--out", str(tmp_path / "o")]) == 2
    assert "takes no target" in capsys.readouterr().err
    assert run.main(["--weights", "band_gap", "--out", str(tmp_path / "o")]) == 2
    assert "PROPERTY=PATH" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    assert run.main(["--num-candidates", "2", "--steps", "2", "--out", str(occupied), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--help"])
    assert "--num-candidates" in capsys.readouterr().out


def test_model_options_are_routed_by_kind_and_checked(tmp_path, capsys):
    from jaxcrystal.smoacs import driver

    config = driver.RunConfig(
        model="crystalformer", model_options={"chunk_size": 3, "alignn.chunk_size": 2, "cgcnn.atom_chunk": 4}
    ).resolved()
    assert driver._model_options(config, "crystalformer") == {"chunk_size": 3}
    assert driver._model_options(config, "alignn") == {"chunk_size": 2}
    assert driver._model_options(config, "cgcnn") == {"atom_chunk": 4}
    with pytest.raises(ConfigError, match="sized by the optimizer"):
        driver.RunConfig(model_options={"alignn.image_box": 4}).resolved()
    with pytest.raises(ConfigError, match="unknown predictor kind 'megnet'"):
        driver.RunConfig(model_options={"megnet.chunk_size": 4}).resolved()
    with pytest.raises(ConfigError, match=r"unknown CGCNN option\(s\) \['chunk_size'\]"):
        jaxcrystal.optimize(num_candidates=2, steps=1, model_options={"chunk_size": 4}, progress=False)
    assert run.main(["--model-option", "chunk_size", "--out", str(tmp_path / "o")]) == 2
    assert "OPTION=VALUE" in capsys.readouterr().err
    assert run._model_options(["chunk_size=64", "crystalformer.gradient=smoacs", "smaller_grids=False"]) == {
        "chunk_size": 64,
        "crystalformer.gradient": "smoacs",
        "smaller_grids": False,
    }


def test_memory_options_do_not_change_the_candidates(perovskite_runs):
    """The neighbour search in other chunks (a memory knob) gives the same run."""
    _, reference = perovskite_runs
    kwargs = dict(structure="perovskite", target=2.0, num_candidates=8, steps=30, checkpoint_every=15, progress=False)
    chunked = jaxcrystal.optimize("bg_and_eform", seed=1, model_options={"crystal_chunk": 3, "atom_chunk": 2}, **kwargs)
    assert list(chunked.table["formula"]) == list(reference.table["formula"])
    np.testing.assert_allclose(chunked.batch.frac, reference.batch.frac, atol=1e-5)
    np.testing.assert_allclose(chunked.batch.lattice, reference.batch.lattice, rtol=1e-5)

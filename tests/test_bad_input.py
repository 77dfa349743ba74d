"""Bad input gives a clear `JaxCrystalError` at the public entry points, never a raw traceback or silent nonsense.

One test per class of bad input of the README table "Bad input" (class -> entry point -> message). Each test calls
the entry point a user calls (`read_structure`, `CrystalBatch.from_structures`, `load_predictor`, a `Predictor`,
`jaxcrystal.optimize`, `jaxcrystal.run.main`) and checks the exception type and that the message names the problem.
"""

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, shared_path
from pymatgen.core import Lattice, Structure

import jaxcrystal
from converters import cgcnn as cgcnn_converter
from converters.torch_reader import read_torch_checkpoint
from jaxcrystal import run
from jaxcrystal.crystal import CrystalBatch, lattice_from_parameters, read_structure, write_cif, write_poscar
from jaxcrystal.elements import one_hot
from jaxcrystal.errors import CheckpointError, ConfigError, ElementError, StructureError
from jaxcrystal.predictors import Predictor, load_predictor

STRUCTURES = FIXTURES / "structures"
POSCAR = STRUCTURES / "POSCAR-JVASP-1372.vasp"  # AlAs, 2 atoms
RANDOM_CGCNN = FIXTURES / "torch_reader" / "random_cgcnn.pth.tar"
CGCNN_WEIGHTS = FIXTURES / "cgcnn" / "random_cgcnn.npz"


def poscar_lines() -> list[str]:
    return POSCAR.read_text().splitlines()


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def srtio3(a: float = 3.905) -> Structure:
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Structure(Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"], coords)


@pytest.fixture(scope="module")
def gap():
    return load_predictor("cgcnn", "band-gap")


# ----------------------------------------------------------------------------------------------------------
# Structure files


def test_malformed_poscar_names_the_file(tmp_path):
    for name, text in (("empty.vasp", ""), ("garbage.vasp", "hello world\n1 2 3\n"), ("bin.vasp", bytes(range(256)))):
        path = write(tmp_path / name, text)
        with pytest.raises(StructureError, match=re.escape(str(path))):
            read_structure(path)


def test_truncated_poscar_names_the_file(tmp_path):
    lines = poscar_lines()
    for cut in (3, 7, len(lines) - 1):  # inside the lattice, before the coordinates, one coordinate line missing
        path = write(tmp_path / f"cut{cut}.vasp", "\n".join(lines[:cut]) + "\n")
        with pytest.raises(StructureError, match=re.escape(f"{path}: cannot parse as POSCAR")) as info:
            read_structure(path)
        assert cut == 7 or "truncated?" in str(info.value)


def test_malformed_and_truncated_cif_name_the_file(tmp_path):
    good = tmp_path / "good.cif"
    write_cif(read_structure(POSCAR), good)
    text = good.read_text()
    assert len(read_structure(good)) == 2
    cases = {
        "truncated.cif": text[: text.index("_atom_site_occupancy") + len("_atom_site_occupancy")],
        "garbage.cif": "data_x\n_cell_length_a banana\n",
        "no_atoms.cif": text[: text.index("loop_")],
    }
    for name, body in cases.items():
        path = write(tmp_path / name, body)
        with pytest.raises(StructureError, match=re.escape(str(path))) as info:
            read_structure(path)
        assert "CIF" in str(info.value) or "no structure" in str(info.value) or "lattice" in str(info.value)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(StructureError, match="no such file"):
        read_structure(tmp_path / "absent.vasp")
    with pytest.raises(StructureError, match="no POSCAR"):
        jaxcrystal.crystal.read_structures(tmp_path)


def test_unknown_element_symbol(tmp_path):
    lines = poscar_lines()
    lines[5] = "Xx As"
    path = write(tmp_path / "unknown.vasp", "\n".join(lines))
    with pytest.raises(ElementError, match=r"unknown element symbol 'Xx'") as info:
        read_structure(path)
    assert str(path) in str(info.value)


def test_element_beyond_californium(tmp_path):
    lines = poscar_lines()
    lines[5] = "Es As"  # Z = 99
    path = write(tmp_path / "einsteinium.vasp", "\n".join(lines))
    with pytest.raises(ElementError, match=r"'Es'.*Z=98"):
        read_structure(path)
    with pytest.raises(ElementError, match=r"'Es'"):
        CrystalBatch.from_structures([Structure(Lattice.cubic(4.0), ["Es"], [[0, 0, 0]])])
    with pytest.raises(ElementError, match="atomic number 99"):
        one_hot([1, 99])


def test_zero_volume_lattice(tmp_path):
    lines = poscar_lines()
    lines[4] = lines[3]  # two equal lattice vectors
    path = write(tmp_path / "flat.vasp", "\n".join(lines))
    # The determinant of two equal rows is 0 or a rounding residue, depending on the CPU (5.15e-15 on an AVX2 VM).
    degenerate = r"flat\.vasp: crystal 0: lattice volume \S+ Å\^3 is zero or degenerate"
    with pytest.raises(StructureError, match=degenerate):
        read_structure(path)
    lines = poscar_lines()
    lines[1] = "0.0"  # zero scale factor
    with pytest.raises(StructureError, match="volume 0"):
        read_structure(write(tmp_path / "zero_scale.vasp", "\n".join(lines)))
    flat = Structure(Lattice([[4, 0, 0], [0, 4, 0], [4, 4, 0]]), ["Na"], [[0, 0, 0]])
    with pytest.raises(StructureError, match="volume"):
        CrystalBatch.from_structures([flat])


def test_flat_cell_with_nonzero_volume():
    """A cell whose lattice planes are 0.02 Å apart (volume 0.32 Å^3 > 1e-3): refused, not searched for images."""
    thin = Structure(Lattice([[4, 0, 0], [0, 4, 0], [0, 0, 0.02]]), ["Na"], [[0, 0, 0]])
    with pytest.raises(StructureError, match=r"crystal 0: the cell is flat \(a height of 0.02 Å"):
        CrystalBatch.from_structures([thin])


def test_negative_volume_conventions(tmp_path, gap):
    """Negative numbers are not errors where they have a meaning, and give correct results there.

    A negative POSCAR scale factor is VASP's "cell volume" convention; a left-handed lattice (negative
    determinant) with the matching fractional coordinates is the same crystal and predicts the same value.
    """
    lines = poscar_lines()
    lines[1] = "-50.0"
    assert read_structure(write(tmp_path / "volume.vasp", "\n".join(lines))).volume == pytest.approx(50.0)
    batch = CrystalBatch.from_structures([srtio3()])
    lattice, frac = batch.lattice.copy(), batch.frac.copy()
    lattice[:, 0] *= -1.0
    frac[..., 0] *= -1.0
    assert np.linalg.det(lattice[0]) < 0
    np.testing.assert_allclose(gap(lattice, frac, batch.species, batch.mask), gap(*batch), rtol=1e-6)


def test_nan_lattice(tmp_path, gap):
    lines = poscar_lines()
    lines[2] = "nan 0 0"
    with pytest.raises(StructureError, match=r"nan_lattice\.vasp: crystal 0: lattice contains NaN or inf"):
        read_structure(write(tmp_path / "nan_lattice.vasp", "\n".join(lines)))
    # an impossible angle triple (alpha + beta < gamma) has no lattice matrix: NaN, refused by the predictor
    impossible = np.asarray(lattice_from_parameters(np.array([[4.0, 4.0, 4.0]]), np.array([[30.0, 30.0, 120.0]])))
    assert np.isnan(impossible).any()
    batch = CrystalBatch.from_structures([srtio3()])
    with pytest.raises(StructureError, match="crystal 0: lattice contains NaN or inf"):
        gap(impossible, batch.frac, batch.species, batch.mask)


def test_nan_and_inf_coordinates(tmp_path, gap):
    for value in ("nan", "inf", "-inf"):
        lines = poscar_lines()
        lines[-1] = f"{value} 0.25 0.25"
        path = write(tmp_path / f"{value}.vasp", "\n".join(lines))
        with pytest.raises(StructureError, match=re.escape(f"{path}: crystal 0: fractional coordinates contain NaN")):
            read_structure(path)
    batch = CrystalBatch.from_structures([srtio3(), srtio3(4.1)])
    frac = batch.frac.copy()
    frac[1, 2, 0] = np.inf
    with pytest.raises(StructureError, match="crystal 1: fractional coordinates contain NaN or inf"):
        gap(batch.lattice, frac, batch.species, batch.mask)
    nan = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, np.nan, 0.5]])
    with pytest.raises(StructureError, match="crystal 1: fractional coordinates contain NaN or inf"):
        CrystalBatch.from_structures([srtio3(), nan])


def test_duplicate_and_overlapping_atoms(tmp_path):
    lines = poscar_lines()
    lines[-1] = lines[-2]  # As on top of Al
    path = write(tmp_path / "dup.vasp", "\n".join(lines))
    with pytest.raises(StructureError, match=r"dup\.vasp: crystal 0: atom 0 and atom 1 are 0 Å apart"):
        read_structure(path)
    # overlap across the cell boundary (periodic image): 0.998 and 0.0005 along a 4 Å axis are 0.01 Å apart
    near = Structure(Lattice.cubic(4.0), ["Na", "Cl", "Cl"], [[0.5, 0.5, 0.5], [0.998, 0, 0], [0.0005, 0, 0]])
    with pytest.raises(StructureError, match=r"crystal 1: atom 1 and atom 2 are 0.01 Å apart \(closer than 0.1 Å"):
        CrystalBatch.from_structures([srtio3(), near])
    # 0.2 Å apart is unusual but not a duplicate: accepted
    CrystalBatch.from_structures([Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])])


def test_species_and_shape_errors(gap):
    batch = CrystalBatch.from_structures([srtio3()])
    species = batch.species.copy()
    species[0, 1] *= 0.5
    with pytest.raises(StructureError, match="crystal 0, atom 1: species probabilities sum to 0.5, not 1"):
        gap(batch.lattice, batch.frac, species, batch.mask)
    with pytest.raises(StructureError, match=re.escape("species must have shape [1, 5, 98], got (1, 5, 97)")):
        gap(batch.lattice, batch.frac, batch.species[..., :97], batch.mask)
    with pytest.raises(StructureError, match=re.escape("lattice must have shape [B, 3, 3], got (3, 3)")):
        gap(batch.lattice[0], batch.frac, batch.species, batch.mask)
    with pytest.raises(StructureError, match="crystal 0 has no atoms"):
        gap(batch.lattice, batch.frac, batch.species, np.zeros_like(batch.mask))
    with pytest.raises(StructureError, match="pad_to=3 is smaller than the largest crystal"):
        CrystalBatch.from_structures([srtio3()], pad_to=3)


# ----------------------------------------------------------------------------------------------------------
# Graph capacity


def test_neighbour_box_overflow_is_never_silent(gap):
    """A 2 Å axis needs an image box of 5 for CGCNN's 8 Å search; the default box 3 misses the +6 Å image.

    The in-`jit` graph flags it; a direct predictor call sizes the box from the given cell and so equals a
    predictor loaded with a sufficient box (and differs from the truncated graph's answer).
    """
    cell = Structure(Lattice.orthorhombic(2.0, 6.0, 6.0), ["Na"], [[0, 0, 0]])
    batch = CrystalBatch.from_structures([cell])
    assert jaxcrystal.geometry.required_image_box(batch.lattice, 8.0) == (5, 2, 2)
    assert bool(gap.build_graph(batch.lattice, batch.frac, batch.mask).overflow[0])
    wide = load_predictor("cgcnn", "band-gap", image_box=5)
    assert not bool(wide.build_graph(batch.lattice, batch.frac, batch.mask).overflow[0])
    exact = np.asarray(wide.apply(wide.params, *batch))
    truncated = np.asarray(gap.apply(gap.params, *batch))
    assert abs(exact[0] - truncated[0]) > 1e-4  # the truncated graph really is wrong
    np.testing.assert_allclose(np.asarray(gap(*batch)), exact, rtol=1e-6)


def test_overflow_without_host_graph_raises(gap):
    """A graph predictor without a host-side builder refuses a crystal whose graph overflows (no silent answer)."""
    small_box = load_predictor("cgcnn", "band-gap", image_box=1)
    bare = Predictor(
        kind="cgcnn",
        name="band-gap",
        units="eV",
        params=small_box.params,
        apply=small_box.apply,
        build_graph=small_box.build_graph,
        apply_with_graph=small_box.apply_with_graph,
    )
    batch = CrystalBatch.from_structures([srtio3(), srtio3(9.0)])
    with pytest.raises(StructureError, match=r"crystals \[0\]: the cgcnn neighbour graph overflows"):
        bare(*batch)


@pytest.mark.slow
def test_alignn_direct_call_uses_the_exact_host_graph():
    """ALIGNN's default capacities overflow on a 1-atom 2.2 Å cell; a direct call builds the exact host graph."""
    predictor = load_predictor("alignn", shared_path("fixtures", "alignn", "random_eform_alignn.zip"))
    batch = CrystalBatch.from_structures([Structure(Lattice.cubic(2.2), ["Po"], [[0, 0, 0]])])
    assert bool(predictor.build_graph(batch.lattice, batch.frac, batch.mask).overflow[0])
    wide = load_predictor("alignn", shared_path("fixtures", "alignn", "random_eform_alignn.zip"), image_box=5)
    assert not bool(wide.build_graph(batch.lattice, batch.frac, batch.mask).overflow[0])
    np.testing.assert_allclose(np.asarray(predictor(*batch)), np.asarray(wide.apply(wide.params, *batch)), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def converted_cgcnn_arrays() -> dict:
    with np.load(CGCNN_WEIGHTS) as npz:
        return {key: npz[key] for key in npz.files}


def test_converted_weights_missing_extra_and_misshaped_keys(tmp_path):
    arrays = converted_cgcnn_arrays()
    key = "params/conv_to_fc/kernel"
    shape = arrays[key].shape
    expected = re.escape(str(shape))
    missing = {k: v for k, v in arrays.items() if k != key}
    extra = arrays | {"params/fc_extra/kernel": np.zeros((4, 1))}
    wrong = arrays | {key: np.zeros((shape[0] + 1, shape[1]))}
    for name, content, pattern in (
        ("missing", missing, rf"missing weight '{key}' \(expected shape \({shape[0]}, {shape[1]}\)\)"),
        ("extra", extra, r"unexpected weight 'params/fc_extra/kernel' with shape \(4, 1\)"),
        ("wrong", wrong, rf"weight '{key}' has shape \({shape[0] + 1}, {shape[1]}\), the model expects {expected}"),
    ):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **content)
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + pattern):
            load_predictor("cgcnn", path)


def test_upstream_checkpoint_missing_extra_and_misshaped_keys(tmp_path):
    # a missing key in the file itself: rename 'conv_to_fc.bias' inside the pickle (same length, zip rewritten)
    renamed = tmp_path / "renamed.pth.tar"
    with zipfile.ZipFile(RANDOM_CGCNN) as source, zipfile.ZipFile(renamed, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(b"conv_to_fc.bias") == 1
                data = data.replace(b"conv_to_fc.bias", b"conv_to_fc.bixs")
            target.writestr(info, data)
    with pytest.raises(CheckpointError, match=r"renamed\.pth\.tar: state_dict has no entry 'conv_to_fc\.bias'"):
        load_predictor("cgcnn", renamed)
    # extra and mis-shaped entries: the converter's public function on the checkpoint read without torch
    checkpoint = read_torch_checkpoint(RANDOM_CGCNN)
    state = checkpoint["state_dict"]
    extra = checkpoint | {"state_dict": state | {"fc_extra.weight": np.zeros((2, 2), np.float32)}}
    with pytest.raises(CheckpointError, match=r"ck: unexpected state_dict entries \['fc_extra.weight'\]"):
        cgcnn_converter.convert_checkpoint(extra, "ck")
    shape = state["conv_to_fc.weight"].shape
    wrong = checkpoint | {"state_dict": state | {"conv_to_fc.weight": np.zeros((shape[0], shape[1] + 2), np.float32)}}
    with pytest.raises(
        CheckpointError, match=rf"'conv_to_fc.weight' has shape \({shape[0]}, {shape[1] + 2}\), expected"
    ):
        cgcnn_converter.convert_checkpoint(wrong, "ck")


def test_checkpoint_of_the_wrong_model_kind(tmp_path):
    cgcnn_npz = jaxcrystal.predictors.cgcnn.weights_dir() / "cgcnn-band-gap.npz"
    with pytest.raises(
        CheckpointError, match=r"cgcnn-band-gap\.npz: format 'jaxcrystal-cgcnn-v1' is not 'jaxcrystal-alignn"
    ):
        load_predictor("alignn", cgcnn_npz)
    with pytest.raises(CheckpointError, match=r"format 'jaxcrystal-cgcnn-v1' is not 'jaxcrystal-crystalformer"):
        load_predictor("crystalformer", cgcnn_npz)
    with pytest.raises(CheckpointError, match=r"random_cgcnn\.pth\.tar: no checkpoint .* found"):
        load_predictor("alignn", RANDOM_CGCNN)
    crystalformer = shared_path("fixtures", "crystalformer", "random_bandgap.ckpt")
    with pytest.raises(
        CheckpointError, match=re.escape(f"{crystalformer}: state_dict has no 'embedding.weight'; not a CGCNN")
    ):
        load_predictor("cgcnn", crystalformer)
    config = shared_path("fixtures", "crystalformer", "default.json")
    with pytest.raises(CheckpointError, match=r"random_cgcnn\.pth\.tar: .*not a Crystalformer checkpoint"):
        load_predictor("crystalformer", RANDOM_CGCNN, config=config)


def test_corrupted_zip_checkpoints(tmp_path):
    data = RANDOM_CGCNN.read_bytes()
    truncated = write(tmp_path / "truncated.pth.tar", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{truncated}: corrupted or truncated checkpoint")):
        load_predictor("cgcnn", truncated)
    flipped = bytearray(data)
    start = data.index(b"data/0") + 200  # inside the first stored tensor
    flipped[start : start + 16] = bytes(16)
    corrupted = write(tmp_path / "corrupted.pth.tar", bytes(flipped))
    with pytest.raises(CheckpointError, match=r"corrupted\.pth\.tar: corrupted or truncated checkpoint .*CRC"):
        load_predictor("cgcnn", corrupted)
    npz = write(tmp_path / "weights.npz", CGCNN_WEIGHTS.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"weights\.npz: cannot read converted weights"):
        load_predictor("cgcnn", npz)
    zipped = shared_path("fixtures", "alignn", "random_eform_alignn.zip").read_bytes()
    alignn_zip = write(tmp_path / "model.zip", zipped[: len(zipped) // 2])
    with pytest.raises(CheckpointError, match=r"model\.zip: not a zip archive"):
        load_predictor("alignn", alignn_zip)


def test_unknown_predictor_kind_source_and_options():
    with pytest.raises(ConfigError, match="unknown predictor kind 'megnet'"):
        load_predictor("megnet", "band-gap")
    with pytest.raises(CheckpointError, match="'band-gaps' is neither an embedded CGCNN model"):
        load_predictor("cgcnn", "band-gaps")
    with pytest.raises(ConfigError, match=r"unknown CGCNN option\(s\) \['truncation'\]"):
        load_predictor("cgcnn", "band-gap", truncation="fixed")
    with pytest.raises(ConfigError, match="smaller_boxes must be True, False or 'auto', got 'no'"):
        load_predictor("cgcnn", "band-gap", smaller_boxes="no")
    with pytest.raises(ConfigError, match="smaller_boxes must be True, False or 'auto', got 1"):
        load_predictor("alignn", "unused.npz", smaller_boxes=1)


# ----------------------------------------------------------------------------------------------------------
# Optimizer and command line


def test_template_without_neutral_oxidation_pattern(tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    write_poscar(Structure(Lattice.cubic(4.2), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]]), folder / "Na2.vasp")
    with pytest.raises(StructureError, match=r"template Na2\.vasp \(Na\) has no charge-neutral oxidation pattern"):
        jaxcrystal.optimize(
            "bg_and_eform", structure="none", templates=str(folder), num_candidates=2, steps=1, progress=False
        )


def cli_error(capsys, argv) -> str:
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_cli_contradicting_flags(capsys, tmp_path):
    err = cli_error(capsys, ["--resume", str(tmp_path), "--steps", "3", "--seed", "1"])
    assert "--resume takes every option from" in err and "drop --steps, --seed" in err
    err = cli_error(capsys, ["--structure", "perovskite", "--templates", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "contradicts structure='perovskite'" in err
    err = cli_error(capsys, ["--task", "tc_and_eform", "--target", "3", "--out", str(tmp_path / "o")])
    assert "maximizes tc; it takes no target" in err
    err = cli_error(capsys, ["--weights", "band_gap", "--out", str(tmp_path / "o")])
    assert "--weights expects PROPERTY=PATH" in err
    err = cli_error(capsys, ["--tolerance-window", "1.0", "0.8", "--out", str(tmp_path / "o")])
    assert "tolerance_window must be (low, high)" in err


def test_existing_output_folder(capsys, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "result.csv").write_text("x\n")
    err = cli_error(capsys, ["--out", str(out), "--num-candidates", "2", "--steps", "1", "--quiet"])
    assert f"{out}: folder exists and is not empty" in err
    file_out = write(tmp_path / "file", "x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        jaxcrystal.optimize("bg_and_eform", out=file_out, num_candidates=2, steps=1, progress=False)
    assert (out / "result.csv").read_text() == "x\n"  # untouched


def test_every_error_is_a_value_error_subclass():
    """Scripts may catch `JaxCrystalError` (or `ValueError`) for every bad-input case above."""
    for cls in (StructureError, ElementError, CheckpointError, ConfigError):
        assert issubclass(cls, jaxcrystal.JaxCrystalError) and issubclass(cls, ValueError)
    assert issubclass(ElementError, StructureError)

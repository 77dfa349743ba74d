"""The benchmark scripts run end to end (smallest case, one process per case) and reject bad cases by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402


def test_parse_case_reads_perovskite_supercells():
    assert common.parse_case("8x135") == (8, 135, 3)
    assert common.parse_case("128X5") == (128, 5, 1)


@pytest.mark.parametrize(
    "case, message",
    [("8xq", "expected BxN"), ("8x135x2", "expected BxN"), ("0x5", "expected BxN"), ("8x7", r"N must be 5 \* cells³")],
)
def test_parse_case_names_the_bad_case(case, message):
    with pytest.raises(SystemExit, match=message) as error:
        common.parse_case(case)
    assert case in str(error.value)


def test_bench_cgcnn_runs_each_case_in_its_own_process(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_cgcnn.py"), "--cases", "4x5", "4xq", "--no-torch"]
    proc = subprocess.run([*cmd, "--repeats", "1", "--json", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "4xq: failed: case '4xq': expected BxN" in proc.stdout
    good, bad = json.loads(out.read_text())["results"]
    assert bad == {"case": "4xq", "error": "case '4xq': expected BxN, two positive integers (e.g. 8x135)"}
    assert (good["case"], good["crystals"], good["atoms"]) == ("4x5", 4, 5)
    assert 0 < good["forward_gflop"] < good["grad_gflop"]  # the backward pass adds work
    for mode in ("forward", "grad"):
        assert good[f"{mode}_s"] > 0 and good[f"{mode}_compile_s"] > 0
        assert 0 < good[f"{mode}_util"] <= good[f"{mode}_ceiling"] <= 100
    assert good["peak_rss_mb"] > 0


def test_basis_size_keeps_the_distances_and_the_width():
    from bench_crystalformer import basis_sized

    from jaxcrystal.models.crystalformer import CrystalformerConfig

    config = CrystalformerConfig()
    assert basis_sized(config, None) is config
    smaller = basis_sized(config, 8)
    for layer in range(config.num_layers):
        centres, width = config.basis(layer)
        fewer, same_width = smaller.basis(layer)
        assert len(fewer) == 8 and fewer[-1] == pytest.approx(centres[-1])
        assert same_width == pytest.approx(width)
    assert smaller.basis_cutoff() == pytest.approx(config.basis_cutoff())  # so the basis windows stay the same


def test_bench_crystalformer_refuses_a_basis_size_for_checkpoints():
    cmd = [sys.executable, str(BENCHMARKS / "bench_crystalformer.py"), "--basis-size", "8", "--ckpt", "any.ckpt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "--basis-size" in proc.stderr and "random weights only" in proc.stderr

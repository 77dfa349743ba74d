"""The shipped Materials Project template set: size, neutrality, reproducible rebuild."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcrystal import chemistry, templates

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_set_is_small_neutral_and_patterned():
    t = templates.materials_project_set()
    assert len(t) == 256 and len(set(t.names)) == 256
    assert all(2 <= len(s) <= 10 for s in t.structures)
    for s in t.structures:
        symbols = [site.specie.symbol for site in s]
        assert chemistry.is_neutral(symbols), s.composition
        assert len(chemistry.neutral_patterns(symbols, max_patterns=1)) == 1
    assert t.family == "general"


@pytest.mark.slow
def test_rebuild_from_the_pypi_sdist_is_bit_for_bit(tmp_path):
    cache = Path.home() / ".cache" / "jaxcrystal"
    sdist = cache / "matminer-0.2.6.tar.gz"
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "matminer==0.2.6"]
        done = subprocess.run([*cmd, "-d", str(cache)], capture_output=True)
        if done.returncode != 0 or not sdist.exists():
            pytest.skip("matminer==0.2.6 sdist could not be downloaded from PyPI (offline?)")
    out = tmp_path / "mp_templates.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_mp_templates.py"), str(sdist), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    shipped = ROOT / "jaxcrystal" / "data" / "mp_templates.json"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(shipped.read_bytes()).hexdigest()

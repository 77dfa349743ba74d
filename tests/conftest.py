"""Shared test helpers: paths to the small fixtures committed in tests/fixtures and to ../shared."""

import os
import tempfile
from pathlib import Path

import jax
import pytest

# Command-line runs started by the tests keep their compiled programs in a throwaway folder, not in ~/.cache.
os.environ.setdefault("JAXCRYSTAL_COMPILE_CACHE", tempfile.mkdtemp(prefix="jaxcrystal-test-xla-"))

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the calling test when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (the ../shared folder is only present in the development setup)")
    return path


@pytest.fixture
def x64():
    """Runs the test with float64 enabled, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)

"""jaxcrystal: a JAX-native differentiable crystal optimizer (SMOACS) with Flax property predictors."""

from jaxcrystal import host_memory
from jaxcrystal.compile_options import compiler_options
from jaxcrystal.crystal import CrystalBatch, lattice_from_parameters, lattice_to_parameters
from jaxcrystal.errors import (
    CheckpointError,
    ConfigError,
    ElementError,
    JaxCrystalError,
    StructureError,
)
from jaxcrystal.host_memory import keep_host_buffers
from jaxcrystal.predictors import Predictor, load_predictor

# Importing is free of JAX computations, so this still precedes JAX's CPU threads (see `jaxcrystal.host_memory`).
host_memory.apply_default()

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CrystalBatch",
    "ElementError",
    "JaxCrystalError",
    "Predictor",
    "StructureError",
    "compiler_options",
    "keep_host_buffers",
    "lattice_from_parameters",
    "lattice_to_parameters",
    "load_predictor",
    "optimize",
]


def __getattr__(name):
    # `optimize` pulls in evaluation and result writing (pandas, matplotlib): import it on first use.
    if name == "optimize":
        from jaxcrystal.smoacs.driver import optimize

        return optimize
    raise AttributeError(f"module 'jaxcrystal' has no attribute {name!r}")

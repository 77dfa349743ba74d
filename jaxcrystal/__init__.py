"""jaxcrystal: a JAX-native differentiable crystal optimizer (SMOACS) with Flax property predictors."""

from jaxcrystal.crystal import CrystalBatch, lattice_from_parameters, lattice_to_parameters
from jaxcrystal.errors import (
    CheckpointError,
    ConfigError,
    ElementError,
    JaxCrystalError,
    StructureError,
)
from jaxcrystal.predictors import Predictor, load_predictor

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CrystalBatch",
    "ElementError",
    "JaxCrystalError",
    "StructureError",
    "Predictor",
    "lattice_from_parameters",
    "load_predictor",
    "lattice_to_parameters",
]

"""`load_predictor(kind, source, config=None, **options)`: one entry point for every property model.

Each kind lives in its own module (`jaxcrystal.predictors.<kind>`) exposing
`load(source, config=None, **options) -> Predictor`.
"""

import importlib

from jaxcrystal.errors import ConfigError
from jaxcrystal.predictors.base import Predictor

KINDS = ("cgcnn", "crystalformer", "alignn")


def load_predictor(kind: str, source, config=None, **options) -> Predictor:
    """Loads a property predictor.

    Args:
      kind: "cgcnn", "crystalformer" or "alignn".
      source: an upstream checkpoint path, a path to converted weights, or the name of an embedded default
        in `weights/` (e.g. "band-gap").
      config: Crystalformer's hyper-parameter JSON (`default.json`); unused by the other kinds.
      **options: model-specific options (Crystalformer: `truncation`, `gradient`).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown predictor kind {kind!r}; expected one of {', '.join(KINDS)}")
    module = importlib.import_module(f"jaxcrystal.predictors.{kind}")
    return module.load(source, config=config, **options)


__all__ = ["KINDS", "Predictor", "load_predictor"]

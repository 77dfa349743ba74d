"""Per-candidate loss terms and their weighted sum.

Each objective maps a property prediction y [B] to a loss [B]; `total_loss` adds them up. They compose freely
from Python:

    >>> import jax.numpy as jnp
    >>> terms = [window("band_gap", target=2.0, margin=0.04), linear("formation_energy", weight=1.0)]
    >>> loss, parts = total_loss(terms, {"band_gap": jnp.array([1.0, 2.0]),
    ...                                  "formation_energy": jnp.array([-1.0, -2.0])})
    >>> [round(float(x), 2) for x in loss]
    [-0.04, -2.0]
"""

import dataclasses

import jax.numpy as jnp

KINDS = ("window", "maximize", "minimize", "linear", "below", "above")


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss on one property.

    Attributes:
      property: key of the prediction it reads (e.g. "band_gap").
      kind: "window" max(|y − target| − margin, 0); "maximize" −y; "minimize" y; "linear" y (SMOACS's
        E_form term, meant with a weight); "below" max(y − target, 0); "above" max(target − y, 0).
      target: window centre or threshold (property units).
      margin: half-width of the flat window bottom (training margin).
      weight: multiplies the term.
    """

    property: str
    kind: str
    target: float | None = None
    margin: float = 0.0
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"objective kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in ("window", "below", "above") and self.target is None:
            raise ValueError(f"a {self.kind!r} objective on {self.property!r} needs a target")

    def __call__(self, y):
        """Loss [B] for predictions y [B]."""
        if self.kind == "window":
            term = jnp.maximum(jnp.abs(y - self.target) - self.margin, 0.0)
        elif self.kind == "maximize":
            term = -y
        elif self.kind in ("minimize", "linear"):
            term = y
        elif self.kind == "below":
            term = jnp.maximum(y - self.target, 0.0)
        else:
            term = jnp.maximum(self.target - y, 0.0)
        return self.weight * term


def window(prop: str, target: float, margin: float = 0.0, weight: float = 1.0) -> Objective:
    """Flat-bottomed L1 hinge around `target` ± `margin`."""
    return Objective(prop, "window", target, margin, weight)


def maximize(prop: str, weight: float = 1.0) -> Objective:
    return Objective(prop, "maximize", weight=weight)


def minimize(prop: str, weight: float = 1.0) -> Objective:
    return Objective(prop, "minimize", weight=weight)


def linear(prop: str, weight: float = 1.0) -> Objective:
    """weight · y, unbounded: SMOACS's formation-energy term (c_f · E_form)."""
    return Objective(prop, "linear", weight=weight)


def below(prop: str, threshold: float, weight: float = 1.0) -> Objective:
    return Objective(prop, "below", threshold, weight=weight)


def above(prop: str, threshold: float, weight: float = 1.0) -> Objective:
    return Objective(prop, "above", threshold, weight=weight)


@dataclasses.dataclass(frozen=True)
class ToleranceObjective:
    """Goldschmidt tolerance factor kept inside [low, high] (perovskites).

    Loss max(low + margin − t, 0) + max(t − high + margin, 0). SMOACS applies its margin 0.1 inward to
    [0.8, 1.0], which collapses the window to |t − 0.9| (smoacs.md §10 item 4); the default here is the real
    window with no margin. `ToleranceObjective(margin=0.1)` reproduces the upstream loss.
    """

    low: float = 0.8
    high: float = 1.0
    margin: float = 0.0
    weight: float = 1.0

    def __call__(self, t):
        low, high = self.low + self.margin, self.high - self.margin
        if low > high:  # an inward margin wider than the window: the hinge meets in the middle
            low = high = 0.5 * (self.low + self.high)
        return self.weight * (jnp.maximum(low - t, 0.0) + jnp.maximum(t - high, 0.0))


def total_loss(objectives, predictions: dict, tolerance=None, tolerance_objective=None):
    """Sum of the objective terms per candidate.

    Args:
      objectives: sequence of `Objective`.
      predictions: property name -> [B].
      tolerance: [B] tolerance factor, or None.
      tolerance_objective: a `ToleranceObjective` applied to `tolerance` when both are given.

    Returns:
      (loss [B], parts) where parts maps "<kind>:<property>" (and "tolerance") to the term [B].
    """
    parts = {}
    for objective in objectives:
        key = f"{objective.kind}:{objective.property}"
        parts[key] = parts.get(key, 0.0) + objective(predictions[objective.property])
    if tolerance is not None and tolerance_objective is not None:
        parts["tolerance"] = tolerance_objective(tolerance)
    loss = sum(parts.values())
    return loss, parts

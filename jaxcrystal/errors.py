"""Exceptions raised for bad user input.

Every error a user can trigger with a file, a flag or an array derives from `JaxCrystalError`, so scripts can
catch them in one place. They subclass `ValueError` because they all mean "this input is not acceptable".
"""


class JaxCrystalError(ValueError):
    """Base class: the input (file, array, flag, checkpoint) is not acceptable; the message says why."""


class StructureError(JaxCrystalError):
    """A crystal structure (file or arrays) is malformed: bad lattice, coordinates, species or atom count."""


class ElementError(StructureError):
    """An element symbol or atomic number is outside the Z = 1..98 vocabulary."""


class CheckpointError(JaxCrystalError):
    """A checkpoint or converted-weights file is unreadable, unsafe, of the wrong kind or mis-shaped."""


class ConfigError(JaxCrystalError):
    """Options or command-line flags contradict each other or are out of range."""

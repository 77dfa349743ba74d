"""Task presets mirroring SMOACS's `main.py` (reference/smoacs.md §5.1), with the paper's evaluation defaults.

A task names its properties and objectives; a (model, task, structure) triple picks the hyper-parameter row.
SMOACS's `*_perov3x3x3` rows can never be selected upstream (smoacs.md §10 item 1); here
`--structure perovskite3x3x3` selects them. CGCNN is not part of SMOACS: it uses the Crystalformer rows (a
non-graph-rebuilding schedule fits it because our graph refresh is cheap and exact), untuned.
"""

import dataclasses

from jaxcrystal.errors import ConfigError

STRUCTURES = ("none", "perovskite", "perovskite3x3x3")
TASKS = ("bg_and_eform", "tc_and_eform", "bg_and_ehull", "B_and_eform")
MODELS = ("cgcnn", "crystalformer", "alignn")


@dataclasses.dataclass(frozen=True)
class Hyper:
    """One row of SMOACS's `condition_dict`: learning rates and copy-mutation settings."""

    coord_lr: float
    lattice_lr: float
    atom_lr: float
    steps_cm: tuple[int, ...]
    mutation_noise: float
    top_ratio: float
    keep_prob: float  # SMOACS's group_C_use_rate
    graph_rebuilds: int | None = None  # ALIGNN: number of sine-scheduled rebuilds


ROWS = {
    "ALIGNN_supercon": Hyper(2e-3, 2e-4, 2e-5, (50, 100, 150), 7e-5, 0.31, 0.02, 12),
    "Crystalformer_wide_bg": Hyper(5e-3, 2e-3, 7e-3, (100, 150), 7e-5, 0.10, 0.05),
    "ALIGNN_wide_bg": Hyper(7e-4, 7e-4, 3e-4, (50, 100, 150), 1e-5, 0.30, 0.20, 46),
    "Crystalformer_perov": Hyper(5e-3, 2e-3, 7e-3, (100, 150), 7e-5, 0.10, 0.05),
    "ALIGNN_perov": Hyper(2e-4, 9.0, 5e-5, (50, 100, 150), 1e-5, 0.87, 0.59, 41),
    "Crystalformer_perov3x3x3": Hyper(3e-3, 2e-3, 6e-5, (50, 100, 150), 1e-5, 0.30, 0.20),
    "ALIGNN_perov3x3x3": Hyper(6.67e-4, 1e-2, 4e-5, (50, 100, 150), 3e-6, 0.30, 0.20, 41),
    "ALIGNN_bg_e_hull": Hyper(7e-4, 7e-4, 3e-4, (120,), 3e-6, 0.48, 0.02, 46),
    "ALIGNN_BM_e_form": Hyper(3e-4, 1e-3, 2e-5, (50, 100), 3e-6, 0.30, 0.10, 46),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """What a task optimizes and how success is judged.

    Attributes:
      main: main property name; `target=None` means maximization.
      second: second property name (linear term with coefficient `second_coef`).
      train_margin: training margin of the main window (property units).
      eval_margin: evaluation margin (paper: ±0.2 eV for gaps, ±10 GPa for the bulk modulus).
      second_max: success requires second < second_max (paper: E_form < −0.5 eV/atom); None = no criterion.
      default_target: target used when none is given.
    """

    main: str
    second: str
    train_margin: float
    eval_margin: float
    second_max: float | None
    default_target: float | None
    second_coef: float = 1.0


TASK_SPECS = {
    "bg_and_eform": Task("band_gap", "formation_energy", 0.04, 0.2, -0.5, 2.0),
    "tc_and_eform": Task("tc", "formation_energy", 0.0, 0.0, None, None, second_coef=0.0),
    "bg_and_ehull": Task("band_gap", "e_hull", 0.04, 0.2, None, 2.0),
    "B_and_eform": Task("bulk_modulus", "formation_energy", 5.0, 10.0, -0.5, 100.0),
}

# Units and a human name of every property a task may need.
PROPERTIES = {
    "band_gap": ("eV", "band gap"),
    "formation_energy": ("eV/atom", "formation energy per atom"),
    "bulk_modulus": ("GPa", "bulk modulus K_VRH"),
    "tc": ("K", "superconducting critical temperature"),
    "e_hull": ("eV/atom", "energy above the convex hull"),
}


def hyper_row(model: str, task: str, structure: str) -> tuple[str, Hyper]:
    """The SMOACS hyper-parameter row for a (model, task, structure) triple."""
    if model not in MODELS:
        raise ConfigError(f"--model must be one of {MODELS}, got {model!r}")
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {TASKS}, got {task!r}")
    if structure not in STRUCTURES:
        raise ConfigError(f"--structure must be one of {STRUCTURES}, got {structure!r}")
    family = "ALIGNN" if model == "alignn" else "Crystalformer"
    if family == "ALIGNN":
        if task == "tc_and_eform":
            return "ALIGNN_supercon", ROWS["ALIGNN_supercon"]
        if task == "bg_and_ehull":
            return "ALIGNN_bg_e_hull", ROWS["ALIGNN_bg_e_hull"]
        if task == "B_and_eform":
            return "ALIGNN_BM_e_form", ROWS["ALIGNN_BM_e_form"]
    key = {"none": "wide_bg", "perovskite": "perov", "perovskite3x3x3": "perov3x3x3"}[structure]
    name = f"{family}_{key}"
    return name, ROWS[name]

"""From templates to the per-candidate constants (`Problem`) and the starting lattice of a batch."""

import numpy as np

from jaxcrystal import chemistry
from jaxcrystal.errors import StructureError
from jaxcrystal.smoacs.parametrization import Problem
from jaxcrystal.templates import SITE_A, SITE_B, SITE_X, Templates

_SITE_LABEL = {SITE_A: "A", SITE_B: "B", SITE_X: "X"}
PEROVSKITE_PATTERNS = 2


def build_problem(
    templates: Templates,
    max_patterns: int = 10,
    radius_convention: str = "shannon",
    template_offset: int = 0,
):
    """The `Problem` of a batch of templates plus its starting lattice parameters.

    Perovskites get SMOACS's two patterns (A +1/+2, B +2/+4, X −1/−2), the perovskite element table and site radii
    (`radius_convention`: "shannon" = A at CN XII, B and X at CN VI; "smoacs" = the upstream CN-VI crystal radii
    everywhere). General templates get up to `max_patterns` neutral patterns of their own composition.

    Args:
      templates: the batch's templates (B of them).
      max_patterns: K for general templates.
      radius_convention: see above.
      template_offset: added to the template indices (their position in the whole run).

    Returns:
      (problem: `Problem` of host numpy arrays, lengths [B, 3] Å, angles [B, 3] degrees).
    """
    b = len(templates)
    n = max(len(s) for s in templates.structures)
    perovskite = templates.family == "perovskite"
    k = PEROVSKITE_PATTERNS if perovskite else int(max_patterns)
    masks = np.zeros((b, n, k, 98), dtype=bool)
    used = np.zeros((b, k), dtype=bool)
    states = np.zeros((b, k, n), dtype=np.int64)
    radii = np.zeros((b, n, k, 98), dtype=np.float32)
    atom_mask = np.zeros((b, n), dtype=bool)
    init_frac = np.zeros((b, n, 3))
    cache = {}
    for i, (name, structure) in enumerate(zip(templates.names, templates.structures, strict=True)):
        m = len(structure)
        atom_mask[i, :m] = True
        init_frac[i, :m] = structure.frac_coords
        if perovskite:
            sites = tuple(_SITE_LABEL[r] for r in templates.site_roles[i, :m])
            if sites not in cache:
                patterns = chemistry.perovskite_patterns(sites)
                mask, use = chemistry.site_element_masks(patterns, k, "perovskite", radius_convention)
                rho = chemistry.site_radii(patterns, sites, k, radius_convention)
                cache[sites] = (patterns, mask, use, rho)
            patterns, mask, use, rho = cache[sites]
            radii[i, :m] = rho.transpose(0, 2, 1)
        else:
            symbols = [site.specie.symbol for site in structure]
            patterns = chemistry.neutral_patterns(symbols, max_patterns=k)
            if len(patterns) == 0:
                raise StructureError(
                    f"template {name} ({structure.composition.reduced_formula}) has no charge-neutral oxidation "
                    "pattern in the 'super common' oxidation-state table"
                )
            mask, use = chemistry.site_element_masks(patterns, k, "general")
        masks[i, :m] = mask.transpose(0, 2, 1)
        used[i] = use
        states[i, : len(patterns), :m] = patterns
    lengths = np.array([s.lattice.abc for s in templates.structures])
    angles = np.array([s.lattice.angles for s in templates.structures])
    problem = Problem(
        site_masks=masks,
        pattern_used=used,
        oxidation_states=states,
        site_radii=radii,
        site_roles=np.where(atom_mask, templates.site_roles[:, :n], -1),
        atom_mask=atom_mask,
        init_frac=init_frac,
        base_length=lengths.max(axis=1),
        template_index=np.arange(b) + template_offset,
    )
    return problem, lengths, angles

"""Step schedules of a SMOACS run, computed once on the host as static tables of length `num_steps`."""

import numpy as np


def temperature(num_steps: int, t_max: float = 0.01, t_min: float = 1e-4) -> np.ndarray:
    """τ_s = t_min + (t_max − t_min) (num_steps − s) / num_steps for s = 0 .. num_steps−1 (smoacs.md §5.3)."""
    s = np.arange(num_steps)
    return t_min + (t_max - t_min) * (num_steps - s) / num_steps


def cosine_with_restarts(base_lr: float, num_steps: int, restarts=()) -> np.ndarray:
    """Learning rate used at each update, as SMOACS's CosineAnnealingLR recreated at every restart.

    The first cycle is base_lr · ½(1 + cos(π s / num_steps)). A restart after the update of step r starts a new
    cosine from the rate the old scheduler had reached (its value for step r+1) down to 0 at `num_steps`:
    lr_{r+1+j} = lr_{r+1} · ½(1 + cos(π j / (num_steps − r))). (Copy-mutation restarts, smoacs.md §5.4.)

    Args:
      base_lr: initial learning rate.
      num_steps: number of updates.
      restarts: steps r after whose update the schedule restarts (0-based).

    Returns:
      [num_steps] float64 learning rates.
    """
    lr = np.empty(num_steps)
    start, start_lr, length = 0, float(base_lr), num_steps
    boundaries = sorted(int(r) for r in restarts if 0 <= int(r) < num_steps - 1)
    for s in range(num_steps):
        lr[s] = start_lr * 0.5 * (1.0 + np.cos(np.pi * (s - start) / length))
        if boundaries and s == boundaries[0]:
            boundaries.pop(0)
            # the old scheduler's value for the next step becomes the new base
            next_lr = start_lr * 0.5 * (1.0 + np.cos(np.pi * (s + 1 - start) / length))
            start, start_lr, length = s + 1, next_lr, num_steps - s
    return lr


def sine_rebuild_steps(num_steps: int, num_rebuilds: int) -> list[int]:
    """SMOACS's ALIGNN graph-rebuild steps: the first s with sin(π s / (2 num_steps)) > k/(n+1), k = 1..n.

    Dense early, sparse late (smoacs.md §5.5); e.g. n = 12 gives [10, 20, 30, 40, 51, 62, 73, 85, 98, 112, 129, 150].
    """
    s = np.arange(num_steps)
    curve = np.sin(np.pi * s / (2 * num_steps))
    steps = [int(np.argmax(curve > k / (num_rebuilds + 1))) for k in range(1, num_rebuilds + 1)]
    return sorted(set(steps))

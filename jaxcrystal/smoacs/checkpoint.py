"""Checkpoints of a run in progress: the loop state of the current batch (orbax) and the history so far.

Layout under `<out>/checkpoints/batch_<i>/`:

| entry          | content                                                                    |
|----------------|----------------------------------------------------------------------------|
| `step_<k>/`    | the `LoopState` after step k (orbax `StandardCheckpointer`)                 |
| `history.npz`  | the history rows of steps 0 .. k-1                                         |
| `meta.json`    | {"step": k, "state": "step_<k>", "box": neighbour box, "complete": bool}   |

`meta.json` is replaced atomically after the state and the history are on disk, so a run killed at any moment
leaves the previous consistent checkpoint in place; older `step_*` folders are removed afterwards.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcrystal.errors import ConfigError
from jaxcrystal.results import atomic_write


class BatchCheckpoints:
    """Saves and restores the per-batch loop state of a run under `folder`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._checkpointer = ocp.StandardCheckpointer()

    def _batch(self, index: int) -> Path:
        return self.folder / f"batch_{index:03d}"

    def save(self, index: int, state, history: dict, box, complete: bool) -> None:
        """Writes the state after `state.step` steps, the history rows so far, then the pointer to them."""
        folder = self._batch(index)
        folder.mkdir(parents=True, exist_ok=True)
        step = int(state.step)
        name = f"step_{step:05d}"
        target = folder / name
        if target.exists():
            shutil.rmtree(target)
        self._checkpointer.save(target.resolve(), jax.tree.map(np.asarray, state))
        self._checkpointer.wait_until_finished()
        atomic_write(folder / "history.npz", lambda p: _save_history(p, history))
        meta = {"step": step, "state": name, "box": list(box) if box else None, "complete": bool(complete)}
        atomic_write(folder / "meta.json", lambda p: p.write_text(json.dumps(meta) + "\n"))
        for old in folder.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def meta(self, index: int) -> dict | None:
        path = self._batch(index) / "meta.json"
        return json.loads(path.read_text()) if path.exists() else None

    def load(self, index: int, abstract_state):
        """(state, history, meta) of batch `index`, or None when it has no checkpoint.

        Args:
          abstract_state: the `LoopState` structure to restore into (`jax.eval_shape` of the loop's `init`).
        """
        meta = self.meta(index)
        if meta is None:
            return None
        folder = self._batch(index)
        try:
            state = self._checkpointer.restore((folder / meta["state"]).resolve(), abstract_state)
            with np.load(folder / "history.npz") as npz:
                history = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{folder}: checkpoint cannot be restored ({err}); rerun without --resume") from err
        return state, history, meta

    def clear(self, index: int) -> None:
        shutil.rmtree(self._batch(index), ignore_errors=True)


def _save_history(path: Path, history: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **history)

"""`optimize(...)`: a whole SMOACS run from Python — templates, batches, the compiled loop, evaluation, files.

>>> import jaxcrystal
>>> result = jaxcrystal.optimize("bg_and_eform", structure="perovskite", target=2.0,
...                              num_candidates=8, steps=20, seed=0)          # doctest: +SKIP
>>> result.table[["success", "band_gap_onehot", "formula"]]                   # doctest: +SKIP
"""

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from pymatgen.core import Lattice, Structure

from jaxcrystal import objectives, presets, templates
from jaxcrystal.crystal import CrystalBatch, concatenate
from jaxcrystal.elements import SYMBOLS
from jaxcrystal.errors import ConfigError
from jaxcrystal.evaluate import Candidates, Criteria, evaluate, summarize
from jaxcrystal.geometry import required_image_box
from jaxcrystal.predictors import load_predictor
from jaxcrystal.results import ResultWriter
from jaxcrystal.smoacs import parametrization as pz
from jaxcrystal.smoacs.checkpoint import BatchCheckpoints
from jaxcrystal.smoacs.loop import LoopConfig, PropertyModel, make_loop, make_predict, tolerance_of
from jaxcrystal.smoacs.mutation import CopyMutation
from jaxcrystal.smoacs.problem import build_problem
from jaxcrystal.smoacs.schedules import sine_rebuild_steps
from jaxcrystal.smoacs.sharding import candidate_mesh, replicate, shard_candidates

NEIGHBOR_CUTOFF = 8.0  # Å, CGCNN's neighbour radius

# Embedded CGCNN models: property -> (weights name, transform of the raw output)
EMBEDDED = {
    "band_gap": ("band-gap", None),
    "formation_energy": ("formation-energy-per-atom", None),
    "bulk_modulus": ("bulk-moduli", lambda y: 10.0**y),  # the model predicts log10(K_VRH / GPa)
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (written to `config.json`; `RunConfig(**json)` reruns it)."""

    task: str = "bg_and_eform"
    structure: str = "perovskite"
    target: float | None = None
    model: str = "cgcnn"
    weights: dict = dataclasses.field(default_factory=dict)
    model_config: str | None = None
    model_options: dict = dataclasses.field(default_factory=dict)  # "[kind.]option" -> value, see `_model_options`
    num_candidates: int = 128
    batch_size: int = 128
    steps: int = 200
    seed: int = 0
    templates: str | None = None
    train_margin: float | None = None
    eval_margin: float | None = None
    second_coef: float | None = None
    second_max: float | None = None
    min_bond: float = 0.5
    tolerance_window: tuple[float, float] = (0.8, 1.0)
    tolerance_margin: float = 0.0
    angle_window: tuple[float, float] = (85.0, 95.0)
    mask_mode: str = "exact"
    radius_convention: str = "shannon"
    max_patterns: int = 10
    graph_refresh: str = "every"
    checkpoint_every: int = 25  # steps per scan segment: progress line and checkpoint
    init_jitter: float = 1e-4  # seeded Gaussian displacement of the starting fractional coordinates (std)
    devices: int | None = None  # shard the candidate axis over this many local devices (None: all that divide B)

    def resolved(self) -> "RunConfig":
        """Fills task defaults and checks that the options fit together (`ConfigError` otherwise)."""
        if self.structure not in presets.STRUCTURES:
            raise ConfigError(f"structure must be one of {presets.STRUCTURES}, got {self.structure!r}")
        if self.task not in presets.TASKS:
            raise ConfigError(f"task must be one of {presets.TASKS}, got {self.task!r}")
        task = presets.TASK_SPECS[self.task]
        if min(self.num_candidates, self.batch_size, self.steps, self.checkpoint_every) < 1:
            raise ConfigError("num_candidates, batch_size, steps and checkpoint_every must all be >= 1")
        if self.templates is not None and self.structure != "none":
            raise ConfigError(
                f"templates={self.templates!r} gives general templates; it contradicts structure="
                f"{self.structure!r} (use structure='none')"
            )
        if self.devices is not None and self.devices < 1:
            raise ConfigError(f"devices must be >= 1, got {self.devices}")
        if self.mask_mode not in ("exact", "smoacs"):
            raise ConfigError(f"mask_mode must be 'exact' or 'smoacs', got {self.mask_mode!r}")
        if self.graph_refresh != "every" and not str(self.graph_refresh).isdigit():
            raise ConfigError(f"graph_refresh must be 'every' or a number of rebuilds, got {self.graph_refresh!r}")
        target = self.target
        if task.default_target is None and target is not None:
            raise ConfigError(f"task {self.task} maximizes {task.main}; it takes no target")
        if task.default_target is not None and target is None:
            target = task.default_target
        for key in self.model_options:
            kind, _, option = key.rpartition(".")
            if kind and kind not in presets.MODELS:
                raise ConfigError(
                    f"model option {key!r}: unknown predictor kind {kind!r} ({', '.join(presets.MODELS)})"
                )
            if option in _OPTIMIZER_OWNED:
                raise ConfigError(f"model option {key!r} is sized by the optimizer from the cells it can reach")
        if self.tolerance_window[0] > self.tolerance_window[1]:
            raise ConfigError(f"tolerance_window must be (low, high), got {self.tolerance_window}")
        return dataclasses.replace(
            self,
            target=target,
            train_margin=task.train_margin if self.train_margin is None else self.train_margin,
            eval_margin=task.eval_margin if self.eval_margin is None else self.eval_margin,
            second_coef=task.second_coef if self.second_coef is None else self.second_coef,
            second_max=task.second_max if self.second_max is None else self.second_max,
            batch_size=min(self.batch_size, self.num_candidates),
        )


@dataclasses.dataclass(frozen=True)
class OptimizationResult:
    """What `optimize` returns.

    Attributes:
      batch: the discretized candidates as one `CrystalBatch` (one-hot species, wrapped coordinates).
      structures: the same as pymatgen `Structure`s.
      table: the evaluation frame (one row per candidate; columns documented in `jaxcrystal.evaluate`).
      summary: the run's rates, uniqueness and novelty.
      history: key -> [steps, num_candidates] ("loss", "tau", every property, "tolerance").
      config: the resolved `RunConfig`.
      out: the result folder, or None.
    """

    batch: CrystalBatch
    structures: list
    table: pd.DataFrame
    summary: dict
    history: dict
    config: RunConfig
    out: Path | None


def load_property_models(config: RunConfig, reach=None, image_box=None, start_cells=None, start_atoms=1) -> dict:
    """Property name -> `PropertyModel` for the task's main and second properties.

    Args:
      config: the run configuration.
      reach: [K, 3, 3] lattices bounding the smallest cells the run can visit; static periodic ranges are sized
        from them (graph predictors' neighbour-search box, Crystalformer's adaptive-box bound). None: defaults.
      image_box: override of the neighbour-search box (the optimizer enlarges it after an overflow).
      start_cells: [K, 3, 3] lattices the run starts from; Crystalformer's basis and softmax windows are sized for
        them (`cheapest_window`, `cheapest_softmax_window`; smaller cells take wider windows or the whole box: same
        results). None: no window under `jit`.
      start_atoms: atoms per crystal of those cells.
    """
    task = presets.TASK_SPECS[config.task]
    needed = [task.main, task.second]
    unknown = set(config.weights) - set(presets.PROPERTIES)
    if unknown:
        raise ConfigError(f"--weights names unknown properties {sorted(unknown)}; known: {sorted(presets.PROPERTIES)}")
    if image_box is None and reach is not None:
        image_box = required_image_box(reach, NEIGHBOR_CUTOFF)
    models = {}
    for prop in needed:
        units, description = presets.PROPERTIES[prop]
        if prop in config.weights:
            source = config.weights[prop]
            kind, _, path = source.partition(":") if source.split(":", 1)[0] in presets.MODELS else ("", "", "")
            kind, path = (kind, path) if kind else (config.model, source)
            options = _model_options(config, kind)
            start = None if start_cells is None else (start_cells, start_atoms)
            predictor = _load_sized(kind, path, config.model_config, reach, image_box, options, start)
            models[prop] = PropertyModel(prop, predictor, None, units)
        elif config.model == "cgcnn" and prop in EMBEDDED:
            name, transform = EMBEDDED[prop]
            predictor = _load_sized("cgcnn", name, None, reach, image_box, _model_options(config, "cgcnn"))
            models[prop] = PropertyModel(prop, predictor, transform, units)
        elif prop == task.second and config.second_coef == 0 and config.second_max is None:
            continue  # not optimized and not judged
        else:
            raise ConfigError(
                f"task {config.task} needs a model for {prop!r} ({description}, {units}), and no embedded "
                f"{config.model} model predicts it; pass --weights {prop}=PATH (a checkpoint of a model trained "
                f"on {description})"
            )
    return models


_OPTIMIZER_OWNED = ("image_box", "max_range")


def _model_options(config: RunConfig, kind: str) -> dict:
    """The `model_options` that apply to predictors of `kind`.

    A key "option" applies to the run's `model` kind (e.g. {"chunk_size": 64} with model="crystalformer"), a key
    "kind.option" to that kind only (e.g. {"alignn.chunk_size": 16} for a tc=alignn:... model); the loaders
    reject options they do not know. These are the memory/speed knobs: the same run on a GPU with room to spare
    only needs larger chunks.
    """
    out = {}
    for key, value in config.model_options.items():
        owner, _, option = key.rpartition(".")
        if (owner or config.model) == kind:
            out[option] = value
    return out


def _load_sized(kind: str, source, model_config, reach, image_box, options: dict, start=None):
    """`load_predictor` with the static periodic ranges each kind needs for the cells of `reach` (and, for
    Crystalformer's basis and softmax windows unless `options` set them, of `start` = (cells [K, 3, 3], atoms per
    crystal))."""
    if kind in ("cgcnn", "alignn"):
        sized = {"image_box": image_box} if image_box else {}
        return load_predictor(kind, source, config=model_config, **options, **sized)
    predictor = load_predictor(kind, source, config=model_config, **options)
    if kind == "crystalformer" and reach is not None:
        from jaxcrystal.models.crystalformer import (
            _normalize_window,
            cheapest_softmax_window,
            cheapest_window,
            required_range,
        )

        arch = predictor.metadata["config"]
        sized = {"max_range": required_range(np.asarray(reach), arch)}
        if start is not None:
            fixed = options.get("truncation") == "fixed"
            grid = (arch.lattice_range,) * 3 if fixed else sized["max_range"]
            cells, atoms = np.asarray(start[0]), start[1]
            smaller = not fixed and options.get("smaller_grids", True) is True
            chunk_size = options.get("chunk_size")
            if "basis_window" not in options:
                sized["basis_window"] = cheapest_window(cells, arch, grid, atoms, chunk_size, smaller)
            if "softmax_window" not in options:
                window = options.get("basis_window", sized.get("basis_window"))
                window = None if window in (None, "auto") else _normalize_window(window)  # "auto": none under jit
                sized["softmax_window"] = cheapest_softmax_window(cells, arch, grid, atoms, window, chunk_size, smaller)
        predictor = load_predictor(kind, source, config=model_config, **options, **sized)
    return predictor


def _templates(config: RunConfig) -> templates.Templates:
    if config.structure == "perovskite":
        return templates.random_perovskites(config.num_candidates, config.seed, supercell=1)
    if config.structure == "perovskite3x3x3":
        return templates.random_perovskites(config.num_candidates, config.seed, supercell=3)
    pool = templates.from_folder(config.templates) if config.templates else templates.materials_project_set()
    rng = np.random.default_rng(config.seed)
    replace = config.num_candidates > len(pool)
    return pool.take(rng.choice(len(pool), size=config.num_candidates, replace=replace))


def _loop_config(config: RunConfig, models: dict, pool: templates.Templates) -> LoopConfig:
    task = presets.TASK_SPECS[config.task]
    _, row = presets.hyper_row(config.model, config.task, config.structure)
    perovskite = pool.family == "perovskite"
    n = pool.supercell
    if perovskite:
        length_range = (2.0 * n, 10.0 * n)
        geometry = pz.Geometry(length_range, 0.15 / n, optimize_angles=False, mask_mode=config.mask_mode)
    else:
        lengths = np.array([s.lattice.abc for s in pool.structures])
        length_range = (min(2.0, float(lengths.min())), max(10.0, float(lengths.max())))
        geometry = pz.Geometry(length_range, None, optimize_angles=True, mask_mode=config.mask_mode)
    if task.default_target is None:
        main = objectives.maximize(task.main)
    else:
        main = objectives.window(task.main, config.target, config.train_margin)
    terms = [main]
    if task.second in models and config.second_coef:
        terms.append(objectives.linear(task.second, config.second_coef))
    refresh = "every"
    if config.graph_refresh != "every":
        refresh = tuple(sine_rebuild_steps(config.steps, int(config.graph_refresh)))
    tolerance = None
    if perovskite:
        low, high = config.tolerance_window
        tolerance = objectives.ToleranceObjective(low, high, config.tolerance_margin)
    return LoopConfig(
        objectives=tuple(terms),
        tolerance=tolerance,
        geometry=geometry,
        learning_rates={"lattice": row.lattice_lr, "coords": row.coord_lr, "atoms": row.atom_lr},
        num_steps=config.steps,
        mutation=CopyMutation(
            steps=tuple(s for s in row.steps_cm if s < config.steps),
            top_ratio=row.top_ratio,
            keep_prob=row.keep_prob,
            noise=row.mutation_noise,
        ),
        graph_refresh=refresh,
        main_property=task.main,
        second_property=task.second if task.second in models else None,
    )


def criteria_for(config: RunConfig, loop: LoopConfig) -> Criteria:
    task = presets.TASK_SPECS[config.task]
    perovskite = loop.tolerance is not None
    return Criteria(
        main=task.main,
        target=config.target,
        margin=config.eval_margin,
        second=loop.second_property,
        second_max=config.second_max if loop.second_property else None,
        tolerance_window=tuple(config.tolerance_window) if perovskite else None,
        min_bond=config.min_bond,
        coord_window=loop.geometry.coord_window,
        angle_window=tuple(config.angle_window) if perovskite else None,
    )


def optimize(
    task: str = "bg_and_eform",
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> OptimizationResult:
    """Runs SMOACS end to end.

    Args:
      task: "bg_and_eform", "tc_and_eform", "bg_and_ehull" or "B_and_eform".
      out: result folder (result.csv, result_summary.csv, result.npz, poscar/, cif/, history_img.png,
        config.json), written batch by batch; None keeps everything in memory.
      overwrite: allow an existing non-empty `out`.
      progress: print progress to stderr.
      **options: any `RunConfig` field (structure, target, model, weights, num_candidates, batch_size, steps,
        seed, ...).

    Returns:
      `OptimizationResult`.
    """
    config = RunConfig(task=task, **options).resolved()
    return _execute(config, out, overwrite, progress, resume=False)


def resume(out: str | Path, progress: bool = True) -> OptimizationResult:
    """Continues an interrupted run from its result folder (its `config.json` and `checkpoints/`).

    Finished batches are restored from their final checkpoints, the interrupted batch continues from its last
    checkpoint, the rest run as usual: the result equals the uninterrupted run's.
    """
    path = Path(out) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; --resume needs the folder of an earlier run")
    record = json.loads(path.read_text())
    record.pop("hyper_parameters", None)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(record) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown configuration keys {unknown}")
    record = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
    config = RunConfig(**record).resolved()
    return _execute(config, out, True, progress, resume=True)


def _execute(config: RunConfig, out, overwrite: bool, progress: bool, resume: bool) -> OptimizationResult:
    pool = _templates(config)
    row_name, _ = presets.hyper_row(config.model, config.task, config.structure)
    record = dataclasses.asdict(config) | {"hyper_parameters": row_name}
    writer = ResultWriter(out, record, overwrite=overwrite) if out is not None else None
    engine = _Engine(config, pool)
    checkpoints = None
    if out is not None:
        if not resume:
            shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)  # a fresh run never continues old states
        checkpoints = BatchCheckpoints(Path(out) / "checkpoints")
    frames, batches, histories = [], [], []
    num_batches = -(-config.num_candidates // config.batch_size)
    key = jax.random.PRNGKey(config.seed)
    start = time.perf_counter()
    for index in range(num_batches):
        lo = index * config.batch_size
        part = pool.take(range(lo, min(lo + config.batch_size, len(pool))))
        problem, lengths, angles = build_problem(part, config.max_patterns, config.radius_convention, lo)
        problem = jax.tree.map(jnp.asarray, problem)
        rng = jax.random.fold_in(key, index)
        variables = pz.initial_variables(lengths, angles, problem)
        variables = pz.jitter_coordinates(variables, problem, config.init_jitter, jax.random.fold_in(rng, 1))
        label = f"batch {index + 1}/{num_batches}"
        state, history = engine.run_batch(index, variables, problem, rng, label, progress, checkpoints, resume)
        candidates, onehot_batch = _discretize(index, lo, pool, state, history, engine)
        frame = evaluate(candidates, engine.criteria)
        if writer is not None:
            writer.write_batch(index, candidates, frame, history)
        frames.append(frame)
        batches.append(onehot_batch)
        histories.append(history)
        if progress:
            successes = int(frame["success"].fillna(False).sum())
            _say(
                f"{label} done: {successes}/{len(part)} successes; {lo + len(part)}/{config.num_candidates} "
                f"candidates, {time.perf_counter() - start:.0f} s elapsed"
            )
    table = pd.concat(frames)
    reference = list(pool.structures)
    if writer is not None:
        summary = writer.finalize(engine.criteria, templates=reference).iloc[0].to_dict()
    else:
        summary = summarize(table, engine.criteria, templates=reference)
    batch = concatenate(batches)
    history = {k: np.concatenate([h[k] for h in histories], axis=1) for k in histories[0]}
    return OptimizationResult(batch, batch.to_structures(), table, summary, history, config, Path(out) if out else None)


class _Engine:
    """The compiled pieces of a run for one static neighbour-search box, rebuilt with a bigger box on overflow."""

    def __init__(self, config: RunConfig, pool: templates.Templates):
        self.config = config
        self.reach = _reach(pool)
        self.start_cells = np.array([s.lattice.matrix for s in pool.structures])
        self.start_atoms = max(len(s) for s in pool.structures)
        self._build(required_image_box(self.reach, NEIGHBOR_CUTOFF), pool)

    def _build(self, box, pool=None):
        self.box = box
        self.models = load_property_models(
            self.config, self.reach, image_box=box, start_cells=self.start_cells, start_atoms=self.start_atoms
        )
        if pool is not None:
            self.loop = _loop_config(self.config, self.models, pool)
            self.criteria = criteria_for(self.config, self.loop)
        self.params = {name: m.predictor.params for name, m in self.models.items()}
        self.compiled = make_loop(self.models, self.loop)
        self.predict = make_predict(self.models)

    def run_batch(self, index, variables, problem, rng, label, progress, checkpoints=None, resume=False):
        """All steps of a batch in segments of `config.checkpoint_every` steps (one compiled scan).

        After each segment a progress line is printed and, with `checkpoints`, the loop state and the history
        so far are saved; with `resume` a saved state of this batch is continued (or returned, if complete).
        Continuing a saved state gives exactly the uninterrupted result (the scan carry is the whole state).

        If a graph predictor's static neighbour-search box turns out too small for a candidate's cell (the
        in-graph overflow flag), the box is enlarged and the batch is run again from its start: the neighbour
        search is exact whenever the box suffices, so the result is the one a large-enough box gives.
        """
        steps = self.config.steps
        b = problem.atom_mask.shape[0]
        mesh = candidate_mesh(b, self.config.devices)
        variables, problem = shard_candidates((variables, problem), mesh, b)
        params = replicate(self.params, mesh)
        saved = None
        if resume and checkpoints is not None and checkpoints.meta(index) is not None:
            box = checkpoints.meta(index)["box"]
            if (tuple(box) if box else None) != self.box:
                self._build(tuple(box) if box else None)
            abstract = jax.eval_shape(self.compiled.init, params, variables, problem, rng)
            saved = checkpoints.load(index, abstract)
        while True:
            t0 = time.perf_counter()
            if saved is not None:
                state, history, _ = saved
                state = shard_candidates(state, mesh, b)
                parts = [history] if int(state.step) > 0 else []
                saved = None
                if progress:
                    _say(f"{label}: resumed at step {int(state.step)}/{steps}")
            else:
                state, parts = self.compiled.init(params, variables, problem, rng), []
            start_step = int(state.step)
            while int(state.step) < steps:
                n = min(self.config.checkpoint_every, steps - int(state.step))
                state, part = self.compiled.advance(params, state, n)
                parts.append(jax.tree.map(np.asarray, part))
                done = int(state.step)
                if checkpoints is not None:
                    overflowed = bool(np.asarray(state.overflow).any())
                    checkpoints.save(index, state, _stack(parts), self.box, complete=done == steps and not overflowed)
                if progress:
                    rate = (done - start_step) / (time.perf_counter() - t0)
                    _say(f"{label}: step {done}/{steps} ({rate:.1f} steps/s incl. compilation)")
            overflow = np.asarray(state.overflow)
            if not overflow.any():
                return state, _stack(parts)
            lattice = np.asarray(pz.decode_lattice(state.variables, state.problem, self.loop.geometry))
            needed = required_image_box(lattice[overflow], NEIGHBOR_CUTOFF)
            if all(n <= m for n, m in zip(needed, self.box, strict=True)):
                raise ConfigError(
                    f"{label}: candidates {np.flatnonzero(overflow).tolist()} overflow a graph predictor's static "
                    f"capacities (not its image box {self.box}): load it with larger capacities (ALIGNN: the "
                    "`degree` / `neighbor_capacity` options)"
                )
            box = tuple(max(m + 1, n) for m, n in zip(self.box, needed, strict=True))
            if progress:
                _say(
                    f"{label}: {int(overflow.sum())} candidates outgrew the neighbour box {self.box}; rerun with {box}"
                )
            if checkpoints is not None:
                checkpoints.clear(index)
            self._build(box)
            params = replicate(self.params, mesh)


def _stack(parts: list[dict]) -> dict:
    """History segments -> one history: key -> [steps, B]."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _reach(pool: templates.Templates) -> np.ndarray:
    """[K, 3, 3] lattices bounding the smallest cells a run can visit.

    Perovskites: orthogonal cells with every length at least the lower bound of the length range (exact bound).
    General templates: the templates' own cells (cells that shrink below them trip the overflow flag of the graph
    predictors, which then rerun the batch with a bigger box).
    """
    if pool.family == "perovskite":
        low = 2.0 * pool.supercell
        return np.diag([low, low, low])[None]
    return np.array([s.lattice.matrix for s in pool.structures])


def _say(message: str) -> None:
    print(f"[jaxcrystal] {message}", file=sys.stderr, flush=True)


def _discretize(index, offset, pool, state, history, engine):
    """The τ → 0 candidates of a finished batch, re-predicted, as `Candidates` and a one-hot `CrystalBatch`."""
    variables, problem, healthy, loop = state.variables, state.problem, state.healthy, engine.loop
    elements, pattern, states = pz.discretize(variables, problem)
    mask = problem.atom_mask
    species = jax.nn.one_hot(elements, 98) * mask[..., None]
    lattice = pz.decode_lattice(variables, problem, loop.geometry)
    frac = pz.decode_frac(variables, problem, loop.geometry)
    predictions = jax.tree.map(np.asarray, engine.predict(engine.params, (lattice, frac, species, mask)))
    tolerance = None
    if loop.tolerance is not None:
        chosen = jax.nn.one_hot(pattern, problem.pattern_used.shape[1])[:, None, :]
        chosen = jnp.broadcast_to(chosen, mask.shape + chosen.shape[-1:])
        tolerance = np.asarray(tolerance_of(species, chosen, problem))
    host = jax.tree.map(np.asarray, (lattice, frac, elements, mask, states, problem))
    lattice, frac, elements, mask, states, problem = host
    wrapped = np.mod(frac, 1.0)
    structures = []
    for b in range(lattice.shape[0]):
        m = mask[b]
        structures.append(Structure(Lattice(lattice[b]), [SYMBOLS[z] for z in elements[b][m]], wrapped[b][m]))
    template_names = [pool.names[i] for i in problem.template_index]
    names = [f"b{index:03d}_c{offset + b:04d}__{template_names[b]}" for b in range(len(structures))]
    soft = {k: history[k][-1] for k in predictions}
    candidates = Candidates(
        names=names,
        template_names=template_names,
        structures=structures,
        frac_unwrapped=frac,
        init_frac=problem.init_frac,
        mask=mask,
        site_roles=problem.site_roles,
        oxidation_states=states,
        predictions=predictions,
        soft_predictions=soft,
        tolerance=tolerance,
        loss=history["loss"][-1],
        healthy=np.asarray(healthy),
        family=pool.family,
    )
    onehot = CrystalBatch(lattice, wrapped * mask[..., None], _one_hot(elements, mask), mask)
    return candidates, onehot


def _one_hot(elements, mask):
    """[B, N, 98] host one-hot species of [B, N] element indices, zero on padding."""
    out = np.zeros(mask.shape + (98,))
    b, n = np.nonzero(mask)
    out[b, n, elements[b, n]] = 1.0
    return out

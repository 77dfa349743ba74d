"""The SMOACS optimization step and whole runs: compile time, step time, FLOPs/utilization, memory, successes.

    python benchmarks/bench_optimize.py                         # 128 candidates x 200 steps, 1x1x1 and 3x3x3
    python benchmarks/bench_optimize.py --steps 20 --structures perovskite --json opt.json --markdown
    python benchmarks/bench_optimize.py --model crystalformer --structures perovskite3x3x3 --steps 0 \
        --segment 1 --repeats 1                                 # 128 x 135-atom Crystalformer steps
    python benchmarks/bench_optimize.py --model crystalformer --structures perovskite --steps 0 \
        --model-option smaller_grids=false                      # the same with a predictor option changed

The task is the paper's perovskite band-gap task (`bg_and_eform`, target 2.0 eV ± 0.2, E_form < -0.5 eV/atom,
tolerance factor in [0.8, 1.0]). `--model cgcnn` uses the embedded CGCNN band-gap and formation-energy models;
`--model crystalformer` / `alignn` use random weights of the reference architectures (Crystalformer default.json,
ALIGNN 4+4 layers × 256) for both properties, so their step costs are real and their success counts are not.
Per structure, in a fresh process (so that the peak RSS is the structure's own):
  * the compiled loop exactly as `jaxcrystal.optimize` builds it: compile time of `init` and of one
    `advance` segment (`--segment` steps in one `lax.scan`), XLA's temporary buffers for it, the steady-state
    time per step (median over `--repeats` segments after a warm-up segment), the FLOPs per step (see
    `measure_loop`) and the utilization against the float32 matmul rate measured in the same process before,
    with the utilization the step's mix of FLOPs and transcendentals allows (`common.mix_ceiling`);
  * then the whole run, `jaxcrystal.optimize(..., steps=--steps)`: wall time (compilation, every step,
    discretization, evaluation), steps/s of the run, and the success table (successes, unique and novel ones).
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

COLUMNS = [
    ("model", "model", ""),
    ("structure", "structure", ""),
    ("atoms", "N", "d"),
    ("box", "image box", ""),
    ("init_compile_s", "init compile s", ".1f"),
    ("advance_compile_s", "scan compile s", ".1f"),
    ("step_s", "step s", ".3f"),
    ("step_gflop", "GFLOP/step", ".1f"),
    ("matmul_gflops", "matmul GFLOP/s", ".0f"),
    ("step_util", "util %", ".0f"),
    ("step_ceiling", "mix ceiling %", ".0f"),
    ("step_temp_mb", "XLA temp MB", ".0f"),
    ("steps", "steps", "d"),
    ("run_s", "run s", ".0f"),
    ("run_steps_per_s", "run steps/s", ".2f"),
    ("num_success", "successes", "d"),
    ("num_unique_success", "unique", "d"),
    ("num_novel_success", "novel", "d"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
]


SINGLE_BLOCK = {  # options that evaluate one candidate without any inner loop (for counting FLOPs)
    "cgcnn": lambda n: {"atom_chunk": n, "crystal_chunk": 1},
    "crystalformer": lambda n: {"chunk_size": n},
    "alignn": lambda n: {"chunk_size": 1, "atom_chunk": n},
}


def model_setup(model: str, directory: str) -> dict:
    """RunConfig fields for the model: the embedded CGCNN models, or random weights of the reference
    architecture for both properties (timing only: their successes mean nothing)."""
    if model == "cgcnn":
        return {"model": "cgcnn"}
    weights = {
        prop: common.random_weights_file(model, os.path.join(directory, f"{model}_{prop}.npz"), seed=i)
        for i, prop in enumerate(("band_gap", "formation_energy"))
    }
    return {"model": model, "weights": weights}


def compiled_loop(structure: str, candidates: int, setup: dict, segment: int, model_options=None):
    """The loop `jaxcrystal.optimize` builds, compiled for `candidates` candidates of `structure`.

    Returns (compiled advance of `segment` steps, model parameters, initial loop state, (init compile s, advance
    compile s), neighbour-search image box, atoms per candidate N, and `attention_shares`). The image box
    depends only on the structure family (perovskite cells never shrink below 2 Å per cell), so a one-candidate
    loop has the same shapes per candidate as the full batch.
    """
    from jaxcrystal.smoacs import driver
    from jaxcrystal.smoacs import parametrization as pz
    from jaxcrystal.smoacs.problem import build_problem
    from jaxcrystal.smoacs.schedules import temperature

    options = {**setup.get("model_options", {}), **(model_options or {})}  # the run's, then the FLOP count's
    setup = {key: value for key, value in setup.items() if key != "model_options"}
    config = driver.RunConfig(
        structure=structure, num_candidates=candidates, steps=200, seed=0, model_options=options, **setup
    ).resolved()
    pool = driver._templates(config)
    engine = driver._Engine(config, pool)
    problem, lengths, angles = build_problem(pool, config.max_patterns, config.radius_convention, 0)
    problem = jax.tree.map(jnp.asarray, problem)
    variables = pz.initial_variables(lengths, angles, problem)
    loop, params, rng = engine.compiled, engine.params, jax.random.key(0)
    start = time.perf_counter()
    init = loop.init.lower(params, variables, problem, rng).compile()
    init_s = time.perf_counter() - start
    state = init(params, variables, problem, rng)
    lowered = loop.advance.lower(params, state, segment)
    start = time.perf_counter()
    advance = lowered.compile()
    advance_s = time.perf_counter() - start
    tau = temperature(engine.loop.num_steps, *engine.loop.temperature)[0]  # the first step's
    windows, shares = attention_shares(engine, pz.decode(variables, problem, engine.loop.geometry, tau)[0])
    atoms = int(problem.atom_mask.shape[1])
    return advance, params, state, (init_s, advance_s), engine.box, atoms, windows, shares


def attention_shares(engine, crystal) -> tuple:
    """({"basis_window": ..., "softmax_window": ...} of the Crystalformer models (None: the whole box), [B, branches]):
    per start candidate, the share of its Crystalformer attention calls (models x layers) that run each of
    `attention_branches` in `periodic_attention` (grid and windows, see `crystal_branches`); ones in a single column
    without Crystalformer models."""
    from jaxcrystal.models.crystalformer import Crystalformer, intermediate_grids
    from jaxcrystal.models.periodic_attention import (
        attention_branches,
        basis_cutoff,
        block_plan,
        crystal_branches,
        softmax_reach,
    )

    windows, counts = {"basis_window": None, "softmax_window": None}, []
    for model in engine.models.values():
        meta = model.predictor.metadata
        if model.predictor.kind != "crystalformer":
            continue
        arch, adaptive = meta["config"], meta["truncation"] == "adaptive"
        grid = meta["max_range"] if adaptive else (arch.lattice_range,) * 3
        grids = intermediate_grids(grid, arch.lattice_range) if adaptive and meta["smaller_grids"] else ()
        window, softmax = (None if meta[key] == "auto" else meta[key] for key in windows)  # "auto": box under jit
        windows = {"basis_window": window, "softmax_window": softmax}
        module = Crystalformer(
            arch, meta["truncation"], meta["gradient"], grid, meta["chunk_size"], window, softmax_window=softmax
        )
        _, state = module.apply({"params": model.predictor.params}, *crystal, mutable=["intermediates"])
        num_crystals, num_atoms = crystal[3].shape
        shifts = int(np.prod([2 * r + 1 for r in grid]))
        per_block = block_plan(num_crystals, num_atoms, shifts, arch.value_pe_dist_real, 4, meta["chunk_size"])[0]
        num_branches = len(attention_branches(grid, grids, window, softmax)[0])
        for layer in range(arch.num_layers):
            cutoff = basis_cutoff(*arch.basis(layer))
            box = state["intermediates"][f"box_layer{layer}"][0] if adaptive else None
            reach = softmax_reach(crystal[0], state["intermediates"][f"gamma_layer{layer}"][0], crystal[3])
            taken = crystal_branches(
                crystal[0], crystal[3], box, ranges=grid, cutoff=cutoff, window=window, grids=grids,
                per_block=per_block, softmax_window=softmax, reach=reach,
            )  # fmt: skip
            counts.append(np.eye(num_branches)[taken])
    if not counts:
        return windows, np.ones((crystal[0].shape[0], 1))
    return windows, np.mean(counts, axis=0)


def measure_loop(structure: str, setup: dict, args, rate: float, exps: float) -> dict:
    """Compile and steady-state figures of the compiled loop the driver builds for this structure.

    FLOPs: XLA's cost analysis counts a loop body once, and the step contains loops over attention blocks,
    ALIGNN chunks and neighbour-search chunks. So the FLOPs of one step are counted on a one-candidate loop
    compiled without any inner loop (`SINGLE_BLOCK` options) and multiplied by the number of candidates. For
    Crystalformer, whose attention picks a branch (grid, basis and softmax windows) per block, each branch that
    runs is counted on its own (`common.attention_branch`) and weighted by the start candidates' attention calls
    that take it (`attention_shares`).
    """
    advance, params, state, (init_s, advance_s), box, atoms, windows, shares = compiled_loop(
        structure, args.candidates, setup, args.segment
    )
    row = {"box": "x".join(str(m) for m in box), "atoms": atoms}
    row["init_compile_s"], row["advance_compile_s"] = init_s, advance_s
    row["step_temp_mb"] = common.xla_temp_bytes(advance) / 2**20
    times = []
    state, _ = jax.block_until_ready(advance(params, state))  # warm-up
    for _ in range(args.repeats):
        t = time.perf_counter()
        state, _ = jax.block_until_ready(advance(params, state))
        times.append((time.perf_counter() - t) / args.segment)
    row["step_s"] = float(np.median(times))
    row["step_min_s"] = float(np.min(times))
    single = SINGLE_BLOCK[setup["model"]](atoms)
    if setup["model"] == "crystalformer":
        single.update(windows)  # the full run's, not ones sized for the single candidate
        row["attention_branch_shares"] = shares.mean(axis=0).round(3).tolist()
    flops = transcendentals = 0.0
    for branch, weight in enumerate(shares.sum(axis=0)):
        if weight > 0:
            with common.attention_branch(branch):
                cost = common.xla_cost(compiled_loop(structure, 1, setup, 1, single)[0])
            flops += cost["flops"] * weight
            transcendentals += cost["transcendentals"] * weight
    row["step_gflop"] = flops / 1e9
    row["step_transcendentals"] = transcendentals
    row["step_util"] = common.utilization(flops, row["step_min_s"], rate)
    row["step_ceiling"] = common.mix_ceiling(flops, transcendentals, rate, exps)
    return row


def single(structure: str, args) -> dict:
    import tempfile

    import jaxcrystal

    rate = common.matmul_rate()  # measured again next to the case: the rate a busy machine gives now
    exps = common.exp_rate()
    row = {"structure": structure, "model": args.model, "candidates": args.candidates, "matmul_gflops": rate}
    row["exp_gps"] = exps
    with tempfile.TemporaryDirectory() as directory:
        setup = model_setup(args.model, directory)
        if args.model_option:
            from jaxcrystal.run import _model_options

            setup["model_options"] = _model_options(args.model_option)
        row.update(measure_loop(structure, setup, args, rate, exps))
        row["loop_peak_rss_mb"] = common.peak_rss_mb()
        if args.steps > 0:
            start = time.perf_counter()
            result = jaxcrystal.optimize(
                "bg_and_eform",
                structure=structure,
                num_candidates=args.candidates,
                steps=args.steps,
                seed=0,
                progress=False,
                **setup,
            )
            row["steps"] = args.steps
            row["run_s"] = time.perf_counter() - start
            row["run_steps_per_s"] = args.steps / row["run_s"]
            summary = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in result.summary.items()}
            row.update({k: v for k, v in summary.items() if k.startswith("num_") or k.endswith("_rate")})
    row["peak_rss_mb"] = common.peak_rss_mb()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", nargs="+", default=["perovskite", "perovskite3x3x3"])
    parser.add_argument(
        "--model",
        choices=sorted(SINGLE_BLOCK),
        default="cgcnn",
        help="cgcnn: the embedded models; crystalformer/alignn: random weights of the reference architecture",
    )
    parser.add_argument(
        "--model-option",
        action="append",
        metavar="[KIND.]OPTION=VALUE",
        help="predictor option, as jaxcrystal.run's (e.g. basis_window=3, smaller_grids=false); repeatable",
    )
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200, help="steps of the whole run (0: loop figures only)")
    parser.add_argument("--segment", type=int, default=5, help="steps per timed scan segment")
    parser.add_argument("--repeats", type=int, default=3, help="timed segments")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one structure in this process
    args = parser.parse_args(argv)
    if args.single:
        import json

        print(json.dumps(single(args.single, args), default=float))
        return 0

    info = common.machine()
    rate = common.matmul_rate()
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, {info['memory_GiB']} GiB, jax {info['jax']}")
    print(f"float32 matmul rate (1024², best of 10): {rate:.1f} GFLOP/s; load average {info['load_average_1min']:.1f}")
    extra = [
        "--model",
        args.model,
        "--candidates",
        str(args.candidates),
        "--steps",
        str(args.steps),
        "--segment",
        str(args.segment),
    ]
    extra += ["--repeats", str(args.repeats)]
    for option in args.model_option or []:
        extra += ["--model-option", option]
    rows = common.run_isolated(os.path.abspath(__file__), args.structures, extra)
    common.print_table(rows, COLUMNS)
    if args.markdown:
        print(common.markdown_table(rows, COLUMNS))
    common.write_json(args.json, {"machine": info, "matmul_gflops": rate, "args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

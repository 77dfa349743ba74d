"""ALIGNN throughput and memory: graph build, forward and forward+gradient on perovskite batches.

    python benchmarks/bench_alignn.py                                  # 128x5, 8x135 (run) and 128x135 (compile only)
    python benchmarks/bench_alignn.py --cases 32x135 --chunk-size 8 --no-remat --json out.json
    python benchmarks/bench_alignn.py --ckpt mp_e_form_alignnn.zip --compile-only 128x135

Per case (B crystals x N atoms): the static capacities (edges / line-graph pairs per crystal), the graph sizes
actually found, compile times and median run times of `build_graph` and of the frozen-topology forward and
forward+gradient (w.r.t. lattice, frac and species), XLA's temporary-buffer size of each compiled program
(`memory_analysis`, the peak working memory without arguments and outputs) and the process peak RSS (monotone
over the run). Cases listed under `--compile-only` are compiled and measured but not run (useful for the
128 x 135 memory plan on a small machine). Without `--ckpt` the weights are random (default 4+4 layers, H = 256).
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np

from jaxcrystal import alignn_graph
from jaxcrystal.compile_options import compiler_options
from jaxcrystal.models.alignn import ALIGNN
from jaxcrystal.predictors import alignn as pa
from jaxcrystal.predictors import load_predictor


def timed(fn, *args, repeat: int):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_stats(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn, compiler_options=compiler_options()).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return compiled, seconds, temp


def run_case(case: str, args, run: bool) -> dict:
    b, n = (int(v) for v in case.split("x"))
    cells = round((n / 5) ** (1 / 3))
    if 5 * cells**3 != n:
        raise SystemExit(f"case {case}: N must be 5 * cells^3 (5, 40, 135, ...)")
    batch = common.perovskite_crystals(b, cells)[:4]
    lattice, frac, species, mask = batch
    box = alignn_graph.geometry.required_image_box(np.asarray(lattice), alignn_graph.CUTOFF)
    if args.ckpt:
        predictor = load_predictor("alignn", args.ckpt)
        variables, hyper = predictor.params, predictor.metadata["hyperparameters"]
    else:
        hyper = {}
    module = ALIGNN(**hyper, remat=not args.no_remat)
    build = jax.jit(lambda lat, f, m: alignn_graph.build_graph(lat, f, m, box=box))
    e_cap, t_cap = alignn_graph.capacities(n)
    chunk = args.chunk_size or max(1, pa.TRIPLETS_PER_CHUNK // t_cap)
    chunks = -(-b // chunk)
    row = {"case": case, "edge_capacity": e_cap, "triplet_capacity": t_cap, "chunk_size": -(-b // chunks)}
    row["remat"] = not args.no_remat
    start = time.perf_counter()
    graph = jax.block_until_ready(build(lattice, frac, mask))
    row["graph_first_call_s"] = time.perf_counter() - start
    row["edges_per_crystal_max"] = int(graph.edge_valid.sum(1).max())
    row["triplets_per_crystal_max"] = int(graph.lg_valid.sum(1).max())
    row["overflow"] = int(graph.overflow.sum())
    if not args.ckpt:
        small = jax.tree.map(lambda x: x[:1], (graph, batch))
        variables = common.random_alignn_variables(module, small[1], small[0])

    def forward(lat, f, s):
        return pa.apply_with_graph(module, chunk, variables, graph, lat, f, s, mask)

    def value_and_grad(lat, f, s):
        return jax.value_and_grad(lambda *a: jnp.sum(forward(*a)), argnums=(0, 1, 2))(lat, f, s)

    for name, fn in (("forward", forward), ("forward_grad", value_and_grad)):
        compiled, seconds, temp = compile_stats(fn, lattice, frac, species)
        row[f"{name}_compile_s"] = seconds
        row[f"{name}_temp_GB"] = None if temp is None else temp / 1e9
        if run:
            row[f"{name}_run_s"] = timed(compiled, lattice, frac, species, repeat=args.repeat)
    if run:
        row["graph_run_s"] = timed(build, lattice, frac, mask, repeat=args.repeat)
    row["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=["128x5", "8x135"], help="BxN cases to compile and run")
    parser.add_argument("--compile-only", nargs="*", default=["128x135"], help="BxN cases to compile only")
    parser.add_argument("--ckpt", default=None, help="ALIGNN zip / folder / converted .npz (default: random)")
    parser.add_argument("--chunk-size", type=int, default=None, help="crystals per chunk (default: automatic)")
    parser.add_argument("--no-remat", action="store_true", help="disable per-layer rematerialization")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for case, run in [(c, True) for c in args.cases] + [(c, False) for c in args.compile_only]:
        row = run_case(case, args, run)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

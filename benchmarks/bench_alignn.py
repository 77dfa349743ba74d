"""ALIGNN throughput and memory: graph build, forward and forward+gradient on perovskite batches.

    python benchmarks/bench_alignn.py                          # 128x5, 8x135, 32x135, 128x135
    python benchmarks/bench_alignn.py --cases 32x135 --chunk-size 8 --no-remat --json out.json --markdown
    python benchmarks/bench_alignn.py --ckpt mp_e_form_alignnn.zip --compile-only 128x135

Per case (B rattled perovskite supercells of N atoms, soft species), in this process: the static capacities
(edges / line-graph pairs per crystal) and the crystals per chunk, the compile time and minimum time of
`--repeats` calls after a warm-up of `build_graph` and of the frozen-topology forward and forward+gradient (w.r.t.
lattice, frac and species), XLA's FLOPs and the utilization against the float32 matmul rate measured next to the
case, the transcendentals and the utilization their mix allows (`common.mix_ceiling`, exp rate measured next to
the case), XLA's temporary buffers (`memory_analysis`: the peak working memory without arguments and outputs) and
the process peak RSS (monotone over the run: run one case per process for a clean figure). Cases listed under
`--compile-only` are compiled and measured but not run.

FLOPs: the crystals run as a loop over chunks, and XLA's cost analysis counts a loop body once; so the FLOPs are
those of one crystal compiled as a single chunk, times B (the work is linear in B). The chunks' `jax.checkpoint`
recomputation of the forward pass in forward+gradient is therefore not counted (the utilization is a lower bound);
the per-layer rematerialization (`--no-remat` turns it off) is. Without `--ckpt` the weights are random (default
4+4 layers, H = 256).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcrystal import alignn_graph  # noqa: E402
from jaxcrystal.models.alignn import ALIGNN  # noqa: E402
from jaxcrystal.predictors import alignn as pa  # noqa: E402
from jaxcrystal.predictors import load_predictor  # noqa: E402

COLUMNS = [
    ("case", "case", ""),
    ("edge_capacity", "edge cap", "d"),
    ("triplet_capacity", "pair cap", "d"),
    ("chunk_size", "chunk", "d"),
    ("mode", "mode", ""),
    ("graph_s", "graph s", ".3f"),
    ("compile_s", "compile s", ".1f"),
    ("run_s", "run s", ".3f"),
    ("gflop", "GFLOP", ".0f"),
    ("matmul_gflops", "matmul GFLOP/s", ".0f"),
    ("util", "util %", ".0f"),
    ("transcendentals_g", "G transc.", ".2f"),
    ("exp_gps", "exp G/s", ".1f"),
    ("ceiling", "mix ceiling %", ".0f"),
    ("temp_gb", "XLA temp GB", ".2f"),
    ("peak_rss_gb", "peak RSS GB", ".1f"),
]


def functions(module, chunk_size: int | None, variables, graph, mask):
    def forward(lattice, frac, species):
        return pa.apply_with_graph(module, chunk_size, variables, graph, lattice, frac, species, mask)

    def value_and_grad(lattice, frac, species):
        return jax.value_and_grad(lambda *a: jnp.sum(forward(*a)), argnums=(0, 1, 2))(lattice, frac, species)

    return {"forward": forward, "forward+grad": value_and_grad}


def run_case(case: str, args, run: bool) -> list[dict]:
    num_crystals, num_atoms, cells = common.parse_case(case)
    batch = common.perovskite_crystals(num_crystals, cells)[:4]
    lattice, frac, species, mask = batch
    box = alignn_graph.geometry.required_image_box(np.asarray(lattice), alignn_graph.CUTOFF)
    if args.ckpt:
        predictor = load_predictor("alignn", args.ckpt)
        variables, hyper = predictor.params, predictor.metadata["hyperparameters"]
    else:
        hyper = {}
    module = ALIGNN(**hyper, remat=not args.no_remat)
    edge_capacity, triplet_capacity = alignn_graph.capacities(num_atoms)
    largest = args.chunk_size or max(1, pa.TRIPLETS_PER_CHUNK // triplet_capacity)
    chunk = -(-num_crystals // -(-num_crystals // largest))  # as `apply_with_graph` equalizes its chunks (reported)
    base = {"case": case, "edge_capacity": edge_capacity, "triplet_capacity": triplet_capacity, "chunk_size": chunk}
    base["remat"] = not args.no_remat

    build, graph_compile_s, _, _ = common.compile_fn(
        lambda lat, f, m: alignn_graph.build_graph(lat, f, m, box=box), lattice, frac, mask
    )
    graph = build(lattice, frac, mask)
    base["graph_compile_s"] = graph_compile_s
    base["graph_s"] = common.steady(build, (lattice, frac, mask), args.repeats)["min_s"] if run else None
    base["edges_per_crystal_max"] = int(graph.edge_valid.sum(1).max())
    base["triplets_per_crystal_max"] = int(graph.lg_valid.sum(1).max())
    base["overflow"] = int(graph.overflow.sum())
    one_graph, one = jax.tree.map(lambda x: x[:1], (graph, batch))
    if not args.ckpt:
        variables = common.random_alignn_variables(module, one, one_graph)

    rows = []
    for mode, fn in functions(module, args.chunk_size, variables, graph, mask).items():  # None: the predictor's own
        compiled, compile_s, _, temp = common.compile_fn(fn, lattice, frac, species)
        one_compiled = common.compile_fn(functions(module, 1, variables, one_graph, one[3])[mode], *one[:3])[0]
        cost = {key: value * num_crystals for key, value in common.xla_cost(one_compiled).items()}
        row = {**base, "mode": mode, "compile_s": compile_s, "temp_gb": temp / 1e9, "gflop": cost["flops"] / 1e9}
        row["transcendentals_g"] = cost["transcendentals"] / 1e9
        if run:
            timing, rate, exps = common.rates_around(common.steady, compiled, (lattice, frac, species), args.repeats)
            row.update(run_s=timing["min_s"], median_s=timing["median_s"], matmul_gflops=rate, exp_gps=exps)
            row["util"] = common.utilization(cost["flops"], timing["min_s"], rate)
            row["ceiling"] = common.mix_ceiling(cost["flops"], cost["transcendentals"], rate, exps)
        row["peak_rss_gb"] = common.peak_rss_mb() / 1024
        rows.append(row)
        common.print_table([row], COLUMNS)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=["128x5", "8x135", "32x135", "128x135"], help="BxN, run")
    parser.add_argument("--compile-only", nargs="*", default=[], help="BxN cases to compile only")
    parser.add_argument("--ckpt", default=None, help="ALIGNN zip / folder / converted .npz (default: random)")
    parser.add_argument("--chunk-size", type=int, default=None, help="crystals per chunk (default: automatic)")
    parser.add_argument("--no-remat", action="store_true", help="disable per-layer rematerialization")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    args = parser.parse_args(argv)

    info = common.machine()
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, jax {info['jax']} on {info['platform']}")
    print(f"chunk_size={args.chunk_size or 'auto'} remat={not args.no_remat} weights={args.ckpt or 'random'}")
    rows = []
    for case, run in [(c, True) for c in args.cases] + [(c, False) for c in args.compile_only]:
        rows.extend(run_case(case, args, run))
    print()
    common.print_table(rows, COLUMNS)
    if args.markdown:
        print(common.markdown_table(rows, COLUMNS))
    common.write_json(args.json, {"machine": info, "args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crystalformer throughput and memory: forward and forward+gradient on perovskite batches.

    python benchmarks/bench_crystalformer.py                      # 128x5, 8x135, 32x135, 128x135
    python benchmarks/bench_crystalformer.py --cases 128x5 8x135 --truncation fixed --chunk-size 64 --json out.json
    python benchmarks/bench_crystalformer.py --ckpt megnet-bandgap-layer4.ckpt --config default.json

Prints, per batch: compile time (forward; forward+gradient w.r.t. lattice, frac and species), the median run
time, the FLOPs XLA reports for the compiled program, XLA's temporary-buffer size, and the process peak RSS
(monotone over the run, so run one case per process for a clean figure). XLA's cost analysis counts the body of
a loop once, so its FLOPs cover one attention block per layer, not the whole batch; the analytic count printed
next to it is 2·P·H·M·K per layer for the dominant contraction (P = Σ N², M translations, K basis functions).
Without `--ckpt` the weights are random (default.json architecture; the cost does not depend on the values).
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
import numpy as np

from jaxcrystal.models.crystalformer import CrystalformerConfig, required_range
from jaxcrystal.models.periodic_attention import AUTO_BLOCK_BYTES, block_plan
from jaxcrystal.predictors.crystalformer import load, make_apply


def timed(fn, args, repeats: int):
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(apply, params, batch, repeats: int, modes=("forward", "forward+grad")) -> dict:
    lattice, frac, species, mask = batch

    def forward(lattice, frac, species):
        return apply(params, lattice, frac, species, mask)

    def value_and_grad(lattice, frac, species):
        return jax.value_and_grad(lambda *a: forward(*a).sum(), argnums=(0, 1, 2))(lattice, frac, species)

    result = {}
    for name, fn in (("forward", forward), ("forward+grad", value_and_grad)):
        if name not in modes:
            continue
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(lattice, frac, species).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        result[name] = {
            "compile_s": compile_s,
            "run_s": timed(compiled, (lattice, frac, species), repeats),
            "gflops": float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan"),
            "temp_mb": getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory else float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["128x5", "8x135", "32x135", "128x135"], help="BxN")
    parser.add_argument("--truncation", choices=["adaptive", "fixed"], default="adaptive")
    parser.add_argument("--gradient", choices=["exact", "smoacs"], default="exact")
    parser.add_argument("--chunk-size", type=int, default=None, help="query rows per attention block")
    parser.add_argument("--ckpt", help="upstream .ckpt or converted .npz (default: random default.json weights)")
    parser.add_argument("--config", help="default.json for --ckpt")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=["forward", "forward+grad"], default=["forward", "forward+grad"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))")
    print(f"truncation={args.truncation} gradient={args.gradient} chunk_size={args.chunk_size or 'auto'}")
    header = f"{'batch':>8} {'blocks(CxQ)':>11} {'mode':>13} {'compile s':>10} {'run s':>9} {'GFLOP':>9} "
    print(header + f"{'XLA temp MB':>12} {'peak RSS MB':>12} {'analytic GFLOP (fwd)':>21}")
    results = []
    for case in args.cases:
        num_crystals, num_atoms = (int(v) for v in case.lower().split("x"))
        cells = round((num_atoms / 5) ** (1 / 3))
        if 5 * cells**3 != num_atoms:
            parser.error(f"{case}: N must be 5 * cells³ (5, 40, 135, ...)")
        batch = common.perovskite_crystals(num_crystals, cells)[:4]
        if args.ckpt:
            predictor = load(args.ckpt, args.config, args.truncation, args.gradient, args.chunk_size)
            config, params = predictor.metadata["config"], predictor.params
        else:
            config = CrystalformerConfig()
            params = common.random_crystalformer_params(config, batch)
        max_range = required_range(batch[0], config)
        apply = make_apply(config, args.truncation, args.gradient, args.chunk_size, max_range)
        num_shifts = int(np.prod([2 * r + 1 for r in (max_range if args.truncation == "adaptive" else (2, 2, 2))]))
        plan = block_plan(num_crystals, num_atoms, num_shifts, config.value_pe_dist_real, 4, args.chunk_size)
        row = measure(apply, params, batch, args.repeats, args.modes)
        pairs = num_crystals * num_atoms**2
        heads, basis = config.head_num, config.value_pe_dist_real
        analytic = 2 * pairs * heads * num_shifts * basis * config.num_layers / 1e9
        for mode, m in row.items():
            print(
                f"{case:>8} {f'{plan[0]}x{plan[1]}':>11} {mode:>13} {m['compile_s']:10.1f} {m['run_s']:9.3f} "
                f"{m['gflops']:9.1f} {m['temp_mb']:12.0f} {m['peak_rss_mb']:12.0f} {analytic:21.0f}",
                flush=True,
            )
        results.append({"case": case, "max_range": max_range, "blocks": plan, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "auto_block_bytes": AUTO_BLOCK_BYTES, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

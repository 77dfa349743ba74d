"""Crystalformer throughput and memory: forward and forward+gradient on perovskite batches.

    python benchmarks/bench_crystalformer.py                      # 128x5, 8x135, 32x135, 128x135
    python benchmarks/bench_crystalformer.py --cases 128x5 8x135 --truncation fixed --chunk-size 64 --json out.json
    python benchmarks/bench_crystalformer.py --ckpt megnet-bandgap-layer4.ckpt --config default.json
    python benchmarks/bench_crystalformer.py --cases 8x135 --basis-window off --softmax-window off   # whole box
    python benchmarks/bench_crystalformer.py --cases 8x135 --basis-size 8    # how much of the time the basis size sets

Per batch B x N (rattled perovskite supercells, soft species), in this process: compile time, the median and
minimum of `--repeats` calls after a warm-up (forward; forward+gradient w.r.t. lattice, frac and species), XLA's
temporary buffers, the FLOPs and the utilization against the float32 matmul rate measured next to the case, the
transcendentals and the utilization their mix allows (`common.mix_ceiling`, exp rate measured next to the case), and
the process peak RSS (monotone over the run: run one case per process for a clean figure).

FLOPs: XLA's cost analysis counts a loop body once, and the attention runs as a loop over query blocks; so the
FLOPs are those of one crystal compiled as a single block, times B (the work is linear in B). With windows
(`--basis-window`, `--softmax-window`, default: sized for the case's cells) they are those of the first branch, the
one with both windows (`common.attention_branch`).
Without `--ckpt` the weights are random (default.json architecture; the cost does not depend on the values).
`--basis-size K` changes only the number K of RBF centres (default.json: 64) of those random weights, spread over the
same distances with the same width (so the basis windows stay the same): a diagnostic of how much of the time and of
the FLOPs the basis sets.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcrystal.models.crystalformer import (  # noqa: E402
    CrystalformerConfig,
    required_range,
    required_softmax_window,
    required_window,
)
from jaxcrystal.models.periodic_attention import AUTO_BLOCK_BYTES, block_plan  # noqa: E402
from jaxcrystal.predictors.crystalformer import load, make_apply  # noqa: E402

COLUMNS = [
    ("case", "case", ""),
    ("blocks", "block (CxQ)", ""),
    ("basis_window", "basis window", ""),
    ("softmax_window", "softmax window", ""),
    ("mode", "mode", ""),
    ("compile_s", "compile s", ".1f"),
    ("median_s", "run s", ".3f"),
    ("gflop", "GFLOP", ".1f"),
    ("matmul_gflops", "matmul GFLOP/s", ".0f"),
    ("util", "util %", ".0f"),
    ("transcendentals_g", "G transc.", ".2f"),
    ("exp_gps", "exp G/s", ".1f"),
    ("ceiling", "mix ceiling %", ".0f"),
    ("temp_mb", "XLA temp MB", ".0f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
]


def functions(apply, params, mask):
    def forward(lattice, frac, species):
        return apply(params, lattice, frac, species, mask)

    def value_and_grad(lattice, frac, species):
        return jax.value_and_grad(lambda *a: forward(*a).sum(), argnums=(0, 1, 2))(lattice, frac, species)

    return {"forward": forward, "forward+grad": value_and_grad}


def basis_sized(config: CrystalformerConfig, size: int | None) -> CrystalformerConfig:
    """`config` with `size` RBF centres over the same distances and of the same width (None: unchanged)."""
    if size is None:
        return config
    scale = config.value_pe_width_scale * size / config.value_pe_dist_real
    return dataclasses.replace(config, value_pe_dist_real=size, value_pe_width_scale=scale)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["128x5", "8x135", "32x135", "128x135"], help="BxN")
    parser.add_argument("--truncation", choices=["adaptive", "fixed"], default="adaptive")
    parser.add_argument("--gradient", choices=["exact", "smoacs"], default="exact")
    parser.add_argument("--chunk-size", type=int, default=None, help="query rows per attention block")
    parser.add_argument(
        "--basis-window", default="auto", help="RBF basis window: auto (per batch), off (whole box), or an int"
    )
    parser.add_argument(
        "--softmax-window", default="auto", help="softmax window: auto (per batch), off (whole box), or an int"
    )
    parser.add_argument("--ckpt", help="upstream .ckpt or converted .npz (default: random default.json weights)")
    parser.add_argument("--config", help="default.json for --ckpt")
    parser.add_argument("--basis-size", type=int, help="RBF centres K of the random weights (default.json: 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=["forward", "forward+grad"], default=["forward", "forward+grad"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    args = parser.parse_args(argv)
    if args.basis_size is not None and (args.ckpt or args.basis_size < 1):
        parser.error("--basis-size takes a positive K and applies to the random weights only (not with --ckpt)")

    info = common.machine()
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, jax {info['jax']} on {info['platform']}")
    window, softmax = ({"auto": "auto", "off": None}.get(w, w) for w in (args.basis_window, args.softmax_window))
    window, softmax = (w if w in ("auto", None) else int(w) for w in (window, softmax))
    print(
        f"truncation={args.truncation} gradient={args.gradient} chunk_size={args.chunk_size or 'auto'} "
        f"basis_window={args.basis_window} softmax_window={args.softmax_window} "
        f"basis_size={args.basis_size or 'as configured'}"
    )
    rows = []
    for case in args.cases:
        num_crystals, num_atoms, cells = common.parse_case(case)
        batch = common.perovskite_crystals(num_crystals, cells)[:4]
        if args.ckpt:
            predictor = load(args.ckpt, args.config, args.truncation, args.gradient, args.chunk_size)
            config, params = predictor.metadata["config"], predictor.params
        else:
            config = basis_sized(CrystalformerConfig(), args.basis_size)
            params = common.random_crystalformer_params(config, batch)
        max_range = required_range(batch[0], config)
        shifts = max_range if args.truncation == "adaptive" else (config.lattice_range,) * 3
        num_shifts = int(np.prod([2 * r + 1 for r in shifts]))
        plan = block_plan(num_crystals, num_atoms, num_shifts, config.value_pe_dist_real, 4, args.chunk_size)
        case_window = required_window(batch[0], config) if window == "auto" else window  # static under jit
        case_softmax = required_softmax_window(batch[0], config) if softmax == "auto" else softmax
        windows = dict(basis_window=case_window, softmax_window=case_softmax)
        apply = make_apply(config, args.truncation, args.gradient, args.chunk_size, max_range, **windows)
        one_block = make_apply(config, args.truncation, args.gradient, num_atoms, max_range, **windows)
        one = jax.tree.map(lambda x: x[:1], batch)
        for mode, fn in functions(apply, params, batch[3]).items():
            if mode not in args.modes:
                continue
            compiled, compile_s, _, temp = common.compile_fn(fn, *batch[:3])
            with common.attention_branch(0):  # the window is sized for these cells: count the branch that runs
                one_compiled = common.compile_fn(functions(one_block, params, one[3])[mode], *one[:3])[0]
            cost = {key: value * num_crystals for key, value in common.xla_cost(one_compiled).items()}
            flops = cost["flops"]
            timing, rate, exps = common.rates_around(common.steady, compiled, batch[:3], args.repeats)
            row = {"case": case, "blocks": f"{plan[0]}x{plan[1]}", "mode": mode, "compile_s": compile_s, **timing}
            row.update(gflop=flops / 1e9, matmul_gflops=rate, temp_mb=temp / 2**20, max_range=max_range)
            for key, value in windows.items():
                effective = [min(w, 2 * r + 1) for w, r in zip(value or (), shifts, strict=False)]
                whole = not effective or effective == [2 * r + 1 for r in shifts]
                row[key] = "box" if whole else "x".join(str(w) for w in effective)
            row["util"] = common.utilization(flops, timing["min_s"], rate)
            row.update(transcendentals_g=cost["transcendentals"] / 1e9, exp_gps=exps)
            row["ceiling"] = common.mix_ceiling(flops, cost["transcendentals"], rate, exps)
            row["peak_rss_mb"] = common.peak_rss_mb()
            rows.append(row)
            common.print_table([row], COLUMNS)
    print()
    common.print_table(rows, COLUMNS)
    if args.markdown:
        print(common.markdown_table(rows, COLUMNS))
    common.write_json(
        args.json, {"machine": info, "args": vars(args), "auto_block_bytes": AUTO_BLOCK_BYTES, "results": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

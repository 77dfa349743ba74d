"""How fast could a hand-written kernel run Crystalformer's basis aggregation? An experiment beside the benchmarks.

    python benchmarks/fused_basis_probe.py                 # one block of the 8x135 benchmark: 7 x 135 x 27 triples
    python benchmarks/fused_basis_probe.py --window 125 --json probe.json

The forward basis aggregation of one attention block (Q query atoms, N key atoms, W window translations, H = 8
heads, the default K = 64 Gaussians),
    out[q,h,k] = Σ_{n,w} inside · coef[q,h,n] · exp(γ[q,h] (d²[q,n,w] - d²_min[q,n])) · φ_k(√d²[q,n,w]),
as `jaxcrystal.models.periodic_attention` writes it (XLA, jit, jaxcrystal's compiler options, both cores), against
the same function as one C++ loop nest (`fused_basis_probe.cc`, compiled here with g++ -O3 -march=native
-ffast-math and glibc's vector exp; one core), on the same random inputs of realistic ranges (distances up to 20 Å,
γ in [-0.5, -0.02] Å⁻², 90 % of the triples inside their box). The C++ loop also runs with only the 32 Gaussians
nearest each distance (the others are below e⁻⁴⁰). Printed: best time of `--repeats` calls, XLA time / this time,
the largest difference from XLA relative to XLA's largest value, and the time the loop's exponentials alone take
at the exp rate of both cores measured in this run (`common.exp_rate`; on one core, about twice as long). Needs g++
and glibc's libmvec; jaxcrystal does not use this code.

A third variant asks whether XLA itself gains from fewer exponentials: the Gaussians of each group of G = 8
consecutive centres (spacing δ, in units of the width s) from two exponentials of the group's offset y = d/s - c
(c: the group's middle) and products, `xla_aggregate_grouped`:
    φ_j = exp(-(y - δ(j - h))² / 2) = E · Q^m · C_j,   E = exp(-(|y| - δh)² / 2),  Q = exp(-δ|y|),
    m = h - sign(y)(j - h) ∈ {0, ..., G-1},  C_j = exp((δh)² / 2 - δ²(j - h)² / 2),  h = (G - 1) / 2,
with E and Q materialized per (triple, group) and Q^m from Q, Q², Q⁴ selected by the bits of m (no factor exceeds
C_j ≤ e^(δh)²/2, so nothing overflows; far groups underflow to 0 as their Gaussians do).

The fourth variant is the same formula as a C++ loop built to be fast: Q = exp(-δ d/s) e^(δc) above the group's middle
and exp(δ d/s) e^(-δc) below it, so one exponential per group (E) and two per triple; the Gaussians and weights of one
atom pair's translations are computed in vector loops and accumulated by a register-blocked update, two heads at a
time. "util %" is XLA's FLOP count of the direct formulation (the same work for every variant) per second, over the
matmul rate of the threads a variant uses: `common.matmul_rate` on both cores, and in a process pinned to one core
(Linux) for the one-thread C++ loops.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from jaxcrystal.compile_options import compiler_options  # noqa: E402
from jaxcrystal.models.crystalformer import CrystalformerConfig  # noqa: E402
from jaxcrystal.models.periodic_attention import HIGHEST, gaussian_basis, safe_sqrt  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "fused_basis_probe.cc"
COMPILE = ["g++", "-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp-simd"]
NEAR = 32  # Gaussians per triple in the C++ loop's "near" variant
COLUMNS = [
    ("variant", "variant", ""),
    ("threads", "threads", ""),
    ("ms", "ms per block", ".3f"),
    ("xla_over", "XLA / this", ".2f"),
    ("max_rel_diff", "max |Δ| / max", ".1e"),
    ("exp_ms", "its exps at the exp rate, ms", ".3f"),
    ("util", "util %", ".0f"),
]
ONE_CORE_MATMUL = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
sys.path.insert(0, sys.argv[1])
import common
print(common.matmul_rate())
"""


def inputs(queries: int, atoms: int, window: int, heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    d2min = rng.uniform(0, 100, (queries, atoms))
    d2 = d2min[..., None] + rng.uniform(0, 300, (queries, atoms, window))
    gamma = rng.uniform(-0.5, -0.02, (queries, heads))
    coef = rng.uniform(0, 2.0 / atoms, (queries, heads, atoms))
    inside = rng.uniform(size=(queries, heads, atoms, window)) < 0.9
    return tuple(np.asarray(x, np.float32) for x in (coef, gamma, d2, d2min, inside))


def xla_aggregate(centers, width):
    def aggregate(coef, gamma, d2, d2min, inside):
        basis = gaussian_basis(safe_sqrt(d2), centers, width)  # [Q, N, W, K]
        weights = inside * coef[..., None] * jnp.exp(gamma[:, :, None, None] * (d2 - d2min[..., None])[:, None])
        return jnp.einsum("qhnw,qnwk->qhk", weights, basis, precision=HIGHEST)

    return aggregate


GROUP = 8  # Gaussians per pair of exponentials in `xla_aggregate_grouped`


def grouped_gaussian_basis(dist, centers, width: float):
    """`gaussian_basis` for evenly spaced centres, two exponentials per `GROUP` centres (module docstring):
    [...] Å -> [..., K]."""
    centers = np.asarray(centers, np.float64)
    spacing = float(np.diff(centers).mean()) / width  # δ
    half = (GROUP - 1) / 2
    middles = (centers.reshape(-1, GROUP).mean(axis=1) / width).astype(np.float32)  # c per group
    offsets = spacing * (np.arange(GROUP) - half)
    constants = np.exp(0.5 * (spacing * half) ** 2 - 0.5 * offsets**2).astype(np.float32)  # C_j
    y = dist[..., None] / width - middles  # [..., groups]
    distance = jnp.abs(y)
    edge = jnp.exp(-0.5 * jnp.square(distance - spacing * half))  # E
    ratio = jnp.exp(-spacing * distance)  # Q
    edge, ratio, above = lax.optimization_barrier((edge, ratio, y > 0))  # once per (triple, group)
    power = jnp.where(above[..., None], GROUP - 1 - np.arange(GROUP), np.arange(GROUP))  # m [..., groups, G]
    value, factor = edge[..., None] * constants, ratio[..., None]
    for bit in range(int(np.log2(GROUP))):
        value = value * jnp.where((power >> bit) & 1 == 1, factor, 1.0)
        factor = factor * factor
    return value.reshape(value.shape[:-2] + (len(centers),))


def xla_aggregate_grouped(centers, width):
    def aggregate(coef, gamma, d2, d2min, inside):
        basis = grouped_gaussian_basis(safe_sqrt(d2), centers, width)
        weights = inside * coef[..., None] * jnp.exp(gamma[:, :, None, None] * (d2 - d2min[..., None])[:, None])
        return jnp.einsum("qhnw,qnwk->qhk", weights, basis, precision=HIGHEST)

    return aggregate


def one_core_matmul_rate() -> float:
    """`common.matmul_rate` (GFLOP/s) in a process pinned to one core (Linux), the rate of the C++ loops' thread."""
    run = subprocess.run([sys.executable, "-c", ONE_CORE_MATMUL, str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(run.stdout.split()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=7, help="query atoms per block")
    parser.add_argument("--atoms", type=int, default=135)
    parser.add_argument("--window", type=int, default=27, help="translations per atom pair")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if shutil.which("g++") is None:
        print("g++ not found: this probe compiles a C++ loop (apt install g++); nothing measured")
        return 1
    info = common.machine()
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, jax {info['jax']} on {info['platform']}")
    centers, width = CrystalformerConfig().basis(0)
    heads = 8
    arrays = inputs(args.queries, args.atoms, args.window, heads)

    def run_xla(aggregate):
        """(output, best seconds, XLA's FLOP count) of `aggregate` compiled by XLA on `arrays`."""
        compiled = jax.jit(aggregate, compiler_options=compiler_options()).lower(*arrays).compile()
        seconds = common.steady(compiled, arrays, args.repeats)["min_s"]
        return np.asarray(compiled(*arrays)), seconds, common.xla_flops(compiled)

    reference, xla_s, flops = run_xla(xla_aggregate(centers, width))  # the work, for every variant's utilization
    grouped_out, grouped_s, _ = run_xla(xla_aggregate_grouped(centers, width))

    with tempfile.TemporaryDirectory() as tmp:
        binary, data, result = (str(Path(tmp) / name) for name in ("probe", "in.bin", "out.bin"))
        widths = [f"-DPROBE_HEADS={heads}", f"-DPROBE_BASIS={len(centers)}"]
        build = subprocess.run([*COMPILE, *widths, str(SOURCE), "-o", binary, "-lmvec"], capture_output=True, text=True)
        if build.returncode != 0:
            print(f"compiling {SOURCE.name} failed:\n{build.stderr.strip()}")
            return 1
        header = np.asarray([args.queries, args.atoms, args.window, 1 / width, np.diff(centers).mean()], np.float32)
        np.concatenate([header, np.asarray(centers, np.float32)] + [a.ravel() for a in arrays]).tofile(data)
        run = subprocess.run([binary, data, result, str(args.repeats)], capture_output=True, text=True, check=True)
        seconds = dict(line.split() for line in run.stdout.split("\n") if line)
        outputs = np.fromfile(result, np.float32).reshape((3,) + reference.shape)

    triples = args.queries * args.atoms * args.window
    exps = common.exp_rate()
    scale = float(np.abs(reference).max())
    rates = {2: common.matmul_rate(), 1: one_core_matmul_rate()}

    def row(variant, threads, seconds, out, exps_per_triple):
        """One table row; utilization against the matmul rate of `threads` cores."""
        return {
            "variant": variant,
            "threads": threads,
            "ms": seconds * 1e3,
            "xla_over": xla_s / seconds,
            "max_rel_diff": float(np.abs(out - reference).max()) / scale,
            "exp_ms": triples * (exps_per_triple + heads) / exps / 1e6,
            "util": common.utilization(flops, seconds, rates[threads]),
        }

    rows = [
        row("XLA", 2, xla_s, reference, len(centers)),
        row(f"XLA, 2 exps per {GROUP} Gaussians", 2, grouped_s, grouped_out, 2 * len(centers) // GROUP),
    ]
    loops = (
        ("all", f"C++ loop, {len(centers)} Gaussians", len(centers)),
        ("near", f"C++ loop, {NEAR} Gaussians", NEAR),
        ("grouped", f"C++ loop, 1 exp per {GROUP} Gaussians + 2", len(centers) // GROUP + 2),
    )
    for (name, variant, exps_per_triple), out in zip(loops, outputs, strict=True):
        rows.append(row(variant, 1, float(seconds[name]), out, exps_per_triple))
    print(f"one block: {args.queries} queries x {args.atoms} atoms x {args.window} translations, H = {heads}, "
          f"K = {len(centers)}; exp rate {exps:.1f} G/s (two cores); {flops / 1e6:.1f} MFLOP (XLA's count of "
          f"the direct formulation); matmul {rates[2]:.0f} GFLOP/s on two cores, {rates[1]:.0f} on one")  # fmt: skip
    common.print_table(rows, COLUMNS)
    payload = {"machine": info, "args": vars(args), "exp_gps": exps, "flops": flops, "matmul_gflops": rates}
    common.write_json(args.json, payload | {"results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

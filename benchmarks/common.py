"""Shared benchmark machinery: test crystals, compile-vs-steady timing, XLA FLOPs, a matmul-rate probe,
peak host memory per case (one subprocess per case), and table + JSON output.

Conventions used by every script:
  * compile time is `jit(...).lower(...).compile()` alone; the steady-state time is the median (and minimum) of
    `repeats` calls of the compiled program after one warm-up call;
  * FLOPs are what XLA's `cost_analysis()` reports for the compiled program (a loop body is counted once, so a
    `lax.scan` of n steps reports one step);
  * utilization = (FLOPs / steady time) / the float32 matmul rate measured in the same run (`matmul_rate`; where
    one process runs several cases, probed before and after each and the higher taken, `rates_around`);
  * XLA does not count transcendental functions (exp, log, ...) as FLOPs but reports them apart; the mix ceiling
    (`mix_ceiling`) is the utilization a program would reach if its FLOPs ran at the matmul rate and its
    transcendentals at the exp rate measured in the same run (`exp_rate`), with nothing else taking time;
  * the peak host memory of a case is the `ru_maxrss` of a fresh process that ran only that case.
"""

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrystal.compile_options import compiler_options

PEROVSKITE_FRAC = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
SRTIO3 = (38, 22, 8, 8, 8)  # Z of the five perovskite sites (A, B, X, X, X)


def parse_case(case: str) -> tuple[int, int, int]:
    """'BxN' -> (B crystals, N atoms, n cells per axis) for perovskite supercells (N = 5 n³)."""
    parts = case.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise SystemExit(f"case {case!r}: expected BxN, two positive integers (e.g. 8x135)")
    b, n = (int(v) for v in parts)
    cells = round((n / 5) ** (1 / 3))
    if 5 * cells**3 != n:
        raise SystemExit(f"case {case!r}: N must be 5 * cells³ (5, 40, 135, ...)")
    return b, n, cells


def perovskite_crystals(num_crystals: int, cells: int, seed: int = 0, soft: bool = True):
    """`num_crystals` rattled ABX3 perovskite supercells (cells³ cells, a ≈ 3.9 Å per cell), float32.

    Returns (lattice [B,3,3] Å rows, frac [B,N,3] in [0,1), species [B,N,98], mask [B,N], Z [N]).
    `soft`: species are random soft distributions (what the optimizer feeds the models); otherwise one-hot SrTiO3.
    """
    rng = np.random.default_rng(seed)
    shifts = np.stack(np.meshgrid(*[np.arange(cells)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = ((PEROVSKITE_FRAC[None] + shifts[:, None]) / cells).reshape(-1, 3)
    n = len(frac)
    a = rng.uniform(3.7, 4.1, size=num_crystals) * cells
    lattice = a[:, None, None] * np.eye(3) + rng.normal(scale=0.05, size=(num_crystals, 3, 3))
    frac = (frac[None] + rng.normal(scale=0.01 / cells, size=(num_crystals, n, 3))) % 1.0
    z = np.tile(np.asarray(SRTIO3), cells**3)
    if soft:
        species = np.asarray(jax.nn.softmax(rng.normal(size=(num_crystals, n, 98)) / 0.3, axis=-1))
    else:
        species = np.zeros((num_crystals, n, 98))
        species[:, np.arange(n), z - 1] = 1.0
    return (
        jnp.asarray(lattice, jnp.float32),
        jnp.asarray(frac, jnp.float32),
        jnp.asarray(species, jnp.float32),
        jnp.ones((num_crystals, n), bool),
        z,
    )


def random_crystalformer_params(config, batch, seed: int = 0):
    """Random Crystalformer parameters of architecture `config` (scaled normal; frozen Gaussian scale [20, 0])."""
    from jaxcrystal.models.crystalformer import Crystalformer

    shapes = jax.eval_shape(Crystalformer(config, truncation="fixed").init, jax.random.key(0), *batch)["params"]
    rng = np.random.default_rng(seed)
    special = {"gauss_scale": np.array([20.0, 0.0]), "target_mean": np.zeros(1), "target_std": np.ones(1)}

    def init(path, leaf):
        name = path[-1].key
        if name in special:
            return jnp.asarray(special[name], jnp.float32)
        fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 16
        return jnp.asarray(rng.normal(scale=fan_in**-0.5, size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(init, shapes)


def random_alignn_variables(module, batch, graph, seed: int = 0):
    """Random ALIGNN variables for `module` (unit BatchNorm statistics, upstream's RBF centres and widths)."""
    from jaxcrystal.predictors.alignn import flat_inputs

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *flat_inputs(graph, *batch)))
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return jnp.ones(leaf.shape, jnp.float32)
        if name == "centers":
            n = leaf.shape[0]
            return jnp.linspace(-1.0, 1.0, n) if n == module.triplet_input_features else jnp.linspace(0.0, 8.0, n)
        if name == "gamma":
            return jnp.asarray(9.875 if path[-2].key.startswith("edge") else 19.5, jnp.float32)
        fan_in = leaf.shape[0] if leaf.ndim == 2 else 256
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(init, shapes)


def random_weights_file(kind: str, path, seed: int = 0) -> str:
    """Writes random weights of the reference architecture (Crystalformer default.json; ALIGNN 4+4 layers, 256
    wide) as a converted-weights `.npz` that `load_predictor(kind, path)` reads; for timing runs only."""
    from jaxcrystal import alignn_graph, weights_file

    tiny = perovskite_crystals(1, 1, seed)[:4]
    if kind == "crystalformer":
        from converters.crystalformer import FORMAT
        from jaxcrystal.models.crystalformer import CrystalformerConfig

        config = CrystalformerConfig()
        variables = random_crystalformer_params(config, tiny, seed)
        metadata = {"format": FORMAT, "config": config.to_dict(), "target": "random", "name": "random"}
    elif kind == "alignn":
        from converters.alignn import FORMAT
        from jaxcrystal.models.alignn import ALIGNN

        graph = alignn_graph.build_graph(*tiny[:2], tiny[3], box=3)
        variables = random_alignn_variables(ALIGNN(), tiny, graph, seed)
        metadata = {"format": FORMAT, "kind": "alignn", "name": "random", "hyperparameters": {}}
        metadata["graph"] = {"use_canonize": True}
    else:
        raise ValueError(f"no random weights for {kind!r}")
    metadata.update(units="random units", source="random weights (benchmarks/common.py)", seed=seed)
    variables = jax.tree.map(np.asarray, variables)
    with open(path, "wb") as f:
        f.write(weights_file.weights_bytes(variables, metadata))
    return str(path)


def steady(fn, args, repeats: int = 3) -> dict:
    """Median and minimum wall time (s) and CPU time (s, all threads) of `fn(*args)` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"median_s": statistics.median(wall), "min_s": min(wall), "cpu_s": statistics.median(cpu)}


def compile_fn(fn, *args, static_argnums=(), options=None):
    """(compiled, compile seconds, XLA FLOPs, XLA temporary bytes) of `jit(fn)` for these arguments.

    `options`: XLA compiler options; None = jaxcrystal's (`jaxcrystal.compiler_options()`, as the optimizer and
    the Crystalformer predictor compile), {} = XLA's defaults.
    """
    options = compiler_options() if options is None else options
    lowered = jax.jit(fn, static_argnums=static_argnums, compiler_options=options).lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    return compiled, seconds, xla_flops(compiled), xla_temp_bytes(compiled)


def xla_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program: {"flops", "transcendentals"} (NaN when unavailable)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    return {key: float(cost.get(key, float("nan"))) for key in ("flops", "transcendentals")}


def xla_flops(compiled) -> float:
    """FLOPs of a compiled program from XLA's cost analysis (NaN when unavailable)."""
    return xla_cost(compiled)["flops"]


def xla_temp_bytes(compiled) -> float:
    memory = compiled.memory_analysis()
    return float(getattr(memory, "temp_size_in_bytes", float("nan"))) if memory is not None else float("nan")


@contextlib.contextmanager
def attention_branch(index: int):
    """While active, Crystalformer attention runs every block on branch `index` of its `attention_branches`
    (clipped to the last, the whole grid), so that XLA drops the other branches of its `lax.switch` (its cost
    analysis would count the largest). Use it for FLOP counting only.
    """
    from jaxcrystal.models import periodic_attention

    def forced(branches, lattice, *args):
        return jnp.zeros((lattice.shape[0], len(branches)), bool).at[:, min(index, len(branches) - 1)].set(True)

    original = periodic_attention.branch_fits
    periodic_attention.branch_fits = forced
    try:
        yield
    finally:
        periodic_attention.branch_fits = original


def best_seconds(fn, x, repeats: int) -> float:
    """Shortest wall time (s) of `repeats` calls of the compiled `fn(x)` after a warm-up call (a rate probe)."""
    f = fn.lower(x).compile()
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t)
    return best


def matmul_rate(size: int = 1024, repeats: int = 10) -> float:
    """Best float32 GFLOP/s of a jitted [size, size] @ [size, size] matmul (the machine's reachable rate)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    return 2 * size**3 / best_seconds(jax.jit(lambda x: x @ x), a, repeats) / 1e9


def exp_rate(size: int = 2**20, terms: int = 16, repeats: int = 10) -> float:
    """Best float32 exponentials per second (G/s) of a jitted Σ_k exp(c_k x) over `size` values, `terms`
    exponentials per value in one fused loop (the machine's reachable rate; memory traffic is one read and one
    write per `terms` exponentials)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=size), jnp.float32)
    scales = np.linspace(-1.0, 1.0, terms, dtype=np.float32)

    def exponentials(x):
        total = jnp.zeros_like(x)
        for scale in scales:
            total = total + jnp.exp(scale * x)
        return total

    return size * terms / best_seconds(jax.jit(exponentials), x, repeats) / 1e9


def rates_around(measure, *args):
    """(measure(*args), matmul GFLOP/s, exp G/s), each rate the higher of a probe right before and one right after the
    measurement, so that one probe taken at a slow moment (seen: half the rate, next to cases that ran at full
    speed) cannot inflate the utilization."""
    before = matmul_rate(), exp_rate()
    result = measure(*args)
    after = matmul_rate(), exp_rate()
    return result, max(before[0], after[0]), max(before[1], after[1])


def utilization(flops: float, seconds: float, rate_gflops: float) -> float:
    """Achieved GFLOP/s over the measured matmul rate, in percent."""
    return 100.0 * flops / seconds / 1e9 / rate_gflops


def mix_ceiling(flops: float, transcendentals: float, rate_gflops: float, exp_gps: float) -> float:
    """The utilization (%) reachable by a program of this operation mix: its FLOPs at the matmul rate (GFLOP/s)
    plus its transcendentals at the exp rate (G/s), everything else free. `utilization` / this = how close the
    program runs to its own mix's bound."""
    flop_s = flops / 1e9 / rate_gflops
    return 100.0 * flop_s / (flop_s + transcendentals / 1e9 / exp_gps)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """A short description of the machine and software."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = float("nan")
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_GiB": round(memory_gb, 1),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
        # `jaxcrystal.host_memory`: on unless JAXCRYSTAL_KEEP_HOST_BUFFERS=0; it turns JAX's async CPU dispatch off
        "keep_host_buffers": os.environ.get("JAXCRYSTAL_KEEP_HOST_BUFFERS", "1") != "0",
        "async_cpu_dispatch": jax.config.read("jax_cpu_enable_async_dispatch"),
    }


def run_isolated(script: str, cases: list[str], extra_args: list[str]) -> list[dict]:
    """Runs `script --single CASE ...` in a fresh interpreter per case and returns the JSON rows they print last;
    a failed case's row is {"case": CASE, "error": its last stderr line}, also printed.

    One process per case gives each case its own peak-RSS figure (XLA never returns memory to the OS).
    """
    rows = []
    for case in cases:
        proc = subprocess.run(
            [sys.executable, script, "--single", case, *extra_args], capture_output=True, text=True, check=False
        )
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            continue
        rows.append({"case": case, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
        print(f"{case}: failed: {rows[-1]['error']}", flush=True)
    return rows


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Prints rows as an aligned table; columns are (key, header, format spec)."""
    header = [h for _, h, _ in columns]
    cells = []
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and np.isnan(value)):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)), flush=True)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """The same table in Markdown (for the README)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = []
        for key, _, spec in columns:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and np.isnan(value))
            values.append("-" if missing else (format(value, spec) if spec else str(value)))
        out.append("| " + " | ".join(values) + " |")
    return "\n".join(out)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=float)

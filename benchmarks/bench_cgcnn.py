"""CGCNN throughput: JAX graph build, forward, forward + input gradient, side by side with PyTorch `cgcnn2`.

    python benchmarks/bench_cgcnn.py                               # 128x5, 8x135, 32x135, 128x135
    python benchmarks/bench_cgcnn.py --cases 128x5 --repeats 5 --json cgcnn.json --markdown

Times are the minimum over `--repeats` calls after a warm-up (the machine is shared: the minimum is the least
disturbed figure; the JSON also holds the medians). Per case (B rattled SrTiO3 perovskite supercells of N atoms,
one process per case so that the peak RSS is the case's own), for the embedded Materials Project model
(`--model`, default band-gap: 4 convolutions, F = 64):
  * JAX: compile time and steady-state time of the in-jit neighbour search (`build_graph`), of the frozen-graph
    forward (bond lengths, Gaussian expansion, model) and of forward + gradient w.r.t. lattice, coordinates and
    species; XLA's FLOPs for each and the utilization (achieved GFLOP/s over the float32 matmul rate measured in
    the same run), and the utilization the program's mix of FLOPs and transcendentals allows (`common.mix_ceiling`,
    with the exp rate measured in the same run);
  * PyTorch (when `torch` and `cgcnn2` are importable): `cgcnn2`'s featurization of the same crystals (CIF files,
    pymatgen neighbour lists, Gaussian expansion; host code), its `CrystalGraphConvNet` forward on the collated
    batch and forward + gradient w.r.t. its inputs (atom features and Gaussian bond features), with the same
    upstream checkpoint; the ratio columns are torch time / JAX time (> 1: JAX is faster; the featurize ratio
    compares cgcnn2's featurization with the in-jit neighbour search), and `max |Δ|` is the
    largest difference between the two predictions (eV). The benchmark installs nothing: without torch/cgcnn2 the
    torch columns are skipped with a message. Enable them with `pip install torch==2.13.0 cgcnn2==0.6.0`
    (CPU wheel) in the environment that runs the script; neither is a dependency of jaxcrystal.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcrystal import geometry  # noqa: E402
from jaxcrystal.predictors import load_predictor  # noqa: E402

# XLA's default CPU options, as jaxcrystal compiles CGCNN-only programs (`compiler_options(("cgcnn",))` is empty):
# CGCNN's forward pass is faster with YNNPACK fusions (0.019 vs 0.037 s for 128 x 5), forward+gradient the same.
XLA_OPTIONS = {}

COLUMNS = [
    ("case", "case", ""),
    ("graph_s", "graph s", ".4f"),
    ("forward_compile_s", "fwd compile s", ".1f"),
    ("forward_s", "fwd s", ".4f"),
    ("matmul_gflops", "matmul GFLOP/s", ".0f"),
    ("forward_util", "fwd util %", ".0f"),
    ("forward_ceiling", "fwd mix ceiling %", ".0f"),
    ("grad_compile_s", "grad compile s", ".1f"),
    ("grad_s", "fwd+grad s", ".4f"),
    ("grad_gflop", "fwd+grad GFLOP", ".2f"),
    ("grad_util", "fwd+grad util %", ".0f"),
    ("grad_ceiling", "fwd+grad mix ceiling %", ".0f"),
    ("torch_featurize_s", "torch featurize s", ".2f"),
    ("torch_forward_s", "torch fwd s", ".4f"),
    ("torch_grad_s", "torch fwd+grad s", ".4f"),
    ("ratio_graph", "featurize ratio", ".0f"),
    ("ratio_forward", "fwd ratio", ".1f"),
    ("ratio_grad", "fwd+grad ratio", ".1f"),
    ("max_abs_diff", "max Δ eV", ".1e"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
]


def torch_available() -> str | None:
    """None when torch and cgcnn2 import, else the reason they do not."""
    try:
        import cgcnn2.model  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return f"{exc}"
    return None


def measure_jax(model: str, crystals, repeats: int, rate: float, exps: float) -> tuple[dict, np.ndarray]:
    lattice, frac, species, mask, _ = crystals
    box = geometry.required_image_box(np.asarray(lattice), 8.0)
    predictor = load_predictor("cgcnn", model, image_box=box)
    params = predictor.params
    row = {"image_box": list(box)}

    build, seconds, _, _ = common.compile_fn(predictor.build_graph, lattice, frac, mask, options=XLA_OPTIONS)
    row["graph_compile_s"] = seconds
    row["graph_s"] = common.steady(build, (lattice, frac, mask), repeats)["min_s"]
    graph = build(lattice, frac, mask)

    def forward(lattice, frac, species):
        return predictor.apply_with_graph(params, graph, lattice, frac, species, mask)

    def forward_grad(lattice, frac, species):
        return jax.value_and_grad(lambda *a: jnp.sum(forward(*a)), argnums=(0, 1, 2))(lattice, frac, species)

    for name, fn in (("forward", forward), ("grad", forward_grad)):
        compiled, seconds, flops, temp = common.compile_fn(fn, lattice, frac, species, options=XLA_OPTIONS)
        transcendentals = common.xla_cost(compiled)["transcendentals"]
        timing = common.steady(compiled, (lattice, frac, species), repeats)
        row[f"{name}_compile_s"] = seconds
        row[f"{name}_s"] = timing["min_s"]
        row[f"{name}_median_s"] = timing["median_s"]
        row[f"{name}_gflop"] = flops / 1e9
        row[f"{name}_temp_mb"] = temp / 2**20
        row[f"{name}_util"] = common.utilization(flops, row[f"{name}_s"], rate)
        row[f"{name}_transcendentals"] = transcendentals
        row[f"{name}_ceiling"] = common.mix_ceiling(flops, transcendentals, rate, exps)
    prediction = np.asarray(jax.jit(forward)(lattice, frac, species))
    return row, prediction


def measure_torch(model: str, crystals, repeats: int) -> tuple[dict, np.ndarray]:
    """cgcnn2 featurization (from CIF files, as its CIFData does) and model timings on the same crystals."""
    import cgcnn2
    import torch
    from cgcnn2.data import CIFData, collate_pool
    from cgcnn2.model import CrystalGraphConvNet
    from pymatgen.core import Lattice, Structure

    lattice, frac, _, _, z = crystals
    package = Path(cgcnn2.__file__).parent
    checkpoint = torch.load(package / "pretrained_models" / f"{model}.pth.tar", map_location="cpu", weights_only=True)
    args = checkpoint["args"]
    net = CrystalGraphConvNet(
        92, 41, atom_fea_len=args["atom_fea_len"], n_conv=args["n_conv"], h_fea_len=args["h_fea_len"], n_h=args["n_h"]
    )
    net.load_state_dict(checkpoint["state_dict"])
    net.eval()
    mean, std = float(checkpoint["normalizer"]["mean"]), float(checkpoint["normalizer"]["std"])

    folder = Path(tempfile.mkdtemp(prefix="bench_cgcnn_"))
    try:
        shutil.copy(package / "asset" / "atom_init.json", folder / "atom_init.json")
        lattice, frac = np.asarray(lattice, np.float64), np.asarray(frac, np.float64)
        with open(folder / "id_prop.csv", "w") as f:
            for b in range(lattice.shape[0]):
                Structure(Lattice(lattice[b]), list(z), frac[b]).to(filename=str(folder / f"c{b:04d}.cif"))
                f.write(f"c{b:04d},0.0\n")
        start = time.perf_counter()
        data = CIFData(str(folder), cache_size=0)
        inputs, _, _ = collate_pool([data[i] for i in range(len(data))])
        featurize_s = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def forward():
        with torch.no_grad():
            return net(*inputs)[0]

    def forward_grad():
        atom_fea = inputs[0].clone().requires_grad_(True)
        nbr_fea = inputs[1].clone().requires_grad_(True)
        out = net(atom_fea, nbr_fea, inputs[2], inputs[3])[0]
        out.sum().backward()
        return atom_fea.grad, nbr_fea.grad

    row = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "torch_featurize_s": featurize_s}
    for name, fn in (("forward", forward), ("grad", forward_grad)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        row[f"torch_{name}_s"] = float(np.min(times))
        row[f"torch_{name}_median_s"] = float(np.median(times))
    prediction = forward().numpy()[:, 0] * std + mean
    return row, prediction


def single(case: str, args) -> dict:
    b, n, cells = common.parse_case(case)
    crystals = common.perovskite_crystals(b, cells, seed=0, soft=False)
    rate = common.matmul_rate()  # measured again next to the case: the rate a busy machine gives now
    exps = common.exp_rate()
    row = {"case": case, "crystals": b, "atoms": n, "matmul_gflops": rate, "exp_gps": exps}
    jax_row, jax_pred = measure_jax(args.model, crystals, args.repeats, rate, exps)
    row.update(jax_row)
    row["jax_peak_rss_mb"] = common.peak_rss_mb()
    if not args.no_torch and torch_available() is None:
        torch_row, torch_pred = measure_torch(args.model, crystals, args.repeats)
        row.update(torch_row)
        row["ratio_graph"] = row["torch_featurize_s"] / row["graph_s"]
        row["ratio_forward"] = row["torch_forward_s"] / row["forward_s"]
        row["ratio_grad"] = row["torch_grad_s"] / row["grad_s"]
        row["max_abs_diff"] = float(np.max(np.abs(jax_pred - torch_pred)))
    row["peak_rss_mb"] = common.peak_rss_mb()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["128x5", "8x135", "32x135", "128x135"], help="BxN")
    parser.add_argument("--model", default="band-gap", help="embedded CGCNN model (default band-gap)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: one case in this process, JSON row out
    args = parser.parse_args(argv)
    if args.single:
        import json

        print(json.dumps(single(args.single, args), default=float))
        return 0

    info = common.machine()
    rate = common.matmul_rate()
    print(f"{info['date']}  {info['cpu']}, {info['cores']} cores, {info['memory_GiB']} GiB, jax {info['jax']}")
    print(f"float32 matmul rate (1024², best of 10): {rate:.1f} GFLOP/s; load average {info['load_average_1min']:.1f}")
    reason = None if args.no_torch else torch_available()
    if args.no_torch:
        print("torch columns: skipped (--no-torch)")
    elif reason:
        print(
            f"torch columns: skipped, torch/cgcnn2 not importable ({reason}); pip install torch==2.13.0 cgcnn2==0.6.0"
        )
    extra = ["--model", args.model, "--repeats", str(args.repeats)]
    extra += ["--no-torch"] if args.no_torch else []
    rows = common.run_isolated(os.path.abspath(__file__), args.cases, extra)
    common.print_table(rows, COLUMNS)
    if args.markdown:
        print(common.markdown_table(rows, COLUMNS))
    common.write_json(args.json, {"machine": info, "matmul_gflops": rate, "args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""XLA compiler options for jaxcrystal's compiled functions.

On CPU, XLA (jaxlib 0.10) hands elementwise and reduction fusions to the YNNPACK library by default. For the
attention kernels here they ran several times slower than XLA's own loop fusions (measured on this project's
benchmark machine: the backward pass of one 8-row Crystalformer attention block of a 135-atom crystal, 25 ms
with them, 5-8 ms without). `compiler_options()` turns them off for the programs jaxcrystal compiles (the
predictors' `apply`, the optimization loop, `benchmarks/`); it is empty on other backends and when the running
jaxlib does not know the option. Results are the same up to float rounding.

To get the same for your own `jax.jit` around a predictor on CPU:

    jax.jit(fn, compiler_options=jaxcrystal.compiler_options())
"""

import functools

import jax

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions (XLA's emitters instead)


@functools.cache
def compiler_options() -> dict:
    """Options for `jax.jit(..., compiler_options=...)` on the default backend (a new dict each call site may
    keep; empty where they do not apply)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:  # a jaxlib without this option: keep its defaults
        return {}
    return dict(_CPU_OPTIONS)

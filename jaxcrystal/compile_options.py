"""XLA compiler options for jaxcrystal's compiled functions.

On CPU, XLA (jaxlib 0.10) hands elementwise and reduction fusions to the YNNPACK library by default. For the
attention kernels here they ran several times slower than XLA's own loop fusions (measured on this project's
benchmark machine: the backward pass of one 8-row Crystalformer attention block of a 135-atom crystal, 25 ms
with them, 5-8 ms without; ALIGNN forward+gradient 8 x 135 atoms 11.3 s with them, 7.1-7.5 s without), while
CGCNN is faster with them (128 x 5 forward 0.019 vs 0.037 s, optimization step 0.086 vs 0.103 s).
`compiler_options(kinds)` therefore turns them off for programs that hold a Crystalformer or ALIGNN model (the
optimization loop, the Crystalformer predictor's own `jit`, `benchmarks/`); it is empty for CGCNN alone, on other
backends, and when the running jaxlib does not know the option. Results are the same up to float rounding.

To get the same for your own `jax.jit` around a Crystalformer or ALIGNN predictor on CPU:

    jax.jit(fn, compiler_options=jaxcrystal.compiler_options())
"""

import functools

import jax

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions (XLA's emitters instead)


_HELPED = ("crystalformer", "alignn")  # predictor kinds measured faster without YNNPACK fusions


@functools.cache
def compiler_options(kinds: tuple[str, ...] = _HELPED) -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of a program holding predictors of `kinds` (a tuple of
    kinds; default: as for Crystalformer/ALIGNN), on the default backend; empty where they do not help."""
    if jax.default_backend() != "cpu" or not set(kinds) & set(_HELPED):
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:  # a jaxlib without this option: keep its defaults
        return {}
    return dict(_CPU_OPTIONS)

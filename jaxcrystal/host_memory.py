"""Reuse of host memory between calls of compiled programs on CPU (Linux with glibc).

XLA:CPU allocates the temporary buffer of every call (all intermediates of the program) anew. Under glibc's
defaults such a block, once above 32 MiB, is a fresh `mmap` that is unmapped again when freed, and so is any block
above 64 MiB that JAX's dispatch thread allocates (JAX runs CPU computations on its own thread by default). So each
call page-faults its whole temporary buffer back in: 0.6 µs per 4 KiB page on this project's benchmark machine,
about a third of the time of a CGCNN forward+gradient call (e.g. 1.7 GB of temporaries for 128 × 135 atoms).

`keep_host_buffers` makes the next call reuse the pages the last one freed:
  * glibc's allocator (`mallopt`): large blocks come from the heap instead of separate mappings (M_MMAP_MAX = 0),
    and up to `retain_bytes` of free memory at the top of the heap is kept instead of being returned to the
    system (M_TRIM_THRESHOLD);
  * JAX runs single-device CPU computations on the calling thread (`jax_cpu_enable_async_dispatch = False`), whose
    allocations come from that heap; a second thread's heap is capped at 64 MiB, beyond which glibc always maps.
    Computations over several devices keep JAX's own threads (JAX's rule), so sharded runs gain less.
Results do not change (tested bit for bit); only where the bytes live and that the calling thread waits for each
single-device computation, which costs nothing for programs of more than a few microseconds. The price: up to
`retain_bytes` of freed memory stays with the process. `import jaxcrystal` applies it unless the environment
variable `JAXCRYSTAL_KEEP_HOST_BUFFERS` is `0`.
"""

import ctypes
import ctypes.util
import functools
import os

import jax

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
RETAIN_BYTES = 2**31  # free memory kept for reuse at most, bytes (2 GiB)
ENV_SWITCH = "JAXCRYSTAL_KEEP_HOST_BUFFERS"
JAX_DISPATCH_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"  # a user's explicit choice, left alone


@functools.cache
def _glibc():
    """The C library when it is glibc (it has `mallopt` and `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version, libc.mallopt  # noqa: B018 (attribute lookups raise outside glibc)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a JAX without this helper: assume the worst
        return True


def keep_host_buffers(retain_bytes: int = RETAIN_BYTES) -> bool:
    """Makes compiled CPU programs reuse the host memory of their previous call (see the module docstring).

    Returns True when fully applied: glibc took both settings and JAX's CPU client is not created yet (then it
    dispatches single-device computations on the calling thread, unless `JAX_CPU_ENABLE_ASYNC_DISPATCH` is set).
    False elsewhere: not glibc (nothing changes), or JAX already ran a computation (its threads keep allocating
    with separate mappings above 64 MiB: call this before the first JAX computation).
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, int(retain_bytes)))
    applied = all(libc.mallopt(option, value) == 1 for option, value in settings)
    if _backends_initialized():
        return False
    if JAX_DISPATCH_ENV not in os.environ:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return applied


def apply_default() -> bool:
    """`keep_host_buffers()` unless `JAXCRYSTAL_KEEP_HOST_BUFFERS=0` (what `import jaxcrystal` does)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    return keep_host_buffers()

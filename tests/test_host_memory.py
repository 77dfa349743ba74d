"""`jaxcrystal.host_memory`: calls of a compiled CPU program reuse the pages of the previous call, results unchanged.

Each case runs in a fresh interpreter, since the setting must precede JAX's first computation. The invariant is
counted, not timed: the minor page faults of one call against the pages of its temporary buffer.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxcrystal import host_memory

pytestmark = pytest.mark.skipif(
    host_memory._glibc() is None or jax.default_backend() != "cpu", reason="glibc's allocator on CPU only"
)

PROBE = r"""
import hashlib, json, resource
import jax, jax.numpy as jnp, numpy as np
import jaxcrystal

x = jnp.arange(2**23, dtype=jnp.float32) % 977.0
sort_rows = jax.jit(lambda x: jnp.sum(jnp.sort(x.reshape(-1, 16), axis=1)[:, ::2])).lower(x).compile()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(sort_rows(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

rng = np.random.default_rng(0)
lattice = np.tile(3.9 * np.eye(3, dtype=np.float32), (2, 1, 1))
base = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], np.float32)
frac = (base + 0.02 * rng.normal(size=(2, 5, 3))).astype(np.float32) % 1.0
species = rng.dirichlet(np.ones(98), size=(2, 5)).astype(np.float32)
mask = np.ones((2, 5), bool)
gap = jaxcrystal.load_predictor("cgcnn", "band-gap")
grads = jax.jit(jax.grad(lambda l, f, s: gap.apply(gap.params, l, f, s, mask).sum(), argnums=(0, 1, 2)))
digest = hashlib.sha256(b"".join(np.asarray(g).tobytes() for g in grads(lattice, frac, species))).hexdigest()
print(json.dumps({
    "temp_pages": sort_rows.memory_analysis().temp_size_in_bytes // resource.getpagesize(),
    "faults": min(faults[1:]),
    "async": jax.config.read("jax_cpu_enable_async_dispatch"),
    "digest": digest,
}))
"""


def _probe(**env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != host_memory.JAX_DISPATCH_ENV} | env
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_calls_reuse_host_pages_and_results_do_not_change():
    kept = _probe(**{host_memory.ENV_SWITCH: "1"})
    system = _probe(**{host_memory.ENV_SWITCH: "0"})
    assert kept["temp_pages"] == system["temp_pages"] >= 8192  # a 48 MiB temporary buffer: above glibc's mmap limit
    assert system["faults"] > 0.5 * system["temp_pages"]  # glibc's defaults: the buffer is faulted in every call
    assert kept["faults"] < 0.05 * kept["temp_pages"]
    assert (kept["async"], system["async"]) == (False, True)
    assert kept["digest"] == system["digest"]  # CGCNN gradients bit for bit


def test_a_users_dispatch_choice_is_left_alone():
    chosen = _probe(**{host_memory.ENV_SWITCH: "1", host_memory.JAX_DISPATCH_ENV: "1"})
    assert chosen["async"] is True


def test_too_late_once_jax_has_run():
    jax.block_until_ready(jax.numpy.zeros(3) + 1)  # this process's CPU client exists
    assert host_memory.keep_host_buffers() is False

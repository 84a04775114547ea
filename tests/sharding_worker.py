"""One process of the multi-process CPU test: joins through sharding.distributed, runs the ring collective
matmuls over a tp mesh spanning both processes, and checks them against numpy (same seed in every process)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from sharding import distributed
from sharding import tensor_parallel as TP
from sharding.mesh import make_mesh

assert distributed.initialize()
jax.config.update("jax_default_matmul_precision", "highest")
n = jax.device_count()
assert n == 2 * jax.local_device_count(), (n, jax.local_device_count())
mesh = make_mesh(tp=n)
r = np.random.default_rng(0)
x, w, wd = r.normal(size=(8 * n, 16)), r.normal(size=(8 * n, 16)), r.normal(size=(16, 8 * n))


def put(a, spec):
    sh = jax.sharding.NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sh, lambda idx: jnp.asarray(a[idx], jnp.float32))


P = jax.sharding.PartitionSpec
for strategy in ("ring", "bidi", "allreduce"):
    @jax.jit
    def block(x, w, wd, strategy=strategy):
        (h,) = TP.column_parallel(x, [w], mesh, strategy)
        y = TP.row_parallel(h, wd, mesh, strategy)
        return jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, P()))

    y = block(put(x, P()), put(w, P("tp")), put(wd, P(None, "tp")))
    got = np.asarray(y.addressable_data(0))
    err = np.abs(got - (x @ w.T) @ wd.T).max() / np.abs((x @ w.T) @ wd.T).max()
    assert err < 1e-5, (strategy, err)
print(f"process {jax.process_index()} ok over {n} devices", flush=True)
sys.exit(0)

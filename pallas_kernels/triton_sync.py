"""Cross-program synchronisation inside one Pallas Triton kernel launch."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def last_arrival(count_ref, index, arrivals: int, then, interpret: bool) -> None:
    """Bumps counter `index` of `count_ref` (int32, zeroed before the launch) after this program's stores, and runs
    `then` in the program that arrives last of the `arrivals` that bump it: it sees every other one's stores.

    The atomic add is acquire-release at GPU scope. The last program may read the others' stores with plain loads:
    L1 is not coherent between SMs, but a launch starts with it invalidated and only the last program ever reads
    another program's results. (Pallas' ".cg" load modifier fails to lower in JAX 0.11.2; volatile loads measured
    the same in the attention kernel's merge.)"""
    if not interpret:  # every thread's stores issued before the arrival (the interpreter runs one at a time)
        pltriton.debug_barrier()
    arrived = pltriton.atomic_add(count_ref, (index,), jnp.int32(1))
    pl.when(arrived == arrivals - 1)(then)

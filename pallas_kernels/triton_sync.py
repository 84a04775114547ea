"""Cross-program synchronisation inside one Pallas Triton kernel launch."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def arrive(count_ref, index, interpret: bool):
    """Bumps counter `index` of `count_ref` (int32) after every thread's stores so far; returns its old value.

    The atomic add is acquire-release at GPU scope, so a program that reads the counter's new value sees those
    stores (L1 is not coherent between SMs, but an acquire at GPU scope drops the reader's stale L1 lines; Pallas'
    ".cg" load modifier fails to lower in JAX 0.11.2, and volatile loads measured the same in the attention
    kernel's merge)."""
    if not interpret:  # every thread's stores issued before the arrival (the interpreter runs one at a time)
        pltriton.debug_barrier()
    return pltriton.atomic_add(count_ref, (jnp.asarray(index, jnp.int32),), jnp.int32(1))


def last_arrival(count_ref, index, arrivals: int, then, interpret: bool) -> None:
    """Bumps counter `index` of `count_ref` (zeroed before the launch) after this program's stores, and runs `then`
    in the program that arrives last of the `arrivals` that bump it: it sees every other one's stores."""
    arrived = arrive(count_ref, index, interpret)
    pl.when(arrived == arrivals - 1)(then)


def wait_for(count_ref, index, target, interpret: bool) -> None:
    """Spins until counter `index` of `count_ref` reaches `target`, then lets the whole program on: it sees the
    stores made before each `arrive` it counted.

    Deadlock-free only where every program it waits on has already started, e.g. when programs take their roles
    in the order of a ticket counter (`arrive` on a counter of its own) rather than of their program ids, which the
    GPU may schedule in any order. In the interpreter programs run one after another, so the counter must already
    be there: it is read once (a spin there would hang the test that should fail)."""

    def read(_):
        return pltriton.atomic_add(count_ref, (jnp.asarray(index, jnp.int32),), jnp.int32(0))  # an acquiring read

    if interpret:
        read(None)
        return
    lax.while_loop(lambda seen: seen < target, read, read(None))
    pltriton.debug_barrier()

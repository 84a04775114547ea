"""Multi-host start-up: every process runs the same program and joins JAX's multi-controller runtime.

Launch (one line per host; process 0's host is the coordinator, any free port):

    COORDINATOR=host0:8476 NUM_PROCESSES=2 PROCESS_ID=0 python -m codegen_jax.cli ...   # on host0
    COORDINATOR=host0:8476 NUM_PROCESSES=2 PROCESS_ID=1 python -m codegen_jax.cli ...   # on host1

then `jax.devices()` lists every host's devices and `sharding.mesh.make_mesh` builds a mesh over all of them
(tp inside a host). On one machine, several processes on the CPU test the same path (tests/test_sharding.py).
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids: list[int] | None = None) -> bool:
    """Joins the job described by the arguments or, when absent, the COORDINATOR / NUM_PROCESSES / PROCESS_ID
    environment variables. Call before any other JAX use. Returns False (and does nothing) for a single process."""
    coordinator = coordinator or os.environ.get("COORDINATOR")
    num_processes = int(num_processes if num_processes is not None else os.environ.get("NUM_PROCESSES", "1"))
    if num_processes <= 1:
        return False
    if process_id is None:
        if "PROCESS_ID" not in os.environ:
            raise ValueError("NUM_PROCESSES > 1 needs PROCESS_ID (0..NUM_PROCESSES-1) for this process")
        process_id = int(os.environ["PROCESS_ID"])
    if not coordinator:
        raise ValueError("NUM_PROCESSES > 1 needs COORDINATOR=host:port (process 0's address)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"PROCESS_ID must be in 0..{num_processes - 1}, got {process_id}")
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU collectives across processes go through gloo (the in-process default cannot cross processes).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return True

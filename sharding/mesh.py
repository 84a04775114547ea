"""Device meshes over (dp, ep, tp) and the interconnect between the devices (NVLink or PCIe).

`tp` is the innermost mesh axis, so on several hosts a tensor-parallel group stays inside one host (its collectives
run every layer); `ep` next, `dp` outermost (data-parallel replicas talk only for training's gradient sums).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("dp", "ep", "tp")
INTERCONNECTS = ("nvlink", "pcie")


def make_mesh(dp: int = 1, tp: int = 1, ep: int = 1, devices=None) -> Mesh:
    """Mesh with axes ('dp', 'ep', 'tp') of sizes (dp, ep, tp) over `devices` (default: all of them, every
    process's). Devices are ordered by (process, id) so each tp group is on one host when tp <= devices per host."""
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("dp", dp), ("tp", tp), ("ep", ep)):
        if size < 1:
            raise ValueError(f"mesh axis {name} must be >= 1, got {size}")
    if dp * ep * tp != len(devices):
        raise ValueError(f"dp*ep*tp = {dp}*{ep}*{tp} = {dp * ep * tp} but {len(devices)} devices are present; "
                         f"pick sizes whose product is the device count")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices, dtype=object).reshape(dp, ep, tp), AXES)


@cache
def interconnect() -> str:
    """'nvlink' or 'pcie' for the local GPUs. JAX does not expose the link, so: CODEGEN_JAX_INTERCONNECT when set,
    else `nvidia-smi topo -m` (NV# between the first two GPUs means NVLink), else 'pcie' (the conservative choice:
    it only makes the strategy overlap more)."""
    forced = os.environ.get("CODEGEN_JAX_INTERCONNECT", "").strip().lower()
    if forced:
        if forced not in INTERCONNECTS:
            raise ValueError(f"CODEGEN_JAX_INTERCONNECT must be one of {INTERCONNECTS}, got {forced!r}")
        return forced
    # NCCL with P2P disabled stages every transfer through the host, whatever the wiring.
    if os.environ.get("NCCL_P2P_DISABLE", "0") not in ("", "0"):
        return "pcie"
    return parse_topology(_nvidia_smi_topo())


def _nvidia_smi_topo() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ""
    try:
        return subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_topology(text: str) -> str:
    """'nvlink' when the GPU0 row of `nvidia-smi topo -m` shows NV<k> to another GPU, else 'pcie'."""
    for line in text.splitlines():
        cells = line.split()
        if line.startswith("GPU0"):  # the row, not the header (which starts with whitespace)
            return "nvlink" if any(c.startswith("NV") for c in cells[1:]) else "pcie"
    return "pcie"

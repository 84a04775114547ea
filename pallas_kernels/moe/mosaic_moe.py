"""Fused MoE for decode on Hopper through Mosaic GPU (`plgpu.kernel`): TMA weight streams into wgmma.

Decode-sized MoE is bound by reading the touched experts' weights, so, as in triton_moe.py, the work is organised
around touched experts, each read once per call however many tokens chose it:

  1. routing in XLA (`reference.route`), the T*K (token, expert) pairs sorted by expert (`group_by_expert`):
     slot s of min(E, T*K) static slots holds one touched expert and the [start, start + count) range of its pairs
     in the sorted order; slots past the touched ones have count 0 and do nothing.
  2. `_gate_up_kernel`, grid (slot, F tile, D split): streams the expert's gate and up tiles [block_k, block_f]
     HBM -> SMEM by TMA through a ring of `num_stages` buffers (loads in flight while one step is multiplied)
     together with the slot's token rows [R, block_k], and multiplies with the weights on the wgmma M side, so
     that a handful of tokens fills the N side (a multiple of 8) instead of wasting a 64-row M:
         G^T[f, r] = Wg^T[f, :] @ X^T[:, r]      U^T[f, r] = Wu^T[f, :] @ X^T[:, r]      h = silu(G) * U
     With one D split the kernel writes h; with several (more programs to cover the SMs at T = 1) it writes
     float32 partial G, U and XLA sums them and applies silu (a few KB at decode).
  3. `_down_kernel`, grid (slot, D tile): O^T[d, r] = w[r] * (Wd^T[d, :] @ h^T[:, r]), w the routing weight.
  4. the combine in XLA: every token gathers its K pair rows and sums them.

Each slot owns R = round_up(T, 8) rows of h and of the down output (layout [S, R, F] and [S, D, R]), so every
program stores whole tiles without masks and never touches another slot's rows. The token rows are copied in
sorted order with each slot's first row 8-aligned (a TMA into 8-row SMEM tiles needs an aligned row offset) and
R zero rows at the end, so a slot's R rows past `count` hold other slots' tokens or zeros: finite, and with
tokens on the N side a column of the product depends only on its own token, so they never mix into live rows;
the combine never gathers them. The down output is float32 [S, D, R] (64 MB at T = 64 with 128 slots): a
masked per-row store would save that write if a GPU profile shows it.

Supported: bf16/f16 activations and weights of the same dtype, T <= 64, D divisible by block_k and block_d, F by
block_f and block_kf (multiples of 64). Int8 `QuantizedWeight`s, larger T and other shapes raise
NotImplementedError for the dispatcher's fallback (the Triton kernel or the reference).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.moe.reference import QuantizedWeight, route
from pallas_kernels.moe.triton_moe import group_by_expert

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_TOKENS = 64  # two [block_f, 64] float32 accumulators per warpgroup; beyond, grouped matmuls do as well
TILE = 64  # 128-byte swizzle of 16-bit elements: tile sides and wgmma M in multiples of 64
MAX_TILE = 256  # a TMA box side
H100_SMS = 132
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on H100/H200


@dataclasses.dataclass(frozen=True)
class MosaicMoEConfig:
    """Tuning of the Mosaic GPU MoE kernels; None fields are picked per shape by `plan`.

    block_f: F columns per gate/up program (the wgmma M side), a multiple of 64 up to 256.
    block_k: D rows per gate/up pipeline step, a multiple of 64 up to 256. None: 128 where it divides D, else 64.
    split_k: D splits of the gate/up stream, each its own program, partial sums combined in XLA. None: the
      fewest (1, 2, 4, ...) giving the expected touched experts x F / block_f x split_k >= one program per SM.
    block_d: D columns per down program (the wgmma M side), a multiple of 64 up to 256.
    block_kf: F rows per down pipeline step, a multiple of 64 up to 256. None: as block_k, over F.
    num_stages: SMEM buffers of the weight ring (tiles in flight while one is multiplied), 2..8.
    """

    block_f: int = 64
    block_k: int | None = None
    split_k: int | None = None
    block_d: int = 64
    block_kf: int | None = None
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_f", "block_k", "block_d", "block_kf"):
            v = getattr(self, name)
            if v is not None and not (0 < v <= MAX_TILE and v % TILE == 0):
                raise ValueError(f"{name}={v} must be a multiple of {TILE} in [{TILE}, {MAX_TILE}]")
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"split_k={self.split_k} must be >= 1")
        if not 2 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages} must be in [2, 8]")


class Plan(NamedTuple):
    """What one call runs: the config with every choice made, plus the derived sizes."""

    rows: int  # R: token rows per slot, the wgmma N side
    num_slots: int  # S = min(E, T * K)
    block_f: int
    block_k: int
    split_k: int
    block_d: int
    block_kf: int
    num_stages: int


def mosaic_available() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x (H100, H200)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def check_supported(x_shape, x_dtype, w_gate, w_up, w_down) -> None:
    """Raises NotImplementedError for what this kernel does not handle (the dispatcher then falls back)."""
    if jnp.dtype(x_dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
        raise NotImplementedError(f"mosaic MoE supports bf16/f16 activations, got {jnp.dtype(x_dtype).name}")
    if any(isinstance(w, QuantizedWeight) for w in (w_gate, w_up, w_down)):
        raise NotImplementedError("mosaic MoE does not take int8 QuantizedWeights (the triton kernel does)")
    for w in (w_gate, w_up, w_down):
        if jnp.dtype(w.dtype) != jnp.dtype(x_dtype):
            raise NotImplementedError(f"expert weights are {jnp.dtype(w.dtype).name}, expected "
                                      f"{jnp.dtype(x_dtype).name} (the activations' dtype)")
    if x_shape[0] > MAX_TOKENS:
        raise NotImplementedError(f"T={x_shape[0]} tokens: the mosaic MoE kernel is for T <= {MAX_TOKENS}")


def _block(n: int, given: int | None, name: str) -> int:
    b = given or (128 if n % 128 == 0 else TILE)
    if n % b:
        raise NotImplementedError(f"{name}={b} does not divide {n} (blocks are multiples of {TILE})")
    return b


def _smem_bytes(R, bf, bk, bd, bkf, stages, itemsize) -> tuple[int, int]:
    gate_up = (stages * (R * bk + 2 * bk * bf) + R * bf) * itemsize + 8 * stages
    down = stages * (R * bkf + bkf * bd) * itemsize + 8 * stages
    return gate_up, down


def plan(T: int, D: int, F: int, E: int, top_k: int, itemsize: int, config: MosaicMoEConfig,
         sms: int = H100_SMS) -> Plan:
    """Fills in the config's open choices for one shape; raises NotImplementedError if it cannot run."""
    if T > MAX_TOKENS:
        raise NotImplementedError(f"T={T} tokens: the mosaic MoE kernel is for T <= {MAX_TOKENS}")
    R = max(8, -(-T // 8) * 8)
    S = min(E, T * top_k)
    bf = _block(F, config.block_f, "block_f")
    bk = _block(D, config.block_k, "block_k")
    bd = _block(D, config.block_d, "block_d")
    bkf = _block(F, config.block_kf, "block_kf")
    nk = D // bk
    split = config.split_k
    if split is None:
        touched = E * (1.0 - (1.0 - top_k / E) ** T)  # expected under uniform routing (exact at T = 1)
        split = 1
        while touched * (F // bf) * split < sms and nk % (2 * split) == 0 and nk // (2 * split) >= 2:
            split *= 2
    if nk % split:
        raise NotImplementedError(f"split_k={split} does not divide the {nk} steps of block_k={bk} over D={D}")
    stages = config.num_stages
    for name, need in zip(("gate/up", "down"), _smem_bytes(R, bf, bk, bd, bkf, stages, itemsize), strict=True):
        if need > SMEM_LIMIT:
            raise NotImplementedError(f"the {name} kernel needs ~{need} bytes of shared memory with {config} at "
                                      f"T={T} (limit {SMEM_LIMIT}): lower the blocks or num_stages")
    return Plan(R, S, bf, bk, split, bd, bkf, stages)


def _silu(g):
    return g / (1.0 + jnp.exp(-g))


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _gate_up_kernel(
    meta_ref,  # [S, 4] int32: expert, first sorted pair, pair count, first row in xs (a multiple of 8)
    xs_ref,  # [Pa, D] each slot's token rows from an 8-aligned row, zeros between and R zero rows after
    wg_ref,  # [E, D, F]
    wu_ref,  # [E, D, F]
    *refs,  # outputs, then scratch (below)
    split_k: int,
    stages: int,
):
    if split_k == 1:
        h_ref, x_smem, wg_smem, wu_smem, h_smem, bars = refs  # h_ref: [S, R, F]; h_smem: [R, BF]
    else:  # g_ref, u_ref: [split_k, S, F, R] float32 partial G^T, U^T
        g_ref, u_ref, x_smem, wg_smem, wu_smem, bars = refs
    # x_smem: [stages, R, BK]; wg_smem, wu_smem: [stages, BK, BF]; bars: one per stage, 3 copies each
    s, fi, ks = lax.axis_index("s"), lax.axis_index("f"), lax.axis_index("k")
    _, R, BK = x_smem.shape
    _, _, BF = wg_smem.shape
    # the slot's rows start 8-aligned: TMA into 8-row SMEM tiles needs the GMEM row offset a multiple of 8
    e, count, start = meta_ref[s, 0], meta_ref[s, 2], pl.multiple_of(meta_ref[s, 3], 8)
    nk = xs_ref.shape[1] // BK // split_k
    nsteps = jnp.where(count > 0, nk, 0)  # an empty slot reads nothing and writes nothing
    f0 = pl.multiple_of(fi * BF, BF)

    def issue(step, slot):
        k0 = pl.multiple_of((ks * nk + step) * BK, BK)
        plgpu.copy_gmem_to_smem(xs_ref.at[pl.ds(start, R), pl.ds(k0, BK)], x_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(wg_ref.at[e, pl.ds(k0, BK), pl.ds(f0, BF)], wg_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(wu_ref.at[e, pl.ds(k0, BK), pl.ds(f0, BF)], wu_smem.at[slot], bars.at[slot])

    for i in range(min(stages, nk)):
        pl.when(i < nsteps)(functools.partial(issue, i, i))

    def body(step, carry):
        g, u = carry
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(bars.at[slot])

        def mm(g_acc, u_acc):
            plgpu.wgmma(g_acc, wg_smem.at[slot].T, x_smem.at[slot].T)
            plgpu.wgmma(u_acc, wu_smem.at[slot].T, x_smem.at[slot].T)
            return g_acc[...], u_acc[...]

        dg, du = pl.run_scoped(mm, plgpu.ACC((BF, R), jnp.float32), plgpu.ACC((BF, R), jnp.float32))
        # both wgmmas have completed (their results were read), so the slot can be refilled
        pl.when(step + stages < nsteps)(lambda: issue(step + stages, slot))
        return g + dg, u + du

    g, u = lax.fori_loop(0, nsteps, body, (_zeros((BF, R)), _zeros((BF, R))))  # [BF, R] G^T, U^T

    @pl.when(count > 0)
    def _store():
        if split_k == 1:
            h_smem.T[...] = (_silu(g) * u).astype(h_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(h_smem, h_ref.at[s, pl.ds(0, R), pl.ds(f0, BF)])
            plgpu.wait_smem_to_gmem(0)
        else:  # straight from registers: partials are tiny next to the weight stream
            g_ref.at[ks, s, pl.ds(f0, BF)][...] = g
            u_ref.at[ks, s, pl.ds(f0, BF)][...] = u


def _down_kernel(
    meta_ref,  # [S, 4] int32
    h_ref,  # [S, R, F] each slot's h rows
    pw_ref,  # [S, R] float32 routing weight of each slot row, 0 past the slot's pairs
    wd_ref,  # [E, F, D]
    o_ref,  # [S, D, R] float32 O^T, weighted
    h_smem,  # [stages, R, BKF]
    wd_smem,  # [stages, BKF, BD]
    pw_smem,  # [R] float32
    pw_bar,
    bars,  # one per stage, 2 copies each
    *,
    stages: int,
):
    s, di = lax.axis_index("s"), lax.axis_index("d")
    _, R, BKF = h_smem.shape
    _, _, BD = wd_smem.shape
    e, count = meta_ref[s, 0], meta_ref[s, 2]
    nk = h_ref.shape[2] // BKF
    nsteps = jnp.where(count > 0, nk, 0)
    d0 = pl.multiple_of(di * BD, BD)

    def issue(step, slot):
        k0 = step * BKF if isinstance(step, int) else pl.multiple_of(step * BKF, BKF)
        plgpu.copy_gmem_to_smem(h_ref.at[s, pl.ds(0, R), pl.ds(k0, BKF)], h_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(wd_ref.at[e, pl.ds(k0, BKF), pl.ds(d0, BD)], wd_smem.at[slot], bars.at[slot])

    for i in range(min(stages, nk)):
        pl.when(i < nsteps)(functools.partial(issue, i, i))
    pl.when(count > 0)(lambda: plgpu.copy_gmem_to_smem(pw_ref.at[s], pw_smem, pw_bar))

    def body(step, acc):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(bars.at[slot])

        def mm(acc_ref):
            plgpu.wgmma(acc_ref, wd_smem.at[slot].T, h_smem.at[slot].T)
            return acc_ref[...]

        acc = acc + pl.run_scoped(mm, plgpu.ACC((BD, R), jnp.float32))
        pl.when(step + stages < nsteps)(lambda: issue(step + stages, slot))
        return acc

    acc = lax.fori_loop(0, nsteps, body, _zeros((BD, R)))  # [BD, R]

    @pl.when(count > 0)
    def _store():
        plgpu.barrier_wait(pw_bar)
        w = plgpu.load(pw_smem, layout=plgpu.Layout.WGMMA.reduce(0))  # [R]
        o_ref.at[s, pl.ds(d0, BD)][...] = acc * lax.broadcast_in_dim(w, (BD, R), [1])


def moe_mosaic(
    x: jax.Array,
    router: jax.Array,
    w_gate: jax.Array | QuantizedWeight,
    w_up: jax.Array | QuantizedWeight,
    w_down: jax.Array | QuantizedWeight,
    *,
    top_k: int,
    norm_topk_prob: bool,
    config: MosaicMoEConfig | dict | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Fused MoE on Hopper through Mosaic GPU; same contract as `moe_reference`.

    Args:
      x: [T, D] bf16/f16 tokens, T <= 64; router: [E, D].
      w_gate, w_up: [E, D, F] in x's dtype; w_down: [E, F, D] in x's dtype.
      config: tuning (a MosaicMoEConfig, or its fields as a dict from the tuned table).
      interpret: False (native), True or `plgpu.InterpretGPUParams` (CPU interpreter).
    Returns:
      [T, D] in x's dtype.
    Raises:
      NotImplementedError for int8 weights, unsupported dtypes, T > 64, or blocks that do not divide D and F.
    """
    config = MosaicMoEConfig(**config) if isinstance(config, dict) else config or MosaicMoEConfig()
    check_supported(x.shape, x.dtype, w_gate, w_up, w_down)
    T, D = x.shape
    E, _, F = w_gate.shape
    sms = H100_SMS if interpret else int(getattr(jax.devices()[0], "core_count", 0) or H100_SMS)
    p = plan(T, D, F, E, top_k, x.dtype.itemsize, config, sms=sms)
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    return _moe(x, router, w_gate, w_up, w_down, top_k=top_k, norm_topk_prob=norm_topk_prob, plan=p,
                interpret=interpret or None)


@functools.partial(jax.jit, static_argnames=("top_k", "norm_topk_prob", "plan", "interpret"))
def _moe(x, router, w_gate, w_up, w_down, *, top_k, norm_topk_prob, plan, interpret):
    T, D = x.shape
    E, _, F = w_gate.shape
    R, S, BF, BK, split_k, BD, BKF, stages = plan
    P = T * top_k
    dtype = x.dtype

    weights, experts = route(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob)  # [T, K]
    order, meta = group_by_expert(experts, E, S)  # order: [P]; meta: [S, 4]
    start, count = meta[:, 1], meta[:, 2]  # empty slots start at P
    # sorted pair q of slot i goes to row xstart[i] + q - start[i] of xs, each slot's first row 8-aligned
    padded = -(-count // 8) * 8
    xstart = jnp.cumsum(padded) - padded  # [S]
    meta = meta.at[:, 3].set(xstart)
    q = jnp.arange(P, dtype=jnp.int32)
    slot_of_q = jnp.searchsorted(start, q, side="right") - 1  # starts ascend; empty slots start at P
    Pa = -(-(P + 7 * S) // 8) * 8 + R  # every slot's R rows stay in bounds
    xs = jnp.zeros((Pa, D), dtype).at[xstart[slot_of_q] + q - start[slot_of_q]].set(
        x[order // top_k], unique_indices=True)  # [Pa, D]
    r = jnp.arange(R, dtype=jnp.int32)[None, :]
    pw_sorted = jnp.pad(weights.reshape(-1)[order], (0, R))
    pw = jnp.where(r < count[:, None], pw_sorted[start[:, None] + r], 0.0)  # [S, R]

    tiled = (plgpu.TilingTransform((8, TILE)), plgpu.SwizzleTransform(128))
    params = plgpu.CompilerParams(approx_math=True)
    f32 = jnp.float32
    gate_up_scratch = (plgpu.SMEM((stages, R, BK), dtype, transforms=tiled),
                       plgpu.SMEM((stages, BK, BF), dtype, transforms=tiled),
                       plgpu.SMEM((stages, BK, BF), dtype, transforms=tiled))
    gate_up_bars = plgpu.Barrier(num_arrivals=3, num_barriers=stages)
    gate_up = functools.partial(_gate_up_kernel, split_k=split_k, stages=stages)
    grid, names = (S, F // BF, split_k), ("s", "f", "k")
    if split_k == 1:
        h = plgpu.kernel(
            gate_up, out_type=jax.ShapeDtypeStruct((S, R, F), dtype),
            scratch_types=(*gate_up_scratch, plgpu.SMEM((R, BF), dtype, transforms=tiled), gate_up_bars),
            grid=grid, grid_names=names, compiler_params=params, interpret=interpret,
        )(meta, xs, w_gate, w_up)  # [S, R, F]
    else:
        partial = jax.ShapeDtypeStruct((split_k, S, F, R), f32)
        g, u = plgpu.kernel(
            gate_up, out_type=(partial, partial), scratch_types=(*gate_up_scratch, gate_up_bars),
            grid=grid, grid_names=names, compiler_params=params, interpret=interpret,
        )(meta, xs, w_gate, w_up)
        g, u = g.sum(0), u.sum(0)  # [S, F, R]
        h = (jax.nn.silu(g) * u).astype(dtype).swapaxes(1, 2)  # [S, R, F]

    o = plgpu.kernel(
        functools.partial(_down_kernel, stages=stages),
        out_type=jax.ShapeDtypeStruct((S, D, R), f32),
        scratch_types=(plgpu.SMEM((stages, R, BKF), dtype, transforms=tiled),
                       plgpu.SMEM((stages, BKF, BD), dtype, transforms=tiled), plgpu.SMEM((R,), f32),
                       plgpu.Barrier(), plgpu.Barrier(num_arrivals=2, num_barriers=stages)),
        grid=(S, D // BD), grid_names=("s", "d"), compiler_params=params, interpret=interpret,
    )(meta, h, pw, w_down)  # [S, D, R]

    # back to token order: flat pair t * K + k sits at sorted position q = inv[t * K + k], row q - start of the
    # slot whose range holds q (starts ascend; empty slots start at P, past every q)
    inv = jnp.zeros((P,), jnp.int32).at[order].set(q)
    slot = slot_of_q[inv]
    out = o[slot, :, inv - start[slot]]  # [P, D]
    return out.reshape(T, top_k, D).sum(axis=1).astype(dtype)

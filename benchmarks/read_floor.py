"""How long it takes just to read N bytes on this GPU, at the sizes of an MoE layer's touched experts: the floor under
any MoE decode kernel, and so the best int8 / bf16 ratio that kernels of a given structure can reach (#4).

For each size and dtype it times, in one process and interleaved (`tuning.time_interleaved`, slope timing):
  xla      jnp.sum of the array in float32 (XLA's reduction);
  triton   a Pallas (Triton) kernel whose programs each load a block of rows and write one partial sum, at the
           fastest of a few block sizes and warp counts;
  mosaic   a Mosaic GPU kernel streaming tiles into shared memory by TMA through a ring of buffers and using none
           of them (the copy engine's floor, without a GEMV's work), over tile sizes, stages and CTA counts;
and then the MoE layer's two-kernel shape: a read of the gate/up bytes, then (depending on it) a read of the down
bytes, for bf16 and int8, per family with each read the family's fastest config of its size. Inputs rotate over
sets that together exceed L2 several times, so every call reads HBM.

    python benchmarks/read_floor.py                   # Qwen3-30B-A3B: hidden 2048, expert FFN 768, top-8
    python benchmarks/read_floor.py --hidden 4096 --ffn 1536

Prints a table (us and GB/s per size) and the floor ratio bf16 / int8; JSON under benchmarks/results/.

Its first H200 run (30ba836; benchmarks/results/logs/read_floor_30b_h200_30ba836.log and _235b_) showed that only
the XLA rows are floors: XLA's sum read bf16 at 2.9-4.4 TB/s and int8 at 1.7-2.4, but the two Pallas readers as
written reached 1.0-1.2 TB/s on bf16 and 0.6-0.7 on int8, below the MoE kernels themselves (bf16 gate/up: 48 MiB
in 19.1 us, 2.6 TB/s). Each Triton program reduces one whole [block_rows, D] tile (one load, nothing pipelined;
int8 twice the values a byte), and the Mosaic ring waits on every tile's barrier in turn. Both runs (30B, 235B)
ended at their 230 s and 200 s limits before the two-kernel stage. From the XLA rows: 24 MiB more bf16 costs
6.6 us (3.8 TB/s) over a fixed ~1.5 us a read."""

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device, versions, write_result  # noqa: E402
from pallas_kernels import tuning  # noqa: E402

ROTATE_BYTES = 400 << 20  # the input sets of one case together: several times the H200's L2


def triton_read(rows: int, cols: int, block_rows: int, warps: int, interpret: bool = False):
    """A kernel reading x [rows, cols] once: program i loads rows [i * block_rows, (i + 1) * block_rows) and writes
    the float32 sum of them (16 copies: a store block of one element is not a power of two above 1 in every path)."""
    grid = rows // block_rows

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.full((16,), jnp.sum(x_ref[...].astype(jnp.float32)))

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((grid * 16,), jnp.float32), grid=(grid,),
                          in_specs=[pl.BlockSpec((block_rows, cols), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((16,), lambda i: (i,)),
                          compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1),
                          interpret=interpret)
    return lambda x: jnp.sum(call(x)[::16])


def mosaic_read(rows: int, cols: int, dtype, block_rows: int, block_cols: int, stages: int, ctas: int,
                interpret: bool = False) -> tuple[Callable, Callable]:
    """A Mosaic GPU kernel that streams x [rows, cols] HBM -> shared memory by TMA, [block_rows, block_cols] tiles
    through a ring of `stages` buffers, and does nothing with them: the memory system's floor, without the work a
    GEMV adds. CTA g takes the contiguous run of steps = blocks / ctas tiles from tile g * steps. To show that every
    copy landed, each CTA writes the first 8 rows of its last tile back (8 * block_cols elements per CTA, ~1-2% of
    the bytes read). Returns (kernel, expected) where expected(x) is the output a correct run gives."""
    nb_c = cols // block_cols
    nblocks = rows // block_rows * nb_c
    if rows % block_rows or cols % block_cols or nblocks % ctas or block_rows % 8:
        raise ValueError(f"tiles {block_rows}x{block_cols} and {ctas} CTAs do not divide [{rows}, {cols}]")
    steps = nblocks // ctas

    def kernel(x_ref, o_ref, smem, bars):
        g = lax.axis_index("g")

        def issue(step, slot):
            b = g * steps + step
            r0 = pl.multiple_of((b // nb_c) * block_rows, block_rows)
            c0 = pl.multiple_of((b % nb_c) * block_cols, block_cols)
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(r0, block_rows), pl.ds(c0, block_cols)], smem.at[slot],
                                    bars.at[slot])

        for i in range(min(stages, steps)):
            issue(i, i)

        def body(step, carry):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(bars.at[slot])
            pl.when(step + stages < steps)(lambda: issue(step + stages, slot))
            return carry

        lax.fori_loop(0, steps, body, 0)
        plgpu.copy_smem_to_gmem(smem.at[(steps - 1) % stages, pl.ds(0, 8)], o_ref.at[g])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ctas, 8, block_cols), dtype),
                        scratch_types=(plgpu.SMEM((stages, block_rows, block_cols), dtype),
                                       plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
                        grid=(ctas,), grid_names=("g",),
                        interpret=plgpu.InterpretGPUParams() if interpret else False)

    def expected(x):
        last = jnp.arange(ctas) * steps + steps - 1
        tiles = x.reshape(rows // block_rows, block_rows, nb_c, block_cols)
        return tiles[last // nb_c, :8, last % nb_c]

    return call, expected


def xla_read(x):
    return jnp.sum(x, dtype=jnp.float32)


def sets_of(rows: int, cols: int, dtype, rotate_bytes: int = ROTATE_BYTES) -> list[tuple]:
    nbytes = rows * cols * jnp.dtype(dtype).itemsize
    key = jax.random.key(0)
    out = []
    for i in range(max(2, math.ceil(rotate_bytes / nbytes))):
        x = jax.random.randint(jax.random.fold_in(key, i), (rows, cols), -8, 8, jnp.int32).astype(dtype)
        out.append((x,))
    return out


def candidates(rows: int, cols: int, dtype, tiny: bool) -> list[tuple[str, Callable, Callable]]:
    """(name, kernel, check) for every kernel config that fits [rows, cols] of dtype; check(x) is True where the
    kernel's output on x is what a read of every byte gives."""
    itemsize = jnp.dtype(dtype).itemsize
    out = []
    triton = [(8, 4)] if tiny else [(br, w) for br in (2, 4, 8, 16, 32) for w in (4, 8)]
    for br, w in triton:
        if rows % br == 0 and br * cols * itemsize <= 64 << 10:
            fn = triton_read(rows, cols, br, w, tiny)
            check = lambda x, fn=fn: _close(float(fn(x)), float(xla_read(x)))
            out.append((f"triton br{br} w{w}", fn, check))
    # Mosaic: tiles of 16 and 32 KB (256-byte rows), 4 or 8 stages, about 1, 2 or 3 CTAs an SM (132 SMs)
    mosaic = [(16, 64 // itemsize, 2, 6)] if tiny else [
        (tr, 256 // itemsize, st, ctas) for tr, st in ((64, 4), (64, 8), (128, 4)) for ctas in (128, 132, 192, 256,
                                                                                                264, 384, 396)]
    seen_per_sm = set()
    for tr, tc, st, ctas in mosaic:
        nblocks = rows // tr * (cols // tc)
        per_sm = round(ctas / 132)
        if rows % tr or cols % tc or nblocks % ctas or (tr, st, per_sm) in seen_per_sm:
            continue
        seen_per_sm.add((tr, st, per_sm))  # one CTA count per (tile, stages, CTAs an SM)
        fn, expected = mosaic_read(rows, cols, dtype, tr, tc, st, ctas, tiny)
        check = lambda x, fn=fn, expected=expected: bool(jnp.array_equal(jax.jit(fn)(x), expected(x)))
        out.append((f"mosaic {tr}x{tc} s{st} c{ctas}", fn, check))
    return out


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-5 * max(abs(want), 1.0)


def link(out, x):
    """x, made to wait for the previous read's output without touching its bytes: both through one optimization
    barrier, so the next read cannot start before the previous one ends (an `x + 0 * out` link would add an XLA
    pass over all of x between the two reads, as many bytes again as the read it precedes)."""
    return lax.optimization_barrier((out, x))[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, the kernels in interpret mode: runs on the CPU")
    args = p.parse_args(argv)

    h, f, k = (64, 48, 2) if args.tiny else (args.hidden, args.ffn, args.top_k)
    rotate = 0 if args.tiny else ROTATE_BYTES
    # rows of `h` columns: gate/up is 2 * f * k rows, down is f * k rows' worth of bytes (as h-wide rows)
    shapes = {"gate_up": 2 * f * k, "down": f * k, "both": 3 * f * k}
    dtypes = {"bf16": jnp.bfloat16, "int8": jnp.int8}
    # tiny: one run of the shortest chains (the interpreter's calls take ms; the figures mean nothing there)
    repeats, target_ms = (1, 0.0) if args.tiny else (args.repeats, 2.0)

    rows_out, best, made = [], {}, {}
    for part, rows in shapes.items():
        for dname, dtype in dtypes.items():
            sets = made[(part, dname)] = sets_of(rows, h, dtype, rotate)
            nbytes = rows * h * jnp.dtype(dtype).itemsize
            cases, kernels = {"xla": (xla_read, sets)}, {}
            for name, fn, check in candidates(rows, h, dtype, args.tiny):
                assert check(sets[0][0]), f"{name} did not read {part} {dname} right"
                cases[name], kernels[name] = (fn, sets), fn
            errors = {}
            timed = tuning.time_interleaved(cases, repeats=repeats, target_ms=target_ms, errors=errors)
            for name, t in timed.items():
                rows_out.append({"part": part, "dtype": dname, "bytes": nbytes, "impl": name, **t,
                                 "gb_s": nbytes / t["us"] / 1e3})
            line = f"{part:8s} {dname:5s} {nbytes / 2**20:7.1f} MiB"
            for family in ("xla", "triton", "mosaic"):
                mine = {n: t for n, t in timed.items() if n.split()[0] == family}
                if mine:
                    name = min(mine, key=lambda n: mine[n]["us"])
                    best[(part, dname, family)] = kernels.get(name)
                    line += f"  {name}: {mine[name]['us']:.2f} us ({nbytes / mine[name]['us'] / 1e3:.0f} GB/s)"
            print(line + (f"  errors {errors}" if errors else ""), flush=True)

    # the MoE layer's two-kernel shape: gate/up bytes, then the down bytes, dependent; per dtype and kernel family,
    # the family's fastest config of each size
    two = {}
    for dname in dtypes:
        gu_sets, dn_sets = made[("gate_up", dname)], made[("down", dname)]  # the inputs the single reads had
        n = max(len(gu_sets), len(dn_sets))
        sets = [(gu_sets[i % len(gu_sets)][0], dn_sets[i % len(dn_sets)][0]) for i in range(n)]
        for family in ("triton", "mosaic"):
            gu, dn = best.get(("gate_up", dname, family)), best.get(("down", dname, family))
            if gu is not None and dn is not None:
                two[f"two-kernel {family} {dname}"] = (lambda a, b, gu=gu, dn=dn: dn(link(gu(a), b))), sets
    errors = {}
    timed = tuning.time_interleaved(two, repeats=repeats, target_ms=target_ms, errors=errors)
    for name, t in timed.items():
        dname = name.split()[-1]
        nbytes = shapes["both"] * h * jnp.dtype(dtypes[dname]).itemsize
        rows_out.append({"part": "two-kernel", "dtype": dname, "bytes": nbytes, "impl": name, **t,
                         "gb_s": nbytes / t["us"] / 1e3})

    print()
    print(f"{'part':10s} {'dtype':5s} {'MiB':>7s} {'impl':26s} {'us':>8s} {'GB/s':>7s}")
    for r in rows_out:
        print(f"{r['part']:10s} {r['dtype']:5s} {r['bytes'] / 2**20:7.1f} {r['impl']:26s} {r['us']:8.2f} "
              f"{r['gb_s']:7.0f}")
    if errors:
        print(f"errors: {errors}")
    one = {d: min(r["us"] for r in rows_out if r["part"] == "both" and r["dtype"] == d) for d in dtypes}
    tw = {d: min(t["us"] for n, t in timed.items() if n.endswith(d)) for d in dtypes}
    ratios = {"one_read": one["bf16"] / one["int8"], "two_kernel": tw["bf16"] / tw["int8"]}
    print(f"floor ratio bf16/int8 (fastest of each): one read {ratios['one_read']:.2f}x, two dependent kernels "
          f"{ratios['two_kernel']:.2f}x")
    if not args.no_write:
        write_result("read_floor", {"args": vars(args), "rows": rows_out, "floor_ratio": ratios,
                                    "device": device(), "versions": versions("jax", "jaxlib")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How long it takes just to read N bytes on this GPU, at the sizes of an MoE layer's touched experts: the floor under
any MoE decode kernel, and so the best int8 / bf16 ratio that kernels of a given structure can reach (#4).

For each size and dtype it times, in one process and interleaved (`tuning.time_interleaved`, slope timing):
  xla      jnp.sum of the array in float32 (XLA's reduction);
  triton   a Pallas (Triton) kernel whose programs each load a block of rows and write one partial sum, at the
           fastest of a few block sizes and warp counts;
and then the MoE layer's two-kernel shape: a read of the gate/up bytes, then (depending on it) a read of the down
bytes, for bf16 and int8, with each read the fastest triton config of its size. Inputs rotate over sets that
together exceed L2 several times, so every call reads HBM.

    python benchmarks/read_floor.py                   # Qwen3-30B-A3B: hidden 2048, expert FFN 768, top-8
    python benchmarks/read_floor.py --hidden 4096 --ffn 1536

Prints a table (us and GB/s per size) and the floor ratio bf16 / int8; JSON under benchmarks/results/."""

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
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
    interpret, rotate = (True, 0) if args.tiny else (False, ROTATE_BYTES)
    # rows of `h` columns: gate/up is 2 * f * k rows, down is f * k rows' worth of bytes (as h-wide rows)
    shapes = {"gate_up": 2 * f * k, "down": f * k, "both": 3 * f * k}
    dtypes = {"bf16": jnp.bfloat16, "int8": jnp.int8}
    configs = [(8, 4)] if args.tiny else [(br, w) for br in (2, 4, 8, 16, 32) for w in (4, 8)]
    # tiny: one run of the shortest chains (the interpreter's calls take ms; the figures mean nothing there)
    repeats, target_ms = (1, 0.0) if args.tiny else (args.repeats, 2.0)

    rows_out, best, config_of = [], {}, {}
    for part, rows in shapes.items():
        for dname, dtype in dtypes.items():
            sets = sets_of(rows, h, dtype, rotate)
            nbytes = rows * h * jnp.dtype(dtype).itemsize
            cases = {"xla": (xla_read, sets)}
            want = float(xla_read(*sets[0]))
            for br, w in configs:
                if rows % br == 0 and br * h * jnp.dtype(dtype).itemsize <= 64 << 10:
                    fn = triton_read(rows, h, br, w, interpret)
                    got = float(jax.jit(fn)(*sets[0]))  # every block read once: the same sum as XLA's
                    assert abs(got - want) <= 1e-5 * max(abs(want), 1.0), (part, dname, br, w, got, want)
                    cases[f"triton br{br} w{w}"] = (fn, sets)
                    config_of[f"triton br{br} w{w}"] = br, w
            errors = {}
            timed = tuning.time_interleaved(cases, repeats=repeats, target_ms=target_ms, errors=errors)
            for name, t in timed.items():
                rows_out.append({"part": part, "dtype": dname, "bytes": nbytes, "impl": name, **t,
                                 "gb_s": nbytes / t["us"] / 1e3})
            tri = {n: t for n, t in timed.items() if n.startswith("triton")}
            name = min(tri, key=lambda n: tri[n]["us"])
            best[(part, dname)] = config_of[name]
            print(f"{part:8s} {dname:5s} {nbytes / 2**20:7.1f} MiB  xla {timed['xla']['us']:7.2f} us "
                  f"({nbytes / timed['xla']['us'] / 1e3:6.0f} GB/s)  best {name}: {tri[name]['us']:7.2f} us "
                  f"({nbytes / tri[name]['us'] / 1e3:6.0f} GB/s)" + (f"  errors {errors}" if errors else ""),
                  flush=True)

    # the MoE layer's two-kernel shape: gate/up bytes, then the down bytes, dependent; per dtype, best configs
    two = {}
    for dname, dtype in dtypes.items():
        fns = []
        for part in ("gate_up", "down"):
            br, w = best[(part, dname)]
            fns.append(triton_read(shapes[part], h, br, w, interpret))
        gu_sets, dn_sets = sets_of(shapes["gate_up"], h, dtype, rotate), sets_of(shapes["down"], h, dtype, rotate)
        n = max(len(gu_sets), len(dn_sets))
        sets = [(gu_sets[i % len(gu_sets)][0], dn_sets[i % len(dn_sets)][0]) for i in range(n)]

        def both(a, b, fns=fns):
            s = fns[0](a)
            return fns[1](b + (s * 0).astype(b.dtype))  # the down read waits for the gate/up read

        two[dname] = both, sets
    timed = tuning.time_interleaved({f"two-kernel {d}": c for d, c in two.items()}, repeats=repeats,
                                    target_ms=target_ms)
    for name, t in timed.items():
        dname = name.split()[1]
        nbytes = shapes["both"] * h * jnp.dtype(dtypes[dname]).itemsize
        rows_out.append({"part": "two-kernel", "dtype": dname, "bytes": nbytes, "impl": name, **t,
                         "gb_s": nbytes / t["us"] / 1e3})

    print()
    print(f"{'part':10s} {'dtype':5s} {'MiB':>7s} {'impl':18s} {'us':>8s} {'GB/s':>7s}")
    for r in rows_out:
        print(f"{r['part']:10s} {r['dtype']:5s} {r['bytes'] / 2**20:7.1f} {r['impl']:18s} {r['us']:8.2f} "
              f"{r['gb_s']:7.0f}")
    one = {d: min(r["us"] for r in rows_out if r["part"] == "both" and r["dtype"] == d) for d in dtypes}
    tw = {d: timed[f"two-kernel {d}"]["us"] for d in dtypes}
    ratios = {"one_read": one["bf16"] / one["int8"], "two_kernel": tw["bf16"] / tw["int8"]}
    print(f"floor ratio bf16/int8: one read {ratios['one_read']:.2f}x, two dependent kernels "
          f"{ratios['two_kernel']:.2f}x")
    if not args.no_write:
        write_result("read_floor", {"args": vars(args), "rows": rows_out, "floor_ratio": ratios,
                                    "device": device(), "versions": versions("jax", "jaxlib")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Probe: where the time of one paged-attention call goes (full op, without the combine, the XLA prep alone)."""
import sys, json, os
sys.path.insert(0, ".")
import jax, jax.numpy as jnp
from benchmarks.attention import make_sets, copies_for, HQ, HKV, D
from pallas_kernels import tuning
from pallas_kernels.attention import mosaic_paged as mp
from pallas_kernels.attention.triton_paged import paged_attention_triton
import pallas_kernels

scale = D ** -0.5
res = {}
orig_combine = mp._combine
def no_combine(o, m, l):
    return o[..., 0, :, :]
for shape in [(1, 32768, 16, 1), (1, 32768, 64, 1), (8, 8192, 16, 1), (8, 8192, 16, 64)]:
    B, L, S, T = shape
    sets = make_sets(B, L, S, T, HQ, HKV, D, copies=copies_for(B, L, S))
    kvb = 2 * B * L * HKV * D * 2
    def full(*a): return mp.paged_attention_mosaic(*a, scale=scale)
    def full_nc(*a):
        return mp._paged_attention.__wrapped__(*a, scale=scale, sliding_window=None, soft_cap=None,
                                              config=mp.MosaicAttentionConfig(), interpret=None)
    def prep(q, k, v, pt, kl, ql):
        G = HQ // HKV
        qt = q.reshape(B, T, HKV, G, D).transpose(0, 2, 1, 3, 4).reshape(B, HKV, T * G, D)
        row_ok = jnp.arange(T)[None, :] < ql[:, None]
        qt = jnp.where(jnp.repeat(row_ok, G, axis=1)[:, None, :, None], qt, 0)
        pos = (kl - ql)[:, None] + jnp.arange(T)[None, :]
        qpos = jnp.repeat(jnp.where(row_ok, pos, -1), G, axis=1)
        ptp = jnp.pad(pt, ((0, 0), (0, 64)))
        return qt, qpos, ptp, jnp.stack([kl, kl, kl - ql], 1)
    def tri(*a): return paged_attention_triton(*a, scale=scale)
    def ours(*a): return pallas_kernels.paged_attention(*a, scale=scale)
    def kvsum(q, k, v, pt, kl, ql): return (k.astype(jnp.float32).sum((1, 2)) + v.astype(jnp.float32).sum((1, 2)))
    cases = {"ours": (ours, sets), "mosaic_full": (full, sets), "triton": (tri, sets), "prep_only": (prep, sets),
             "kv_sum_xla": (kvsum, sets)}
    errs = {}
    t = tuning.time_interleaved(cases, errors=errs)
    print("errors", errs)
    mp._combine = no_combine
    t2 = tuning.time_interleaved({"mosaic_no_combine": (jax.jit(full_nc), sets)}, errors=errs)
    print("errors", errs)
    mp._combine = orig_combine
    t.update(t2)
    res[str(shape)] = {k: round(v["us"], 2) for k, v in t.items()}
    print(shape, {k: (round(v["us"], 1), round(kvb / v["us"] / 1e3)) for k, v in t.items()}, flush=True)
    jax.clear_caches()
if os.environ.get("OUT"):
    json.dump(res, open(os.path.join(os.environ["OUT"], "parts.json"), "w"), indent=1)

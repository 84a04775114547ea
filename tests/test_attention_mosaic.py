"""The Mosaic GPU paged attention kernel against a float64 loop, in the CPU interpreter (natively on a GPU).

Inputs come from `make_case` in test_attention_reference.py: a NaN-poisoned page pool, random page tables
whose unused entries point at NaN pages, NaN query padding. The interpreter fills every buffer the kernel
does not write with NaN (its `uninitialized_memory="nan"`), so a CTA that skips its partial output poisons
the result. These are the kernel's own cases (configs, tiling edges, lowering); the shared contract lives in
the suite over all backends.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from test_attention_reference import check_kernel, check_unused_page_ids_out_of_range

from pallas_kernels.attention.mosaic_paged import MosaicAttentionConfig, paged_attention_mosaic, plan

ON_GPU = jax.default_backend() == "gpu"
TOL = {"bfloat16": 2e-2, "float16": 1e-2}


def _interpret(**kw):
    return False if ON_GPU else plgpu.InterpretGPUParams(**kw)


def _reset_interpreter():
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

    reset_gpu_interpret_mode_state()


@pytest.fixture(autouse=True)
def _clean_interpreter():
    yield
    if not ON_GPU:  # the interpreter keeps global state that an exception leaves half-updated
        _reset_interpreter()


def check(rng, *, dtype="bfloat16", config=None, interpret_kw=None, **kw):
    kernel = functools.partial(paged_attention_mosaic, config=config, interpret=_interpret(**(interpret_kw or {})))
    return check_kernel(kernel, rng, dtype=dtype, tol=TOL[dtype], **kw)


# Decode over GQA ratios 1, 2, 3, 4, 8, 16, every head_dim and page size, both 16-bit dtypes; each row set
# is ragged: a page minus/plus one, an exact multiple, a single token, a random length.
DECODE = [
    # Hq, Hkv, D, S, dtype
    (2, 2, 128, 16, "bfloat16"),
    (4, 2, 64, 32, "bfloat16"),
    (6, 2, 128, 64, "float16"),
    (4, 1, 256, 16, "bfloat16"),
    (16, 2, 128, 128, "bfloat16"),
    (16, 1, 64, 64, "float16"),
    (32, 8, 128, 16, "bfloat16"),
]


@pytest.mark.parametrize("Hq,Hkv,D,S,dtype", DECODE)
def test_decode(rng, Hq, Hkv, D, S, dtype):
    kv_lens = [S - 1, 2 * S, 1, S + 1, int(rng.integers(1, 3 * S + 1))]
    check(rng, T=1, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=[1] * 5, dtype=dtype)


@pytest.mark.parametrize("Hq,Hkv,D,S,T", [(4, 2, 128, 16, 5), (16, 1, 64, 32, 8), (4, 1, 128, 64, 64),
                                          (8, 2, 128, 16, 16)])
def test_verify(rng, Hq, Hkv, D, S, T):
    # up to T draft tokens per row: a full row, a single token, a random count, an empty slot, T - 1
    q_lens = [T, 1, int(rng.integers(1, T + 1)), 0, T - 1]
    kv_lens = [max(T, 2 * S), S + 1, int(rng.integers(q_lens[2], 3 * S + 1)), int(rng.integers(0, 2 * S)),
               int(rng.integers(T - 1, 3 * S + 1))]
    check(rng, T=T, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=q_lens)


def test_chunked_prefill_over_cached_prefix(rng):
    C, S = 24, 16
    q_lens = [C, C, 7, 1]
    prefixes = [int(rng.integers(1, 3 * S)), 0, 2 * S - 3, S]
    check(rng, T=C, Hq=8, Hkv=2, D=128, S=S, kv_lens=[p + n for p, n in zip(prefixes, q_lens, strict=True)],
          q_lens=q_lens)


@pytest.mark.parametrize("window", [1, 19, 64, 1000])
def test_sliding_window(rng, window):
    # the window's first block starts mid-block and mid-split; decode, verify and prefill rows together
    check(rng, T=12, Hq=8, Hkv=2, D=64, S=16, kv_lens=[200, 37, 12, 16, 133], q_lens=[1, 4, 12, 1, 2],
          sliding_window=window, config=MosaicAttentionConfig(num_splits=3))


@pytest.mark.parametrize("soft_cap", [1.0, 30.0])
def test_soft_cap(rng, soft_cap):
    check(rng, T=6, Hq=4, Hkv=1, D=128, S=32, kv_lens=[150, 20, 6], q_lens=[1, 3, 6], soft_cap=soft_cap,
          q_scale=4.0)


def test_sliding_window_and_soft_cap(rng):
    check(rng, T=8, Hq=16, Hkv=2, D=64, S=32, kv_lens=[100, 8, 33], q_lens=[8, 8, 2], sliding_window=24,
          soft_cap=10.0, q_scale=3.0)


CONFIGS = [
    MosaicAttentionConfig(block_kv=128, num_stages=2),  # several pages per block, two stages
    MosaicAttentionConfig(num_splits=1, num_stages=4),  # one split walks the whole sequence
    MosaicAttentionConfig(num_splits=64),  # more splits than blocks: most CTAs have nothing to do
    MosaicAttentionConfig(block_q=8, num_splits=2),  # 3 query tiles per KV head, split boundary mid-row
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"bkv{c.block_kv}-bq{c.block_q}-s{c.num_splits}"
                                                          f"-st{c.num_stages}")
def test_configs(rng, config):
    check(rng, T=3, Hq=8, Hkv=1, D=128, S=16, kv_lens=[300, 17, 64, 5, 0], q_lens=[3, 1, 2, 3, 0],
          config=config)


VERIFY_CONFIGS = [
    MosaicAttentionConfig(q_warpgroups=2, num_splits=1),  # two warpgroups taking turns, normalised in the kernel
    MosaicAttentionConfig(q_warpgroups=1, num_splits=1, block_kv=128, num_stages=2),
    MosaicAttentionConfig(q_warpgroups=2, num_splits=3, num_stages=4),  # several splits: the combine step
    MosaicAttentionConfig(q_warpgroups=3, num_splits=2),
    # K handed back after the QK matmul, V after PV; the softmax fenced off from the turn taking
    MosaicAttentionConfig(q_warpgroups=2, num_splits=1, release_k=True, fence_softmax=True),
    MosaicAttentionConfig(q_warpgroups=1, num_splits=2, num_stages=3, release_k=True),
]


@pytest.mark.parametrize("config", VERIFY_CONFIGS, ids=lambda c: f"wg{c.q_warpgroups}-bkv{c.block_kv}"
                                                                 f"-s{c.num_splits}-st{c.num_stages}"
                                                                 f"{'-rk' if c.release_k else ''}"
                                                                 f"{'-fs' if c.fence_softmax else ''}")
def test_verify_layout_configs(rng, config):
    # 80 query rows per KV head (20 tokens x 4 heads): the verify layout; long prefixes (whole blocks that skip
    # the mask), a prefix ending mid-block, a single new token, an empty slot
    check(rng, T=20, Hq=8, Hkv=2, D=128, S=16, kv_lens=[300, 45, 20, 0, 161], q_lens=[20, 13, 20, 0, 1],
          config=config)


def test_page_larger_than_block(rng):
    # 128-token pages copied in two 64-token slices per page
    check(rng, T=2, Hq=4, Hkv=2, D=128, S=128, kv_lens=[127, 128, 129, 300, 2], q_lens=[1, 2, 1, 2, 2])


def test_empty_slots_are_exactly_zero(rng):
    got = check(rng, T=4, Hq=8, Hkv=2, D=128, S=16, kv_lens=[40, 0, 17, 0, 25], q_lens=[3, 0, 1, 0, 0])
    assert np.all(got[[1, 3, 4]] == 0)


def test_all_slots_empty(rng):
    got = check(rng, T=2, Hq=4, Hkv=1, D=64, S=16, kv_lens=[0, 0, 0], q_lens=[0, 0, 0])
    assert np.all(got == 0)


def test_unused_page_table_entries_out_of_range(rng):
    check_unused_page_ids_out_of_range(functools.partial(paged_attention_mosaic, interpret=_interpret()), rng)


@pytest.mark.skipif(ON_GPU, reason="race detection is an interpreter feature")
def test_no_races_in_the_pipeline(rng):
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    check(rng, T=2, Hq=4, Hkv=2, D=64, S=16, kv_lens=[300, 5], q_lens=[2, 1],
          config=MosaicAttentionConfig(num_splits=2, num_stages=2), interpret_kw={"detect_races": True})
    assert not get_races().races_found


@pytest.mark.parametrize(("dtype", "D", "S"), [("float32", 128, 16), ("bfloat16", 96, 16),
                                               ("bfloat16", 128, 24)])
def test_unsupported_raise_not_implemented(dtype, D, S):
    q = jnp.zeros((1, 1, 4, D), dtype)
    kp = jnp.zeros((2, 3, S, D), dtype)
    pt, lens = jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(NotImplementedError):
        paged_attention_mosaic(q, kp, kp, pt, lens, lens, scale=0.1, interpret=_interpret())


@pytest.mark.parametrize("kw", [{"block_kv": 48}, {"block_q": 12}, {"block_q": 512}, {"num_splits": 0},
                                {"num_stages": 1}])
def test_config_validates_itself(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        MosaicAttentionConfig(**kw)


def test_plan_fits_shared_memory_or_says_why():
    # head_dim 256 with deep pipelining does not fit: a clear NotImplementedError, not a compile failure
    with pytest.raises(NotImplementedError, match="shared memory"):
        plan((8, 64, 32, 256), (8, 100, 16, 256), 64, 2, MosaicAttentionConfig(block_kv=128, num_stages=4))
    p = plan((8, 1, 32, 128), (8, 4097, 16, 128), 512, 2, MosaicAttentionConfig())
    assert p.rows == 8 and p.q_warpgroups == 0 and p.num_q_tiles == 1 and p.num_splits * 8 * 8 >= 132


# (B, T, Hq, Hkv, D, S, N): the benchmark's shapes at reduced batch, plus the extremes of every knob
LOWERING = [
    (8, 1, 32, 8, 128, 16, 2048),  # page slice > 256 ids: a bulk copy, not a TMA box
    (1, 1, 32, 8, 128, 64, 512),
    (8, 64, 32, 8, 128, 16, 512),
    (2, 16, 16, 1, 256, 128, 8),
    (2, 3, 12, 4, 64, 32, 8),
]


@pytest.mark.skipif(ON_GPU, reason="the GPU compiles for real in the other tests")
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,N", LOWERING)
def test_lowers_for_cuda(B, T, Hq, Hkv, D, S, N):
    # Mosaic GPU's own lowering (layout inference, wgmma/TMA checks) runs on the CPU for a cuda target; this
    # catches what the interpreter ignores. Only ptxas and the run itself are left for the GPU.
    sds = jax.ShapeDtypeStruct
    P = B * N + 1
    args = (sds((B, T, Hq, D), jnp.bfloat16), sds((Hkv, P, S, D), jnp.bfloat16),
            sds((Hkv, P, S, D), jnp.bfloat16), sds((B, N), jnp.int32), sds((B,), jnp.int32), sds((B,), jnp.int32))
    for kw in ({}, {"sliding_window": 100, "soft_cap": 30.0},
               {"config": MosaicAttentionConfig(release_k=True, fence_softmax=True)}):
        fn = jax.jit(lambda *a, kw=kw: paged_attention_mosaic(*a, scale=D ** -0.5, **kw))
        fn.trace(*args).lower(lowering_platforms=("cuda",))

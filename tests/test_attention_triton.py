"""The Triton paged attention kernel against a float64 loop, in the Pallas interpreter (natively on a GPU).

Inputs come from `make_case` in test_attention_reference.py: a NaN-poisoned page pool, random page tables
whose unused entries point at NaN pages, NaN query padding. The interpreter fills every output buffer with
NaN before the kernel runs (`uninitialized_value`), so a program that skips its partial output poisons the
result. The interpreter cannot compile for Triton, so `test_lowers_to_triton` lowers the benchmark's shapes
for a CUDA target on the CPU (power-of-two blocks, supported ops); only Triton's own compiler is left for the
GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_reference import check_kernel, check_unused_page_ids_out_of_range

from pallas_kernels.attention import IMPLEMENTATIONS
from pallas_kernels.attention.dispatch import choose
from pallas_kernels.attention.triton_paged import (
    TritonAttentionConfig,
    paged_attention_triton,
    plan,
    trim_splits,
    triton_available,
)

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TOL = {"bfloat16": 2e-2, "float16": 1e-2}


def check(rng, *, dtype="bfloat16", config=None, **kw):
    kernel = functools.partial(paged_attention_triton, config=config, interpret=INTERPRET)
    return check_kernel(kernel, rng, dtype=dtype, tol=TOL[dtype], **kw)


# Decode over GQA ratios 1, 2, 4, 8, 16 (and 3), every head_dim and page size, both 16-bit dtypes; each row
# set is ragged: a page minus one, exactly a page, a page plus one, a single token, a random length.
DECODE = [
    # Hq, Hkv, D, S, dtype
    (2, 2, 128, 16, "bfloat16"),
    (4, 2, 64, 32, "bfloat16"),
    (6, 2, 128, 64, "float16"),
    (4, 1, 256, 16, "bfloat16"),
    (16, 2, 128, 128, "bfloat16"),
    (16, 1, 64, 64, "float16"),
    (32, 2, 256, 32, "bfloat16"),
]


@pytest.mark.parametrize("Hq,Hkv,D,S,dtype", DECODE)
def test_decode(rng, Hq, Hkv, D, S, dtype):
    kv_lens = [S - 1, S, S + 1, 1, int(rng.integers(1, 3 * S + 1))]
    check(rng, T=1, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=[1] * 5, dtype=dtype)


# verify: T * G query rows per KV head, in one tile (12, 32 rows) or several (64 rows, 128 rows at block_q 64)
@pytest.mark.parametrize("Hq,Hkv,D,S,T", [(8, 2, 128, 16, 3), (8, 4, 64, 32, 16), (16, 2, 128, 16, 16),
                                          (2, 1, 64, 64, 64)])
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
    check(rng, T=C, Hq=4, Hkv=2, D=128, S=S, kv_lens=[p + n for p, n in zip(prefixes, q_lens, strict=True)],
          q_lens=q_lens, config=TritonAttentionConfig(block_q=16, num_splits=2))


@pytest.mark.parametrize("window", [1, 19, 64, 1000])
def test_sliding_window(rng, window):
    # the window's first block starts mid-block and mid-split; decode, verify and prefill rows together
    check(rng, T=12, Hq=4, Hkv=2, D=64, S=16, kv_lens=[200, 37, 12, 16, 133], q_lens=[1, 4, 12, 1, 2],
          sliding_window=window, config=TritonAttentionConfig(num_splits=3))


@pytest.mark.parametrize("soft_cap", [1.0, 30.0])
def test_soft_cap(rng, soft_cap):
    check(rng, T=6, Hq=4, Hkv=1, D=128, S=32, kv_lens=[150, 20, 6], q_lens=[1, 3, 6], soft_cap=soft_cap,
          q_scale=4.0)


def test_sliding_window_and_soft_cap(rng):
    check(rng, T=8, Hq=16, Hkv=2, D=64, S=32, kv_lens=[100, 8, 33], q_lens=[8, 8, 2], sliding_window=24,
          soft_cap=10.0, q_scale=3.0, config=TritonAttentionConfig(block_q=32))


CONFIGS = [
    TritonAttentionConfig(pages_per_block=1, num_splits=1),  # one page per block, one split walks it all
    TritonAttentionConfig(pages_per_block=8, num_splits=2, num_warps=8, num_stages=3),  # 128-token blocks
    TritonAttentionConfig(num_splits=64),  # more splits than blocks: most programs have nothing to do
    TritonAttentionConfig(block_q=16, pages_per_block=2, num_splits=3),  # 2 query tiles, split mid-row
    # one split normalises in the kernel and stores into [B, T, Hq, D]; the last of 2 tiles repeats its last row
    TritonAttentionConfig(block_q=16, num_splits=1),
    # several splits merged by the last split of each tile to arrive instead of XLA's combine passes
    TritonAttentionConfig(block_q=16, num_splits=3, combine_in_kernel=True),
    TritonAttentionConfig(num_splits=64, combine_in_kernel=True),  # splits with nothing to do arrive too
    # V loaded beside K: one split over many blocks, and merged in the kernel over 2 query tiles
    TritonAttentionConfig(pages_per_block=1, num_splits=1, early_v=True),
    TritonAttentionConfig(block_q=16, num_splits=3, combine_in_kernel=True, early_v=True),
    # the splits merged by a second kernel, one program per query tile (2 tiles here), instead of XLA's passes
    TritonAttentionConfig(block_q=16, num_splits=3, combine_kernel=True),
    TritonAttentionConfig(num_splits=64, combine_kernel=True, early_v=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"ppb{c.pages_per_block}-bq{c.block_q}-s{c.num_splits}"
                                                          f"-w{c.num_warps}-st{c.num_stages}"
                                                          f"{'-combine_in_kernel' if c.combine_in_kernel else ''}"
                                                          f"{'-early_v' if c.early_v else ''}"
                                                          f"{'-combine_kernel' if c.combine_kernel else ''}")
def test_configs(rng, config):
    check(rng, T=3, Hq=8, Hkv=1, D=128, S=16, kv_lens=[300, 17, 64, 5, 0], q_lens=[3, 1, 2, 3, 0],
          config=config)


# the in-kernel merge at decode: the group's G rows (rounded to a power of two) of a 16-row tile, the splits in
# chunks of MERGE_VALUES // (rows * D): one partial chunk (5 splits), several with the last one partial (40
# splits of 16-split chunks at G=4, D=128), every split its own chunk (G=16, D=256: 2 splits a chunk)
@pytest.mark.parametrize("Hq,Hkv,D,S,splits", [(8, 2, 128, 16, 5), (8, 2, 128, 16, 40), (2, 2, 64, 32, 7),
                                                (16, 1, 256, 16, 9)])
@pytest.mark.parametrize("mode", ["combine_in_kernel", "combine_kernel"])
def test_decode_combine_in_kernel(rng, Hq, Hkv, D, S, splits, mode):
    # (and the same merge run by a second kernel after the first: combine_kernel)
    kv_lens = [S - 1, 40 * S + 3, S + 1, 1, 0, int(rng.integers(1, 12 * S + 1))]
    q_lens = [1, 1, 1, 1, 0, 1]
    config = TritonAttentionConfig(pages_per_block=1, num_splits=splits, **{mode: True})
    check(rng, T=1, Hq=Hq, Hkv=Hkv, D=D, S=S, kv_lens=kv_lens, q_lens=q_lens, config=config)


def test_empty_slots_are_exactly_zero(rng):
    got = check(rng, T=4, Hq=8, Hkv=2, D=128, S=16, kv_lens=[40, 0, 17, 0, 25], q_lens=[3, 0, 1, 0, 0])
    assert np.all(got[[1, 3, 4]] == 0)


def test_all_slots_empty(rng):
    got = check(rng, T=2, Hq=4, Hkv=1, D=64, S=16, kv_lens=[0, 0, 0], q_lens=[0, 0, 0])
    assert np.all(got == 0)


def test_unused_page_table_entries_out_of_range(rng):
    kernel = functools.partial(paged_attention_triton, config=TritonAttentionConfig(pages_per_block=4),
                               interpret=INTERPRET)
    check_unused_page_ids_out_of_range(kernel, rng)


@pytest.mark.parametrize(("dtype", "D", "S", "config"), [
    ("float32", 128, 16, None),
    ("bfloat16", 96, 16, None),  # head_dim not a power of two
    ("bfloat16", 128, 24, None),  # page size not a power of two
    ("bfloat16", 64, 128, TritonAttentionConfig(pages_per_block=8)),  # 1024-token blocks
])
def test_unsupported_raise_not_implemented(dtype, D, S, config):
    q = jnp.zeros((1, 1, 4, D), dtype)
    kp = jnp.zeros((2, 3, S, D), dtype)
    pt, lens = jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(NotImplementedError):
        paged_attention_triton(q, kp, kp, pt, lens, lens, scale=0.1, config=config, interpret=INTERPRET)


@pytest.mark.parametrize("kw", [{"pages_per_block": 3}, {"pages_per_block": 128}, {"block_q": 8},
                                {"block_q": 48}, {"block_q": 256}, {"num_splits": 0}, {"num_warps": 3},
                                {"num_stages": 0}, {"combine_kernel": True, "combine_in_kernel": True}])
def test_config_validates_itself(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        TritonAttentionConfig(**kw)


def test_plan_defaults():
    c = TritonAttentionConfig()
    # decode, GQA 4: the group padded to 16 rows, 64-token blocks of 4 pages, about two programs per SM
    p = plan((8, 1, 32, 128), (8, 4097, 16, 128), 512, c, sms=132)
    assert (p.block_q, p.num_q_tiles, p.pages_per_block, p.block_kv, p.num_warps) == (16, 1, 4, 64, 4)
    assert p.num_splits == 5
    # verify with 64 tokens x GQA 4 = 256 rows: four tiles of 64; pages larger than a block: one page
    p = plan((8, 64, 32, 128), (8, 4097, 128, 128), 64, c, sms=132)
    assert (p.block_q, p.num_q_tiles, p.pages_per_block, p.block_kv, p.num_splits) == (64, 4, 1, 128, 2)
    assert p.num_warps == 8
    # head_dim 256: 32-row tiles and 32-token blocks keep the accumulator and logits in registers
    p = plan((2, 16, 16, 256), (1, 100, 16, 256), 8, c, sms=132)
    assert (p.block_q, p.num_q_tiles, p.block_kv) == (32, 8, 32)
    # small pages are grouped up to the dot's 16-token minimum; splits never exceed the blocks
    p = plan((1, 1, 8, 256), (1, 10, 8, 256), 3, TritonAttentionConfig(pages_per_block=1), sms=132)
    assert (p.pages_per_block, p.block_kv, p.num_splits) == (2, 16, 2)
    # B=1, 32k tokens: 512 blocks over about 264 programs' worth of splits (33) is 16 blocks each, which 32 cover
    p = plan((1, 1, 32, 128), (8, 2049, 16, 128), 2048, c, sms=132)
    assert (p.block_kv, p.num_splits) == (64, 32)
    # 7 blocks at 5 splits would be 2, 2, 2, 1, 0: 4 splits of 2 blocks; a config's own count is kept
    p = plan((8, 1, 32, 128), (8, 57, 64, 128), 7, c, sms=132)
    assert (p.block_kv, p.num_splits) == (64, 4)
    assert plan((8, 1, 32, 128), (8, 57, 64, 128), 7, TritonAttentionConfig(num_splits=5), sms=132).num_splits == 5


def test_trim_splits_and_the_tuners_merge_counts(monkeypatch):
    import sys
    from pathlib import Path

    from pallas_kernels.attention import triton_paged

    assert [trim_splits(512, n) for n in (33, 32, 64, 66, 1, 600)] == [32, 32, 64, 64, 1, 512]
    assert [trim_splits(128, n) for n in (5, 6, 8, 9, 12, 13)] == [5, 6, 8, 9, 12, 13]
    assert [trim_splits(100, n) for n in (30, 40, 99)] == [25, 34, 50]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, as tests/test_plot.py
    from benchmarks.attention import triton_candidates

    # the search proposes, on an H200's 132 SMs, the split counts that won the sweep (attn_splits_h200_7d60785):
    # 6 and 8 at B=8 L=8k, 64 at B=1 L=32k; each merge count is trimmed, and every candidate plans
    monkeypatch.setattr(triton_paged, "_sm_count", lambda: 132)
    want_base = {8: 5, 1: 32}
    for (B, L, S, T), want in [((8, 8192, 16, 1), {6, 8}), ((8, 8192, 64, 1), {6, 8}), ((1, 32768, 16, 1), {64})]:
        N = L // S
        cands = triton_candidates((B, L, S, T), N)
        blocks = L // 64
        merge = {c.get("num_splits", 5 if B == 8 else 32) for c in cands if c.get("combine_in_kernel")}
        assert want <= merge and all(trim_splits(blocks, n) == n for n in merge), merge
        # V beside K, alone and with the merge at fewer, longer splits
        assert {"early_v": True} in cands and len({c.get("num_splits") for c in cands if c.get("early_v")}) >= 3
        # the second-kernel merge, with and without V beside K
        assert {"combine_kernel": True} in cands and {"combine_kernel": True, "early_v": True} in cands
        # and at twice and four times the default splits (B=1: 32 on 132 SMs), trimmed and within the KV's blocks
        more = {c["num_splits"] for c in cands if c.get("combine_kernel") and c.get("num_splits", 0) > want_base[B]}
        assert more == ({64, 128} if B == 1 else {10, 19}), more
        for c in cands:
            plan((B, T, 32, 128), (8, B * N + 1, S, 128), N, TritonAttentionConfig(**c))


@pytest.mark.parametrize("argv,field", [(["--tune-only"], "--tune-only"),
                                        (["--tune", "--tune-impls", "triton,cuda"], "--tune-impls"),
                                        (["--tune", "--tune-impls", ","], "--tune-impls"),
                                        (["--tune", "--tune-configs", "[[triton"], "--tune-configs"),
                                        (["--tune", "--tune-configs", '[["cuda", {}]]'], "--tune-configs"),
                                        (["--tune", "--tune-configs", '[["triton", {"num_stages": 0}]]'],
                                         "--tune-configs"),
                                        (["--tune", "--tune-configs", '[["mosaic", {"warps": 4}]]'],
                                         "--tune-configs"),
                                        (["--tune-configs", '[["triton", {}]]'], "--tune-configs")])
def test_benchmark_rejects_bad_tune_options(argv, field):
    # benchmarks/attention.py: a bad tune option is exit code 2 and one line naming it, before any work
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "benchmarks/attention.py", *argv], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and field in p.stderr.strip().splitlines()[-1], p.stderr


def test_tune_configs_are_the_searchs_only_proposals(monkeypatch):
    # benchmarks/attention.py --tune-configs: the search is handed exactly the configs given, in order (and would be
    # handed the table's entry after them); without it, every kernel's proposals of --tune-impls
    import argparse
    import sys
    from pathlib import Path

    from pallas_kernels import tuning

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import attention as bench

    given = bench.parse_configs('[["triton", {"num_stages": 1, "combine_kernel": true}], ["mosaic", {}]]')
    assert given == [("triton", {"num_stages": 1, "combine_kernel": True}), ("mosaic", {})]
    seen = []
    monkeypatch.setattr(tuning, "search", lambda cands, *a, **k: (seen.append([(c.impl, c.config) for c in cands]),
                                                                  (None, []))[1])
    shape = (2, 128, 16, 1)
    bench.tune([shape], argparse.Namespace(tune_configs=given, tune_impls=("mosaic", "triton")))
    bench.tune([shape], argparse.Namespace(tune_configs=None, tune_impls=("triton",)))
    assert seen[0] == given
    assert seen[1] == [("triton", c) for c in bench.triton_candidates(shape, 128 // 16)]


def test_benchmark_summary_flags_a_stale_entry():
    # benchmarks/attention.py: ours over jax_paged and over our kernels' faster default plan; a shape where the
    # tuned entry lost to a default plan (B=8 L=2k page 16 in attn_b8_h200_2e4775d.log: 30.08 against 27.56) is
    # named, a shape where it won (or no default plan ran) is not
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.attention import stale, summarize

    def row(B, impl, us, ok=True):
        return {"B": B, "L": 2048, "page": 16, "T": 1, "impl": impl, "us": us, "ok": ok, "GB/s": 1.0}

    rows = [row(8, "ours", 30.08), row(8, "triton", 27.56), row(8, "mosaic", 33.3), row(8, "jax_paged", 50.64),
            row(1, "ours", 12.9), row(1, "triton", 14.0), row(1, "mosaic", 9.0, ok=False), row(1, "jax_paged", 15.08),
            row(32, "ours", 80.0), row(32, "jax_paged", 150.0)]
    lines = {line["B"]: line for line in summarize(rows)}
    assert lines[8]["ours/jax_paged"] == 1.68 and lines[8]["ours/default"] == 0.92
    assert lines[1]["ours/default"] == 1.09  # the failed Mosaic trial is not a default to beat
    assert "ours/default" not in lines[32]
    (message,) = stale(list(lines.values()))
    assert message.startswith("stale: B=8 L=2048 page=16 T=1") and "0.92" in message


def test_picked_on_nvidia_and_for_hopper_decode(monkeypatch):
    fn, _ = IMPLEMENTATIONS["triton"]
    assert fn is paged_attention_triton

    class Dev:
        platform = "gpu"
        compute_capability = "8.0"

    for cc, want in [("8.0", True), ("8.9", True), ("12.0", True), ("9.0", False), ("gfx90a", False)]:
        Dev.compute_capability = cc
        monkeypatch.setattr(jax, "devices", lambda *a, **k: [Dev()])
        assert triton_available() is want, cc
    decode, verify = (jnp.zeros((2, 1, 8, 64)),) * 5, (jnp.zeros((2, 4, 8, 64)),) * 5
    # (compute capability, pick for decode, pick for verify, pick without arguments)
    for cc, picks in [("8.0", ("triton", "triton", "triton")), ("9.0", ("triton", "mosaic", "mosaic")),
                      ("gfx90a", ("reference",) * 3)]:
        Dev.compute_capability = cc
        monkeypatch.setattr(jax, "devices", lambda *a, **k: [Dev()])
        assert (choose(decode), choose(verify), choose()) == picks, cc
    monkeypatch.undo()
    assert triton_available() is (ON_GPU and not str(jax.devices()[0].compute_capability).startswith("9"))
    assert choose(decode) == ("triton" if ON_GPU else "reference")


# (B, T, Hq, Hkv, D, S, N): the benchmark's shapes at reduced batch, plus the extremes of every knob
LOWERING = [
    (8, 1, 32, 8, 128, 16, 512),
    (1, 1, 32, 8, 128, 64, 128),
    (8, 64, 32, 8, 128, 16, 128),
    (2, 16, 16, 1, 256, 128, 8),
    (2, 3, 12, 4, 64, 32, 8),
]


@pytest.mark.skipif(ON_GPU, reason="the GPU compiles for real in the other tests")
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,N", LOWERING)
def test_lowers_to_triton(B, T, Hq, Hkv, D, S, N):
    # Pallas' Triton lowering (power-of-two blocks, dot shapes, supported ops) runs on the CPU for a CUDA
    # target given an abstract GPU; this catches what the interpreter ignores.
    from jax._src.mesh import AbstractDevice
    from jax.sharding import AbstractMesh

    sds = jax.ShapeDtypeStruct
    P = B * N + 1
    args = (sds((B, T, Hq, D), jnp.bfloat16), sds((Hkv, P, S, D), jnp.bfloat16),
            sds((Hkv, P, S, D), jnp.bfloat16), sds((B, N), jnp.int32), sds((B,), jnp.int32), sds((B,), jnp.int32))
    a100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA A100-SXM4-80GB", 108, "gpu"))
    with jax.sharding.use_abstract_mesh(a100):
        for kw in ({}, {"sliding_window": 100, "soft_cap": 30.0},
                   {"config": TritonAttentionConfig(combine_in_kernel=True)},
                   {"config": TritonAttentionConfig(combine_in_kernel=True, early_v=True)},
                   {"config": TritonAttentionConfig(combine_kernel=True)}):
            fn = jax.jit(lambda *a, kw=kw: paged_attention_triton(*a, scale=D ** -0.5, **kw))
            text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert "__gpu$xla.gpu.triton" in text


def test_tuned_entries_are_candidates_of_the_search():
    # every entry of the committed attention table still builds as the search loop's candidate (the tune times
    # the table's entry beside its candidates: tuning.with_incumbent)
    import sys
    from pathlib import Path

    from conftest import tuned_entries

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, as tests/test_plot.py
    from benchmarks.attention import candidate

    for e in tuned_entries("paged_attention"):
        c = candidate(e["impl"], e["config"], 0.1)
        assert (c.impl, c.config) == (e["impl"], e["config"])

"""The Mosaic GPU MoE kernel against `moe_reference`, in the Mosaic GPU interpreter on the CPU (natively on a GPU).

Inputs are bf16 with the experts no token chose NaN-filled (reading one would poison the output), and the
interpreter fills every buffer the kernel does not write with NaN (its `uninitialized_memory="nan"`), so a slot
row or tile the kernel skips, or a padding row the combine gathers, poisons the result: NaN never passes.
`test_lowers_for_cuda` runs Mosaic GPU's own lowering (layout inference, wgmma and TMA checks) for a CUDA target
at the benchmark's real shapes, which the interpreter does not check; ptxas and the run are left for the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from test_moe_reference import hot_expert, make_inputs

from pallas_kernels.moe import IMPLEMENTATIONS, dispatch, moe_reference, quantize_int8
from pallas_kernels.moe.mosaic_moe import MAX_TOKENS, MosaicMoEConfig, moe_mosaic, mosaic_available, plan
from pallas_kernels.moe.reference import route

ON_GPU = jax.default_backend() == "gpu"
TOL = 2e-2  # max |diff| / max |ref|: bf16 h and outputs, float32 accumulation in both


def _interpret(**kw):
    return False if ON_GPU else plgpu.InterpretGPUParams(**kw)


@pytest.fixture(autouse=True)
def _clean_interpreter():
    yield
    if not ON_GPU:  # the interpreter keeps global state that an exception leaves half-updated
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

        reset_gpu_interpret_mode_state()


@functools.partial(jax.jit, static_argnames=("top_k",))
def _reference(x, router, wg, wu, wd, *, top_k):
    return moe_reference(x, router, wg, wu, wd, top_k=top_k, norm_topk_prob=True)


def check(rng, T, E, top_k, D, F, *, bias=None, config=None, interpret_kw=None):
    """Kernel (unchosen experts NaN) against the reference (clean weights); returns the [T, K] expert ids."""
    x, router, *ws = make_inputs(rng, T, E, D, F, top_k, bias)
    x, router, *ws = (jnp.asarray(a, jnp.bfloat16) for a in (x, router, *ws))
    want = np.asarray(_reference(x, router, *ws, top_k=top_k).astype(jnp.float32), np.float64)
    experts = np.asarray(route(x, router, top_k=top_k, norm_topk_prob=True)[1])
    unused = np.setdiff1d(np.arange(E), experts)
    poisoned = [w.at[unused].set(jnp.nan) for w in ws]
    got = moe_mosaic(x, router, *poisoned, top_k=top_k, norm_topk_prob=True, config=config,
                     interpret=_interpret(**(interpret_kw or {})))
    assert got.shape == (T, D) and got.dtype == jnp.bfloat16
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.isfinite(got).all(), "NaN/inf leaked into the output"
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= TOL, f"max rel err {err:.3g} > {TOL}"
    return experts


# (E, top_k, D, F): Qwen3-30B-A3B's routing (128 experts, top-8) at reduced D/F, and a small config
SMALL = (8, 2, 128, 128)
QWEN = (128, 8, 128, 64)


@pytest.mark.parametrize("T", [1, 7, 16, 64])
def test_small(rng, T):
    check(rng, T, *SMALL)


@pytest.mark.parametrize("T", [1, 7, 16, 64])
def test_qwen3_30b_a3b_routing(rng, T):
    # T >= 16: all 128 slots in the grid; at 16 most touched experts hold one row and some slots are empty
    check(rng, T, *QWEN)


def test_one_expert_chosen_by_every_token_and_some_by_none(rng):
    # the hot slot holds all 16 pairs (count == R, every N column live); of 8 experts with 32 pairs over 16
    # tokens, the rest share 16 pairs: some are usually left out, and those are NaN
    hot = int(rng.integers(8))
    experts = check(rng, 16, *SMALL, bias=hot_expert(hot))
    assert (experts[:, 0] == hot).all()


def test_experts_chosen_by_no_token(rng):
    dead = [0, 3, 5]  # the first slot's neighbours among the sorted ids

    def bias(x, router):
        x, router = x.copy(), router.copy()
        x[:, 0], router[:, 0] = 1.0, 0.0
        router[dead, 0] = -30.0
        return x, router

    experts = check(rng, 7, *SMALL, bias=bias)
    assert not np.isin(experts, dead).any()


CONFIGS = [
    # more k-steps than stages (the ring wraps), two D splits combined in XLA, 128-wide M tiles
    (MosaicMoEConfig(block_k=64, block_kf=64, num_stages=2), (8, 2, 256, 128)),
    (MosaicMoEConfig(block_k=64, split_k=2, num_stages=3), (8, 2, 256, 128)),
    (MosaicMoEConfig(block_f=128, block_d=128, block_k=64, block_kf=128, split_k=4), (8, 2, 256, 128)),
]


@pytest.mark.parametrize("config,shape", CONFIGS, ids=["ring-wraps", "split2", "m128-split4"])
def test_configs(rng, config, shape):
    check(rng, 7, *shape, config=config)


@pytest.mark.skipif(ON_GPU, reason="race detection is an interpreter feature")
def test_no_races_in_the_pipeline(rng):
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    check(rng, 3, 4, 2, 128, 128, config=MosaicMoEConfig(block_k=64, block_kf=64, num_stages=2),
          interpret_kw={"detect_races": True})
    assert not get_races().races_found


# name: (T, D, F, activation dtype, weight format, config)
UNSUPPORTED = {
    "float32": (1, 128, 128, jnp.float32, "same", None),
    "int8-weights": (1, 128, 128, jnp.bfloat16, "int8", None),
    "mixed-dtypes": (1, 128, 128, jnp.bfloat16, "float16", None),
    "T65": (MAX_TOKENS + 1, 128, 128, jnp.bfloat16, "same", None),
    "D96": (1, 96, 128, jnp.bfloat16, "same", None),
    "F48": (1, 128, 48, jnp.bfloat16, "same", None),
    "split-k-3-of-2-steps": (1, 128, 128, jnp.bfloat16, "same", MosaicMoEConfig(block_k=64, split_k=3)),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_raise_not_implemented(case):
    T, D, F, dtype, wfmt, config = UNSUPPORTED[case]
    E = 8
    x, router = jnp.zeros((T, D), dtype), jnp.zeros((E, D), dtype)
    ws = [jnp.zeros((E, D, F), dtype), jnp.zeros((E, D, F), dtype), jnp.zeros((E, F, D), dtype)]
    if wfmt == "int8":
        ws = [quantize_int8(w) for w in ws]
    elif wfmt == "float16":
        ws[2] = ws[2].astype(jnp.float16)
    with pytest.raises(NotImplementedError):
        moe_mosaic(x, router, *ws, top_k=2, norm_topk_prob=True, config=config, interpret=_interpret())


@pytest.mark.parametrize("kw", [{"block_f": 32}, {"block_k": 320}, {"block_d": 96}, {"block_kf": 0},
                                {"split_k": 0}, {"num_stages": 1}])
def test_config_validates_itself(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        MosaicMoEConfig(**kw)


def test_plan_covers_the_sms_at_decode():
    # Qwen3-30B-A3B at T = 1: 8 touched experts x 12 F tiles = 96 programs; split D in two to cover 132 SMs
    p = plan(1, 2048, 768, 128, 8, 2, MosaicMoEConfig())
    assert p.rows == 8 and p.num_slots == 8 and p.split_k == 2
    assert p.num_slots * 768 // p.block_f * p.split_k >= 132
    assert plan(8, 2048, 768, 128, 8, 2, MosaicMoEConfig()).split_k == 1
    with pytest.raises(NotImplementedError, match="shared memory"):
        plan(64, 4096, 1536, 128, 8, 2, MosaicMoEConfig(block_f=256, block_k=256, num_stages=4))


def test_registered_for_hopper_only():
    # beside triton, after it: on Hopper triton stays the default (it also covers T up to 256) until the tuned
    # table records a mosaic winner for a shape
    assert "mosaic" in IMPLEMENTATIONS and IMPLEMENTATIONS["mosaic"][1] is mosaic_available
    names = list(IMPLEMENTATIONS)
    assert names.index("triton") < names.index("mosaic")
    if not ON_GPU:
        assert not mosaic_available() and dispatch.choose() == "reference"


# (T, D, F, config): the benchmark's shapes (Qwen3-30B-A3B, Qwen3-235B-A22B; 128 experts, top-8) and the
# extremes of the config space a GPU search sweeps
LOWERING = [
    (1, 2048, 768, MosaicMoEConfig()),  # split_k 2: float32 partials stored from registers
    (8, 2048, 768, MosaicMoEConfig()),  # split_k 1: h through SMEM and a TMA store
    (64, 2048, 768, MosaicMoEConfig()),
    (1, 2048, 768, MosaicMoEConfig(block_f=128, block_k=128, block_d=128, block_kf=256, num_stages=3)),
    (1, 4096, 1536, MosaicMoEConfig(block_k=256, block_kf=256, num_stages=3)),
    (64, 4096, 1536, MosaicMoEConfig(block_f=128, block_d=128, num_stages=2)),
]


@pytest.mark.skipif(ON_GPU, reason="the GPU compiles for real in the other tests")
@pytest.mark.parametrize("T,D,F,config", LOWERING)
def test_lowers_for_cuda(T, D, F, config):
    E, K = 128, 8
    sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (sds((T, D), bf16), sds((E, D), bf16), sds((E, D, F), bf16), sds((E, D, F), bf16), sds((E, F, D), bf16))
    fn = jax.jit(lambda *a: moe_mosaic(*a, top_k=K, norm_topk_prob=True, config=config))
    fn.trace(*args).lower(lowering_platforms=("cuda",))

"""Which collective-matmul strategy a tensor-parallel block uses, from the interconnect and the message size.

- 'xla': plain GSPMD (XLA inserts all-gather / all-reduce; with its latency-hiding scheduler and windowed einsum
  flags this is XLA's own overlap, the baseline).
- 'ring', 'bidi': sequence-parallel blocks with the ppermute-ring collective matmuls of `collectives.py`
  (one or both directions). Need the token count divisible by 2*tp ('bidi') or tp ('ring').
- 'sp': the same sequence-parallel blocks with plain `all_gather` / `psum_scatter` (the rings' unoverlapped twin).
- 'allreduce': column-parallel local matmuls, row-parallel then `psum` (replicated tokens; decode-sized).
- 'allreduce_overlap': as 'allreduce' with the chunked one-shot all-reduce of `collectives.matmul_all_reduce`.
- 'nocomm': the same per-device compute with no communication (wrong results): the benchmark's floor, to measure
  how much of a step is communication.
"""

from __future__ import annotations

from pathlib import Path

STRATEGIES = ("xla", "ring", "bidi", "sp", "allreduce", "allreduce_overlap", "nocomm")

# Below this many bytes per all-reduce a message is latency-bound (1 MB all-reduces take ~150 us on both NVLink
# and host-staged PCIe on our H200s, ANCHORS.md): splitting it into a ring only adds hops.
DECODE_BYTES = 1 << 20


# Interconnects where a GPU run of benchmarks/sharding.py showed the overlapped rings beating XLA's own collectives
# in the TP=2 prefill step. None yet: with 20 ms timing chains on 2 H200s, 'bidi' (the rings' best) took 8,286 us to
# XLA's 7,270 over NVLink (sharding_nvlink.json, 5738fbc) and 13,387 to 12,611 with peer access off, the
# host-staged path of a PCIe box (sharding_p2p_profile_h200_3fd908d.json). Per layer, with each call waiting for
# all of the previous one's output, no ring hid more than 7% of its exposed transfer
# (sharding_whole_link_h200_5b0e9e2.json): NCCL's host-staged send/receive does run beside the matmuls, but both
# then take longer (the all-gather ring's matmuls ~22%). 'auto' picks the rings only where they have won.
RINGS_WIN: frozenset[str] = frozenset()


def choose(interconnect: str, tokens: int, hidden: int, tp: int, itemsize: int = 2) -> str:
    """Strategy for a block over `tokens` tokens of width `hidden` on `tp` devices linked by `interconnect`:
    'xla' unless the interconnect is in RINGS_WIN and the block is prefill-sized."""
    if tp == 1 or interconnect not in RINGS_WIN:
        return "xla"
    message = tokens * hidden * itemsize
    if message <= DECODE_BYTES or tokens % tp:
        # GSPMD's own all-reduce: a latency-bound message gains nothing from a ring, and on 2 H200s XLA's placement
        # of it beat our shard_map psum ('allreduce') in the TP=2 decode step in 2 of 3 scenarios
        # (benchmarks/results/sharding.json, run at 2840fdc)
        return "xla"
    if tokens % (2 * tp) == 0:
        # Both link directions carry half of each shard: halves are cheaper than one full ring, equal in compute.
        return "bidi"
    return "ring"


def validate(strategy: str) -> str:
    """`strategy` if it is one of STRATEGIES or 'auto' (chosen per call by `choose`)."""
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; pick 'auto' or one of {', '.join(STRATEGIES)}")
    return strategy


# XLA flags for micro-batched prefill (`Transformer.microbatches`), each measured on the TP=2 prefill step of a
# 70B-shaped 2-layer model on 2 H200s with peer access off (benchmarks/sharding.py, logs README):
# - the dot merger off: it joins the pieces' matmuls that share a weight into one dot, so both pieces' all-reduces
#   wait for it (0.98x XLA's unsplit step with it on, 1.06-1.08x off, sharding_nomerge_h200_98e432b.json on);
# - the latency-hiding scheduler, said explicitly;
# - ALLREDUCE_LATENCY, a profile for XLA's profile-guided latency estimator that gives every all-reduce the time a
#   host-staged one takes. Its own estimate treats an all-reduce as worth about one matmul, so with the staggered
#   stages (`Transformer.microbatch_stagger`) it started each stage's all-reduce just before the next stage's last
#   matmul (scheduled HLO of xla_mb2s, f5d5475): 1.11-1.15x XLA's step in nine runs. With the profile each starts
#   before the next stage's first, second or third matmul: 1.271x and 1.260x in two runs
#   (sharding_ar_latency*_h200x2_5e2d0b9.json); costed at 1,500 us instead of 610, 1.251x. (The 74% of XLA's
#   exposed communication hidden that those runs' summary gives is against 'nocomm' floors that still hold
#   collectives; `benchmarks.sharding.against_nvlink` is the same-program measure.)
# Tried and taken out (commits kept in the history): optimization barriers chaining the pieces' sublayers (1add04c;
# XLA's GPU pipeline removes barriers before it schedules), and scheduling annotations (`_scheduling_group_id` on a
# stage's all-reduce and the next stage's ops: c369a63, d3ab94f, c8ddcf7), which XLA refused to compile in all
# three forms ("annotation groups with gaps"); the SoL latency estimator (scenario p2p_disabled_sol, d334241, since
# removed) gave the same schedule and compiled slower; XLA's costly-collective estimate and two collectives in
# flight (scenarios p2p_disabled_costly, p2p_disabled_limit2) left the schedule as it was.
# Why rings inside one collective matmul hide little (benchmarks/collective_overlap.py, 2 H200s, peer access off):
# NCCL's kernels take no SM that another kernel holds, and one cuBLAS matmul holds every SM to its end, so a host-staged
# 32 MB ppermute beside one matmul hid at most 29% of it (under 15% in most settings), and of the same product as 4
# matmuls 79-96%. NCCL's copy-engine SHM copies (slower, and the step's first collective never finished), command
# buffers off, Triton GEMMs (every step slower), stream priority, 1 channel and 32 connections did not change that.
# `TPAttention.chunks` / `TPMLP.chunks` > 1 with 'xla' issue each projection as that many matmuls
# (`parallel._pieced`). Measured on the step they only cost: 4 pieces took 1.10x the time of whole matmuls, with or
# without micro-batches, and 1.26x with staggered ones (sharding_stagger_h200x2_10d1f4e.json).
ALLREDUCE_LATENCY = Path(__file__).with_name("allreduce_latency.pbtxt")
MICROBATCH_XLA_FLAGS = {"xla_gpu_dot_merger_threshold_mb": "0", "xla_gpu_enable_latency_hiding_scheduler": "true",
                        "xla_gpu_pgle_profile_file_or_directory_path": str(ALLREDUCE_LATENCY)}


def with_microbatch_flags(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) plus MICROBATCH_XLA_FLAGS, each unless the value already sets it."""
    out = xla_flags.split()
    for name, value in MICROBATCH_XLA_FLAGS.items():
        if not any(f.lstrip("-").split("=")[0] == name for f in out):
            out.append(f"--{name}={value}")
    return " ".join(out)

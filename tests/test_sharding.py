"""sharding/: rules, topology and strategy choice in this process (1 CPU device); the 8-device equality suite,
the 2-process multi-host start-up and the benchmark's --tiny mode in subprocesses (device count and distributed
runtime are fixed when JAX initialises, so they cannot share this process). The 8-device suite (in two parts) and
the benchmark start together and run side by side: each spends most of its time compiling on one core, so on the
2-core CI machine they overlap instead of queueing (one after another they took ~250 s of the suite's
~1,200 s)."""

import os
import subprocess
import sys

import jax
import pytest
from conftest import FIXTURES, ROOT, xla_flags

from codegen_jax import load_model
from sharding import distributed
from sharding import strategy as S
from sharding.mesh import interconnect, make_mesh, parse_topology
from sharding.rules import PARAM_AXES, ShardingRules, logical_axes, param_shardings, path_str


def cpu_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "COORDINATOR", "NUM_PROCESSES",
                                                          "PROCESS_ID")}
    extra["XLA_FLAGS"] = xla_flags(*extra.get("XLA_FLAGS", "").split())
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **extra}


def test_rules_fail_on_collisions_and_replicate_what_does_not_divide():
    with pytest.raises(ValueError, match="both map to mesh axis 'tp'"):
        ShardingRules().mesh_axes(("heads", "mlp"))
    with pytest.raises(ValueError, match="mesh axis name"):
        ShardingRules(heads=3)
    with pytest.raises(ValueError, match="no sharding rule"):
        ShardingRules().mesh_axes(("nope",))
    mesh = make_mesh(devices=jax.devices()[:1])
    rules = ShardingRules()
    assert rules.spec(("kv_heads", None), (2, 8)) == jax.sharding.PartitionSpec("tp")
    assert rules.spec(("kv_heads", None), (3, 8), mesh) == jax.sharding.PartitionSpec("tp")  # tp=1 divides
    assert ShardingRules(heads="xx").spec(("heads",), (4,), mesh) == jax.sharding.PartitionSpec()  # absent axis


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_every_parameter_has_logical_axes(family):
    from flax import nnx

    state = nnx.state(load_model(FIXTURES / family, progress=False))
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert "layers.0.self_attn.q_proj.weight" in names
    assert logical_axes("layers.0.self_attn.q_proj.weight", 2) == ("heads", "embed")
    assert logical_axes("layers.0.mlp.down_proj.weight", 2) == ("embed", "mlp")
    shardings = param_shardings(state, make_mesh(devices=jax.devices()[:1]))
    assert len(jax.tree.leaves(shardings)) == len(names)
    with pytest.raises(ValueError, match="PARAM_AXES"):
        logical_axes("layers.0.new_thing.weight", 2)
    assert PARAM_AXES


def test_topology_and_strategy(monkeypatch):
    nv = "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tNV18\t0-63\nGPU1\tNV18\t X \t0-63\n"
    pcie = "\tGPU0\tGPU1\nGPU0\t X \tPHB\nGPU1\tPHB\t X \n"
    assert parse_topology(nv) == "nvlink" and parse_topology(pcie) == "pcie" and parse_topology("") == "pcie"
    interconnect.cache_clear()
    monkeypatch.setenv("CODEGEN_JAX_INTERCONNECT", "nvlink")
    assert interconnect() == "nvlink"
    interconnect.cache_clear()
    monkeypatch.setenv("CODEGEN_JAX_INTERCONNECT", "infiniband")
    with pytest.raises(ValueError, match="CODEGEN_JAX_INTERCONNECT"):
        interconnect()
    interconnect.cache_clear()
    # 'auto' is XLA's collectives wherever the rings have not won a GPU run (none so far: RINGS_WIN)
    for link in ("pcie", "nvlink"):
        assert [S.choose(link, n, 8192, 2) for n in (8, 2048, 2046, 2047)] == ["xla"] * 4
    monkeypatch.setattr(S, "RINGS_WIN", frozenset({"pcie"}))  # where they win: prefill-sized blocks take a ring
    assert S.choose("pcie", 8, 8192, 2) == "xla"  # decode: latency-bound, GSPMD's all-reduce
    assert S.choose("pcie", 2048, 8192, 2) == "bidi"
    assert S.choose("pcie", 2046, 8192, 2) == "ring"
    assert S.choose("pcie", 2047, 8192, 2) == "xla"
    assert S.choose("nvlink", 2048, 8192, 2) == "xla"
    with pytest.raises(ValueError, match="unknown strategy"):
        S.validate("fast")
    with pytest.raises(ValueError, match="device count"):
        make_mesh(tp=3)


def test_microbatch_flags_add_what_is_missing_and_keep_what_is_set():
    flags = S.with_microbatch_flags("").split()
    assert sorted(flags) == sorted(f"--{k}={v}" for k, v in S.MICROBATCH_XLA_FLAGS.items())
    # a user's own value wins; other flags stay as they were
    mine = "--xla_gpu_dot_merger_threshold_mb=8 --xla_force_host_platform_device_count=2"
    flags = S.with_microbatch_flags(mine).split()
    assert flags[:2] == mine.split() and flags[2:] == [
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        f"--xla_gpu_pgle_profile_file_or_directory_path={S.ALLREDUCE_LATENCY}"]
    assert S.with_microbatch_flags(" ".join(flags)) == " ".join(flags)


def test_allreduce_latency_profile_names_every_all_reduce_start_once():
    """sharding/allreduce_latency.pbtxt, the profile the micro-batch flags hand XLA's latency estimator: one cost per
    all-reduce-start name XLA gives (all-reduce-start, .1, .2, ...), each positive, none twice."""
    import re

    rows = [r for r in S.ALLREDUCE_LATENCY.read_text().splitlines() if r and not r.startswith("#")]
    parsed = [re.fullmatch(r'costs \{ name: "(all-reduce-start(?:\.\d+)?)" cost_us: ([0-9.]+) \}', r) for r in rows]
    assert all(parsed), [r for r, m in zip(rows, parsed, strict=True) if not m][:3]
    names = [m.group(1) for m in parsed]
    assert len(set(names)) == len(names) >= 1024
    assert names[0] == "all-reduce-start" and set(names[1:]) == {f"all-reduce-start.{i}" for i in range(1, len(names))}
    assert all(float(m.group(2)) > 0 for m in parsed)


def test_cli_with_microbatches_sets_the_xla_flags_before_jax_starts(monkeypatch, tmp_path, capsys):
    from codegen_jax.cli import main

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    # the command fails on its missing model after the flags are set (exit 2, one line)
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--quiet", "--tp-microbatches",
                 "2"]) == 2
    assert os.environ["XLA_FLAGS"] == S.with_microbatch_flags("--xla_force_host_platform_device_count=8")
    assert "not a directory" in capsys.readouterr().err


def test_single_process_initialize_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NUM_PROCESSES", raising=False)
    assert distributed.initialize() is False
    with pytest.raises(ValueError, match="PROCESS_ID"):
        monkeypatch.delenv("PROCESS_ID", raising=False)
        distributed.initialize("localhost:1", 2)


DEVICES_SUITE = "tests/test_sharding_devices.py"
# The 8-device suite in two processes of about equal compile time: the training, CLI and collective tests, and every
# other test of the file (the engines). Node-id arguments and --deselect prefixes, so the two run each test exactly
# once between them, and a renamed test fails the first part (its node id is not found).
FIRST_PART = ["test_sharded_training_equals_one_device", "test_train_drafter_cli_with_tp",
              "test_generate_and_serve_with_tp", "test_collective_matmuls_equal_plain_matmuls",
              "test_expert_parallel_moe_equals_reference"]
EIGHT_DEVICE_PARTS = {
    "training-cli-collectives": [f"{DEVICES_SUITE}::{name}" for name in FIRST_PART],
    "engines": [DEVICES_SUITE, *(arg for name in FIRST_PART for arg in ("--deselect", f"{DEVICES_SUITE}::{name}"))],
}


def background_commands(items) -> dict:
    """The module's long subprocesses (started by conftest when collection ends): those of the selected tests only,
    so a `-k` run of one of them starts nothing else."""
    eight = cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    commands = {}
    for item in items:
        if item.originalname == "test_eight_device_suite":
            part = item.callspec.params["part"]
            commands[f"eight-{part}"] = ([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider",
                                          *EIGHT_DEVICE_PARTS[part]], eight, ROOT)
    if any(item.originalname == "test_benchmark_tiny" for item in items):
        # its scenario's own limit (default 200 s) raised: on 2 busy cores it ran past 200 s once (2026-11-30)
        commands["sharding-benchmark"] = ([sys.executable, "-m", "benchmarks.sharding", "--tiny", "--no-write",
                                           "--scenarios", "nvlink", "--timeout", "600"], cpu_env(), ROOT)
    return commands


@pytest.mark.parametrize("part", list(EIGHT_DEVICE_PARTS))
def test_eight_device_suite(background, part):
    """Every strategy's output equals the single-device output (tests/test_sharding_devices.py)."""
    rc, stdout, stderr = background[f"eight-{part}"].wait(timeout=1200)
    assert rc == 0, stdout[-4000:] + stderr[-2000:]
    assert "PASSED" in stdout and "SKIPPED" not in stdout, stdout[-2000:]


def test_two_processes_on_localhost(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/sharding_worker.py")], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                          COORDINATOR=f"localhost:{port}", NUM_PROCESSES="2", PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out[-3000:]
        assert f"process {i} ok over 4 devices" in out


def test_benchmark_tiny(background):
    rc, stdout, stderr = background["sharding-benchmark"].wait(timeout=900)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert "prefill_comm_share" in stdout and "matmul_rs_bidi" in stdout


def test_against_nvlink_compares_each_program_with_itself():
    """benchmarks.sharding.against_nvlink: a host-staged scenario's exposed communication per variant is its time
    less the same variant's under 'nvlink' in the same invocation, and the hidden share is against XLA's."""
    from benchmarks.sharding import against_nvlink

    nv = {"scenario": "nvlink",
          "step_us": {"prefill_xla": 7000.0, "prefill_xla_mb2s": 7400.0, "prefill_xla_mb3s": 7600.0}}
    p2p = {"scenario": "p2p_disabled_ar_latency",
           "step_us": {"prefill_xla": 11000.0, "prefill_xla_mb2s": 9400.0, "prefill_nocomm": 7200.0}}
    got = against_nvlink([p2p, nv, {"scenario": "p2p_disabled", "error": "timed out"}])
    assert got == {"p2p_disabled_ar_latency": {"xla_exposed_us": 4000.0, "xla_mb2s_exposed_us": 2000.0,
                                               "xla_mb2s_hidden_share": 0.5}}
    assert against_nvlink([p2p]) == {}  # no nvlink run: nothing to compare with


def test_collective_overlap_tiny():
    """benchmarks/collective_overlap.py on 2 simulated CPU devices: every body timed, the hidden shares computed
    from those times."""
    from benchmarks import collective_overlap as co

    r = co.run_setting("p2p_disabled", tiny=True, timeout=300)
    assert "error" not in r, r.get("error")
    us = r["us"]
    assert set(us) == {"psum", "ppermute", "matmul", "matmul4", "matmul+ppermute", "matmul4+ppermute"}
    assert all(0 < t < 1e6 for t in us.values()), us
    for m in ("matmul", "matmul4"):
        assert r[f"{m}_hidden_us"] == round(us["ppermute"] + us[m] - us[f"{m}+ppermute"], 1)
        assert r[f"{m}_hidden_share"] == round(r[f"{m}_hidden_us"] / us[m], 3)

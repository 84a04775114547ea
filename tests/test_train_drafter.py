"""Drafter training on the CPU with the tiny qwen2 fixture as the target: training on the target's regenerated
output raises the acceptance length of the real verify loop, kill and resume continues the same loss curve, bad
data exits 2 with one line, and the pieces (online target features, the EAGLE-3 unroll, packing, the resumable
grain iterator, the config file) match what serving and the issue expect."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codegen_jax import Engine, EngineConfig, Tokenizer, load_model
from drafters.checkpoint import load_drafter
from drafters.eagle3 import Eagle3Config, Eagle3Drafter
from train.config import parse
from train.data import DataIterator, dataset, load_prompts, pack
from train.drafter import main
from train.losses import eagle3_unroll
from train.target_features import target_forward

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "tests" / "fixtures" / "qwen2"
SMALL = ["--target", str(TARGET), "--max-prompt-len", "48", "--max-new-tokens", "48", "--eval-max-new-tokens", "32",
         "--eval-prompts", "4", "--batch-size", "4", "--seq-len", "128", "--context", "16", "--head-dim", "16",
         "--intermediate-size", "128", "--num-heads", "2", "--compute-dtype", "float32", "--target-dtype", "float32",
         "--lr", "3e-3", "--warmup-steps", "10", "--no-progress"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """Code-completion prompts cut from a few of the repo's own files, as JSONL."""
    out = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    lines = []
    for f in ["codegen_jax/sampling.py", "codegen_jax/kv_cache.py", "drafters/verify.py", "drafters/base.py",
              "codegen_jax/tokenizer.py", "train/data.py"]:
        text = (ROOT / f).read_text().splitlines(keepends=True)
        lines += [json.dumps({"prompt": "".join(text[: len(text) * c // 5])}) for c in (1, 2, 3, 4)]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def regenerated(prompts_file, tmp_path_factory) -> Path:
    """The target's responses, generated once: a 1-step run writes them, later runs copy them in and reuse them."""
    out = tmp_path_factory.mktemp("regen")
    assert main([*SMALL, "--drafter", "block", "--data", str(prompts_file), "--out", str(out), "--steps", "1",
                 "--eval-every", "0", "--block-size", "6"]) == 0
    return out / "regenerated.jsonl"


def _out(tmp_path: Path, name: str, regenerated: Path) -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(regenerated, out / "regenerated.jsonl")
    return out


@pytest.mark.parametrize("kind,extra", [("block", ["--block-size", "6"]),
                                        ("eagle3", ["--draft-len", "4", "--draft-vocab-size", "256"])])
def test_training_raises_acceptance_length(kind, extra, prompts_file, regenerated, tmp_path):
    out = _out(tmp_path, kind, regenerated)
    assert main([*SMALL, *extra, "--drafter", kind, "--data", str(prompts_file), "--out", str(out), "--steps", "120",
                 "--eval-every", "120", "--checkpoint-every", "120", "--log-every", "40"]) == 0
    evals = [r for r in rows(out / "metrics.jsonl") if "acceptance_length" in r]
    assert [r["step"] for r in evals] == [0, 120]
    untrained, trained = evals[0]["acceptance_length"], evals[1]["acceptance_length"]
    print(kind, "acceptance length", untrained, "->", trained)
    assert trained > untrained + 0.3, (untrained, trained)
    losses = [r["loss"] for r in rows(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    # the export is what serving loads
    model = load_drafter(out / "drafter")
    assert model.cfg.dtype == "float32" and model.cfg.target_layers == (0, 1, 2)


def test_kill_and_resume_continues_the_same_loss_curve(prompts_file, regenerated, tmp_path):
    common = [*SMALL, "--drafter", "block", "--block-size", "6", "--data", str(prompts_file), "--steps", "16",
              "--eval-every", "0", "--checkpoint-every", "5", "--log-every", "1"]
    whole = _out(tmp_path, "whole", regenerated)
    assert main([*common, "--out", str(whole)]) == 0
    killed = _out(tmp_path, "killed", regenerated)
    # "killed" after step 8: the last checkpoint is step 5, so the resumed run redoes 6..8 from the restored state
    assert main([*common, "--out", str(killed), "--stop-after-step", "8"]) == 0
    assert not (killed / "drafter").exists()
    assert main([*common, "--out", str(killed)]) == 0
    a = {r["step"]: r["loss"] for r in rows(whole / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in rows(killed / "metrics.jsonl")}
    assert sorted(a) == sorted(b) == list(range(1, 17))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)


def test_bad_data_exits_2_with_one_line(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"prompt": "def f():"}\n{"prompt": "x = [1, \n')
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "no prompt field"}\n')
    for data, words in [(tmp_path / "missing.jsonl", "no such file"), (corrupt, "corrupt.jsonl:2: not valid JSON"),
                        (wrong, "needs a 'prompt'"), (tmp_path / "bad.parquet", "no such file")]:
        assert main(["--target", str(TARGET), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_parallelism_that_does_not_fit_the_devices_exits_2_with_one_line(tmp_path, capsys):
    base = ["--target", str(TARGET), "--data", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]
    for flags, words in [(["--tp", "3"], "--tp 3 times --ep 1 must divide the device count (1)"),
                         (["--tp", "0"], "--tp must be >= 1"), (["--ep", "-1"], "--ep must be >= 1")]:
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()  # checked before anything is read or written


def test_parquet_prompts_equal_jsonl_and_corrupt_parquet_is_a_clear_error(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from codegen_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TARGET)
    records = [{"prompt": "def add(a, b):"}, {"prompt": "class Stack:"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet", tok) == load_prompts(tmp_path / "p.jsonl", tok)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    assert main(["--target", str(TARGET), "--data", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable parquet file" in err[0], err


def test_cli_help_and_config_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.drafter", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0
    for flag in ("--target", "--drafter", "--data", "--out", "--config", "--position-decay", "--checkpoint-every",
                 "--tp", "--ep"):
        assert flag in done.stdout
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('target = "t"\ndata = "d"\nout = "o"\ndrafter = "eagle3"\nsteps = 7\ntarget-layers = [0, 2]\n')
    cfg = parse(["--config", str(cfg_file), "--steps", "9"])
    assert (cfg.drafter, cfg.steps, cfg.layers) == ("eagle3", 9, (0, 2))  # the flag wins over the file
    with pytest.raises(ValueError, match="unknown key"):
        cfg_file.write_text('stepz = 3\n')
        parse(["--config", str(cfg_file)])


def test_online_features_match_the_engine(rng):
    target = load_model(TARGET, dtype=jnp.float32, progress=False)
    seqs = [rng.integers(0, 500, n).tolist() for n in (11, 7)]
    packed = pack([(s[:3], s[3:]) for s in seqs], 32)
    assert len(packed) == 1 and packed.segments[0].max() == 2  # both sequences share one row
    feats, hidden = target_forward(target, jnp.asarray(packed.tokens), jnp.asarray(packed.segments),
                                   jnp.asarray(packed.positions), (0, 2))
    eng = Engine(target, EngineConfig(max_slots=1, page_size=4, max_seq_len=32, prefill_chunk=16))
    eng.cache.reserve(0, 16)
    at = 0
    for seg in (1, 2):  # first-fit decreasing put the longer sequence first
        n = int((packed.segments[0] == seg).sum())
        toks = packed.tokens[0, at : at + n]
        eng.cache.lengths[0] = 0
        _, ref = eng.verify_features(toks[None], np.array([n]), (0, 2))
        np.testing.assert_allclose(np.asarray(feats[0, at : at + n]), np.asarray(ref[0]), rtol=1e-4, atol=1e-5)
        assert packed.loss[0, at : at + n].sum() == n - 3
        at += n


def test_eagle3_unroll_is_the_serving_draft(rng):
    m = Eagle3Drafter(Eagle3Config(32, (0, 1), 61, 40, draft_len=4, head_dim=8, intermediate_size=48, context=8),
                      rngs=nnx.Rngs(0))
    m.d2t.set_value(jnp.asarray(np.sort(rng.choice(61, 40, replace=False)), jnp.int32))
    embed = jnp.asarray(rng.normal(size=(61, 32)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(3, 8, 64)), jnp.float32)
    nxt = jnp.asarray(rng.integers(0, 61, (3, 8)), jnp.int32)
    n = jnp.array([8, 3, 1])
    _, _, tokens = eagle3_unroll(m, embed, ctx, nxt, n)
    ref, _ = m.draft(embed, embed, ctx, nxt, n, nxt[:, -1], jnp.zeros(3, jnp.uint32), jnp.zeros(3, jnp.int32),
                     jnp.zeros(3), with_probs=False)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref))


def test_data_iterator_resumes_exactly(tmp_path):
    tok = Tokenizer.from_dir(TARGET)
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps({"prompt_ids": [i + 1] * (i % 5 + 1)}) for i in range(20)) + "\n")
    prompts = load_prompts(src, tok)
    packed = pack([(p, [7] * 3) for p in prompts], 8)
    it = DataIterator(dataset(packed, 2, seed=3))
    for _ in range(5):
        next(it)
    state = it.state()
    after = [next(it)["tokens"] for _ in range(9)]  # past an epoch boundary: the next epoch is reshuffled
    again = DataIterator(dataset(packed, 2, seed=3))
    again.restore(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(np.stack(after), np.stack([next(again)["tokens"] for _ in range(9)]))
    # two hosts see disjoint halves of the rows (one sequence a row here, told apart by its first token)
    one = pack([([i + 1], [7] * 3) for i in range(20)], 4)
    seen = [{int(next(DataIterator(dataset(one, 1, seed=3, shard=h, num_shards=2)))["tokens"][0, 0])}
            for h in (0, 1)]
    halves = [{int(b["tokens"][0, 0]) for b, _ in zip(DataIterator(dataset(one, 1, seed=3, shard=h, num_shards=2)),
                                                       range(10), strict=False)} for h in (0, 1)]
    assert seen[0] <= halves[0] and not halves[0] & halves[1] and halves[0] | halves[1] == set(range(1, 21))


def test_throughput_benchmark_tiny(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--tiny", "--no-write"],
                          capture_output=True, text=True, cwd=ROOT, timeout=170, env={"JAX_PLATFORMS": "cpu",
                                                                                      "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["train_tokens_per_s"] > 0

"""The `codegen-jax` command line: output on a fixture checkpoint, exit code 2 and one line on bad input."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import FIXTURES

from codegen_jax.cli import main


def test_generate_json_end_to_end(tmp_path):
    # a real process, as a user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "codegen_jax.cli", "generate", "--model", str(FIXTURES / "qwen2"),
         "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--json", "--quiet"],
        capture_output=True, text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "HOME": str(tmp_path),
                                                          "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"prompt_tokens", "tokens", "text", "tokens_per_second"}
    assert out["prompt_tokens"] > 0 and 1 <= len(out["tokens"]) <= 12 and out["tokens_per_second"] > 0
    assert isinstance(out["text"], str)


def test_generate_greedy_matches_engine(capsys):
    import jax.numpy as jnp

    from codegen_jax import Engine, EngineConfig, SamplingParams, Tokenizer, load_model

    prompt = "class Stack:\n    def push(self, item):"
    assert main(["generate", "--model", str(FIXTURES / "llama"), "--prompt", prompt, "--dtype", "float32",
                 "--max-new-tokens", "20", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_dir(FIXTURES / "llama")
    engine = Engine(load_model(FIXTURES / "llama", dtype=jnp.float32, progress=False),
                    EngineConfig(max_slots=1, max_seq_len=64, prefill_chunk=16))
    ids = tok.encode(prompt)
    expected = engine.generate([ids], SamplingParams(max_new_tokens=20, stop_token_ids=(tok.eos_token_id,)))[0]
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == expected.tokens
    assert out["text"] == tok.decode(expected.tokens)


def test_chat_flag(capsys):
    assert main(["generate", "--model", str(FIXTURES / "qwen3"), "--prompt", "hi", "--chat", "--system", "be brief",
                 "--max-new-tokens", "4", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] > 10  # the template added the system and user turns


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_corrupt_config_exits_2(tmp_path, capsys):
    d = tmp_path / "broken"
    shutil.copytree(FIXTURES / "qwen2", d)
    (d / "config.json").write_text("{ corrupt")
    assert main(["generate", "--model", str(d), "--prompt", "x", "--quiet"]) == 2
    assert "config.json: not valid JSON" in one_line_error(capsys)


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--prompt", "x"], "--model"),
    (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--model", "m", "--prompt", "x", "--temperature", "hot"], "--temperature"),
    (["generate", "--model", "m", "--prompt", "x", "--tp-microbatches", "0"], "--tp-microbatches"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in one_line_error(capsys)


@pytest.mark.parametrize("extra,needle", [
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-new-tokens", "5000"], "--max-seq-len"),
    (["--tp", "2"], "--tp 2"),  # one device here
    (["--tp-strategy", "fastest"], "--tp-strategy"),
])
def test_bad_values_exit_2(extra, needle, capsys):
    argv = ["generate", "--model", str(FIXTURES / "qwen2"), "--prompt", "x", "--quiet", *extra]
    assert main(argv) == 2
    assert needle in one_line_error(capsys)


def test_missing_directory_exits_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--quiet"]) == 2
    assert "not a directory" in one_line_error(capsys)


@pytest.mark.parametrize("flags,overlap,least", [([], True, 2048), (["--no-remote-overlap"], False, 2048),
                                                  (["--remote-overlap", "--remote-min-tokens", "0"], True, 0)])
def test_serve_remote_hit_flags_reach_the_config(monkeypatch, flags, overlap, least):
    """`serve`'s remote-hit defaults are ServeConfig's (the head recomputed while the tail is fetched, hits under
    2,048 tokens recomputed) and each flag overrides its own."""
    import serve.server

    seen = []
    monkeypatch.setattr(serve.server, "run", lambda cfg: seen.append(cfg) or 0)
    assert main(["serve", "--model", str(FIXTURES / "qwen2"), "--remote", "memory://", *flags]) == 0
    assert (seen[0].remote_overlap, seen[0].remote_min_tokens) == (overlap, least)


def test_compilation_cache_takes_its_directory_and_a_size_limit(tmp_path, monkeypatch):
    """codegen_jax.jit_cache on a GPU: the directory from $CODEGEN_JAX_CACHE_DIR, and a size limit, which makes JAX's
    cache evict least recently used entries and lock its files. On the CPU backend it leaves the cache off (the
    module's docstring says why) and JAX's config as it was."""
    import jax
    from jax._src.lru_cache import LRUCache

    from codegen_jax import jit_cache

    names = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size",
             "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    monkeypatch.setenv(jit_cache.CACHE_DIR_ENV, str(tmp_path / "jit"))
    assert jax.default_backend() == "cpu"
    assert jit_cache.enable_compilation_cache(min_compile_time_s=0) is None
    assert {name: getattr(jax.config, name) for name in names} == before
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    try:
        assert jit_cache.enable_compilation_cache(min_compile_time_s=0) == str(tmp_path / "jit")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jit")
        assert jax.config.jax_compilation_cache_max_size == jit_cache.MAX_BYTES > 0
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        cache = LRUCache(jax.config.jax_compilation_cache_dir, max_size=jax.config.jax_compilation_cache_max_size)
        assert cache.eviction_enabled and cache.lock is not None
    finally:
        for name, value in before.items():
            jax.config.update(name, value)

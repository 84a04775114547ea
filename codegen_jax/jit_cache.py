"""The persistent cache of compiled programs that the CLI, the server and the benchmarks share across runs."""

import os

CACHE_DIR_ENV = "CODEGEN_JAX_CACHE_DIR"  # where the cache lives; default ~/.cache/codegen-jax/jax
MAX_BYTES = 8 << 30  # least recently used entries go past this


def enable_compilation_cache(min_compile_time_s: float | None = None) -> str:
    """Turns on JAX's persistent compilation cache in $CODEGEN_JAX_CACHE_DIR (default ~/.cache/codegen-jax/jax)
    and returns the directory. The cache gets a size limit, which makes JAX evict least recently used entries and
    take a file lock around every read and write of it. Without the lock JAX writes an entry in place, so another
    process (a server beside a CLI run, the test suite's subprocesses) can read it half-written and crash
    deserialising it: a CI run here segfaulted in that read (2026-12-02). min_compile_time_s: cache programs that
    took at least this long to compile (JAX's default where None)."""
    import jax

    path = os.environ.get(CACHE_DIR_ENV) or os.path.expanduser("~/.cache/codegen-jax/jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if min_compile_time_s is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return path

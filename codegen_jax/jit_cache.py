"""The persistent cache of compiled programs that the CLI, the server and the benchmarks share across runs."""

import os

CACHE_DIR_ENV = "CODEGEN_JAX_CACHE_DIR"  # where the cache lives; default ~/.cache/codegen-jax/jax
MAX_BYTES = 8 << 30  # least recently used entries go past this


def enable_compilation_cache(min_compile_time_s: float | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in $CODEGEN_JAX_CACHE_DIR (default ~/.cache/codegen-jax/jax)
    and returns the directory; on the CPU backend it leaves the cache off and returns None.

    Why not on the CPU: programs there are small models that compile in seconds, and the cache costs more than it
    saves. The test suite runs the CLI in its own process, and JAX's cache is process-wide config: once on, every
    later compile of the suite hashed its program for a key, took the cache's lock and scanned the directory for
    eviction (a clean-clone run took 38 min against 20-23, 2026-12-01). The segfaults CI had then were not the
    cache's: the process ran out of memory mappings (tests/conftest.py, `_free_compiled_programs`).

    The size limit makes JAX evict least recently used entries (and lock the directory around reads and writes).
    min_compile_time_s: cache programs that took at least this long to compile (JAX's default where None)."""
    import jax

    if jax.default_backend() == "cpu":
        return None
    path = os.environ.get(CACHE_DIR_ENV) or os.path.expanduser("~/.cache/codegen-jax/jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if min_compile_time_s is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return path

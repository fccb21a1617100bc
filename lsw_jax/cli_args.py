"""Argument types of the ``lsw-jax`` command line: each checks its value when it is parsed,
so a bad flag ends with argparse's usage line and a message naming the flag, the value and
what is allowed (``argument --slots: must be an integer >= 1, got '0'``), never a
traceback or a run that hangs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from lsw_jax.model.layers import FLOAT_DTYPES


def int_at_least(lo: int) -> Callable[[str], int]:
    """An integer >= ``lo``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value!r}")
        return n

    return parse


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi]."""

    def parse(value: str) -> int:
        n = int_at_least(lo)(value)
        if n > hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {value!r}")
        return n

    return parse


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[str], float]:
    """A finite number in [lo, hi] (``lo_open``: (lo, hi])."""
    if hi < math.inf:
        allowed = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    else:
        allowed = f"{'>' if lo_open else '>='} {lo:g}"

    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or x < lo or (lo_open and x == lo) or x > hi:
            raise argparse.ArgumentTypeError(f"must be a number {allowed}, got {value!r}")
        return x

    return parse


def float_dtype(value: str) -> str:
    """One of ``FLOAT_DTYPES`` (casts; quantized storage is not a cast)."""
    if value not in FLOAT_DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(FLOAT_DTYPES)}, got {value!r}")
    return value


def existing_file(value: str) -> str:
    """A file that exists (data to read, a config)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {value!r}")
    if path.is_dir():
        raise _not_a(value, "a directory, expected a file")
    return value


def existing_dir(value: str) -> str:
    """A directory that exists (a PEFT adapter)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such directory: {value!r}")
    if not path.is_dir():
        raise _not_a(value, "a file, expected a directory")
    return value


def existing_path(value: str) -> str:
    """A file or directory that exists (a model to convert: a folder or a .gguf)."""
    if not Path(value).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {value!r}")
    return value


def _not_a(value: str, why: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{value!r} is {why}")

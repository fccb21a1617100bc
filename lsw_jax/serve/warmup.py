"""The engine's warm-up: which step shapes compile before the server says ready, and which
compile after, in the background, while it serves.

Every prefill shape is a ``(prompt bucket P, rows R)`` pair; a request's first token waits
on the compilation of its shape when nothing compiled it before (seconds on a CPU), and so
does every stream running beside it. Compiling all of them before ``/health`` says ready
costs minutes on a 2-core CPU at a 2048-token context (8 lengths x 3 row counts), most of
it for shapes rarely used. So the start is split:

* ``ready_shapes``: one row at every prompt bucket up to ``READY_PROMPT_LEN`` (a chat turn,
  a completion) and the decode step of every mode the policy picks: compiled before ready;
* ``background_shapes``: the longer prompts, then the multi-row chunks, cheapest first:
  compiled on a background thread after ready, the multi-row ones only while the engine
  is idle. Until a multi-row shape is compiled the engine prefills that chunk as single
  rows (``Engine._chunk_rows``), so a burst of admissions never waits on a compile; a
  prompt longer than ``READY_PROMPT_LEN`` that arrives before its bucket compiled
  compiles it then (loaded from the persistent compilation cache on a restart).

Shapes are compiled ahead of time (``jit.lower(...).compile()``: JAX keeps the executable
for the jitted call, nothing is traced again) and run once only when a run costs little
(``run_tokens``): the first run of a fresh executable pays its allocations.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from lsw_jax.plans import Plan
from lsw_jax.serve import steps

if TYPE_CHECKING:
    from lsw_jax.serve.engine import Engine

log = logging.getLogger("lsw_jax.serve")

READY_PROMPT_LEN = 512  # prompt buckets compiled (one row) before the server says ready
RUN_TOKENS = 512  # shapes of at most this many tokens also run once at warm-up

Shape = tuple[int, int]  # (prompt bucket P, rows R)


def all_shapes(engine: Engine) -> list[Shape]:
    """Every prefill shape of ``engine``, cheapest (fewest tokens) first."""
    shapes = [(p, r) for p in engine.prefill_lens for r in engine.prefill_rows]
    return sorted(shapes, key=lambda s: (s[0] * s[1], s[1]))


def ready_shapes(engine: Engine) -> list[Shape]:
    """The shapes compiled before ready: one row at each bucket up to READY_PROMPT_LEN
    (at least the smallest bucket)."""
    lens = [p for p in engine.prefill_lens if p <= READY_PROMPT_LEN] or engine.prefill_lens[:1]
    return [(p, 1) for p in lens]


def background_shapes(engine: Engine) -> list[Shape]:
    """The rest: single rows of longer prompts first (a request needs them), then the
    multi-row chunks (only a speed-up: the engine falls back to single rows)."""
    ready = set(ready_shapes(engine))
    rest = [s for s in all_shapes(engine) if s not in ready]
    return sorted(rest, key=lambda s: (s[1] > 1, s[0] * s[1]))


def compile_prefill(engine: Engine, shape: Shape, run_tokens: int = RUN_TOKENS) -> None:
    """Compile the prefill of ``shape`` (no logprobs; the common case) and, when it costs
    at most ``run_tokens`` tokens, run it once on empty rows (nothing is written). Safe on
    a thread beside the engine's as long as it does not run (lowering reads only shapes)."""
    p, r = shape
    static = dict(k_max=engine._k_max, num_logprobs=0, prompt_logprobs=False)
    args = engine._prefill_args([], p, r)
    if p * r <= run_tokens:
        _, _, _, engine.logit_state, engine.cache = steps.prefill_insert(*args, **static)
    else:
        steps.prefill_insert.lower(*args, **static).compile()
    engine.prefill_pending.discard(shape)


def compile_decode(engine: Engine) -> None:
    """Run the decode step of every mode the policy may choose, on empty rows."""
    idle = ([None] * engine.slots, np.zeros((engine.slots,), np.int32))
    for mode in engine.scheduler.modes:  # base weights ("") in every mode the policy picks
        engine._run_decode(*idle, *engine._plan_weights(mode, ""))
    if engine.pool is not None and "merged" in engine.scheduler.modes:  # an adapter merged
        merged = steps.create_merged(engine.graphdef, engine.state, engine._unmerged)
        selection = (jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32))
        engine._merged = steps.switch_merged(merged, selection)  # gate 0: nothing merged
        engine._run_decode(*idle, Plan.MERGED, engine._merged)


def warm_up(engine: Engine, shapes: list[Shape], run_tokens: int = RUN_TOKENS) -> None:
    """Compile (and run, when cheap) the prefill ``shapes`` and every decode step, on the
    engine's thread: nothing else uses the engine meanwhile."""
    engine._sync_state()
    for shape in shapes:
        compile_prefill(engine, shape, run_tokens)
    compile_decode(engine)
    jax.block_until_ready(engine.cache.k[0])


def compile_in_background(engine: Engine, shapes: list[Shape], poll_s: float = 0.05) -> None:
    """Compile ``shapes`` one by one (never run: the engine owns the cache) until done or
    the engine stops; a failure is logged and leaves that shape to compile on first use.

    A multi-row shape waits until the engine is idle: compiling beside running streams
    halves their speed on a 2-core CPU (docs/benchmarks.md), and until it is compiled the
    engine prefills such chunks row by row. A single-row shape of a long prompt does not
    wait: without it such a request would compile it in the engine's own thread."""
    t0, done = time.perf_counter(), 0
    for shape in shapes:
        while shape[1] > 1 and engine.has_work() and not engine.stopping:
            time.sleep(poll_s)
        if engine.stopping:
            return
        try:
            compile_prefill(engine, shape, run_tokens=0)
            done += 1
        except Exception:  # that shape then compiles on first use
            engine.prefill_pending.discard(shape)
            log.exception("background compilation of prefill shape %s failed", shape)
    log.info(
        "compiled %d more prefill shapes in the background in %.1f s",
        done,
        time.perf_counter() - t0,
    )

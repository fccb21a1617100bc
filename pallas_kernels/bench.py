"""Measuring the kernels on the current backend: bandwidth, per-call time, block sweeps.

Used by `scripts/gpu_check.py` (GPU numbers; tiny shapes in interpret mode on CPU for its
smoke run) and by nothing on the model's path.

How a linear is timed (`time_unmerged`): one jitted function applies the op to L layers of
distinct weights, R times with R distinct inputs, all outputs returned. L * W bytes exceed the
GPU's L2 (50 MB on an H200) many times over, so W streams from HBM as in a decode step (the
first run's loop over one W measured L2, not HBM, at the 4096 x 4096 shape), and the calls
run back to back without a host loop between them (its ~20 us per iteration swamped the
first run's numbers). Time per call = best wall time / (L * R); the one dispatch per jitted
call (~10-30 us) is spread over the L * R calls.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch, lora_fused
from pallas_kernels import lora_unmerged as lu
from pallas_kernels import switch_merge as sm
from pallas_kernels.common import on_gpu


def _best_time(fn: Callable, *args, iters: int = 5) -> tuple[float, float]:
    """(best seconds of `iters` calls after one compiling call, compile+first call seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best, compile_s


def copy_gbs(n_bytes: int, dtype=jnp.bfloat16) -> float:
    """Device copy bandwidth, GB/s, read + write counted (`x + 1` over n_bytes)."""
    x = jnp.zeros((n_bytes // jnp.dtype(dtype).itemsize,), dtype)
    sec, _ = _best_time(jax.jit(lambda x: x + jnp.asarray(1, dtype)), x, iters=10)
    return 2 * x.nbytes / sec / 1e9


def read_gbs(n_bytes: int, dtype=jnp.bfloat16) -> float:
    """Device read bandwidth, GB/s (a sum over n_bytes; the output is one number)."""
    x = jnp.ones((n_bytes // jnp.dtype(dtype).itemsize,), dtype)
    sec, _ = _best_time(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x, iters=10)
    return x.nbytes / sec / 1e9


# ----------------------------------------------------------------------------- unmerged


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """One adapted linear of a model: W [out, in], its experts' stacked rank."""

    name: str
    out: int
    d_in: int
    rank: int

    @property
    def key(self) -> str:
        return f"{self.name} {self.out}x{self.d_in} R{self.rank}"


def llama7b_linears(r: int = 16) -> list[LinearShape]:
    """The fused linears of a Llama-2-7B layer (q|k|v and gate|up stacked), E experts of rank r."""
    return [
        LinearShape("qkv", 12288, 4096, 3 * r),
        LinearShape("o", 4096, 4096, r),
        LinearShape("gate_up", 22016, 4096, 2 * r),
        LinearShape("down", 4096, 11008, r),
    ]


def tiny_linears(r: int = 4) -> list[LinearShape]:
    """Tiny stand-ins (CPU smoke run, interpret mode)."""
    return [
        LinearShape("qkv", 96, 64, 3 * r),
        LinearShape("o", 64, 64, r),
        LinearShape("gate_up", 128, 64, 2 * r),
        LinearShape("down", 64, 96, r),
    ]


def unmerged_bytes(shape: LinearShape, n: int, n_experts_used: int, itemsize: int = 2) -> int:
    """HBM bytes one call must move: W, x, y and the used experts' A and B."""
    lora = n_experts_used * shape.rank * (shape.d_in + shape.out)
    return itemsize * (shape.out * shape.d_in + n * (shape.d_in + shape.out) + lora)


def make_unmerged(
    shape: LinearShape, n: int, *, layers: int, rounds: int, n_exp: int, k: int, dtype, seed=0
):
    """Inputs for `time_unmerged`: xs [R x (N, in)], per-layer W/A/B lists, e/g [N, k]."""
    key = jax.random.key(seed)
    ks = jax.random.split(key, 3 * layers + rounds)

    def rnd(kk, shp, scale):
        return (scale * jax.random.normal(kk, shp, jnp.float32)).astype(dtype)

    xs = [rnd(ks[3 * layers + i], (n, shape.d_in), 1.0) for i in range(rounds)]
    ws = [rnd(ks[3 * i], (shape.out, shape.d_in), shape.d_in**-0.5) for i in range(layers)]
    a_s = [
        rnd(ks[3 * i + 1], (n_exp, shape.rank, shape.d_in), shape.d_in**-0.5) for i in range(layers)
    ]
    b_s = [rnd(ks[3 * i + 2], (n_exp, shape.out, shape.rank), 0.5) for i in range(layers)]
    rng = np.random.default_rng(seed + n)
    e = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(n)])
    g = rng.random((n, k)) + 0.1
    return (
        xs,
        ws,
        a_s,
        b_s,
        jnp.asarray(e, jnp.int32),
        jnp.asarray(g / g.sum(1, keepdims=True), jnp.float32),
    )


def unmerged_op(impl: str, blocks: dict | None = None) -> Callable:
    """x, w, a, b, e, g -> y for impl "pallas" | "mosaic" | "reference" | "base" (XLA's
    x @ W.T) | "base_kernel" (x @ W.T through the one-launch kernel, no expert slot)."""
    if impl == "base":
        return lambda x, w, a, b, e, g: jnp.einsum("bi,oi->bo", x, w)
    if impl == "base_kernel":
        interpret = not on_gpu()  # the smoke run on a CPU
        return lambda x, w, a, b, e, g: lora_fused.linear_pallas(
            x, w, interpret=interpret, **(blocks or {})
        )
    return functools.partial(lu.lora_unmerged, impl=impl, block_sizes=blocks)


def time_unmerged(op: Callable, problem, iters: int = 5) -> tuple[float, float]:
    """(seconds per call, compile seconds) of `op` over every layer and round of `problem`."""
    xs, ws, a_s, b_s, e, g = problem

    @jax.jit
    def run(xs, ws, a_s, b_s, e, g):
        return [op(x, w, a, b, e, g) for x in xs for w, a, b in zip(ws, a_s, b_s, strict=True)]

    sec, compile_s = _best_time(run, xs, ws, a_s, b_s, e, g, iters=iters)
    return sec / (len(xs) * len(ws)), compile_s


def check_unmerged(shape: LinearShape, n: int, impl: str, *, n_exp: int, k: int, dtype) -> dict:
    """Kernel vs the XLA reference and an fp32 HIGHEST oracle at this shape (bf16 inputs)."""
    xs, ws, a_s, b_s, e, g = make_unmerged(
        shape, n, layers=1, rounds=1, n_exp=n_exp, k=k, dtype=dtype
    )
    args = (xs[0], ws[0], a_s[0], b_s[0], e, g)
    got = lu.lora_unmerged(*args, impl=impl)
    ref = lu.lora_unmerged_reference(*args)
    f32 = [t.astype(jnp.float32) for t in args[:4]]
    with jax.default_matmul_precision("highest"):  # one compile serves both oracle calls
        oracle = lu.lora_unmerged_reference(*f32, e, g)
        no_lora = lu.lora_unmerged_reference(*f32, e, g * 0)
    r_ref, r_or, share = rel_err(got, ref), rel_err(got, oracle), rel_err(no_lora, oracle)
    finite = bool(np.isfinite(np.asarray(got, np.float32)).all())
    ok = finite and r_or < 1e-2 and share > 3e-2
    return dict(rel_vs_ref=r_ref, rel_vs_f32=r_or, lora_share=share, ok=ok)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def unmerged_candidates(shape: LinearShape, n: int) -> list[dict]:
    """A short block sweep per shape: the dispatch's current pick first, then narrow / wide
    out blocks, longer K steps and split-K (the o / down shapes have 4096 outputs)."""
    current = dispatch.pick_unmerged(
        "pallas", False, n=n, out=shape.out, d_in=shape.d_in, rank=shape.rank, dtype=jnp.bfloat16
    ).blocks
    base = dict(block_rows=16 if n <= 16 else 32, num_warps=4, num_stages=3)
    grid = [
        dict(block_out=32, block_k=256, split_k=1),
        dict(block_out=16, block_k=256, split_k=1, num_stages=4),
        dict(block_out=64, block_k=256, split_k=1, num_warps=8),
        dict(block_out=32, block_k=128, split_k=1, num_stages=4),
        dict(block_out=32, block_k=512, split_k=1),
        dict(block_out=16, block_k=256, split_k=2, num_stages=4),
        dict(block_out=32, block_k=256, split_k=2),
        dict(block_out=32, block_k=256, split_k=4),
    ]
    if shape.out >= 8192:  # wide outputs fill the SMs without split-K
        grid = grid[:5] + [dict(block_out=128, block_k=128, split_k=1, num_warps=8)]
    out = [current]
    for c in grid:
        cand = {**base, **c}
        if cand not in out:
            out.append(cand)
    return out


# ----------------------------------------------------------------------------- switch


def make_bank(shape: LinearShape, layers: int, n_exp: int, dtype, seed: int = 11):
    ks = jax.random.split(jax.random.key(seed), 3)
    w = (jax.random.normal(ks[0], (layers, shape.out, shape.d_in), jnp.float32)).astype(dtype)
    a = (
        shape.d_in**-0.5 * jax.random.normal(ks[1], (layers, n_exp, shape.rank, shape.d_in))
    ).astype(dtype)
    b = (
        shape.rank**-0.5 * jax.random.normal(ks[2], (layers, n_exp, shape.out, shape.rank))
    ).astype(dtype)
    return w, a, b


def switch_bytes(shape: LinearShape, layers: int, k: int, itemsize: int = 2) -> int:
    """Ideal HBM bytes of one switch: read + write W, read the 2k chosen A and B once."""
    w = layers * shape.out * shape.d_in
    return itemsize * (2 * w + 2 * k * layers * shape.rank * (shape.d_in + shape.out))


def time_switch(
    shape: LinearShape,
    *,
    layers: int,
    n_exp: int,
    k: int,
    dtype,
    impl="pallas",
    blocks=None,
    iters=6,
) -> tuple[float, float]:
    """(seconds per switch, compile seconds): W donated, the selection changes every call."""
    w, a, b = make_bank(shape, layers, n_exp, dtype)
    sel = [
        (jnp.arange(k, dtype=jnp.int32), jnp.full((k,), 1.0 / k, jnp.float32)),
        (jnp.arange(k, 2 * k, dtype=jnp.int32) % n_exp, jnp.full((k,), 0.5 / k, jnp.float32)),
    ]
    step = jax.jit(
        functools.partial(sm.switch_merge, impl=impl, block_sizes=blocks), donate_argnums=0
    )
    t0 = time.perf_counter()
    w = jax.block_until_ready(step(w, a, b, *sel[0], *sel[1]))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for i in range(iters):
        old, new = (sel[1], sel[0]) if i % 2 == 0 else (sel[0], sel[1])
        t0 = time.perf_counter()
        w = jax.block_until_ready(step(w, a, b, *old, *new))
        best = min(best, time.perf_counter() - t0)
    return best, compile_s


def switch_candidates(shape: LinearShape, k: int = 2, dtype=jnp.bfloat16) -> list[dict]:
    """The dispatch's pick, the read-once loop at other tiles, and the first run's best
    one-tile-per-program grid (steps=1); candidates whose pipeline would not fit in shared
    memory at this rank are left out."""
    itemsize, n_slots = jnp.dtype(dtype).itemsize, 2 * k
    current = dispatch.pick_switch(
        "pallas",
        False,
        out=shape.out,
        d_in=shape.d_in,
        rank=shape.rank,
        n_slots=n_slots,
        dtype=dtype,
    ).blocks
    grid = [
        dict(block_out=32, block_in=256, steps=None, num_warps=4, num_stages=3),
        dict(block_out=32, block_in=128, steps=None, num_warps=4, num_stages=3),
        dict(block_out=16, block_in=256, steps=None, num_warps=4, num_stages=3),
        dict(block_out=64, block_in=128, steps=None, num_warps=4, num_stages=3),
        dict(block_out=64, block_in=64, steps=None, num_warps=4, num_stages=4),
        dict(block_out=32, block_in=256, steps=4, num_warps=4, num_stages=3),
        dict(block_out=32, block_in=256, steps=1, num_warps=4, num_stages=2),
    ]
    fits = [
        c
        for c in grid
        if dispatch.switch_smem(c, shape.rank, n_slots, itemsize) <= dispatch.SMEM_BUDGET
    ]
    return [current] + [c for c in fits if c != current]


def sweep(
    candidates: Sequence[dict], measure: Callable[[dict], float], deadline: float
) -> list[tuple[dict, float | str]]:
    """measure(candidate) -> seconds, for each candidate until time.time() passes `deadline`;
    failures are recorded as their error text (a candidate the backend rejects never wins)."""
    results = []
    for cand in candidates:
        if time.time() > deadline:
            break
        try:
            results.append((cand, measure(cand)))
        except Exception as err:  # report, go on with the next candidate
            results.append((cand, f"{type(err).__name__}: {str(err)[:300]}"))
    return results


# ----------------------------------------------------------------------------- tuning table

TUNING_DOC = '''"""Measured kernel settings per shape on a GPU; read by `pallas_kernels.dispatch` only.

Regenerate from a GPU run: `scripts/gpu_check.sh` writes an updated copy of this file to
$OUT/tuning.py (its measured sweeps and kernel-vs-XLA timings merged into the entries below);
review the diff and commit it here. Every entry says where its numbers came from; shapes
without an entry use the dispatch's fallback (XLA for the op, heuristic blocks), which is
unmeasured by definition.

UNMERGED[(out, in)] = list of entries, each for row counts N <= n_max (ascending):
  impl: "pallas" | "mosaic" | "reference" (XLA): the fastest measured at that N;
  blocks: keyword arguments of `lora_unmerged_pallas` (mosaic_blocks: of the Mosaic kernel;
  fused_blocks: of `lora_fused_pallas`, which the dispatch runs at N <= 16).
SWITCH[(out, in)]: blocks of `merge_delta_pallas`.
"""
'''


def render_tuning(unmerged: dict, switch: dict, *, device: str, jax_version: str, date: str) -> str:
    """The text of pallas_kernels/tuning.py for these tables."""
    import pprint

    fmt = functools.partial(pprint.pformat, width=100, sort_dicts=False)
    return (
        f"{TUNING_DOC}\n# fmt: off\n"
        f"DEVICE = {device!r}\nJAX = {jax_version!r}\nDATE = {date!r}\n\n"
        f"UNMERGED = {fmt(unmerged)}\n\nSWITCH = {fmt(switch)}\n"
    )


def merge_unmerged_entry(table: dict, out: int, d_in: int, entry: dict) -> dict:
    """A copy of UNMERGED with `entry` (n_max, impl, blocks, source) replacing the one of the
    same n_max for (out, in); entries stay sorted by n_max."""
    new = {key: [dict(e) for e in entries] for key, entries in table.items()}
    rest = [e for e in new.get((out, d_in), []) if e["n_max"] != entry["n_max"]]
    new[(out, d_in)] = sorted(rest + [entry], key=lambda e: e["n_max"])
    return new

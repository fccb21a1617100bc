"""Cache attention bounded to the filled slots, against a float64 numpy reference and the
whole-bucket softmax the model used before."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsw_jax.model.attention import cached_attention, dense_attention, prefix_sizes, slot_mask


def reference(q, k, v, valid, index, window=None):
    """float64 numpy: out[b,t,h] = softmax over visible slots of q.k/sqrt(D), times v; a
    query with no visible slot -> None in ``seen`` (its output is not compared here)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    index = np.broadcast_to(np.asarray(index), (b,))
    out = np.zeros((b, t, h, d))
    seen = np.zeros((b, t), bool)
    for r in range(b):
        for i in range(t):
            qs = index[r] + i
            vis = [
                j
                for j in range(s)
                if valid[r, j] and j <= qs and (window is None or qs - j < window)
            ]
            if not vis:
                continue
            seen[r, i] = True
            for hh in range(h):
                kk = k[r, vis, hh // (h // kvh)]
                sc = kk @ q[r, i, hh] / np.sqrt(d)
                p = np.exp(sc - sc.max())
                out[r, i, hh] = (p / p.sum()) @ v[r, vis, hh // (h // kvh)]
    return out, seen


def make(b, t, s, h, kvh, d, fills, *, pad=0, dtype=np.float32, seed=0):
    """Queries at slots fill-T .. fill-1 of each row (the new tokens already written), the
    first ``pad`` slots of odd rows invalid (left padding), random everything."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)).astype(dtype)
    k = rng.standard_normal((b, s, kvh, d)).astype(dtype)
    v = rng.standard_normal((b, s, kvh, d)).astype(dtype)
    fills = np.broadcast_to(np.asarray(fills), (b,))
    valid = np.arange(s)[None, :] < fills[:, None]
    valid[1::2, :pad] = False
    return q, k, v, valid, fills - t


def rel_err(got, want, rows):
    got, want = np.asarray(got, np.float64)[rows], want[rows]
    return np.abs(got - want).max() / np.abs(want).max()


def run(q, k, v, valid, index, shared, kv_layout="bskd", **kw):
    """``cached_attention`` jitted, the index shared (``[]``) or per row; k, v given
    slot-major and handed over in ``kv_layout``."""
    idx = jnp.int32(index[0]) if shared else jnp.asarray(index, jnp.int32)
    if kv_layout == "bksd":
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    f = _jitted(kv_layout, tuple(sorted(kw.items())))
    return f(*(jnp.asarray(a) for a in (q, k, v, valid)), idx)


@functools.cache
def _jitted(kv_layout, kw):
    """One jitted function per setting: fills are data, so cases share compiles."""
    return jax.jit(
        lambda q, k, v, valid, idx: cached_attention(
            q, k, v, valid, idx, kv_layout=kv_layout, **dict(kw)
        )
    )


LAYOUTS = pytest.mark.parametrize("kv_layout", ["bskd", "bksd"])


@LAYOUTS
@pytest.mark.parametrize("fill", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("min_slots", [64, 128])
def test_decode_fills_match_float64_and_dense(fill, min_slots, kv_layout):
    """Decode (T=1), SmolLM2 head layout (9 heads over 3 KV heads), a 1024-slot bucket:
    fills at and around a ladder step, against float64 and the whole-bucket softmax."""
    q, k, v, valid, index = make(2, 1, 1024, 9, 3, 64, fill, pad=min(fill - 1, 5))
    got = run(q, k, v, valid, index, True, kv_layout, min_slots=min_slots)
    want, seen = reference(q, k, v, valid, index)
    assert seen.all()
    assert rel_err(got, want, seen) < 1e-5
    mask = slot_mask(jnp.asarray(valid), jnp.int32(index[0]), 1)
    dense = dense_attention(*(jnp.asarray(a) for a in (q, k, v)), mask)
    assert rel_err(got, np.asarray(dense, np.float64), seen) < 1e-5


@LAYOUTS
def test_per_row_fills(kv_layout):
    """The engine's cache: every row at its own slot, fills 1 .. 1000 in one batch."""
    fills = [1, 63, 64, 65, 1000, 700]
    q, k, v, valid, index = make(6, 1, 1024, 9, 3, 64, fills, pad=1)
    want, seen = reference(q, k, v, valid, index)
    got = run(q, k, v, valid, index, False, kv_layout, min_slots=64)
    assert rel_err(got, want, seen) < 1e-5
    assert np.isfinite(np.asarray(got)).all()  # a row with no visible slot stays finite


@LAYOUTS
@pytest.mark.parametrize(
    "t,fill,s,min_slots",
    [(16, 16, 64, 8), (5, 66, 128, 64), (7, 130, 200, 64), (3, 200, 200, 64), (4, 10, 32, 64)],
)
def test_prefill_chunks_and_uneven_bucket(t, fill, s, min_slots, kv_layout):
    """T > 1 (causal within the new queries) across ladder steps, a bucket that is not a
    power of two times ``min_slots`` (the last step is the bucket), and a bucket smaller
    than ``min_slots``."""
    q, k, v, valid, index = make(3, t, s, 4, 2, 16, fill, pad=3)
    want, seen = reference(q, k, v, valid, index)
    for shared in (True, False):
        got = run(q, k, v, valid, index, shared, kv_layout, min_slots=min_slots)
        assert rel_err(got, want, seen) < 1e-5


@LAYOUTS
@pytest.mark.parametrize("window", [1, 7, 64, 100])
def test_sliding_window(window, kv_layout):
    """Mistral's window: only the window is read (a dynamic start), rows far apart."""
    q, k, v, valid, index = make(3, 2, 512, 4, 1, 16, [500, 130, 3], pad=2)
    want, seen = reference(q, k, v, valid, index, window)
    got = run(q, k, v, valid, index, False, kv_layout, min_slots=32, sliding_window=window)
    assert rel_err(got, want, seen) < 1e-5
    mask = slot_mask(jnp.asarray(valid), jnp.asarray(index, jnp.int32), 2, window)
    dense = dense_attention(*(jnp.asarray(a) for a in (q, k, v)), mask)
    assert rel_err(got, np.asarray(dense, np.float64), seen) < 1e-5


def test_bf16():
    q, k, v, valid, index = make(2, 1, 256, 8, 2, 32, 130, dtype=jnp.bfloat16)
    want, seen = reference(q, k, v, valid, index)
    got = run(q, k, v, valid, index, True, min_slots=64)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want, seen) < 1e-2


def test_prefix_sizes():
    assert prefix_sizes(2048, 128) == (128, 256, 512, 1024, 2048)
    assert prefix_sizes(200, 64) == (64, 128, 200)
    assert prefix_sizes(32, 64) == (32,)


@LAYOUTS
def test_one_compile_serves_every_fill_in_a_while_loop(kv_layout):
    """The fill is traced: a decode-like ``while_loop`` over a static bucket advances the
    index each step with one compiled body, and every step matches the reference."""
    q, k, v, _, _ = make(1, 1, 96, 4, 2, 16, 1)
    steps = 70
    kc, vc = (a.transpose(0, 2, 1, 3) if kv_layout == "bksd" else a for a in (k, v))

    @jax.jit
    def loop(q, k, v):
        def body(carry):
            i, outs = carry
            valid = jnp.arange(96)[None, :] <= i
            out = cached_attention(q, k, v, valid, i, kv_layout=kv_layout, min_slots=16)
            return i + 1, outs.at[i].set(out[0, 0])

        return jax.lax.while_loop(
            lambda c: c[0] < steps, body, (jnp.int32(0), jnp.zeros((steps, 4, 16)))
        )[1]

    got = np.asarray(loop(*(jnp.asarray(a) for a in (q, kc, vc))))
    for i in (0, 15, 16, 17, 69):
        valid = np.arange(96)[None, :] <= i
        want, _ = reference(q, k, v, valid, np.array([i]))
        np.testing.assert_allclose(got[i], want[0, 0], rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_tensor():
    q = jnp.zeros((1, 1, 4, 16))
    k = jnp.zeros((1, 8, 3, 16))
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of kv_heads=3"):
        cached_attention(q, k, k, jnp.ones((1, 8), bool), jnp.int32(0))
    k = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=r"valid \(1, 9\) must be \[B, S\]"):
        cached_attention(q, k, k, jnp.ones((1, 9), bool), jnp.int32(0))
    with pytest.raises(ValueError, match=r"index \(2,\) must be"):
        cached_attention(q, k, k, jnp.ones((1, 8), bool), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="kv_layout='bhsd' must be one of"):
        cached_attention(q, k, k, jnp.ones((1, 8), bool), jnp.int32(0), kv_layout="bhsd")

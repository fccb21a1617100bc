"""Cache attention bounded to the filled slots, against a float64 numpy reference and the
whole-bucket softmax the model used before."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsw_jax.model.attention import cached_attention, dense_attention, slot_mask


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


def run(q, k, v, valid, index, shared, **kw):
    idx = jnp.int32(index[0]) if shared else jnp.asarray(index, jnp.int32)
    f = jax.jit(lambda q, k, v, valid, idx: cached_attention(q, k, v, valid, idx, **kw))
    return f(*(jnp.asarray(a) for a in (q, k, v, valid)), idx)


@pytest.mark.parametrize("fill", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("chunk", [64, 256])
def test_decode_fills_match_float64_and_dense(fill, chunk):
    """Decode (T=1), SmolLM2 head layout (9 heads over 3 KV heads), a 1024-slot bucket."""
    q, k, v, valid, index = make(2, 1, 1024, 9, 3, 64, fill, pad=min(fill - 1, 5))
    got = run(q, k, v, valid, index, shared=True, chunk=chunk)
    want, seen = reference(q, k, v, valid, index)
    assert seen.all()
    assert rel_err(got, want, seen) < 1e-5
    mask = slot_mask(jnp.asarray(valid), jnp.int32(index[0]), 1)
    dense = dense_attention(*(jnp.asarray(a) for a in (q, k, v)), mask)
    assert rel_err(got, np.asarray(dense, np.float64), seen) < 1e-5


def test_per_row_fills():
    """The engine's cache: every row at its own slot, fills 1 .. 1000 in one batch."""
    fills = [1, 63, 64, 65, 1000, 700]
    q, k, v, valid, index = make(6, 1, 1024, 9, 3, 64, fills, pad=1)
    want, seen = reference(q, k, v, valid, index)
    got = run(q, k, v, valid, index, shared=False, chunk=64)
    assert rel_err(got, want, seen) < 1e-5
    assert np.abs(np.asarray(got)[~seen]).max(initial=0.0) == 0.0  # no slot visible -> 0


@pytest.mark.parametrize(
    "t,fill,s,chunk",
    [(16, 16, 64, 8), (5, 66, 128, 64), (7, 130, 200, 64), (3, 200, 200, 64)],
)
def test_prefill_chunks_and_ragged_bucket(t, fill, s, chunk):
    """T > 1 (causal within the new queries), chunks crossing the queries, and a bucket the
    chunk does not divide (the last chunk moves back; its overlap must count once)."""
    q, k, v, valid, index = make(3, t, s, 4, 2, 16, fill, pad=3)
    want, seen = reference(q, k, v, valid, index)
    for shared in (True, False):
        got = run(q, k, v, valid, index, shared=shared, chunk=chunk)
        assert rel_err(got, want, seen) < 1e-5


@pytest.mark.parametrize("window", [1, 7, 64, 100])
def test_sliding_window(window):
    """Mistral's window: only the last ``window`` slots; chunks before it are skipped."""
    q, k, v, valid, index = make(3, 2, 512, 4, 1, 16, [500, 130, 3], pad=2)
    want, seen = reference(q, k, v, valid, index, window)
    got = run(q, k, v, valid, index, shared=False, chunk=32, sliding_window=window)
    assert rel_err(got, want, seen) < 1e-5
    mask = slot_mask(jnp.asarray(valid), jnp.asarray(index, jnp.int32), 2, window)
    dense = dense_attention(*(jnp.asarray(a) for a in (q, k, v)), mask)
    assert rel_err(got, np.asarray(dense, np.float64), seen) < 1e-5


def test_bf16():
    q, k, v, valid, index = make(2, 1, 256, 8, 2, 32, 130, dtype=jnp.bfloat16)
    want, seen = reference(q, k, v, valid, index)
    got = run(q, k, v, valid, index, shared=True, chunk=64)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want, seen) < 1e-2


def test_one_compile_serves_every_fill_in_a_while_loop():
    """The fill is traced: a decode-like ``while_loop`` over a static bucket advances the
    index each step with one compiled body, and every step matches the reference."""
    q, k, v, _, _ = make(1, 1, 96, 4, 2, 16, 1)
    steps = 70

    @jax.jit
    def loop(q, k, v):
        def body(carry):
            i, outs = carry
            valid = jnp.arange(96)[None, :] <= i
            out = cached_attention(q, k, v, valid, i, chunk=32)
            return i + 1, outs.at[i].set(out[0, 0])

        return jax.lax.while_loop(
            lambda c: c[0] < steps, body, (jnp.int32(0), jnp.zeros((steps, 4, 16)))
        )[1]

    got = np.asarray(loop(*(jnp.asarray(a) for a in (q, k, v))))
    for i in (0, 31, 32, 33, 69):
        valid = np.arange(96)[None, :] <= i
        want, _ = reference(q, k, v, valid, np.array([i]))
        np.testing.assert_allclose(got[i], want[0, 0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_tensor():
    q = jnp.zeros((1, 1, 4, 16))
    k = jnp.zeros((1, 8, 3, 16))
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of kv_heads=3"):
        cached_attention(q, k, k, jnp.ones((1, 8), bool), jnp.int32(0))
    k = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=r"valid \(1, 9\) must be \[B, S\]"):
        cached_attention(q, k, k, jnp.ones((1, 9), bool), jnp.int32(0))
    with pytest.raises(ValueError, match=r"index \(2,\) must be"):
        cached_attention(q, k, k, jnp.ones((1, 8), bool), jnp.zeros((2,), jnp.int32))


def _splice():
    """scripts/attention_splice.py: the prototype that routes the model's cached attention
    through ``cached_attention`` (until the model calls it itself)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "attention_splice.py"
    spec = importlib.util.spec_from_file_location("attention_splice", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_with_bounded_attention_matches_the_model():
    """In place: prefill + decode logits of a left-padded batch through the whole model, and
    greedy ``generate`` (the fill traced inside its while loop), with chunks of 16 slots
    over a 64-slot bucket, equal the model's own whole-bucket attention."""
    from flax import nnx

    from lsw_jax.config import ModelConfig
    from lsw_jax.decode import generate
    from lsw_jax.model.llama import KVCache, init_model

    model = init_model(ModelConfig.tiny(num_layers=2), seed=3)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (2, 19)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding on one row

    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state):
        model = nnx.merge(graphdef, state)
        cache = KVCache.create(model.cfg, 2, 64, jnp.float32)
        out = model.forward(jnp.asarray(ids), attention_mask=jnp.asarray(mask), cache=cache)
        got = [out.logits]
        pos = jnp.asarray(mask.sum(1, keepdims=True))
        for step in range(20):  # decode across chunk boundaries 32 and 48 (minus padding)
            tok = jnp.argmax(got[-1][:, -1:], -1)
            out = model.forward(tok, positions=pos + step, cache=out.cache)
            got.append(out.logits)
        return jnp.concatenate(got, 1)

    want_logits = np.asarray(logits(state))
    want_tokens = generate(model, ids, 40, attention_mask=mask, eos_token_id=[])
    splice = _splice()
    with splice.bounded_attention(chunk=16):
        assert model.layers[0].self_attn.__call__.__func__ is not splice._ORIGINAL
        got_logits = np.asarray(logits(state))
        got_tokens = generate(model, ids, 40, attention_mask=mask, eos_token_id=[])
    real = np.concatenate([mask, np.ones((2, 20), np.int32)], 1).astype(bool)
    assert rel_err(got_logits, want_logits.astype(np.float64), real) < 1e-5
    np.testing.assert_array_equal(got_tokens, want_tokens)

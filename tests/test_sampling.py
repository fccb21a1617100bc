"""The sampler's top-k / top-p cuts and its draw against independent oracles: the cuts
against a full sort (``cutoffs_reference``) and a float64 numpy definition, the draw
against the exact probabilities (an inverse CDF at a grid of uniforms), at odd
vocabulary sizes, with ties and -inf logits, on both paths (candidates and bisection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsw_jax import sampling
from lsw_jax.sampling import RowSampling, SamplingParams, cutoffs, cutoffs_reference, draw_above

ROWS = [
    SamplingParams(),  # greedy: no cut
    SamplingParams(temperature=1.0),  # no cut
    SamplingParams(temperature=0.7, top_k=1),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.5, top_p=0.3),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.8),
    SamplingParams(temperature=2.0, top_k=100_000),  # top_k >= V: off
]


def _logits(v: int, seed: int, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, scale, (len(ROWS), v)).astype(np.float32)
    x[:, : v // 5] = np.round(x[:, : v // 5])  # ties
    x[1::3, -3:] = -np.inf  # banned tokens (logit_bias / min_tokens)
    return x


def _numpy_cut(x: np.ndarray, sp: SamplingParams) -> float:
    """The definition in float64: top-k's k-th value, then the top-p prefix's last value."""
    top_k = sp.top_k if sp.top_k < x.size else 0
    if sp.temperature == 0 or (top_k == 0 and sp.top_p >= 1):
        return -np.inf
    xs = x.astype(np.float64) / sp.temperature
    desc = np.sort(xs)[::-1]
    kth = desc[top_k - 1] if top_k else -np.inf
    if sp.top_p >= 1:
        return kth
    kept = desc[desc >= kth]
    p = np.exp(kept - kept[0])
    p /= p.sum()
    before = np.cumsum(p) - p
    return max(kept[np.sum(before < sp.top_p) - 1], kth)


def _scaled(x: np.ndarray, rs: RowSampling) -> jax.Array:
    return jnp.asarray(x) / jnp.maximum(rs.temperature, 1e-6)[:, None]


@pytest.mark.parametrize("v", [37, 1000, 5003])
def test_cutoffs_equal_a_sort_and_a_float64_definition(v):
    rs = RowSampling.from_params(ROWS)
    x = _logits(v, v)
    xs = _scaled(x, rs)
    got = np.asarray(jax.jit(cutoffs)(xs, rs))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(cutoffs_reference)(xs, rs)))
    want = [_numpy_cut(x[i], sp) for i, sp in enumerate(ROWS)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cutoffs_past_the_candidates_take_the_bisection_and_stay_exact():
    """Rows whose cut lies beyond ``CANDIDATES`` (a large top-k; a nucleus of thousands
    of tokens in flat logits) give the same cut as the sort."""
    v = 4099
    rows = [
        SamplingParams(temperature=1.0, top_k=sampling.CANDIDATES + 333),
        SamplingParams(temperature=1.0, top_p=0.95),
        SamplingParams(temperature=0.9, top_k=3000, top_p=0.99),
        SamplingParams(temperature=1.0, top_k=3),  # fits: same answer on either path
    ]
    rs = RowSampling.from_params(rows)
    x = np.random.default_rng(1).normal(0, 0.5, (len(rows), v)).astype(np.float32)
    xs = _scaled(x, rs)
    got = np.asarray(jax.jit(cutoffs)(xs, rs))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(cutoffs_reference)(xs, rs)))
    kept = (np.asarray(xs) >= got[:, None]).sum(-1)
    assert kept[0] == sampling.CANDIDATES + 333 and kept[1] > sampling.CANDIDATES
    np.testing.assert_allclose(got, [_numpy_cut(x[i], sp) for i, sp in enumerate(rows)], rtol=1e-6)


@pytest.mark.parametrize("case", ["cluster", "ties"])
def test_cutoffs_exact_where_the_value_halvings_cannot_separate(case):
    """Thousands of logits within 1e-4 of each other where the nucleus ends (more than
    the candidates left after the halvings: the order bisection finishes it), and ties of
    the K-th candidate reaching past the candidates (the cut is that value)."""
    v = 6000
    rng = np.random.default_rng(7)
    x = rng.normal(-3.0, 0.3, (2, v)).astype(np.float32)
    if case == "cluster":
        x[:, :3000] = (1.0 + 1e-4 * rng.random((2, 3000))).astype(np.float32)
    else:
        x[:, :100] = 3.0
        x[:, 100:2000] = 1.0  # the 256th largest, tied 1900 times
    rows = [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=1.0, top_p=0.97)]
    rs = RowSampling.from_params(rows)
    got = np.asarray(jax.jit(cutoffs)(jnp.asarray(x), rs))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(cutoffs_reference)(jnp.asarray(x), rs)))
    kept = (x >= got[:, None]).sum(-1)
    assert np.all(kept > sampling.CANDIDATES)  # both rows beyond the candidates


def test_order_keys_keep_the_order_of_floats_and_invert():
    x = np.array([-np.inf, -3e38, -1.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 3e38, np.inf], np.float32)
    keys = np.asarray(sampling._order_key(jnp.asarray(x)))
    assert np.all(np.diff(keys.astype(np.int64)) > 0)
    np.testing.assert_array_equal(np.asarray(sampling._from_order_key(jnp.asarray(keys))), x)


@pytest.mark.parametrize("v", [5, 300, 777])
def test_draw_follows_the_exact_probabilities_of_the_kept_tokens(v):
    """An inverse CDF at N evenly spaced uniforms draws each token softmax(x)[t] * N
    times, to within one, and never a token below the cut."""
    rng = np.random.default_rng(v)
    x = rng.normal(0, 2, (1, v)).astype(np.float32)
    cut = np.float32(np.sort(x[0])[v // 3])
    n = 20_000
    u = (np.arange(n) + 0.5) / n
    draws = jax.jit(jax.vmap(lambda u: draw_above(jnp.asarray(x), jnp.asarray([cut]), u[None])[0]))(
        jnp.asarray(u, jnp.float32)
    )
    counts = np.bincount(np.asarray(draws), minlength=v)
    p = np.where(x[0] >= cut, np.exp(x[0].astype(np.float64) - x.max()), 0.0)
    p /= p.sum()
    assert np.all(counts[x[0] < cut] == 0)
    assert np.max(np.abs(counts - p * n)) <= 1.5


def test_sampled_rows_are_reproducible_seeded_and_inside_their_cut():
    v = 1000
    rows = [SamplingParams(temperature=1.0, top_k=5, seed=s) for s in range(4)] + [
        SamplingParams(temperature=0.8, top_p=0.5, seed=9),
        SamplingParams(),
    ]
    x = jnp.asarray(np.random.default_rng(3).normal(0, 2, (len(rows), v)).astype(np.float32))
    x = x.at[:4].set(x[0])  # the same logits, four seeds
    step = jax.jit(sampling.sample_rows)
    draws = np.stack(
        [np.asarray(step(x, RowSampling.from_params(rows, [c] * len(rows)))) for c in range(64)]
    )
    again = np.asarray(step(x, RowSampling.from_params(rows, [5] * len(rows))))
    np.testing.assert_array_equal(draws[5], again)
    top5 = set(np.argsort(-np.asarray(x[0]))[:5].tolist())
    assert set(draws[:, :4].ravel().tolist()) <= top5
    assert len({tuple(draws[:, i]) for i in range(4)}) == 4  # seeds differ
    assert len(set(draws[:, 0].tolist())) > 2  # it samples
    assert np.all(draws[:, 5] == int(np.argmax(np.asarray(x[5]))))  # greedy row
    cut = float(cutoffs_reference(x[4:5] / 0.8, RowSampling.from_params(rows[4:5]))[0])
    assert np.all(np.asarray(x[4])[draws[:, 4]] / 0.8 >= cut)

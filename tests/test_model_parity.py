"""Logits parity with Hugging Face LlamaForCausalLM / MistralForCausalLM (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
from hf_helpers import hf_logits, make_hf_model, rel_err, save_hf_model

import lsw_jax

VARIANTS = {
    "gqa": ("llama", {}),
    "mqa": ("llama", dict(num_key_value_heads=1)),
    "mha": ("llama", dict(num_key_value_heads=4)),
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "head_dim": ("llama", dict(head_dim=24)),
    "bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3_rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "linear_rope": (
        "llama",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ),
    "mistral_window": ("mistral", dict(sliding_window=5)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            kind, kw = VARIANTS[name]
            hf = make_hf_model(kind, **kw)
            root = tmp_path_factory.mktemp(name)
            save_hf_model(hf, root / "hf")
            lsw_jax.convert_checkpoint(root / "hf", root / "ckpt", show_progress=False)
            cache[name] = (hf, lsw_jax.load_model(root / "ckpt", dtype="float32"), root)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf(converted, name):
    hf, ours, _ = converted(name)
    ids = np.random.default_rng(1).integers(3, 160, (2, 23))
    want = hf_logits(hf, ids)
    got = np.asarray(ours(ids))
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


def test_left_padded_batch_matches_hf(converted):
    import torch

    hf, ours, _ = converted("gqa")
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 160, (3, 12))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = hf(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(pos),
        ).logits.numpy()
    got = np.asarray(ours(ids, attention_mask=mask))
    real = mask.astype(bool)
    assert rel_err(got[real], want[real]) < 1e-4


@pytest.mark.parametrize("name", ["gqa", "mistral_window"])
def test_cached_decode_equals_full_forward(converted, name):
    import jax.numpy as jnp

    _, ours, _ = converted(name)
    ids = np.random.default_rng(3).integers(3, 160, (2, 14))
    full = np.asarray(ours(ids))
    cache = lsw_jax.KVCache.create(ours.cfg, 2, 32, jnp.float32)
    out = ours.forward(jnp.asarray(ids[:, :6]), cache=cache)
    steps = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(6, 14):
        out = ours.forward(
            jnp.asarray(ids[:, t : t + 1]), positions=jnp.full((2, 1), t), cache=cache
        )
        cache = out.cache
        steps.append(np.asarray(out.logits))
    got = np.concatenate(steps, axis=1)
    assert rel_err(got, full) < 1e-5


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_logits_at_one_position_per_row(converted, name):
    """A prefill that samples one token computes the head at one position per row."""
    import jax.numpy as jnp

    _, ours, _ = converted(name)
    ids = np.random.default_rng(4).integers(3, 160, (3, 9))
    full = np.asarray(ours(ids))
    at = np.array([8, 0, 5])
    got = np.asarray(ours.forward(jnp.asarray(ids), logits_at=jnp.asarray(at)).logits)
    assert got.shape == (3, 1, full.shape[-1])
    assert rel_err(got[:, 0], full[np.arange(3), at]) < 1e-6


@pytest.mark.parametrize("name", ["gqa", "tied", "mistral_window"])
def test_greedy_generate_matches_hf(converted, name):
    import torch

    hf, ours, _ = converted(name)
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 160, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding, as HF's generate expects
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    got = lsw_jax.generate(ours, ids, 12, attention_mask=mask, eos_token_id=[])
    np.testing.assert_array_equal(got, want)


def test_eos_stops_row_and_fills(converted):
    _, ours, _ = converted("gqa")
    ids = np.random.default_rng(5).integers(3, 160, (2, 7))
    free = lsw_jax.generate(ours, ids, 10, eos_token_id=[])
    eos = int(free[0, 3])
    got = lsw_jax.generate(ours, ids, 10, eos_token_id=eos)
    first = int(np.argmax(free[0] == eos))
    np.testing.assert_array_equal(got[0, : first + 1], free[0, : first + 1])
    assert np.all(got[0, first:] == eos)
    row1_stop = np.flatnonzero(free[1] == eos)
    end = row1_stop[0] + 1 if row1_stop.size else 10
    np.testing.assert_array_equal(got[1, :end], free[1, :end])


def test_sampling_reproducible_and_seed_dependent(converted):
    _, ours, _ = converted("gqa")
    ids = np.random.default_rng(6).integers(3, 160, (2, 5))
    kw = dict(temperature=1.5, top_k=50, top_p=0.95, eos_token_id=[])
    a = lsw_jax.generate(ours, ids, 16, seed=7, **kw)
    b = lsw_jax.generate(ours, ids, 16, seed=7, **kw)
    c = lsw_jax.generate(ours, ids, 16, seed=8, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_one_is_greedy(converted):
    _, ours, _ = converted("gqa")
    ids = np.random.default_rng(9).integers(3, 160, (1, 6))
    greedy = lsw_jax.generate(ours, ids, 8, eos_token_id=[])
    topk1 = lsw_jax.generate(ours, ids, 8, temperature=0.8, top_k=1, seed=3, eos_token_id=[])
    np.testing.assert_array_equal(greedy, topk1)


def test_prompt_longer_than_context_is_refused(converted):
    _, ours, _ = converted("gqa")
    ids = np.ones((1, 120), np.int32)
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        lsw_jax.generate(ours, ids, 20)


def test_per_row_cache_index_matches_separate_rows(converted):
    """Continuous batching: rows at different positions in one cache, one decode step."""
    import jax.numpy as jnp

    _, ours, _ = converted("mistral_window")
    rng = np.random.default_rng(11)
    lens = [3, 9]
    seqs = [rng.integers(3, 160, (n + 1,)) for n in lens]
    cache = lsw_jax.KVCache.create(ours.cfg, 2, 16, jnp.float32)
    for r, seq in enumerate(seqs):  # prefill each row into its own slot region
        row = lsw_jax.KVCache.create(ours.cfg, 1, 16, jnp.float32)
        row = ours.forward(jnp.asarray(seq[None, :-1]), cache=row).cache
        cache.k = [c.at[r].set(x[0]) for c, x in zip(cache.k, row.k, strict=True)]
        cache.v = [c.at[r].set(x[0]) for c, x in zip(cache.v, row.v, strict=True)]
        cache.valid = cache.valid.at[r].set(row.valid[0])
    cache.index = jnp.asarray(lens, jnp.int32)
    last = jnp.asarray([[s[-1]] for s in seqs])
    out = ours.forward(last, positions=jnp.asarray([[n] for n in lens]), cache=cache)
    for r, seq in enumerate(seqs):
        want = np.asarray(ours(seq[None]))[0, -1]
        assert rel_err(np.asarray(out.logits[r, 0]), want) < 1e-5
    np.testing.assert_array_equal(np.asarray(out.cache.index), [4, 10])


def test_segment_ids_isolate_packed_documents(converted):
    _, ours, _ = converted("gqa")
    rng = np.random.default_rng(12)
    a, b = rng.integers(3, 160, (1, 5)), rng.integers(3, 160, (1, 7))
    packed = np.concatenate([a, b], axis=1)
    seg = np.asarray([[1] * 5 + [2] * 7])
    pos = np.asarray([list(range(5)) + list(range(7))])
    got = np.asarray(ours(packed, segment_ids=seg, positions=pos))
    assert rel_err(got[:, :5], np.asarray(ours(a))) < 1e-5
    assert rel_err(got[:, 5:], np.asarray(ours(b))) < 1e-5

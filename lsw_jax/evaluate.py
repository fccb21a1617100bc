"""Evaluation: perplexity on text, multiple-choice accuracy by log-likelihood."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@jax.jit
def _token_logprobs(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """log p(ids[:, t+1] | ids[:, :t+1]) -> [B, T-1] (rows left-aligned, mask = real)."""
    model = nnx.merge(graphdef, state)
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits = model.forward(ids, attention_mask=mask, positions=pos).logits
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def _pad_rows(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _bucket(n: int) -> int:
    return 1 << max(4, math.ceil(math.log2(max(n, 2))))


def sequence_logprobs(
    model: Any, rows: list[list[int]], score_from: list[int], *, batch_size: int = 8
) -> list[tuple[float, int]]:
    """For each token row, (sum of log p of tokens at index >= score_from[i], their count)."""
    graphdef, state = nnx.split(model)
    out = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        length = _bucket(max(len(r) for r in chunk))
        if length > model.cfg.max_position_embeddings:
            raise ValueError(
                f"a sequence of {max(len(r) for r in chunk)} tokens exceeds the context of "
                f"{model.cfg.max_position_embeddings}"
            )
        while len(chunk) < batch_size:  # fixed batch shape: one compilation per length bucket
            chunk = chunk + [chunk[-1]]
        ids, mask = _pad_rows(chunk, length)
        lp = np.asarray(_token_logprobs(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))
        for i in range(min(batch_size, len(rows) - lo)):
            start, end = score_from[lo + i], len(rows[lo + i])
            out.append((float(lp[i, start - 1 : end - 1].sum()), end - start))
    return out


def perplexity(model: Any, tokenizer: Any, texts: list[str], *, max_len: int = 512) -> dict:
    """Token-level perplexity over documents (each cut into windows of ``max_len``)."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        rows += [ids[i : i + max_len] for i in range(0, max(len(ids) - 1, 1), max_len - 1)]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("perplexity: no document has two or more tokens")
    scores = sequence_logprobs(model, rows, [1] * len(rows))
    nll = -sum(s for s, _ in scores)
    n = sum(c for _, c in scores)
    return {"perplexity": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n}


def multiple_choice(model: Any, tokenizer: Any, items: list[Any]) -> dict:
    """acc: argmax of sum log p(choice | question); acc_norm: divided by the choice's
    length in characters (lm-eval-harness's length normalisation)."""
    rows, starts, owners = [], [], []
    for q_idx, item in enumerate(items):
        ctx = tokenizer.encode(item.question, add_special_tokens=False)
        if tokenizer.bos_token_id is not None:
            ctx = [tokenizer.bos_token_id] + ctx
        for choice in item.choices:
            rows.append(ctx + tokenizer.encode(" " + choice.strip(), add_special_tokens=False))
            starts.append(len(ctx))
            owners.append(q_idx)
    scores = sequence_logprobs(model, rows, starts)
    correct = correct_norm = 0
    k = 0
    for item in items:
        s = scores[k : k + len(item.choices)]
        raw = [x for x, _ in s]
        norm = [x / max(len(c.strip()) + 1, 1) for (x, _), c in zip(s, item.choices, strict=True)]
        correct += int(np.argmax(raw) == item.answer)
        correct_norm += int(np.argmax(norm) == item.answer)
        k += len(item.choices)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}

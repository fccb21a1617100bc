"""Evaluation: perplexity on text, multiple-choice accuracy by log-likelihood.

Both score exactly as EleutherAI's lm-evaluation-harness does for a causal model, so
``lsw-jax eval`` and lm-eval (``hf`` backend, or ``local-completions`` against
``lsw-jax serve``) report the same numbers on the same weights:

* no BOS is added to a context (lm-eval's ``add_bos_token=False`` default); a context
  that is empty is replaced by the prefix token (BOS, else EOS);
* a context's trailing whitespace moves to the continuation, and the continuation's
  tokens are those of ``encode(context + continuation)`` past ``encode(context)``
  (``_encode_pair``); a choice's continuation is ``" " + choice`` (the default
  ``target_delimiter``), acc_norm divides by ``len(choice)`` in characters;
* perplexity scores every token of a document in disjoint rolling windows of
  ``max_len`` tokens, the first conditioned on the prefix token
  (``get_rolling_token_windows`` with ``context_len=1``).

Rows are batched as they are (no padding rows), grouped by length.

``evaluate_domains`` adds held-out loss per domain of a packed mixture (the training
loss on unseen rows, not an lm-eval score) with routing statistics of routed adapters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsw_jax.adapters.lora import learned_routings, routing_stats
from lsw_jax.data import BATCH_KEYS, PackedDataset
from lsw_jax.train import token_nll


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
    """For each token row, (sum of log p of tokens at index >= score_from[i], their count).

    Rows are sorted by length and batched up to ``batch_size`` real rows (no padding
    rows); each batch is padded to a power-of-two length (few compilations)."""
    limit = model.cfg.max_position_embeddings
    too_long = max(len(r) for r in rows)
    if too_long > limit:
        raise ValueError(f"a sequence of {too_long} tokens exceeds the context of {limit}")
    graphdef, state = nnx.split(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        chunk = [rows[i] for i in idx]
        ids, mask = _pad_rows(chunk, min(_bucket(len(chunk[0])), max(limit, len(chunk[0]))))
        lp = np.asarray(_token_logprobs(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))
        for k, i in enumerate(idx):
            start, end = score_from[i], len(rows[i])
            out[i] = (float(lp[k, start - 1 : end - 1].sum()), end - start)
    return out


def prefix_token(tokenizer: Any) -> int:
    """What conditions a prediction with no context: BOS, else EOS (lm-eval's choice)."""
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
    tok = tokenizer.eos_token_id if tok is None else tok
    if tok is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition on")
    return tok


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval splits them (module docstring)."""
    if not context:
        return [prefix_token(tokenizer)], tokenizer.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def rolling_windows(ids: list[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """Disjoint windows predicting every token of ``ids`` once: (window tokens, index from
    which its tokens are scored); the first window starts with ``prefix``."""
    if max_len < 1:  # no window would advance
        raise ValueError(f"max_len={max_len} must be >= 1")
    out = []
    n = min(max_len, len(ids))
    out.append(([prefix] + ids[: n - 1] + ids[n - 1 : n], 1))
    done = n
    while done < len(ids):
        end = min(done + max_len, len(ids))
        window = ids[max(end - max_len - 1, 0) : end]
        out.append((window, len(window) - (end - done)))
        done = end
    return out


def perplexity(model: Any, tokenizer: Any, texts: list[str], *, max_len: int = 512) -> dict:
    """Token-level perplexity over documents (lm-eval's rolling windows of ``max_len``)."""
    prefix = prefix_token(tokenizer)
    rows, starts = [], []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for window, start in rolling_windows(ids, prefix, max_len) if ids else []:
            rows.append(window)
            starts.append(start)
    if not rows:
        raise ValueError("perplexity: every document is empty")
    scores = sequence_logprobs(model, rows, starts)
    nll = -sum(s for s, _ in scores)
    n = sum(c for _, c in scores)
    return {"perplexity": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n}


def multiple_choice(model: Any, tokenizer: Any, items: list[Any]) -> dict:
    """acc: argmax of log p(" " + choice | question); acc_norm: each divided by the
    choice's length in characters (lm-eval's multiple_choice metrics)."""
    rows, starts = [], []
    for item in items:
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, item.question, " " + choice)
            rows.append(ctx + cont)
            starts.append(len(ctx))
    scores = sequence_logprobs(model, rows, starts)
    correct = correct_norm = 0
    k = 0
    for item in items:
        raw = [x for x, _ in scores[k : k + len(item.choices)]]
        norm = [x / max(len(c), 1) for x, c in zip(raw, item.choices, strict=True)]
        correct += int(np.argmax(raw) == item.answer)
        correct_norm += int(np.argmax(norm) == item.answer)
        k += len(item.choices)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


# ---------------------------------------------------------------------- domains & routing


@jax.jit
def _domain_batch(graphdef: Any, state: tuple, batch: dict[str, jax.Array]) -> dict:
    """Summed target NLL and token count; with learned routers, per routing (layer) the
    token-weighted expert load [L, E] and routing entropy [L]."""
    model = nnx.merge(graphdef, *state)
    nll, out = token_nll(model, batch)
    res = {"nll": jnp.sum(nll * batch["loss_mask"]), "n": batch["loss_mask"].sum()}
    routings = learned_routings(out.routing)
    if routings:
        mask = batch["segment_ids"] > 0
        n_tok = mask.sum().astype(jnp.float32)
        stats = [routing_stats(r, r.logits.shape[-1], mask) for r in routings]
        res["tokens"] = n_tok
        res["load"] = jnp.stack([s["expert_load"] for s in stats]) * n_tok
        res["entropy"] = jnp.stack([s["routing_entropy"] for s in stats]) * n_tok
    return res


def evaluate_domains(
    graphdef: Any, state: tuple, held: PackedDataset, *, batch_size: int = 8
) -> dict[str, dict]:
    """Held-out loss per domain of ``held`` and, for routed adapters, its routing.

    ``state``: the ``nnx.split`` states after ``graphdef`` (e.g. ``(trainable, rng,
    frozen)``). Per domain: ``loss`` (mean NLL per target token), ``target_tokens``, and
    with learned routers ``expert_load_per_layer`` [L][E] (share of the top-k assignments
    of all non-padding tokens, rows sum to 1), ``routing_entropy_per_layer`` [L] (mean
    entropy in nats of the router softmax) and ``routed_tokens``. L is 1 for switch.
    Batches are padded to ``batch_size`` rows, so one compilation serves every call.
    """
    out = {}
    for d, name in enumerate(held.domain_names):
        idx = np.flatnonzero(held.domain_id == d)
        acc: dict[str, Any] = {}
        for lo in range(0, len(idx), batch_size):
            rows = held.rows(idx[lo : lo + batch_size])
            fill = batch_size - len(rows["input_ids"])
            batch = {
                k: jnp.asarray(
                    np.concatenate([rows[k], np.zeros((fill, *rows[k].shape[1:]), rows[k].dtype)])
                )
                for k in BATCH_KEYS
            }
            r = jax.tree.map(np.asarray, _domain_batch(graphdef, state, batch))
            acc = r if not acc else jax.tree.map(np.add, acc, r)
        if not acc:
            raise ValueError(f"held-out domain {name!r} has no rows")
        res = {"loss": float(acc["nll"] / max(acc["n"], 1.0)), "target_tokens": int(acc["n"])}
        if "load" in acc:
            res["expert_load_per_layer"] = (acc["load"] / acc["tokens"]).tolist()
            res["routing_entropy_per_layer"] = (acc["entropy"] / acc["tokens"]).tolist()
            res["routed_tokens"] = int(acc["tokens"])
        out[name] = res
    return out


def mutual_information(usage: np.ndarray) -> float:
    """I(domain; expert) in nats of a usage table [D, E] whose rows sum to 1 (each row: how a
    domain's assignments spread over experts), domains equally likely. 0: every domain
    routed alike; log(min(D, E)) at most."""
    p = np.asarray(usage, np.float64) / len(usage)
    marginal = p.sum(0, keepdims=True) * p.sum(1, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / marginal[nz])))


def routing_summary(per_domain: dict[str, dict], names: list[str]) -> dict[str, Any]:
    """Routing statistics of :func:`evaluate_domains` output over the domains ``names``.

    usage_layer0 / usage_mean_layers [D][E]; entropy_layer0 / entropy_mean_layers [D];
    expert_load [E] (layer 0, domains weighted equally); mi_layer0, mi_per_layer [L],
    mi_mean_over_layers, and mi_of_mean_usage (of the layer-averaged table).
    """
    load = np.stack([np.asarray(per_domain[n]["expert_load_per_layer"]) for n in names])  # D,L,E
    ent = np.stack([np.asarray(per_domain[n]["routing_entropy_per_layer"]) for n in names])
    mi_layers = [mutual_information(load[:, layer]) for layer in range(load.shape[1])]
    return {
        "usage_layer0": load[:, 0].tolist(),
        "usage_mean_layers": load.mean(1).tolist(),
        "entropy_layer0": ent[:, 0].tolist(),
        "entropy_mean_layers": ent.mean(1).tolist(),
        "expert_load": load[:, 0].mean(0).tolist(),
        "mi_layer0": mi_layers[0],
        "mi_mean_over_layers": float(np.mean(mi_layers)),
        "mi_per_layer": mi_layers,
        "mi_of_mean_usage": mutual_information(load.mean(1)),
    }

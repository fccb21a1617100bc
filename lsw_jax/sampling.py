"""Sampling: one set of settings and one per-row sampler for ``generate``, the serving
engine and the server.

``SamplingParams`` holds a request's settings and their limits (validated once, here).
``sample_rows`` draws every row's next token inside the jitted step, each row with its own
temperature / top-k / top-p and its own PRNG key, so a row's samples do not depend on the
batch it shares.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MAX_TEMPERATURE = 100.0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request; ``temperature == 0`` is greedy.

    max_tokens: new tokens at most. top_k: 0 = off. top_p in (0, 1]. seed: the request's
    PRNG seed. stop_token_ids: extra ids that end the request (after being emitted).
    ignore_eos: keep going past the model's EOS ids.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature={self.temperature} must be in [0, {MAX_TEMPERATURE}]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be in [0, 2**63)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def stop_ids(self, eos_ids: tuple[int, ...]) -> tuple[int, ...]:
        """Every id that ends this request: its stop ids, plus EOS unless ignored."""
        eos = () if self.ignore_eos else tuple(eos_ids)
        return tuple(dict.fromkeys(eos + self.stop_token_ids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per-row sampler inputs, each ``[B]`` (a pytree: one jitted function serves all)."""

    seeds: Array  # uint32
    counters: Array  # int32: tokens the row's request has generated so far
    temperature: Array  # float32
    top_k: Array  # int32, 0 = off
    top_p: Array  # float32

    @classmethod
    def from_params(
        cls, params: list[SamplingParams | None], counters: list[int] | None = None
    ) -> RowSampling:
        """Rows of ``params`` (None: an idle row, greedy); ``counters`` default 0."""
        n = len(params)
        seeds = np.zeros((n,), np.uint32)
        temp, top_k, top_p = np.zeros((n,), np.float32), np.zeros((n,), np.int32), np.ones((n,))
        for i, sp in enumerate(params):
            if sp is not None:
                seeds[i] = sp.seed % 2**32
                temp[i], top_k[i], top_p[i] = sp.temperature, sp.top_k, sp.top_p
        ctr = np.zeros((n,), np.int32) if counters is None else np.asarray(counters, np.int32)
        return cls(
            jnp.asarray(seeds),
            jnp.asarray(ctr),
            jnp.asarray(temp),
            jnp.asarray(top_k),
            jnp.asarray(top_p, jnp.float32),
        )

    def advance(self, active: Array | None = None) -> RowSampling:
        """The next step's counters (rows not ``active`` keep theirs)."""
        step = jnp.ones_like(self.counters) if active is None else active.astype(jnp.int32)
        return dataclasses.replace(self, counters=self.counters + step)


def sample_rows(logits: Array, rs: RowSampling) -> Array:
    """Next token per row from ``logits [B, V]``: argmax where ``temperature == 0``, else
    temperature, top-k and top-p sampling with key ``fold_in(key(seed), counter)``."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        v = logits.shape[-1]
        x = logits.astype(jnp.float32) / jnp.maximum(rs.temperature, 1e-6)[:, None]
        desc = -jnp.sort(-x, axis=-1)
        kth = jnp.take_along_axis(desc, jnp.clip(rs.top_k - 1, 0, v - 1)[:, None], axis=-1)
        x = jnp.where((rs.top_k[:, None] > 0) & (x < kth), -jnp.inf, x)
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        cut_idx = jnp.sum(before < rs.top_p[:, None], axis=-1, keepdims=True) - 1
        x = jnp.where(x < jnp.take_along_axis(desc, cut_idx, axis=-1), -jnp.inf, x)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
            rs.seeds, rs.counters
        )
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(rs.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(rs.temperature > 0), sample, lambda _: greedy, None)

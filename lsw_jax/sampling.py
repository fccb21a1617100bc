"""Sampling: one set of settings and one per-row sampler for ``generate``, the serving
engine and the server.

``SamplingParams`` holds a request's settings and their limits (validated once, here).
``sample_rows`` draws every row's next token inside the jitted step, each row with its own
logit adjustments (``LogitAdjust``: logit bias, ``min_tokens``, repetition / presence /
frequency penalties), temperature, top-k, top-p and PRNG key, so a row's samples do not
depend on the batch it shares. ``token_logprobs`` gives the log-probabilities of the chosen
tokens and the top-N alternatives in the same step, from the RAW model logits (before any
adjustment, temperature, top-k or top-p: vLLM's default, ``logprobs_mode="raw_logprobs"``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20  # top-N alternatives per token at most (vLLM's default max_logprobs)
LOGPROB_BUCKETS = (5, MAX_LOGPROBS)  # the static N of the jitted steps: few compiles


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request; ``temperature == 0`` is greedy.

    max_tokens: new tokens at most (0: score the prompt only). top_k: 0 = off. top_p in
    (0, 1]. seed: the request's PRNG seed. stop_token_ids: extra ids that end the request
    (after being emitted). stop: strings that end it (matched in the engine's text; the text
    is cut before the match). ignore_eos: keep going past the model's EOS ids. min_tokens:
    EOS, stop ids and stop strings cannot end the request before this many tokens.
    presence_penalty / frequency_penalty (OpenAI): subtracted from the logits of tokens
    already generated, once / per occurrence. repetition_penalty (HF/CTRL): logits of tokens
    in the prompt or output are divided by it (multiplied when negative); 1 = off.
    logit_bias: (token id, bias) pairs added to the logits. logprobs: top-N alternatives to
    report per generated token (None: no log-probabilities; 0: the chosen token's only).
    prompt_logprobs: also report the prompt tokens' log-probabilities (``echo``).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 0")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature={self.temperature} must be in [0, {MAX_TEMPERATURE}]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be in [0, 2**63)")
        if not 0 <= self.min_tokens <= max(self.max_tokens, 0):
            raise ValueError(f"min_tokens={self.min_tokens} must be in [0, max_tokens]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be in (0, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        bias = tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items())
        if any(not -100.0 <= b <= 100.0 for _, b in bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit adjustment (bias, min_tokens, penalties) is asked for."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )

    def stop_ids(self, eos_ids: tuple[int, ...]) -> tuple[int, ...]:
        """Every id that ends this request: its stop ids, plus EOS unless ignored."""
        eos = () if self.ignore_eos else tuple(eos_ids)
        return tuple(dict.fromkeys(eos + self.stop_token_ids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogitAdjust:
    """Per-row logit adjustments, each ``[B, V]`` float32, applied in this order (vLLM's):
    ``x = logits + bias`` (logit_bias; -inf on stop ids before min_tokens), then the
    repetition penalty (``x / r`` where ``x > 0``, ``x * r`` elsewhere; r = 1 leaves a token
    alone), then ``x - penalty`` (presence + frequency x count of generated tokens)."""

    bias: Array
    repetition: Array
    penalty: Array

    @classmethod
    def build(
        cls,
        rows: list[tuple[SamplingParams, list[int], list[int]] | None],
        vocab: int,
        eos_ids: tuple[int, ...],
    ) -> LogitAdjust:
        """From each row's (params, prompt ids, generated ids); None: an idle row."""
        n = len(rows)
        bias = np.zeros((n, vocab), np.float32)
        rep = np.ones((n, vocab), np.float32)
        pen = np.zeros((n, vocab), np.float32)
        for i, row in enumerate(rows):
            if row is None:
                continue
            sp, prompt, output = row
            for t, b in sp.logit_bias:
                bias[i, t] += b
            if len(output) < sp.min_tokens:
                bias[i, list(sp.stop_ids(eos_ids))] = -np.inf
            if sp.repetition_penalty != 1.0:
                rep[i, np.asarray(prompt + output, np.int64)] = sp.repetition_penalty
            if output and (sp.presence_penalty or sp.frequency_penalty):
                counts = np.bincount(np.asarray(output, np.int64), minlength=vocab)[:vocab]
                pen[i] = sp.presence_penalty * (counts > 0) + sp.frequency_penalty * counts
        return cls(jnp.asarray(bias), jnp.asarray(rep), jnp.asarray(pen))

    def __call__(self, logits: Array) -> Array:
        x = logits.astype(jnp.float32) + self.bias
        x = jnp.where(x > 0, x / self.repetition, x * self.repetition)
        return x - self.penalty


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per-row sampler inputs, each ``[B]`` (a pytree: one jitted function serves all);
    ``adjust``: the rows' logit adjustments, or None when no row asks for one (then the
    step compiles without them and costs nothing extra)."""

    seeds: Array  # uint32
    counters: Array  # int32: tokens the row's request has generated so far
    temperature: Array  # float32
    top_k: Array  # int32, 0 = off
    top_p: Array  # float32
    adjust: LogitAdjust | None = None

    @classmethod
    def from_params(
        cls,
        params: list[SamplingParams | None],
        counters: list[int] | None = None,
        adjust: LogitAdjust | None = None,
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
            adjust,
        )

    def advance(self, active: Array | None = None) -> RowSampling:
        """The next step's counters (rows not ``active`` keep theirs)."""
        step = jnp.ones_like(self.counters) if active is None else active.astype(jnp.int32)
        return dataclasses.replace(self, counters=self.counters + step)


def sample_rows(logits: Array, rs: RowSampling) -> Array:
    """Next token per row from ``logits [B, V]``: the row's logit adjustments (if any),
    then argmax where ``temperature == 0``, else temperature, top-k and top-p sampling with
    key ``fold_in(key(seed), counter)``."""
    if rs.adjust is not None:
        logits = rs.adjust(logits)
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of chosen tokens and their top-N alternatives (raw model)."""

    chosen: Array  # [..., ] float32: log p(token)
    top_ids: Array  # [..., N] int32, most likely first
    top_logprobs: Array  # [..., N] float32


def logprob_bucket(n: int | None) -> int:
    """The static top-N a step computes for a requested ``n`` (0: none at all)."""
    if n is None:
        return 0
    return next(b for b in LOGPROB_BUCKETS if b >= n)


def token_logprobs(logits: Array, tokens: Array, n: int) -> TokenLogprobs:
    """``log_softmax(logits)`` at ``tokens`` and its top ``n``: logits ``[..., V]``, tokens
    ``[...]``; computed in float32 from the raw logits."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, n)
    return TokenLogprobs(chosen, top_ids.astype(jnp.int32), top_lp)

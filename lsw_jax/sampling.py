"""Sampling: one set of settings and one per-row sampler for ``generate``, the serving
engine and the server.

``SamplingParams`` holds a request's settings and their limits (validated once, here).
``sample_rows`` draws every row's next token inside the jitted step, each row with its own
logit adjustments (``LogitAdjust``: logit bias, ``min_tokens``, repetition / presence /
frequency penalties), temperature, top-k, top-p and PRNG key, so a row's samples do not
depend on the batch it shares. It never sorts the vocabulary: top-k / top-p cuts come from
XLA's top-k over 256 candidates or, beyond them, an exact bucketed search (``cutoffs``),
and the draw is an inverse CDF at one uniform per row (``draw_above``); a sampled row costs
about what a greedy one does (scripts/bench_sampling.py). ``token_logprobs`` gives the log-probabilities of the chosen
tokens and the top-N alternatives in the same step, from the RAW model logits (before any
adjustment, temperature, top-k or top-p: vLLM's default, ``logprobs_mode="raw_logprobs"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20  # top-N alternatives per token at most (vLLM's default max_logprobs)
LOGPROB_BUCKETS = (5, MAX_LOGPROBS)  # the static N of the jitted steps: few compiles
CANDIDATES = 256  # top-k / top-p cut found among this many largest logits when they hold it
DRAW_BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request; ``temperature == 0`` is greedy.

    max_tokens: new tokens at most (0: score the prompt only). top_k: 0 = off. top_p in
    (0, 1]. seed: the request's PRNG seed, any int64 (its low 32 bits pick the key). stop_token_ids: extra ids that end the request
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
        if not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be a 64-bit signed integer")
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
    """Per-row logit adjustments, applied in this order (vLLM's): ``x = logits + bias``
    (logit_bias), -inf on the ``ban`` ids (EOS and stop ids) while the row has generated
    fewer than ``min_tokens``, then the repetition penalty on tokens ``seen`` in the prompt
    or output (``x / r`` where ``x > 0``, ``x * r`` elsewhere), then ``x - presence *
    (counts > 0) - frequency * counts`` over the generated tokens' ``counts``.

    A device-resident state: ``counted`` adds a step's sampled tokens inside the jitted
    step and ``with_rows`` writes admitted rows, so nothing ``[B, V]`` crosses to the host
    per step. Rows with ``on`` false pass through (and when no row is on, the sampler skips
    the adjustment)."""

    bias: Array  # [B, V] float32
    ban: Array  # [B, V] bool
    seen: Array  # [B, V] bool: in the prompt or the output
    counts: Array  # [B, V] float32: times generated
    min_tokens: Array  # [B] int32
    repetition: Array  # [B] float32, 1 = off
    presence: Array  # [B] float32
    frequency: Array  # [B] float32
    on: Array  # [B] bool: the row asks for any adjustment

    @classmethod
    def build(
        cls,
        rows: list[tuple[SamplingParams, list[int], list[int]] | None],
        vocab: int,
        eos_ids: tuple[int, ...],
    ) -> LogitAdjust:
        """From each row's (params, prompt ids, generated ids); None: an idle row."""
        n = len(rows)
        bias, counts = np.zeros((n, vocab), np.float32), np.zeros((n, vocab), np.float32)
        ban, seen = np.zeros((n, vocab), bool), np.zeros((n, vocab), bool)
        per_row = np.zeros((4, n), np.float32)  # min_tokens, repetition, presence, frequency
        per_row[1] = 1.0
        on = np.zeros((n,), bool)
        for i, row in enumerate(rows):
            if row is None or not row[0].adjusts_logits:
                continue
            sp, prompt, output = row
            on[i] = True
            for t, b in sp.logit_bias:
                bias[i, t] += b
            ban[i, list(sp.stop_ids(eos_ids))] = True
            seen[i, np.asarray(prompt + output, np.int64)] = True
            counts[i] = np.bincount(np.asarray(output, np.int64), minlength=vocab)[:vocab]
            per_row[:, i] = (sp.min_tokens, sp.repetition_penalty, sp.presence_penalty,
                             sp.frequency_penalty)  # fmt: skip
        return cls(
            jnp.asarray(bias),
            jnp.asarray(ban),
            jnp.asarray(seen),
            jnp.asarray(counts),
            jnp.asarray(per_row[0], jnp.int32),
            *map(jnp.asarray, per_row[1:]),
            jnp.asarray(on),
        )

    @classmethod
    def identity(cls, n: int, vocab: int) -> LogitAdjust:
        """``n`` rows that adjust nothing."""
        return cls.build([None] * n, vocab, ())

    def __call__(self, logits: Array, generated: Array) -> Array:
        """``logits [B, V]`` adjusted, float32; ``generated [B]``: tokens each row has
        generated so far (``min_tokens``)."""
        x = logits.astype(jnp.float32) + self.bias
        x = jnp.where(self.ban & (generated < self.min_tokens)[:, None], -jnp.inf, x)
        r = jnp.where(self.seen, self.repetition[:, None], 1.0)
        x = jnp.where(x > 0, x / r, x * r)
        penalty = self.presence[:, None] * (self.counts > 0) + self.frequency[:, None] * self.counts
        return jnp.where(self.on[:, None], x - penalty, logits.astype(jnp.float32))

    def counted(self, tokens: Array, live: Array) -> LogitAdjust:
        """The state after rows ``live [B]`` generated ``tokens [B]``."""
        b = jnp.arange(tokens.shape[0])
        add = live & self.on
        return dataclasses.replace(
            self,
            counts=self.counts.at[b, tokens].add(add.astype(jnp.float32)),
            seen=self.seen.at[b, tokens].max(add),
        )

    def with_rows(self, rows: Array, new: LogitAdjust) -> LogitAdjust:
        """Rows ``rows [R]`` replaced by ``new``'s R rows (rows out of range: dropped)."""
        return jax.tree.map(lambda a, x: a.at[rows].set(x, mode="drop"), self, new)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per-row sampler inputs, each ``[B]`` (a pytree: one jitted function serves all);
    ``adjust``: the rows' logit adjustments, or None (``generate``: none asked for)."""

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
    then argmax where ``temperature == 0``, else a draw from
    ``softmax(x / T)`` restricted to ``x >= cut`` (``cutoffs``: top-k, then top-p) with
    one uniform per row from ``fold_in(key(seed), counter)``.

    No step sorts the vocabulary (a sort of [8, 49152] costs XLA's CPU 74 ms, more than
    a whole greedy decode step of SmolLM2-135M)."""
    if rs.adjust is not None:
        adjust = lambda x: rs.adjust(x, rs.counters)
        plain = lambda x: x.astype(jnp.float32)
        logits = jax.lax.cond(jnp.any(rs.adjust.on), adjust, plain, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        x = logits.astype(jnp.float32) / jnp.maximum(rs.temperature, 1e-6)[:, None]
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
            rs.seeds, rs.counters
        )
        u = jax.vmap(jax.random.uniform)(keys)  # [B] in [0, 1)
        drawn = draw_above(x, cutoffs(x, rs), u)
        return jnp.where(rs.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(rs.temperature > 0), sample, lambda _: greedy, None)


def _wants_cut(x: Array, rs: RowSampling) -> tuple[Array, Array]:
    """[B] effective top-k (0: off; >= V is off too) and whether the row cuts at all."""
    top_k = jnp.where(rs.top_k >= x.shape[-1], 0, rs.top_k)
    return top_k, (rs.temperature > 0) & ((top_k > 0) | (rs.top_p < 1.0))


def cutoffs(x: Array, rs: RowSampling) -> Array:
    """[B] logit ``cut`` per row: the tokens kept are ``x >= cut`` (-inf: all). Top-k keeps
    the k largest (ties with the k-th included); top-p then keeps the smallest prefix of
    those, most likely first, whose probability (renormalised over them) reaches top_p
    (``cutoffs_reference`` says it with a sort). Found among the ``CANDIDATES`` largest
    logits (XLA's top-k: no sort); a row whose cut lies beyond them takes
    ``_cut_beyond_candidates`` (a bucketed search, exact)."""
    top_k, wants = _wants_cut(x, rs)
    k = min(CANDIDATES, x.shape[-1])

    def from_candidates():
        c = jax.lax.top_k(x, k)[0]  # [B, k] most likely first
        kth = jnp.take_along_axis(c, jnp.clip(top_k - 1, 0, k - 1)[:, None], axis=-1)[:, 0]
        kth = jnp.where(top_k > 0, kth, -jnp.inf)
        # A static slice of c would make XLA's CPU sort the whole row instead of top-k.
        top = jnp.max(x, axis=-1, keepdims=True)
        z = jnp.sum(jnp.where(x >= kth[:, None], jnp.exp(x - top), 0.0), axis=-1)  # [B]
        p = jnp.where(c >= kth[:, None], jnp.exp(c - top), 0.0) / z[:, None]
        cum = jnp.cumsum(p, axis=-1)
        at = jnp.sum(cum - p < rs.top_p[:, None], axis=-1) - 1
        p_cut = jnp.take_along_axis(c, jnp.clip(at, 0, k - 1)[:, None], axis=-1)[:, 0]
        cut = jnp.where(rs.top_p < 1.0, jnp.maximum(p_cut, kth), kth)
        held = ~wants | ((top_k <= k) & ((rs.top_p >= 1.0) | (cum[:, -1] >= rs.top_p)))
        return jnp.where(wants, cut, -jnp.inf), held, c, kth

    def cut(_):
        fast, held, c, kth = from_candidates()
        slow = lambda _: _cut_beyond_candidates(x, top_k, rs.top_p, c, kth, held)
        return jax.lax.cond(jnp.all(held), lambda _: fast, slow, None)

    none = jnp.full(x.shape[:1], -jnp.inf, jnp.float32)
    return jax.lax.cond(jnp.any(wants), cut, lambda _: none, None)


def _cut_beyond_candidates(
    x: Array,
    top_k: Array,
    top_p: Array,
    c: Array,
    kth: Array,
    held: Array,
    *,
    bins: int = 4096,
    finish: int = 128,
) -> Array:
    """``cutoffs`` for the rows not ``held`` by their candidates ``c [B, K]`` (the others'
    results are not used), given the k-th largest logit ``kth`` found among them (-inf:
    no top-k). The k-th largest logit, where k > K: by bisection on the
    logits' order (32 passes over [B, V], only when some row asks). The top-p cut, the
    largest logit t whose mass ``M(t) = sum(w[x >= t])`` reaches ``need = top_p *
    sum(w)``: the logits in [lo, hi) (lo the smallest kept, hi the K-th candidate: the cut
    lies below it) go into ``bins`` buckets of equal width, whose masses (one segment sum)
    name the bucket holding the cut: the binning is monotone in x, so the mass above a
    bucket is exact. Its logits are ranked by XLA's top-k (``finish`` of them at most;
    more: 32 passes on the order). Chosen by timing on XLA's CPU ([8, 49152], top_p 0.9):
    4.0 ms against 11.8 for 64 passes on the order (1,024 buckets: 10.8, too many
    logits left per bucket)."""
    b, k = c.shape
    keys = _order_key(x)
    beyond = ~held & (top_k > k)

    def kth_by_bisection(_):
        t = _largest_key(keys, lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= top_k)
        return jnp.where(beyond, _from_order_key(t), kth)

    kth = jax.lax.cond(jnp.any(beyond), kth_by_bisection, lambda _: kth, None)
    top = jnp.max(x, axis=-1, keepdims=True)
    w = jnp.where(x >= kth[:, None], jnp.exp(x - top), 0.0)
    need = top_p * jnp.sum(w, axis=-1)  # [B]
    lo = jnp.min(jnp.where(w > 0, x, jnp.inf), axis=-1)  # M(lo) = sum(w) >= need
    hi = c[:, -1]
    m_hi = jnp.sum(jnp.where(x >= hi[:, None], w, 0.0), axis=-1)
    at_hi = m_hi >= need  # ties of the K-th candidate beyond the candidates: the cut is it
    inside = (x >= lo[:, None]) & (x < hi[:, None])
    scale = bins / jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny)
    bucket = jnp.clip(jnp.floor((x - lo[:, None]) * scale[:, None]), 0, bins - 1).astype(jnp.int32)
    bucket = jnp.where(inside, bucket, bins)  # [B, V]; bins: not in [lo, hi)
    ids = bucket + (bins + 1) * jnp.arange(b)[:, None]
    mass = jax.ops.segment_sum(w.ravel(), ids.ravel(), num_segments=b * (bins + 1))
    mass = mass.reshape(b, bins + 1)[:, :bins]
    above = m_hi[:, None] + jnp.cumsum(mass[:, ::-1], axis=-1)[:, ::-1]  # M(bucket j's least)
    j = jnp.maximum(jnp.sum(above >= need[:, None], axis=-1) - 1, 0)  # the cut's bucket
    nxt = jnp.take_along_axis(above, jnp.minimum(j + 1, bins - 1)[:, None], axis=-1)[:, 0]
    m_above = jnp.where(j + 1 < bins, nxt, m_hi)  # mass above the cut's bucket
    in_bucket = bucket == j[:, None]
    finish = min(finish, x.shape[-1])
    left = jax.lax.top_k(jnp.where(in_bucket, x, -jnp.inf), finish)[0]  # [B, finish]
    cum = m_above[:, None] + jnp.cumsum(jnp.exp(left - top), axis=-1)
    n_in = jnp.sum(in_bucket, axis=-1)
    at = jnp.minimum(jnp.sum(cum < need[:, None], axis=-1), jnp.maximum(n_in - 1, 0))
    p_cut = jnp.where(at_hi, hi, jnp.take_along_axis(left, at[:, None], axis=-1)[:, 0])
    overflow = ~held & (top_p < 1.0) & ~at_hi & (n_in > finish)

    def p_cut_by_bisection(_):
        t = _largest_key(keys, lambda t: jnp.sum(jnp.where(keys >= t[:, None], w, 0.0), -1) >= need)
        return jnp.where(overflow, _from_order_key(t), p_cut)

    p_cut = jax.lax.cond(jnp.any(overflow), p_cut_by_bisection, lambda _: p_cut, None)
    return jnp.where(top_p < 1.0, jnp.maximum(p_cut, kth), kth)


def _order_key(x: Array) -> Array:
    """uint32 keys in the order of the float32 values ``x`` (an involution on the bits
    but for the final sign flip)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    i = i ^ ((i >> 31) & 0x7FFFFFFF)
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _from_order_key(key: Array) -> Array:
    i = jax.lax.bitcast_convert_type(key ^ jnp.uint32(0x80000000), jnp.int32)
    return jax.lax.bitcast_convert_type(i ^ ((i >> 31) & 0x7FFFFFFF), jnp.float32)


def _largest_key(keys: Array, holds: Callable[[Array], Array]) -> Array:
    """[B] largest key t of each row of ``keys [B, V]`` with ``holds(t)`` (monotone:
    true at the row's smallest key, false above some t), in 32 halvings."""

    def halve(_, bounds):
        lo, hi = bounds
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)  # ceil of the midpoint, without overflow
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    bounds = (jnp.min(keys, axis=-1), jnp.max(keys, axis=-1))
    return jax.lax.fori_loop(0, 32, halve, bounds)[0]


def cutoffs_reference(x: Array, rs: RowSampling) -> Array:
    """``cutoffs`` by sorting every row (the definition; the fallback and the test oracle)."""
    top_k, wants = _wants_cut(x, rs)
    v = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    desc = jnp.where(desc >= kth[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    at = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < rs.top_p[:, None], axis=-1) - 1
    p_cut = jnp.take_along_axis(desc, jnp.clip(at, 0, v - 1)[:, None], axis=-1)[:, 0]
    cut = jnp.where(rs.top_p < 1.0, jnp.maximum(p_cut, kth), kth)
    return jnp.where(wants, cut, -jnp.inf)


def draw_above(x: Array, cut: Array, u: Array) -> Array:
    """[B] token t with probability ``softmax(x)[t]`` over the tokens with ``x >= cut``
    (inverse CDF at ``u [B]``), in two levels (blocks of ``DRAW_BLOCK`` tokens, then the
    token in its block) so no pass scans the vocabulary in sequence."""
    b, v = x.shape
    w = jnp.where(x >= cut[:, None], jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), 0.0)
    nb = -(-v // DRAW_BLOCK)
    w = jnp.pad(w, ((0, 0), (0, nb * DRAW_BLOCK - v))).reshape(b, nb, DRAW_BLOCK)
    mass = jnp.sum(w, axis=-1)  # [B, nb]
    cum = jnp.cumsum(mass, axis=-1)
    target = u * cum[:, -1]
    block = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), nb - 1)  # first cum > target
    rest = target - jnp.take_along_axis(cum - mass, block[:, None], axis=-1)[:, 0]
    inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]  # [B, DRAW_BLOCK]
    pos = jnp.sum(jnp.cumsum(inner, axis=-1) <= rest[:, None], axis=-1)
    # Rounding can put ``rest`` past the block's own sum: stay on a token it holds.
    last = jnp.max(jnp.where(inner > 0, jnp.arange(DRAW_BLOCK), 0), axis=-1)
    return (block * DRAW_BLOCK + jnp.minimum(pos, last)).astype(jnp.int32)


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

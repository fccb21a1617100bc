"""LoRA expert banks, routers and the routing struct shared by every execution plan.

Router input (LoRA-Switch, ``switch``): the output of decoder layer 0's
``input_layernorm`` applied to the token embeddings, i.e. exactly the tensor layer 0's
q/k/v projections read. It is computed once per token, before layer 0, so the chosen
experts of every layer are known before any layer runs (pre-gating). ``mola`` routers read
their own layer's ``input_layernorm`` output, and one routing serves that layer's
attention and MLP linears.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsw_jax.config import ROUTER_CONTEXTS, AdapterConfig
from lsw_jax.linears import ALL_TARGETS, LINEAR_BY_NAME, LINEARS

Array = jax.Array


class LoRAParam(nnx.Param):
    """Trainable adapter weights (the only parameters training differentiates)."""


class RouterParam(LoRAParam):
    """Router weights; trained with the adapters."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    """Which experts each token uses and with what weight.

    expert_ids: [B, T, k] int32, indices into the bank's experts.
    gates: [B, T, k] float32, softmax over the router logits, restricted to the top-k and
        renormalised to sum to 1 (the bank's alpha/r scaling is applied by the bank).
    logits: [B, T, E] float32 router logits (None for fixed routing); feeds the aux losses.
    """

    expert_ids: Array
    gates: Array
    logits: Array | None = None


def learned_routings(routing: Routing | list[Routing] | None) -> list[Routing]:
    """The routings of a model output that come from a router with logits: [] for a plain
    LoRA or no adapter, [one] for switch, one per layer for MoLA."""
    routings = routing if isinstance(routing, list) else [routing]
    return [r for r in routings if r is not None and r.logits is not None]


def top_k_routing(logits: Array, top_k: int) -> Routing:
    """Softmax over experts, keep the top-k, renormalise over the k."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    gates = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return Routing(top_i.astype(jnp.int32), gates, logits)


class Router(nnx.Module):
    """``logits[b, t, e] = sum_d h[b, t, d] * weight[e, d] / temperature``, then top-k gating.

    weight [E, D] starts as N(0, init_std^2). The temperature divides the logits that the
    softmax, the top-k and the auxiliary losses all see. With ``context="prefix_mean"`` h
    is first replaced by its mean over the row's real tokens up to and including t (within
    t's own document of a packed row): ``causal_mean``. With ``normalize_input``, h is then
    rescaled per token to unit RMS (``h / sqrt(mean_d h^2 + 1e-6)``).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        init_std: float = 0.02,
        temperature: float = 1.0,
        normalize_input: bool = False,
        context: str = "token",
        rngs: nnx.Rngs,
    ):
        if context not in ROUTER_CONTEXTS:
            raise ValueError(f"router context {context!r} must be one of {ROUTER_CONTEXTS}")
        self.top_k = top_k
        self.temperature = float(temperature)
        self.normalize_input = bool(normalize_input)
        self.context = context
        w = init_std * jax.random.normal(rngs.params(), (num_experts, dim), jnp.float32)
        self.weight = RouterParam(w, logical_axes=("experts", "embed"))

    def __call__(
        self, h: Array, token_mask: Array | None = None, segment_ids: Array | None = None
    ) -> Routing:
        """h [B, T, D]; token_mask [B, T] real tokens and segment_ids [B, T] documents of a
        packed row (both used by ``context="prefix_mean"`` only)."""
        if self.context == "prefix_mean":
            h = causal_mean(h.astype(jnp.float32), token_mask, segment_ids)[0]
        return self.route_features(h)

    def route_features(self, h: Array) -> Routing:
        """Routing of router inputs that already carry their context (``causal_mean``)."""
        h = h.astype(jnp.float32)
        if self.normalize_input:
            h = unit_rms(h)
        logits = jnp.einsum("btd,ed->bte", h, self.weight[...].astype(jnp.float32))
        return top_k_routing(logits / self.temperature, self.top_k)


def causal_mean(
    h: Array,
    token_mask: Array | None,
    segment_ids: Array | None,
    start: tuple[Array, Array] | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """``out[b, t] = mean of h[b, s]`` over real tokens s <= t of t's document (a packed row's
    segment; the whole row without segment_ids), and the running (sum [B, D], count [B])
    after the last position, which a KV cache carries to the next call as ``start``.
    Padding neither counts nor moves the mean; a position with no real token so far gets 0.
    """
    b, t, _ = h.shape
    m = jnp.ones((b, t), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    hm = h * m[..., None]
    total, count = jnp.cumsum(hm, axis=1), jnp.cumsum(m, axis=1)
    if start is not None:
        if segment_ids is not None:
            raise ValueError("a carried router state continues one document: no segment_ids")
        total = total + start[0][:, None, :].astype(total.dtype)
        count = count + start[1][:, None].astype(count.dtype)
    if segment_ids is not None:  # subtract what came before each document's first token
        pos = jnp.arange(t)[None, :]
        starts = jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        first = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)  # [B, T]
        before = jnp.take_along_axis(total - hm, first[..., None], axis=1)
        total = total - before
        count = count - jnp.take_along_axis(count - m, first, axis=1)
    return total / jnp.maximum(count, 1.0)[..., None], (total[:, -1], count[:, -1])


def unit_rms(h: Array) -> Array:
    """Each token's router input rescaled to unit RMS (``router_normalize_input``)."""
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


class FixedRouter(nnx.Module):
    """Plain LoRA: every token uses expert 0 with gate 1."""

    def __call__(self, h: Array, token_mask: Array | None = None, segment_ids=None) -> Routing:
        b, t = h.shape[:2]
        return Routing(jnp.zeros((b, t, 1), jnp.int32), jnp.ones((b, t, 1), jnp.float32))


KIND_CODES = {"lora": 0, "switch": 1, "mola": 2}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterTables:
    """The routers of a pool of adapters, indexed by each adapter's base expert slot.

    switch_w: [S, E_max, D] pre-gated router of the adapter based at slot s (zeros for a
        plain LoRA: one expert, gate 1); layer_w: [L, S, E_max, D] per-layer routers (MoLA),
        or None while the pool holds no MoLA adapter; num_experts, top_k, kind: [S] int32;
        normalize: [S] bool, the adapter's ``router_normalize_input``; prefix: [S] bool, its
        router reads the document so far (``router_context="prefix_mean"``). A router's
        temperature is folded into its weights (logits are linear in them).
    """

    switch_w: Array
    num_experts: Array
    top_k: Array
    kind: Array
    normalize: Array
    prefix: Array
    layer_w: Array | None = None

    @classmethod
    def empty(cls, slots: int, max_experts: int, dim: int) -> RouterTables:
        ones = jnp.ones((slots,), jnp.int32)
        w = jnp.zeros((slots, max_experts, dim), jnp.float32)
        no = jnp.zeros((slots,), bool)
        return cls(w, ones, ones, 0 * ones, no, no)

    def with_layer_routers(self, num_layers: int) -> RouterTables:
        w = jnp.zeros((num_layers,) + self.switch_w.shape, jnp.float32)
        return dataclasses.replace(self, layer_w=w)

    def with_adapter(
        self,
        base: int,
        kind: str,
        num_experts: int,
        top_k: int,
        router: Any = None,  # [E, D] (switch), temperature folded in
        layer_routers: Any = None,  # [L, E, D] (mola), temperature folded in
        normalize_input: bool = False,
        router_context: str = "token",
    ) -> RouterTables:
        """The tables with an adapter based at slot ``base`` (host -> device copy)."""
        e_max, d = self.switch_w.shape[1:]
        row = jnp.zeros((e_max, d), jnp.float32)
        if router is not None:
            row = row.at[:num_experts].set(jnp.asarray(router, jnp.float32))
        layer_w = self.layer_w
        if layer_w is not None:
            rows = jnp.zeros((layer_w.shape[0], e_max, d), jnp.float32)
            if layer_routers is not None:
                rows = rows.at[:, :num_experts].set(jnp.asarray(layer_routers, jnp.float32))
            layer_w = layer_w.at[:, base].set(rows)
        return RouterTables(
            self.switch_w.at[base].set(row),
            self.num_experts.at[base].set(num_experts),
            self.top_k.at[base].set(top_k),
            self.kind.at[base].set(KIND_CODES[kind]),
            self.normalize.at[base].set(normalize_input),
            self.prefix.at[base].set(router_context == "prefix_mean"),
            layer_w,
        )


def _row_top_k(logits: Array, num_experts: Array, top_k: Array, k_max: int) -> tuple[Array, Array]:
    """``top_k_routing`` with each row's own expert count and k: logits [B, T, E_max],
    num_experts / top_k [B] -> (local ids [B, T, k_max], gates [B, T, k_max]; gate 0 past
    the row's k)."""
    e_max = logits.shape[-1]
    valid = jnp.arange(e_max)[None, :] < num_experts[:, None]  # [B, E_max]
    probs = jax.nn.softmax(jnp.where(valid[:, None, :], logits, -jnp.inf), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k_max)
    keep = (jnp.arange(k_max)[None, :] < top_k[:, None])[:, None, :]  # [B, 1, k_max]
    top_p = jnp.where(keep, top_p, 0.0)
    # Unused choices point at the row's first expert (gate 0): always a slot it owns.
    top_i = jnp.where(keep, top_i, 0).astype(jnp.int32)
    return top_i, top_p / jnp.sum(top_p, axis=-1, keepdims=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowRouter:
    """Per-row routing for a batch whose rows use different pooled adapters.

    rows: [B] int32, the base expert slot of each row's adapter (-1: the base model). A row
    of a plain LoRA uses its slot with gate 1; a LoRA-Switch row its adapter's router, top-k
    among its own experts (mapped to the pool's slots) for all layers; a MoLA row its
    adapter's router of each layer. Same softmax / top-k / renormalisation as the
    adapters' own routers, so a row routes as it would alone.
    """

    tables: RouterTables
    rows: Array
    k_max: int = dataclasses.field(metadata=dict(static=True))

    def _route(self, w: Array, h: Array) -> Routing:
        """w [S, E_max, D] router table, h [B, T, D] -> per-row Routing [B, T, k_max]."""
        t = self.tables
        slot = jnp.maximum(self.rows, 0)
        h = h.astype(jnp.float32)
        h = jnp.where(t.normalize[slot][:, None, None], unit_rms(h), h)
        logits = jnp.einsum("btd,bed->bte", h, w[slot])
        ids, gates = _row_top_k(logits, t.num_experts[slot], t.top_k[slot], self.k_max)
        gates = jnp.where((self.rows >= 0)[:, None, None], gates, 0.0)
        return Routing(ids + slot[:, None, None], gates, None)

    def pre_gate(self, h0: Array, h0_prefix: Array | None = None) -> Routing:
        """Routing of every row from layer 0's normalised input (MoLA rows: see ``layer``);
        rows whose router reads the document so far route on ``h0_prefix`` (its causal
        mean, ``causal_mean``), which the caller gives when any row may need it."""
        if h0_prefix is not None:
            reads = self.tables.prefix[jnp.maximum(self.rows, 0)][:, None, None]
            h0 = jnp.where(reads, h0_prefix, h0.astype(jnp.float32))
        return self._route(self.tables.switch_w, h0)

    def layer(self, index: int, normed: Array, pre: Routing) -> Routing:
        """Layer ``index``'s routing: MoLA rows route on this layer's input, others keep
        the pre-gated choice."""
        if self.tables.layer_w is None:
            return pre
        mine = self._route(self.tables.layer_w[index], normed)
        mola = (self.tables.kind[jnp.maximum(self.rows, 0)] == KIND_CODES["mola"])[:, None, None]
        return Routing(
            jnp.where(mola, mine.expert_ids, pre.expert_ids),
            jnp.where(mola, mine.gates, pre.gates),
            None,
        )


def dense_gate_weights(routing: Routing, num_experts: int) -> Array:
    """[B, T, E]: gate of each expert (0 where not selected); duplicates add up."""
    one_hot = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=jnp.float32)
    return jnp.einsum("btk,btke->bte", routing.gates.astype(jnp.float32), one_hot)


def _dense_lora_delta(x: Array, a: Array, b: Array, w: Array) -> Array:
    xa = jnp.einsum("bti,eri->bter", x, a) * w[..., None]  # [B, T, E, r]
    return jnp.einsum("bter,eor->bto", xa, b)


@jax.custom_vjp
def dense_lora_delta(x: Array, a: Array, b: Array, w: Array) -> Array:
    """``delta[b, t, o] = sum_e w[b, t, e] sum_r B[e, o, r] sum_i A[e, r, i] x[b, t, i]``.

    x [B, T, in], a [E, r, in], b [E, out, r], w [B, T, E] (gates times scale, 0 where an
    expert is not selected); differentiable in all four. The backward is written out so
    that every product contracts the token axis with both operands in their stored
    [tokens, features] layout, and the incoming gradient sits behind an optimisation
    barrier. Left to autodiff, XLA's CPU backend re-ran the producer of dy (e.g. the SwiGLU
    backward) a second time, transposed to [out, tokens], for B's gradient: 15% of a
    SmolLM2 training step, measured.
    """
    return _dense_lora_delta(x, a, b, w)


def _dense_lora_delta_fwd(x, a, b, w):
    return _dense_lora_delta(x, a, b, w), (x, a, b, w)


def _dense_lora_delta_bwd(res, dy):
    x, a, b, w = res
    e, r, _ = a.shape
    n = x.shape[0] * x.shape[1]
    dy2 = jax.lax.optimization_barrier(dy).reshape(n, -1)  # [N, out]
    x2, w2 = x.reshape(n, -1), w.reshape(n, e, 1)
    xa = jnp.einsum("ni,eri->ner", x2, a)  # [N, E, r], recomputed (E*r is small)
    b_rows = jnp.swapaxes(b, 1, 2).reshape(e * r, -1)  # [E r, out]
    dxaw = (dy2 @ b_rows.T).reshape(n, e, r)
    db = jnp.einsum("nk,no->ko", (xa * w2).reshape(n, e * r), dy2)  # [E r, out]
    db = jnp.swapaxes(db.reshape(e, r, -1), 1, 2)
    dw = jnp.sum(dxaw * xa, axis=-1).reshape(w.shape)
    dxa = (dxaw * w2).reshape(n, e * r)
    da = jnp.einsum("nk,ni->ki", dxa, x2).reshape(a.shape)
    dx = (dxa @ a.reshape(e * r, -1)).reshape(x.shape)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), dw.astype(w.dtype)


dense_lora_delta.defvjp(_dense_lora_delta_fwd, _dense_lora_delta_bwd)


class LoraBank(nnx.Module):
    """E LoRA experts of one linear: ``delta[..., o] = scale * sum_j g_j *
    sum_r B[e_j, o, r] * sum_i A[e_j, r, i] * x[..., i]``.

    a: [E, r, in] (PEFT's lora_A.weight per expert), b: [E, out, r] (lora_B.weight).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_experts: int,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        axes: tuple[str, str] = ("mlp", "embed"),
        rngs: nnx.Rngs,
    ):
        self.scale = float(scale)
        self.num_experts = num_experts
        self.rank = rank
        # PEFT's default: A kaiming-uniform (a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)); B zero,
        # so an attached adapter starts as the identity.
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(
            rngs.params(), (num_experts, rank, in_features), jnp.float32, -bound, bound
        )
        self.a = LoRAParam(a, logical_axes=("experts", "lora_rank", axes[1]))
        self.b = LoRAParam(
            jnp.zeros((num_experts, out_features, rank), jnp.float32),
            logical_axes=("experts", axes[0], "lora_rank"),
        )
        # Inactive until model.train(); inference never drops.
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None

    def delta(self, x: Array, routing: Routing) -> Array:
        """The LoRA contribution for x [B, T, in] under ``routing`` ([B, T, k]) (dense plan).

        Few tokens (decode): gather just the selected experts' A and B. Many tokens
        (training, prefill): x.A for all E experts (E*r is small next to in/out), then B
        weighted by the dense gate matrix; it avoids materialising per-token copies of B.
        Both are differentiable.
        """
        dt = x.dtype
        if self.dropout is not None:
            x = self.dropout(x)
        a, b = self.a[...].astype(dt), self.b[...].astype(dt)
        bsz, t, _ = x.shape
        ids, gates = routing.expert_ids, (routing.gates * self.scale).astype(dt)
        if bsz * t * ids.shape[-1] <= self.num_experts:
            xa = jnp.einsum("bti,btkri->btkr", x, jnp.take(a, ids, axis=0))
            return jnp.einsum("btkr,btkor->bto", xa * gates[..., None], jnp.take(b, ids, axis=0))
        w = dense_gate_weights(routing, self.num_experts) * self.scale  # [B, T, E]
        return dense_lora_delta(x, a, b, w.astype(dt))


# ---------------------------------------------------------------------- attaching


@dataclasses.dataclass(eq=False)
class PartView:
    """One adaptable linear (``q_proj`` ...) of a layer: a part of a fused ``Linear``.

    ``lora`` reads / writes the part's ``LoraBank`` (None when not adapted); the weight
    rows live in the fused linear (``lsw_jax.linears``).
    """

    linear: Any  # the fused model.layers.Linear
    name: str
    in_features: int
    out_features: int

    @property
    def lora(self) -> LoraBank | None:
        banks = self.linear.lora
        return None if banks is None or self.name not in banks else banks[self.name]

    @lora.setter
    def lora(self, bank: LoraBank | None) -> None:
        banks = self.linear.lora
        if bank is None:
            if banks is not None and self.name in banks:
                del banks[self.name]
                if not len(banks):
                    self.linear.lora = None
            return
        if banks is None:
            self.linear.lora = banks = nnx.Dict()
        banks[self.name] = bank


def iter_linears(model: Any, targets: tuple[str, ...] = ALL_TARGETS):
    """Yield ``(layer index, part name, PartView)`` for every targeted adaptable linear."""
    cfg = model.cfg
    for i, layer in enumerate(model.layers):
        for spec in LINEARS:
            if spec.name not in targets:
                continue
            fused = getattr(getattr(layer, spec.module), spec.fused)
            out, d_in = spec.shape(cfg)
            yield i, spec.name, PartView(fused, spec.name, d_in, out)


def attach_adapter(
    model: Any,
    cfg: AdapterConfig,
    *,
    seed: int = 0,
    ranks: dict[tuple[int, str], int] | None = None,
    scales: dict[tuple[int, str], float] | None = None,
) -> Any:
    """Give ``model`` a fresh adapter of ``cfg`` in place (B = 0: the model is unchanged).

    ranks/scales: optional per-(layer, module) overrides (PEFT rank/alpha patterns).
    """
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    detach_adapter(model)
    for i, name, lin in iter_linears(model, cfg.targets):
        r = (ranks or {}).get((i, name), cfg.rank)
        lin.lora = LoraBank(
            lin.in_features,
            lin.out_features,
            num_experts=cfg.num_experts,
            rank=r,
            scale=(scales or {}).get((i, name), cfg.scale),
            dropout=cfg.dropout,
            axes=LINEAR_BY_NAME[name].axes,
            rngs=rngs,
        )
    d = model.cfg.hidden_size
    router_kw = dict(
        init_std=cfg.router_init_std,
        temperature=cfg.router_temperature,
        normalize_input=cfg.router_normalize_input,
        rngs=rngs,
    )
    if cfg.kind == "lora":
        model.router = FixedRouter()
    elif cfg.kind == "switch":
        model.router = Router(
            d, cfg.num_experts, cfg.top_k, context=cfg.router_context, **router_kw
        )
    else:
        for layer in model.layers:
            layer.router = Router(d, cfg.num_experts, cfg.top_k, **router_kw)
    model.adapter_config = cfg
    return model


def detach_adapter(model: Any) -> Any:
    for _, _, part in iter_linears(model):
        part.lora = None
    model.router = None
    for layer in model.layers:
        layer.router = None
    model.adapter_config = None
    return model


# ---------------------------------------------------------------------- losses & stats


def load_balancing_loss(routing: Routing, num_experts: int, mask: Array | None = None) -> Array:
    """Switch Transformer: ``E * sum_e f_e * P_e``; f_e = share of the k*T assignments
    that went to expert e, P_e = mean router probability of e (over unmasked tokens)."""
    probs = jax.nn.softmax(routing.logits, axis=-1)  # [B, T, E]
    assign = jax.nn.one_hot(routing.expert_ids, num_experts).sum(-2)  # [B, T, E]
    m = jnp.ones(probs.shape[:2]) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    f = jnp.einsum("bte,bt->e", assign, m) / (n * routing.expert_ids.shape[-1])
    p = jnp.einsum("bte,bt->e", probs, m) / n
    return num_experts * jnp.sum(f * p)


def router_z_loss(routing: Routing, mask: Array | None = None) -> Array:
    """``mean(logsumexp(logits)^2)`` over unmasked tokens (ST-MoE)."""
    z = jax.nn.logsumexp(routing.logits, axis=-1) ** 2
    m = jnp.ones(z.shape) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(z * m) / jnp.maximum(m.sum(), 1.0)


def routing_stats(routing: Routing, num_experts: int, mask: Array | None = None) -> dict:
    """Per-expert load (share of assignments, sums to 1) and mean routing entropy (nats)."""
    m = jnp.ones(routing.expert_ids.shape[:2]) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    assign = jax.nn.one_hot(routing.expert_ids, num_experts).sum(-2)
    load = jnp.einsum("bte,bt->e", assign, m) / (n * routing.expert_ids.shape[-1])
    stats = {"expert_load": load}
    if routing.logits is not None:
        logp = jax.nn.log_softmax(routing.logits, axis=-1)
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        stats["routing_entropy"] = jnp.sum(ent * m) / n
    return stats

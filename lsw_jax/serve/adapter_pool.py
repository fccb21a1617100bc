"""Device-resident pool of adapters of every kind for batched serving (dLoRA's adapter memory).

The serving model carries ONE expert bank per adaptable linear with ``E = capacity`` expert
slots (``a [E, r_pool, in]``, ``b [E, out, r_pool]``, bank scale 1.0). A resident adapter
occupies consecutive slots ``base .. base + E_n - 1`` of every linear, expert ``e`` in slot
``base + e``:

    a[base + e, :r] = A_n[e],  a[base + e, r:] = 0
    b[base + e, :, :r] = scale_n * B_n[e],  b[base + e, :, r:] = 0

so ``b[s] @ a[s] = scale_n * B_n[e] @ A_n[e]`` exactly (zero rank padding adds exact zeros);
linears an adapter does not touch hold zeros in its slots. A plain LoRA is one expert (E=1,
k=1, gate 1), a LoRA-Switch bank E experts plus its pre-gated router, a MoLA bank E experts
plus one router per layer. The routers live in ``RouterTables`` indexed by the adapter's
base slot; ``RowRouter`` routes every row of a batch with its own adapter's router to its
own experts (``lsw_jax.adapters.lora``), so rows of all kinds share one decode step.

Memory: one slot costs ``4 * r_pool * sum_linears (in + out)`` bytes (fp32); SmolLM2-135M
with all 7 linears and ``r_pool = 16`` is 20.2 MB per slot. Host copies of every registered
adapter stay in host memory (numpy), so eviction is free and reloading a copy host -> device.

Adapters come from a PEFT directory (``adapter_config.json``: plain LoRA) or from the
checkpoint's stored adapters (``ckpt/adapters/<name>``: any kind). Their shapes are checked
against the model when registered, so a wrong adapter is refused by name, never served.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsw_jax.adapters.lora import LoraBank, RouterTables, iter_linears
from lsw_jax.adapters.store import check_adapter_name, load_adapter, stored_adapter
from lsw_jax.config import ModelConfig
from lsw_jax.convert.peft import read_peft_adapter
from lsw_jax.linears import ALL_TARGETS, LINEAR_BY_NAME
from lsw_jax.model.llama import LlamaModel

Array = jax.Array


@dataclasses.dataclass
class HostAdapter:
    """One adapter in host memory, each expert's scale folded into its B.

    banks: ``(layer, part) -> (A [E, r, in], scale * B [E, out, r])`` float32.
    router: ``[E, hidden]`` (switch) or None; layer_routers: ``[L, E, hidden]`` (mola) or None;
    both divided by the adapter's router temperature. normalize_input: the routers read
    their input at unit RMS (``AdapterConfig.router_normalize_input``).
    """

    name: str
    source: str
    kind: str  # "lora" | "switch" | "mola"
    num_experts: int
    top_k: int
    banks: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    router: np.ndarray | None = None
    layer_routers: np.ndarray | None = None
    normalize_input: bool = False
    router_context: str = "token"  # "prefix_mean": the engine's cache carries its running mean

    @property
    def rank(self) -> int:
        return max(a.shape[1] for a, _ in self.banks.values())

    def check(self, cfg: ModelConfig, targets: tuple[str, ...]) -> None:
        """Raise ValueError naming the tensor when this adapter does not fit the model."""
        where = f"adapter {self.name!r} ({self.source})"
        if not self.banks:
            raise ValueError(f"{where} has no LoRA weights")
        for (i, part), (a, b) in self.banks.items():
            if not 0 <= i < cfg.num_layers:
                raise ValueError(f"{where}: layer {i} does not exist ({cfg.num_layers} layers)")
            if part not in targets:
                raise ValueError(f"{where} adapts {i}.{part}, which the pool does not target")
            out, d_in = LINEAR_BY_NAME[part].shape(cfg)
            e = self.num_experts
            if a.ndim != 3 or a.shape[0] != e or a.shape[2] != d_in:
                raise ValueError(
                    f"{where}: layer {i} {part} A has shape {a.shape}, expected [{e}, r, {d_in}]"
                )
            if b.shape != (e, out, a.shape[1]):
                raise ValueError(
                    f"{where}: layer {i} {part} B has shape {b.shape}, expected {(e, out, a.shape[1])}"
                )
        d = cfg.hidden_size
        if self.kind == "switch" and (self.router is None or self.router.shape != (e, d)):
            got = None if self.router is None else self.router.shape
            raise ValueError(f"{where}: router has shape {got}, expected {(e, d)}")
        if self.kind == "mola":
            want = (cfg.num_layers, e, d)
            got = None if self.layer_routers is None else self.layer_routers.shape
            if got != want:
                raise ValueError(f"{where}: per-layer routers have shape {got}, expected {want}")


def read_adapter(
    cfg: ModelConfig, name: str, source: str | Path, ckpt: str | Path | None
) -> HostAdapter:
    """A PEFT directory (plain LoRA) or a stored adapter of ``ckpt`` (any kind), in host memory."""
    if (Path(source) / "adapter_config.json").exists():
        adapter_cfg, tensors = read_peft_adapter(source, cfg.num_layers)
        banks = {k: (a[None], (b * s)[None]) for k, (a, b, s) in tensors.items()}
        return HostAdapter(name, str(source), "lora", 1, 1, banks)
    where = stored_adapter(ckpt, source)
    if where is None:
        raise FileNotFoundError(
            f"{source!r} is not a PEFT directory, a training run, a stored adapter's folder "
            "or the name of an adapter stored in the checkpoint"
        )
    # A shape-only skeleton: load_adapter attaches real banks to it, the backbone stays abstract.
    skeleton = nnx.eval_shape(lambda: LlamaModel(cfg, dtype="float32", rngs=nnx.Rngs(0)))
    load_adapter(skeleton, *where)
    acfg = skeleton.adapter_config
    banks = {}
    for i, part, view in iter_linears(skeleton, ALL_TARGETS):
        if view.lora is not None:
            bank = view.lora
            a = np.asarray(bank.a[...], np.float32)
            banks[(i, part)] = (a, np.asarray(bank.b[...], np.float32) * bank.scale)
    router = layer_routers = None
    # Logits are linear in the router weights: dividing them by the temperature is exact.
    if acfg.kind == "switch":
        router = np.asarray(skeleton.router.weight[...], np.float32) / acfg.router_temperature
    elif acfg.kind == "mola":
        layer_routers = np.stack(
            [np.asarray(la.router.weight[...], np.float32) for la in skeleton.layers]
        )
        layer_routers /= acfg.router_temperature
    return HostAdapter(
        name,
        str(source),
        acfg.kind,
        acfg.num_experts,
        acfg.top_k,
        banks,
        router,
        layer_routers,
        acfg.router_normalize_input,
        acfg.router_context,
    )


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_slots(a_all: dict, b_all: dict, a_new: dict, b_new: dict, base: Array):
    """a_all[k][base:base+E] = a_new[k] (and b) for every linear k, in place."""

    def put(dst, src):
        return jax.lax.dynamic_update_slice_in_dim(dst, src.astype(dst.dtype), base, axis=0)

    return (
        {k: put(a_all[k], a_new[k]) for k in a_all},
        {k: put(b_all[k], b_new[k]) for k in b_all},
    )


class AdapterPool:
    """``capacity`` device expert slots holding adapters of every kind, LRU eviction to host.

    ``acquire(name)`` returns the adapter's base slot (loading it into free consecutive
    slots, evicting least recently used unpinned adapters to make room) and pins it until
    ``release(name)``; it returns None when pinned adapters leave no room. Thread-safe.
    max_experts / max_top_k bound the experts and top-k of any adapter the pool accepts.
    """

    def __init__(
        self,
        model: Any,
        *,
        capacity: int = 8,
        rank: int = 16,
        max_experts: int = 8,
        max_top_k: int = 2,
        targets: tuple[str, ...] = ALL_TARGETS,
        ckpt: str | Path | None = None,
    ):
        if min(capacity, rank, max_experts, max_top_k) < 1:
            raise ValueError(f"{capacity=}, {rank=}, {max_experts=}, {max_top_k=} must be >= 1")
        self.capacity, self.rank, self.targets, self.ckpt = capacity, rank, targets, ckpt
        self.max_experts, self.max_top_k = min(max_experts, capacity), max_top_k
        self.model_cfg: ModelConfig = model.cfg
        self._parts: dict[tuple[int, str], Any] = {}
        rngs = nnx.Rngs(0)
        for i, name, view in iter_linears(model, targets):
            bank = LoraBank(
                view.in_features,
                view.out_features,
                num_experts=capacity,
                rank=rank,
                scale=1.0,
                axes=LINEAR_BY_NAME[name].axes,
                rngs=rngs,
            )
            bank.a.set_value(jnp.zeros_like(bank.a[...]))
            view.lora = bank
            self._parts[(i, name)] = view
        model.router = None  # routing comes from the engine, per row (RowRouter)
        for layer in model.layers:
            layer.router = None
        self.tables = RouterTables.empty(capacity, self.max_experts, model.cfg.hidden_size)
        self._lock = threading.RLock()
        self._host: dict[str, HostAdapter] = {}
        self._slot_of: dict[str, int] = {}
        self._name_in: list[str | None] = [None] * capacity  # per slot: resident adapter
        self._pins: collections.Counter[str] = collections.Counter()
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.version = 0  # bumped whenever device banks or tables change
        self.generation = [0] * capacity  # loads per slot: identifies a slot's contents
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ registry
    @property
    def slot_bytes(self) -> int:
        return sum(4 * self.rank * (v.in_features + v.out_features) for v in self._parts.values())

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._host)

    def describe(self) -> dict[str, dict[str, Any]]:
        """name -> {kind, num_experts, top_k, rank, source} of every registered adapter."""
        with self._lock:
            return {
                n: dict(
                    kind=h.kind,
                    num_experts=h.num_experts,
                    top_k=h.top_k,
                    rank=h.rank,
                    source=h.source,
                )
                for n, h in sorted(self._host.items())
            }

    def kind_of(self, name: str) -> str:
        with self._lock:
            return self._host[name].kind

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)

    def register(self, name: str, source: str | Path) -> HostAdapter:
        """Read an adapter into host memory (hot add); loaded to the device on demand."""
        check_adapter_name(name)
        return self.add(read_adapter(self.model_cfg, name, source, self.ckpt))

    def add(self, host: HostAdapter) -> HostAdapter:
        """Register an adapter already in host memory (checked against the model first)."""
        check_adapter_name(host.name)
        host.check(self.model_cfg, self.targets)
        where = f"adapter {host.name!r} ({host.source})"
        if host.rank > self.rank:
            raise ValueError(
                f"{where} has rank {host.rank} > the pool rank {self.rank}; "
                f"start the pool with rank >= {host.rank}"
            )
        if host.num_experts > self.max_experts:
            raise ValueError(
                f"{where} has {host.num_experts} experts > the pool's max_experts "
                f"{self.max_experts} (capacity {self.capacity})"
            )
        if host.top_k > self.max_top_k:
            raise ValueError(
                f"{where} has top_k {host.top_k} > the pool's max_top_k {self.max_top_k}"
            )
        with self._lock:
            if host.name in self._host:
                raise ValueError(f"adapter {host.name!r} is already registered")
            self._host[host.name] = host
            if host.kind == "mola" and self.tables.layer_w is None:
                self.tables = self.tables.with_layer_routers(self.model_cfg.num_layers)
                self.version += 1
        return host

    def remove(self, name: str) -> None:
        """Hot remove: forget the adapter (refused while requests use it)."""
        with self._lock:
            if name not in self._host:
                raise KeyError(f"no adapter named {name!r}")
            if self._pins[name]:
                raise ValueError(f"adapter {name!r} is in use by {self._pins[name]} request(s)")
            self._evict(name)
            del self._host[name]

    # ------------------------------------------------------------------ device slots
    def acquire(self, name: str) -> int | None:
        """Pin ``name`` on the device and return its base slot (None: no room now)."""
        with self._lock:
            if name not in self._host:
                raise KeyError(f"no adapter named {name!r}")
            slot = self._slot_of.get(name)
            if slot is None:
                slot = self._make_room(self._host[name].num_experts)
                if slot is None:
                    return None
                self._load(name, slot)
            else:
                self.stats["hits"] += 1
            self._pins[name] += 1
            self._lru.pop(name, None)
            self._lru[name] = None
            return slot

    def release(self, name: str) -> None:
        with self._lock:
            if self._pins[name] <= 0:
                raise ValueError(f"adapter {name!r} is not pinned")
            self._pins[name] -= 1

    def pins(self, name: str | None = None) -> int:
        """Requests holding ``name`` (all adapters when None)."""
        with self._lock:
            return sum(self._pins.values()) if name is None else self._pins[name]

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            return self._slot_of.get(name)

    def expert_bank(self, layer: int, part: str) -> LoraBank:
        """The pooled bank of one adaptable linear (read-only use: inspection, tests)."""
        return self._parts[(layer, part)].lora

    def _fit(self, n: int) -> int | None:
        run = 0
        for s, owner in enumerate(self._name_in):
            run = run + 1 if owner is None else 0
            if run == n:
                return s - n + 1
        return None

    def _make_room(self, n: int) -> int | None:
        """First free run of ``n`` slots, evicting LRU unpinned adapters until one exists."""
        base = self._fit(n)
        victims = [v for v in self._lru if not self._pins[v]]  # oldest first
        while base is None and victims:
            self._evict(victims.pop(0))
            self.stats["evictions"] += 1
            base = self._fit(n)
        return base

    def _evict(self, name: str) -> None:
        slot = self._slot_of.pop(name, None)
        if slot is not None:  # stale weights stay: no request routes to these slots
            for s in range(slot, slot + self._host[name].num_experts):
                self._name_in[s] = None
        self._lru.pop(name, None)

    def _load(self, name: str, base: int) -> None:
        host = self._host[name]
        n, r = host.num_experts, self.rank
        a_all = {k: v.lora.a[...] for k, v in self._parts.items()}
        b_all = {k: v.lora.b[...] for k, v in self._parts.items()}
        a_new, b_new = {}, {}
        for key, view in self._parts.items():
            a_pad = np.zeros((n, r, view.in_features), np.float32)
            b_pad = np.zeros((n, view.out_features, r), np.float32)
            if key in host.banks:
                a, b = host.banks[key]
                a_pad[:, : a.shape[1]], b_pad[:, :, : a.shape[1]] = a, b
            a_new[_key(key)], b_new[_key(key)] = a_pad, b_pad
        a_all = {_key(k): v for k, v in a_all.items()}
        b_all = {_key(k): v for k, v in b_all.items()}
        a_out, b_out = _write_slots(a_all, b_all, a_new, b_new, jnp.int32(base))
        for key, view in self._parts.items():
            view.lora.a.set_value(a_out[_key(key)])
            view.lora.b.set_value(b_out[_key(key)])
        self.tables = self.tables.with_adapter(
            base,
            host.kind,
            n,
            host.top_k,
            host.router,
            host.layer_routers,
            host.normalize_input,
            host.router_context,
        )
        self._slot_of[name] = base
        for s in range(base, base + n):
            self._name_in[s] = name
            self.generation[s] += 1
        self.stats["loads"] += 1
        self.version += 1


def _key(k: tuple[int, str]) -> str:
    return f"{k[0]}.{k[1]}"

"""Device-resident pool of plain LoRA adapters for batched serving (dLoRA's adapter memory).

The serving model carries ONE expert bank per linear with ``E = capacity`` slots
(``a [E, r_pool, in]``, ``b [E, out, r_pool]``, bank scale 1.0). Adapter ``n`` resident in
slot ``s`` occupies ``a[s], b[s]`` of every linear:

    a[s, :r_n] = A_n,  a[s, r_n:] = 0
    b[s, :, :r_n] = scale_n * B_n,  b[s, :, r_n:] = 0

so ``b[s] @ a[s] = scale_n * B_n @ A_n`` exactly (zero rank padding adds exact zeros). A
request with adapter slot ``s`` is routed ``expert_ids = [[s]], gates = [[1.0]]``; a request
without an adapter uses gate 0. Linears an adapter does not touch hold zeros in its slot.

Memory: one slot costs ``4 * r_pool * sum_linears (in + out)`` bytes (fp32) on the device;
SmolLM2-135M with all 7 linears and ``r_pool = 16`` is 30 * 16 * 4 * (4*576 + 2*192 + 3*(576
+ 1536)) = 20.2 MB per slot. Host copies of every registered adapter stay in host memory
(numpy), so eviction is a free, and reloading one is a copy host -> device.

Adapters come from a PEFT directory (``adapter_config.json``) or from the checkpoint's
stored adapters (``ckpt/adapters/<name>``); only plain LoRA (``kind="lora"``) is poolable.
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

from lsw_jax.config import ALL_TARGETS

Array = jax.Array


@dataclasses.dataclass
class HostAdapter:
    """One plain LoRA adapter in host memory, padded to the pool rank, scale folded into B.

    tensors: ``"layer.module" -> (A [r_pool, in], B [out, r_pool])`` float32.
    """

    name: str
    source: str
    rank: int  # the adapter's own largest rank
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]


def _linear_key(i: int, name: str) -> str:
    return f"{i}.{name}"


def read_lora_tensors(
    model_cfg: Any, source: str | Path, ckpt: str | Path | None
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]]:
    """``{(layer, module): (A [r, in], B [out, r], scale)}`` of a PEFT dir or stored adapter."""
    if (Path(source) / "adapter_config.json").exists():
        from lsw_jax.convert.peft import read_peft_adapter

        cfg, tensors = read_peft_adapter(source, model_cfg.num_layers)
        if cfg.kind != "lora":
            raise ValueError(f"{source}: only plain LoRA adapters can be served from the pool")
        return tensors
    if ckpt is None:
        raise FileNotFoundError(
            f"{source!r} is not a PEFT directory and no checkpoint holds stored adapters"
        )
    from lsw_jax.adapters.lora import iter_linears
    from lsw_jax.adapters.store import load_adapter
    from lsw_jax.model.llama import LlamaModel

    # A shape-only skeleton: load_adapter attaches real banks to it, the backbone stays abstract.
    skeleton = nnx.eval_shape(lambda: LlamaModel(model_cfg, dtype="float32", rngs=nnx.Rngs(0)))
    load_adapter(skeleton, ckpt, str(source))
    kind = skeleton.adapter_config.kind
    if kind != "lora":
        raise ValueError(
            f"stored adapter {source!r} is a {kind!r} expert bank; the server pools plain LoRA"
        )
    out = {}
    for i, name, lin in iter_linears(skeleton, ALL_TARGETS):
        if lin.lora is not None:
            a = np.asarray(lin.lora.a[...], np.float32)[0]
            b = np.asarray(lin.lora.b[...], np.float32)[0]
            out[(i, name)] = (a, b, float(lin.lora.scale))
    return out


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_slot(a_all: dict, b_all: dict, a_new: dict, b_new: dict, slot: Array):
    """a_all[k][slot] = a_new[k], b_all[k][slot] = b_new[k] for every linear k (in place)."""
    a_out = {k: a_all[k].at[slot].set(a_new[k].astype(a_all[k].dtype)) for k in a_all}
    b_out = {k: b_all[k].at[slot].set(b_new[k].astype(b_all[k].dtype)) for k in b_all}
    return a_out, b_out


class AdapterPool:
    """``capacity`` device slots of LoRA adapters with LRU eviction to host memory.

    ``acquire(name)`` returns the device slot of a registered adapter (loading it, and
    evicting the least recently used unpinned adapter when the pool is full) and pins it
    until ``release(name)``; it returns None when every slot is pinned. Thread-safe.
    """

    def __init__(
        self,
        model: Any,
        *,
        capacity: int = 8,
        rank: int = 16,
        targets: tuple[str, ...] = ALL_TARGETS,
        ckpt: str | Path | None = None,
    ):
        from lsw_jax.adapters.lora import LINEAR_AXES, LoraBank, iter_linears

        if capacity < 1 or rank < 1:
            raise ValueError(f"{capacity=} and {rank=} must be >= 1")
        self.capacity, self.rank, self.targets, self.ckpt = capacity, rank, targets, ckpt
        self.model_cfg = model.cfg
        self._linears: dict[str, Any] = {}
        rngs = nnx.Rngs(0)
        for i, name, lin in iter_linears(model, targets):
            bank = LoraBank(
                lin.in_features,
                lin.out_features,
                num_experts=capacity,
                rank=rank,
                scale=1.0,
                axes=LINEAR_AXES[name],
                rngs=rngs,
            )
            bank.a.set_value(jnp.zeros_like(bank.a[...]))
            lin.lora = bank
            self._linears[_linear_key(i, name)] = lin
        model.router = None  # routing comes from the engine, per request
        self._lock = threading.RLock()
        self._host: dict[str, HostAdapter] = {}
        self._slot_of: dict[str, int] = {}
        self._name_in: list[str | None] = [None] * capacity
        self._pins: collections.Counter[str] = collections.Counter()
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.version = 0  # bumped whenever device banks change (the engine re-splits then)
        self.generation = [0] * capacity  # loads per slot: identifies a slot's contents
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ registry
    @property
    def slot_bytes(self) -> int:
        return sum(
            4 * self.rank * (lin.in_features + lin.out_features) for lin in self._linears.values()
        )

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._host)

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)

    def register(self, name: str, source: str | Path) -> HostAdapter:
        """Read an adapter into host memory (hot add); loaded to the device on demand."""
        from lsw_jax.adapters.store import check_adapter_name

        check_adapter_name(name)
        return self.add(name, source, read_lora_tensors(self.model_cfg, source, self.ckpt))

    def add(
        self,
        name: str,
        source: str | Path,
        tensors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]],
    ) -> HostAdapter:
        """Register already-read LoRA tensors (``read_lora_tensors``'s format) as ``name``."""
        ranks = [a.shape[0] for a, _, _ in tensors.values()]
        if not ranks:
            raise ValueError(f"adapter {name!r} ({source}) has no LoRA weights")
        if max(ranks) > self.rank:
            raise ValueError(
                f"adapter {name!r} has rank {max(ranks)} > the pool rank {self.rank}; "
                f"start the pool with rank >= {max(ranks)}"
            )
        padded = {}
        for (i, mod), (a, b, scale) in tensors.items():
            key = _linear_key(i, mod)
            if key not in self._linears:
                raise ValueError(f"adapter {name!r} adapts {key}, which the pool does not target")
            r = a.shape[0]
            pa = np.zeros((self.rank, a.shape[1]), np.float32)
            pb = np.zeros((b.shape[0], self.rank), np.float32)
            pa[:r], pb[:, :r] = a, b * scale
            padded[key] = (pa, pb)
        host = HostAdapter(name, str(source), max(ranks), padded)
        with self._lock:
            if name in self._host:
                raise ValueError(f"adapter {name!r} is already registered")
            self._host[name] = host
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
        """Pin ``name`` on the device and return its slot (None: every slot is pinned)."""
        with self._lock:
            if name not in self._host:
                raise KeyError(f"no adapter named {name!r}")
            slot = self._slot_of.get(name)
            if slot is None:
                slot = self._free_slot()
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

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            return self._slot_of.get(name)

    def _free_slot(self) -> int | None:
        for s, n in enumerate(self._name_in):
            if n is None:
                return s
        for victim in self._lru:  # oldest first
            if not self._pins[victim]:
                slot = self._slot_of[victim]
                self._evict(victim)
                self.stats["evictions"] += 1
                return slot
        return None

    def _evict(self, name: str) -> None:
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._name_in[slot] = None  # stale weights stay: no request routes to the slot
        self._lru.pop(name, None)

    def _load(self, name: str, slot: int) -> None:
        host = self._host[name]
        a_all = {k: lin.lora.a[...] for k, lin in self._linears.items()}
        b_all = {k: lin.lora.b[...] for k, lin in self._linears.items()}
        a_new, b_new = {}, {}
        for k, lin in self._linears.items():
            pa, pb = host.tensors.get(k, (None, None))
            a_new[k] = pa if pa is not None else np.zeros((self.rank, lin.in_features), np.float32)
            b_new[k] = pb if pb is not None else np.zeros((lin.out_features, self.rank), np.float32)
        a_out, b_out = _write_slot(a_all, b_all, a_new, b_new, jnp.int32(slot))
        for k, lin in self._linears.items():
            lin.lora.a.set_value(a_out[k])
            lin.lora.b.set_value(b_out[k])
        self._slot_of[name], self._name_in[slot] = slot, name
        self.stats["loads"] += 1
        self.generation[slot] += 1
        self.version += 1

"""Device mesh and logical-axis rules: how every parameter and activation is laid out.

Every ``nnx.Param`` carries ``logical_axes`` metadata (``("heads", "embed")`` for a
q projection, ``("experts", "lora_rank", "embed")`` for a LoRA A bank). One table,
``LOGICAL_AXIS_RULES``, maps those names to mesh axes; ``logical_to_spec`` resolves a
tensor's names to a ``PartitionSpec`` for a given mesh, and everything else (model
shardings, sharded checkpoint restore, training batches) goes through it. Nothing else in
the code base writes a ``PartitionSpec`` by hand.

Parallelism is jit's: arrays are placed in their shardings and XLA's partitioner inserts
the collectives (all-gathers for FSDP weights, reduce-scatters/all-reduces for tensor
parallel matmuls and data-parallel gradients). Multi-host runs use the same code after
``jax.distributed.initialize`` (see ``docs/sharding.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# (logical name, mesh axes): weights first, then activations. A name may appear more than
# once: the first entry whose axes are free (not yet used by another dimension of the same
# tensor) and divide the dimension wins. Mesh axes that do not divide a dimension are
# dropped, so a layout always exists (at worst replicated). Names without a rule replicate.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # ---- weights
    ("vocab", "tensor"),  # embedding rows / lm_head outputs: vocab-parallel logits
    ("embed", "fsdp"),  # model dim of every weight: FSDP shards, all-gathered per use
    ("heads", "tensor"),  # q/o projections: Megatron column/row parallel attention
    ("kv_heads", "tensor"),  # k/v projections; replicate when kv_heads < tensor size
    ("mlp", "tensor"),  # gate/up columns, down rows
    ("norm", None),  # RMSNorm scales: tiny, replicated
    ("experts", None),  # LoRA experts: E*r is small; set to "tensor"/"expert" to split
    ("lora_rank", None),  # the rank of a LoRA bank (4-64): never worth splitting
    # ---- activations
    ("batch", ("data", "fsdp")),  # FSDP is data parallelism over the weights' shards
    ("length", None),  # sequence (no context parallelism)
    ("act_embed", None),  # hidden states between layers
    ("act_heads", "tensor"),  # attention heads / KV cache heads inside a layer
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),  # logits
)


def with_rules(rules: Rules = LOGICAL_AXIS_RULES, **overrides: MeshAxes) -> tuple:
    """The table with some names re-mapped, e.g. ``with_rules(experts="tensor")``."""
    out = [(name, overrides[name]) for name in overrides]
    return tuple(out + [(name, axes) for name, axes in rules if name not in overrides])


# ---------------------------------------------------------------------- the mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Named mesh axes and their sizes; one size may be ``-1`` (all remaining devices).

    ``MeshConfig.parse("data=2,fsdp=-1,tensor=2")``; the default puts every device on
    ``fsdp`` (ZeRO-3 style data parallelism), which suits adapter training.
    """

    axes: tuple[tuple[str, int], ...] = (("data", 1), ("fsdp", -1), ("tensor", 1))

    def __post_init__(self) -> None:
        names = [n for n, _ in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"mesh axes {names} repeat a name")
        sizes = [s for _, s in self.axes]
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes {sizes}: each >= 1, at most one -1")

    @classmethod
    def parse(cls, spec: str) -> MeshConfig:
        """``"data=2,tensor=4"`` (axes named here only; order is the mesh's order)."""
        axes = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, size = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"mesh spec {spec!r}: expected name=size[,name=size...]")
            axes.append((name.strip(), int(size)))
        if not axes:
            raise ValueError(f"mesh spec {spec!r} names no axis")
        return cls(tuple(axes))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """Axis sizes with ``-1`` resolved; raises unless they multiply to ``num_devices``."""
        known = math.prod(s for _, s in self.axes if s != -1)
        sizes = [s if s != -1 else num_devices // known for _, s in self.axes]
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(self.axes)} does not fit {num_devices} devices")
        return tuple(sizes)

    def make(self, devices: Sequence[Any] | None = None) -> Mesh:
        """A ``Mesh`` over ``devices`` (default: all devices of all processes).

        Axes are ``Auto``: jit propagates shardings from the placed arrays (GSPMD), which
        is what the rest of the code relies on.
        """
        devices = list(jax.devices() if devices is None else devices)
        shape = self.shape(len(devices))
        types = (jax.sharding.AxisType.Auto,) * len(shape)
        return jax.make_mesh(shape, self.names, types, devices=devices)


# ---------------------------------------------------------------------- resolving names


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    units: dict[str, int] | None = None,
) -> PartitionSpec:
    """The ``PartitionSpec`` of a tensor of ``shape`` whose dimensions are named ``axes``.

    For dimension i named n, the rules' candidates for n are tried in order; a candidate's
    mesh axes are kept one by one while each is in the mesh, has size > 1, is not yet used
    by an earlier dimension, and the product of the kept sizes divides ``units[n]`` (how
    many indivisible pieces the dimension has, e.g. the number of heads of a flat
    ``heads * head_dim`` dimension; default the dimension's size). The first candidate that
    keeps an axis wins; none means replicated along i.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, dim in zip(axes, shape, strict=True):
        pieces = (units or {}).get(name, dim) if name is not None else dim
        if dim % max(pieces, 1):
            raise ValueError(f"{name}: dimension {dim} is not a multiple of {pieces} units")
        chosen: tuple[str, ...] = ()
        for rule_name, candidate in rules:
            if rule_name != name or name is None:
                continue
            kept: list[str] = []
            split = 1  # product of the kept axes' sizes
            for ax in _as_tuple(candidate):
                size = mesh.shape.get(ax, 1)
                if size > 1 and ax not in used and pieces % (split * size) == 0:
                    kept.append(ax)
                    split *= size
            if kept:
                chosen = tuple(kept)
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while spec and spec[-1] is None:  # P("x", None) == P("x"); shorter prints
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    units: dict[str, int] | None = None,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules, units))


def head_units(cfg: Any) -> dict[str, int]:
    """How many whole heads the flat head dimensions of a ``ModelConfig`` hold."""
    return {
        "heads": cfg.num_heads,
        "act_heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "act_kv_heads": cfg.num_kv_heads,
    }


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(
    var: nnx.Variable, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, units: Any = None
) -> NamedSharding:
    """The sharding of one Variable from its ``logical_axes`` (replicated without them)."""
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return named_sharding(axes, var.get_value().shape, mesh, rules, units)


def state_shardings(
    state: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, units: Any = None
) -> Any:
    """The same ``nnx.State`` with every Variable's value replaced by its NamedSharding."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh, rules, units)),
        state,
        is_leaf=_is_variable,
    )


def model_shardings(model: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """``nnx.state(model)`` with each Variable's value replaced by its NamedSharding."""
    return state_shardings(nnx.state(model), mesh, rules, head_units(model.cfg))


def place(tree: Any, shardings: Any) -> Any:
    """``device_put`` that also works across processes: every process passes the same
    host values, and each builds only its own devices' shards."""

    def put(x, s):
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def shard_model(model: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Move every Variable of ``model`` (in place) to its sharding on ``mesh``."""
    state = nnx.state(model)
    nnx.update(model, place(state, model_shardings(model, mesh, rules)))
    return model


# ---------------------------------------------------------------------- accounting


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each addressable device holds of the arrays in ``tree`` (an nnx state, a
    model's state, any pytree of ``jax.Array``)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def param_bytes(model: Any) -> tuple[int, dict[Any, int]]:
    """(total bytes of the model's parameters, bytes each device holds of them)."""
    state = nnx.state(model, nnx.Param)
    total = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    return total, per_device_bytes(state)

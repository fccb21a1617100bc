"""Adapter training: frozen backbone, optax AdamW, exact resume through Orbax.

Only adapter weights (``LoRAParam``: banks and routers) are differentiated: the model is
split into (trainable, frozen) states and ``jax.value_and_grad`` sees only the first, so
no backbone gradient is ever computed. A step = ``grad_accum`` micro-batches summed in a
``lax.scan``, clipped, AdamW with linear warmup + cosine decay. The CheckpointManager
saves adapters, optimizer state, dropout RNG state, step and the data position, so a
resumed run replays exactly the batches and losses of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from lsw_jax import sharding as sh
from lsw_jax.adapters.lora import (
    LoRAParam,
    attach_adapter,
    iter_linears,
    learned_routings,
    load_balancing_loss,
    router_z_loss,
    routing_stats,
)
from lsw_jax.adapters.store import save_adapter
from lsw_jax.checkpoint import CheckpointError, first_line, tree_checksums, verify_tree_checksums
from lsw_jax.config import AdapterConfig
from lsw_jax.convert.peft import export_peft_adapter
from lsw_jax.data import Batches, load_documents, pack_documents
from lsw_jax.linears import ALL_TARGETS
from lsw_jax.loading import load_model, load_tokenizer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; a JSON file with these keys (``adapter`` nested) + flags."""

    ckpt: str
    data: tuple[str, ...]
    out_dir: str
    adapter: AdapterConfig = AdapterConfig()
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    lr: float = 2e-4
    router_lr: float | None = None  # routers' peak learning rate; None: lr
    warmup_steps: int | None = None  # linear warm-up; None: 10, a tenth of runs under 100 steps
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    dtype: str | None = None  # compute dtype; adapters always stay fp32
    remat: bool = False
    save_every: int = 50
    keep_checkpoints: int = 2
    adapter_name: str | None = None  # also store the result in ckpt/adapters/<name>

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.router_lr is not None and self.router_lr < 0:
            raise ValueError(f"router_lr={self.router_lr} must be >= 0")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}): the run "
                "would end before its learning rate leaves the warm-up (the adapter's B "
                "starts at 0, so it would stay a no-op); lower warmup_steps or raise steps"
            )

    @property
    def warmup(self) -> int:
        """The warm-up's steps: ``warmup_steps``, by default 10 but never more than a
        tenth of the run (a 1-step run has none: its one step moves the adapter)."""
        return min(10, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        raw = json.loads(Path(path).read_text())
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown training config fields {unknown}")
        if isinstance(raw.get("adapter"), dict):
            raw["adapter"] = AdapterConfig.from_dict(raw["adapter"])
        if isinstance(raw.get("data"), str):
            raw["data"] = (raw["data"],)
        raw["data"] = tuple(raw.get("data", ()))
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter"] = self.adapter.to_dict()
        d["data"] = list(self.data)
        return d


# ---------------------------------------------------------------------- loss & step


def token_nll(model: Any, batch: dict[str, Array]) -> tuple[Array, Any]:
    """Per-token ``-log p(targets)`` [B, T] of a packed batch, and the model output."""
    out = model.forward(
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        attention_mask=batch["segment_ids"] > 0,
    )
    logits = out.logits.astype(jnp.float32)  # [B, T, V]
    # logsumexp - target logit: no [B, T, V] log-probabilities are materialised.
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target, out


def lm_loss(
    model: Any, batch: dict[str, Array], adapter: AdapterConfig
) -> tuple[Array, dict[str, Array]]:
    """Masked next-token cross-entropy + aux losses; returns (total, metrics)."""
    nll, out = token_nll(model, batch)
    mask = batch["loss_mask"]
    n_tok = jnp.maximum(mask.sum(), 1.0)
    ce = jnp.sum(nll * mask) / n_tok
    total, metrics = ce, {"ce": ce, "tokens": mask.sum()}
    routings = learned_routings(out.routing)
    if routings:
        token_mask = batch["segment_ids"] > 0
        aux = sum(load_balancing_loss(r, adapter.num_experts, token_mask) for r in routings)
        aux = aux / len(routings)
        z = sum(router_z_loss(r, token_mask) for r in routings) / len(routings)
        total = total + adapter.aux_loss_coef * aux + adapter.router_z_loss_coef * z
        # Load and entropy of the first routing (MoLA: layer 0; switch: the only one).
        stats = routing_stats(routings[0], adapter.num_experts, token_mask)
        metrics.update(aux_loss=aux, z_loss=z, **stats)
    return total, metrics


def _is_router(path: tuple) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "router" for k in path)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with linear warmup and cosine decay to 10% of peak.

    With ``cfg.router_lr`` set, router weights get their own AdamW whose schedule peaks at
    ``router_lr`` (same warmup and decay shape); the clipping still sees all gradients.
    """

    def adamw(peak: float) -> optax.GradientTransformation:
        w = cfg.warmup
        if w == 0:  # optax's warm-up starts at 0: even one warm-up step would be a no-op
            schedule = optax.cosine_decay_schedule(peak, max(cfg.steps, 1), alpha=0.1)
        else:
            schedule = optax.warmup_cosine_decay_schedule(
                0.0, peak, w, max(cfg.steps, w + 1), peak * 0.1
            )
        return optax.adamw(schedule, weight_decay=cfg.weight_decay)

    if cfg.router_lr is None:
        update = adamw(cfg.lr)
    else:
        update = optax.multi_transform(
            {"adapter": adamw(cfg.lr), "router": adamw(cfg.router_lr)},
            lambda params: jax.tree_util.tree_map_with_path(
                lambda path, _: "router" if _is_router(path) else "adapter", params
            ),
        )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), update)


def make_train_step(graphdef: Any, optimizer: Any, adapter: AdapterConfig, shardings: Any = None):
    """jitted ``(trainable, rng_state, frozen, opt_state, batches[A, B, T]) -> ...``.

    shardings: optional ``(trainable, rng_state, opt_state)`` shardings the step's new
    states keep (on a mesh: the next step then sees the same layouts, no recompile).
    """

    def micro(trainable, rng_state, frozen, batch):
        def loss_fn(trainable):
            model = nnx.merge(graphdef, trainable, rng_state, frozen)
            loss, metrics = lm_loss(model, batch, adapter)
            new_rng = nnx.state(model, nnx.RngState)
            return loss, (metrics, new_rng)

        (loss, (metrics, rng_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return grads, loss, metrics, rng_state

    @jax.jit
    def step(trainable, rng_state, frozen, opt_state, batches):
        def body(carry, batch):
            acc, rng_state = carry
            grads, loss, metrics, rng_state = micro(trainable, rng_state, frozen, batch)
            acc = jax.tree.map(jnp.add, acc, grads)
            return (acc, rng_state), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads, rng_state), (losses, metrics) = jax.lax.scan(body, (zeros, rng_state), batches)
        n = batches["input_ids"].shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        metrics["loss"] = jnp.mean(losses)
        metrics["grad_norm"] = optax.global_norm(grads)
        if shardings is not None:
            trainable, rng_state, opt_state = jax.lax.with_sharding_constraint(
                (trainable, rng_state, opt_state), shardings
            )
        return trainable, rng_state, opt_state, metrics

    return step


# ---------------------------------------------------------------------- the run


def build_data(cfg: TrainConfig, tokenizer: Any):
    if not cfg.data:
        raise ValueError("data: give at least one .txt or .jsonl file")
    docs = load_documents(cfg.data)
    packed = pack_documents(docs, tokenizer, cfg.seq_len)
    if len(packed) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(
            f"data: {len(packed)} sequences of {cfg.seq_len} tokens, fewer than one step's "
            f"batch_size*grad_accum = {cfg.batch_size * cfg.grad_accum}"
        )
    return Batches(packed, cfg.batch_size * cfg.grad_accum, seed=cfg.seed)


def _stack_micro(batch: dict[str, np.ndarray], accum: int) -> dict[str, Array]:
    keys = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
    return {k: jnp.asarray(batch[k].reshape(accum, -1, *batch[k].shape[1:])) for k in keys}


class Trainer:
    """Holds model, optimizer, data and the CheckpointManager of one run."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batches: Any = None,
        mesh: Any = None,
        verify_checksums: bool = True,
    ):
        """model/tokenizer default to those of ``cfg.ckpt``; ``batches`` (a data.Batches,
        e.g. over a domain mixture) replaces the files of ``cfg.data``. ``mesh``: a
        ``jax.sharding.Mesh``; backbone, adapters and batches are then laid out by
        ``sharding.LOGICAL_AXIS_RULES`` (data, FSDP and tensor parallel) and jit places
        the collectives."""
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.mesh = mesh
        if model is None:
            model = load_model(
                cfg.ckpt, dtype=cfg.dtype, mesh=mesh, verify_checksums=verify_checksums
            )
        if tokenizer is None and batches is None:
            tokenizer = load_tokenizer(cfg.ckpt, required=True)
        attach_adapter(model, cfg.adapter, seed=cfg.seed)
        if cfg.remat:
            model.remat = True
        self.model = model
        self.graphdef, self.trainable, self.rng_state, self.frozen = nnx.split(
            model, LoRAParam, nnx.RngState, ...
        )
        self.optimizer = make_optimizer(cfg)
        shardings = None
        if mesh is not None:
            shardings = self._shard_states(mesh)
        else:
            self.opt_state = self.optimizer.init(self.trainable)
        self.batches = batches if batches is not None else build_data(cfg, tokenizer)
        self.step_fn = make_train_step(self.graphdef, self.optimizer, cfg.adapter, shardings)
        self.step = 0
        self.manager = ocp.CheckpointManager(
            (self.out / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep_checkpoints, save_interval_steps=cfg.save_every
            ),
        )
        self._restore_latest()

    def _shard_states(self, mesh: Any) -> tuple:
        """Place the states on ``mesh`` by the rules; returns (trainable, rng, opt) shardings."""
        units = sh.head_units(self.model.cfg)
        self.trainable, self.rng_state, self.frozen = (
            sh.place(s, sh.state_shardings(s, mesh, units=units))
            for s in (self.trainable, self.rng_state, self.frozen)
        )
        opt_state = self.optimizer.init(self.trainable)  # moments inherit the params' layout
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.opt_state = sh.place(
            opt_state,
            jax.tree.map(
                lambda x: (
                    x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated
                ),
                opt_state,
            ),
        )
        return jax.tree.map(lambda x: x.sharding, (self.trainable, self.rng_state, self.opt_state))

    def _batch(self) -> dict[str, Array]:
        """The next step's micro-batches ``[A, B, T]``; on a mesh, split along B."""
        batch = _stack_micro(next(self.batches), self.cfg.grad_accum)
        if self.mesh is None:
            return batch
        axes = (None, "batch", "length")
        return sh.place(
            batch, {k: sh.named_sharding(axes, v.shape, self.mesh) for k, v in batch.items()}
        )

    def _payload(self) -> dict[str, Any]:
        return {
            "trainable": self.trainable.to_pure_dict(),
            "rng": self.rng_state.to_pure_dict(),
            "opt": self.opt_state,
        }

    def _restore_latest(self) -> None:
        """Resume from the newest step that restores and verifies; steps after it that do
        not are moved aside (``<step>.corrupt-N``, kept for inspection) with a warning
        saying why, so the run re-makes them. None verifying is an error listing why."""
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta, state = self._restore_step(step)
            except CheckpointError as e:
                skipped.append((step, str(e)))
                continue
            self._set_state(meta, state)
            break
        else:
            if skipped:
                reasons = "\n".join(f"  step {s}: {why}" for s, why in skipped)
                raise ValueError(
                    f"{self.out / 'checkpoints'}: no checkpoint step restores:\n{reasons}\n"
                    "move that folder away to start the run afresh"
                )
            return
        for step, _ in skipped:
            self._set_aside(step)
        if skipped:
            reasons = "; ".join(f"step {s}: {why}" for s, why in skipped)
            warnings.warn(
                f"{self.out / 'checkpoints'}: resumed from step {self.step}, skipping newer "
                f"steps that do not restore ({reasons})",
                stacklevel=3,
            )
            self.manager.reload()

    def _restore_step(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(meta, state) of one saved step, its arrays checked against their checksums;
        a failure is a one-line CheckpointError (a different adapter: a ValueError)."""
        source = self.out / "checkpoints" / str(step)
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            meta = self.manager.restore(step, args=args)["meta"]
            trained = meta["config"]["adapter"]
        except Exception as e:  # orbax raises many types, with pages of context
            raise CheckpointError(f"{source}: {first_line(e)}") from None
        if trained != self.cfg.adapter.to_dict():  # another run's folder, not a corrupt step
            raise ValueError(
                f"{self.out}: checkpoint was trained with adapter {trained}, this run asks "
                f"for {self.cfg.adapter.to_dict()}"
            )
        on_mesh = self.mesh is not None  # restore each array straight into its layout
        target = jax.tree.map(
            lambda x: (
                jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if on_mesh else None)
                if hasattr(x, "shape")
                else x
            ),
            self._payload(),
        )
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
            state = self.manager.restore(step, args=args)["state"]
        except Exception as e:
            raise CheckpointError(f"{source}: {first_line(e)}") from None
        if meta.get("checksums"):
            verify_tree_checksums(state, meta["checksums"], source)
        return meta, state

    def _set_state(self, meta: dict[str, Any], state: dict[str, Any]) -> None:
        self.trainable.replace_by_pure_dict(state["trainable"])
        self.rng_state.replace_by_pure_dict(state["rng"])
        self.opt_state = state["opt"]
        self.batches.restore(meta["data"])
        self.step = int(meta["step"])

    def _set_aside(self, step: int) -> None:
        if jax.process_index() != 0:  # one process renames the shared folder
            return
        root = self.out / "checkpoints"
        n = 0
        while (root / f"{step}.corrupt-{n}").exists():
            n += 1
        os.replace(root / str(step), root / f"{step}.corrupt-{n}")

    def save(self, force: bool = False) -> None:
        """Save this step (every ``save_every`` steps, or now with ``force``) with the
        crc32 of every array, which resume checks."""
        if not (force or self.manager.should_save(self.step)):
            return
        if self.step in self.manager.all_steps():
            return  # already saved (finish() right after a periodic save; a rerun)
        payload = self._payload()
        meta = {
            "step": self.step,
            "data": self.batches.state(),
            "config": self.cfg.to_dict(),
            "checksums": tree_checksums(payload),
        }
        self.manager.save(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(payload), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def run(self, *, stop_after: int | None = None, progress: bool = True) -> list[dict]:
        """Train to ``cfg.steps`` (or stop after ``stop_after`` more steps); metrics per step."""
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        trim_metrics(metrics_path, self.step)
        history = []
        target = (
            self.cfg.steps if stop_after is None else min(self.cfg.steps, self.step + stop_after)
        )
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress, desc="train")
        # No host sync per step: step n's metrics are read after step n+1 is dispatched,
        # so the host prepares the next batch while the device computes.
        pending, t_last = None, time.perf_counter()

        def record(step: int, m: Any, n_tokens: int) -> None:
            nonlocal t_last
            m = jax.tree.map(lambda x: np.asarray(x).tolist(), m)  # waits for step `step`
            now = time.perf_counter()
            m.update(step=step, tokens_per_s=n_tokens / (now - t_last))
            t_last = now
            history.append(m)
            log.write(json.dumps(m) + "\n")
            log.flush()  # readable while the run goes on
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            bar.update(1)

        with open(metrics_path, "a") as log:
            while self.step < target:
                batch = self._batch()
                self.trainable, self.rng_state, self.opt_state, m = self.step_fn(
                    self.trainable, self.rng_state, self.frozen, self.opt_state, batch
                )
                self.step += 1
                if pending is not None:
                    record(*pending)
                pending = (self.step, m, batch["input_ids"].size)
                self.save()
            if pending is not None:
                record(*pending)
        bar.close()
        self.manager.wait_until_finished()
        return history

    def finish(self) -> None:
        """Write the trained adapter (and a loss plot); store it in the base checkpoint."""
        self.save(force=True)
        self.manager.wait_until_finished()
        nnx.update(self.model, self.trainable)
        if adapter_is_zero(self.model):
            warnings.warn(
                "the trained adapter is exactly zero (every LoRA B is 0): it changes nothing; "
                f"train longer or with a higher lr ({self.cfg.steps} steps, lr {self.cfg.lr:g}, "
                f"warm-up {self.cfg.warmup})",
                stacklevel=2,
            )
        save_adapter(self.model, self.out, "final", overwrite=True)
        if self.cfg.adapter_name:
            save_adapter(self.model, self.cfg.ckpt, self.cfg.adapter_name, overwrite=True)
        if self.cfg.adapter.kind == "lora":
            export_peft_adapter(self.model, self.out / "peft")
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` in the metrics file ``path`` (a run killed
    after its last checkpoint wrote steps that the resumed run replays; a kill mid-write
    leaves a torn last line). Rewritten atomically, only when something goes."""
    if not path.exists() or jax.process_index() != 0:
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    if kept != lines:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def adapter_is_zero(model: Any) -> bool:
    """Whether every attached LoRA's B is all zeros (the adapter's delta is 0)."""
    banks = [view.lora for _, _, view in iter_linears(model, ALL_TARGETS) if view.lora is not None]
    return bool(banks) and not any(np.any(np.asarray(bank.b[...])) for bank in banks)


def plot_losses(metrics_path: Path, png: Path) -> None:
    try:
        import matplotlib  # optional (the dev extra): a run without it just skips the plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional at run time
        return
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["ce"] for r in rows], label="cross-entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

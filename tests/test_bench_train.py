"""scripts/bench_train.py's FLOP count, against XLA's own count of the compiled step."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

import lsw_jax
from lsw_jax.config import ModelConfig
from lsw_jax.data import BATCH_KEYS, Batches
from lsw_jax.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_train  # noqa: E402


def test_step_flops_match_xla_cost_analysis(tmp_path):
    """The roofline's numerator: within 10% of XLA's FLOP count of the real training step
    (XLA also counts elementwise ops and the adapter, which ``step_flops`` leaves out)."""
    cfg = ModelConfig.tiny(
        vocab_size=2048, hidden_size=256, intermediate_size=768, num_heads=4, head_dim=64
    )
    batch, seq = 2, 64
    data = bench_train.packed(bench_train.random_rows(cfg.vocab_size, 4 * batch, seq))
    train_cfg = TrainConfig(
        ckpt="unused",
        data=(),
        out_dir=str(tmp_path),
        adapter=bench_train.adapter_config("lora", 8, 1, 1),
        seq_len=seq,
        batch_size=batch,
        dtype="float32",
    )
    model = lsw_jax.init_model(cfg, dtype="float32")
    trainer = Trainer(train_cfg, model=model, batches=Batches(data, batch, seed=0))
    rows = data.rows(np.arange(batch))
    sample = {k: jax.numpy.asarray(rows[k][None]) for k in BATCH_KEYS}
    args = (trainer.trainable, trainer.rng_state, trainer.frozen, trainer.opt_state, sample)
    cost = trainer.step_fn.lower(*args).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = bench_train.step_flops(cfg, batch, seq)
    assert 1.0 <= xla_flops / ours < 1.1, (xla_flops, ours)

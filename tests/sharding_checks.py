"""Sharded-vs-single-device checks on 8 fake CPU devices; run by tests/test_sharding.py.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax starts, so
this runs as its own process: ``python tests/sharding_checks.py OUT.json``. It computes
every quantity the tests assert on (relative errors, shardings, bytes) and writes them as
JSON; the assertions live in the test file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lsw_jax import sharding as sh  # noqa: E402
from lsw_jax.adapters.lora import LoRAParam, attach_adapter  # noqa: E402
from lsw_jax.config import AdapterConfig, ModelConfig  # noqa: E402
from lsw_jax.decode import generate  # noqa: E402
from lsw_jax.loading import save_model, sharded_load_model  # noqa: E402
from lsw_jax.model.llama import init_model  # noqa: E402

ADAPTER = AdapterConfig(kind="switch", num_experts=4, top_k=2, rank=4)
CONFIGS = {
    # every sharded dimension divides 8: heads 8, kv_heads 8, mlp 128, vocab 128, embed 64
    "divisible": ModelConfig.tiny(num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=128),
    # one KV head: k/v projections must replicate over "tensor", never split a head
    "mqa": ModelConfig.tiny(num_heads=4, num_kv_heads=1, head_dim=16),
}
MESHES = {
    "data2_fsdp2_tensor2": "data=2,fsdp=2,tensor=2",
    "tensor8": "data=1,fsdp=1,tensor=8",
}
# (config, mesh) pairs checked: both meshes where every dimension divides; the MQA model
# where kv_heads=1 meets a 2-way tensor axis (each case compiles; the file has ~90 s).
FORWARD = (
    ("divisible", "data2_fsdp2_tensor2"),
    ("divisible", "tensor8"),
    ("mqa", "data2_fsdp2_tensor2"),
)

# data/FSDP/tensor-parallel decode, and pure tensor-parallel decode
GENERATE = {("divisible", "data2_fsdp2_tensor2"), ("divisible", "tensor8")}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def adapted_model(cfg: ModelConfig):
    """A model with a switch adapter whose B banks are non-zero (the delta matters)."""
    model = init_model(cfg, seed=0, dtype="float32")
    attach_adapter(model, ADAPTER, seed=1)
    key = jax.random.key(7)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, LoRAParam) and path[-1] == "b":
            key, sub = jax.random.split(key)
            var[...] = 0.05 * jax.random.normal(sub, var.get_value().shape)
    return model


@nnx.jit
def logits_of(model, ids):
    return model(ids)


def check_forward_and_generate(out: dict, tmp: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 128, (4, 12)).astype(np.int32)
    for cname, cfg in CONFIGS.items():
        ref_model = adapted_model(cfg)
        ref_logits = np.asarray(logits_of(ref_model, ids))
        ref_tokens = generate(ref_model, ids, 6) if any(c == cname for c, _ in GENERATE) else None
        for mname in (m for c, m in FORWARD if c == cname):
            mesh = sh.MeshConfig.parse(MESHES[mname]).make()
            model = sh.shard_model(adapted_model(cfg), mesh)
            batch = sh.named_sharding(("batch", "length"), ids.shape, mesh)
            logits = logits_of(model, jax.device_put(ids, batch))
            attn = model.layers[0].self_attn
            out[f"forward/{cname}/{mname}"] = {
                "rel_err": rel_err(logits, ref_logits),
                "qkv_spec": str(attn.qkv_proj.weight[...].sharding.spec),
                "o_spec": str(attn.o_proj.weight[...].sharding.spec),
                "logits_devices": len(logits.sharding.device_set),
            }
            if (cname, mname) in GENERATE:  # each generate compiles a while loop: two cases
                tokens = generate(model, ids, 6)
                out[f"forward/{cname}/{mname}"]["generate_equal"] = bool(
                    np.array_equal(tokens, ref_tokens)
                )


def check_bytes(out: dict, tmp: Path) -> None:
    mesh = sh.MeshConfig.parse(MESHES["data2_fsdp2_tensor2"]).make()
    model = sh.shard_model(init_model(CONFIGS["divisible"], seed=0, dtype="float32"), mesh)
    total, per_device = sh.param_bytes(model)
    q = model.layers[0].self_attn.qkv_proj.weight[...]
    norm = model.norm.weight[...]
    out["bytes"] = {
        "total": total,
        "per_device": sorted(per_device.values()),
        "q_total": q.nbytes,
        "q_per_device": sorted(sh.per_device_bytes(q).values()),
        "norm_total": norm.nbytes,
        "norm_per_device": sorted(sh.per_device_bytes(norm).values()),
        # every parameter here is 2-D and split 4 ways (fsdp x tensor), except the five
        # RMSNorm scales (2 per layer + the final one), which every device holds whole
        "expected_per_device": (total - 5 * norm.nbytes) // 4 + 5 * norm.nbytes,
    }


def check_sharded_load(out: dict, tmp: Path) -> None:
    cfg = CONFIGS["mqa"]
    model = init_model(cfg, seed=3, dtype="float32")
    save_model(model, tmp / "ckpt")
    mesh = sh.MeshConfig.parse(MESHES["data2_fsdp2_tensor2"]).make()
    loaded = sharded_load_model(tmp / "ckpt", mesh, dtype="float32")
    expected = sh.model_shardings(model, mesh)
    mismatched, max_err = [], 0.0
    flat_loaded = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    flat_want = dict(nnx.to_flat_state(nnx.state(expected, nnx.Param)))
    flat_ref = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in flat_loaded.items():
        arr = var[...]
        if not arr.sharding.is_equivalent_to(flat_want[path].get_value(), arr.ndim):
            mismatched.append(f"{path}: {arr.sharding} != {flat_want[path].get_value()}")
        max_err = max(max_err, rel_err(arr, flat_ref[path][...]))
    attn = loaded.layers[1].self_attn
    out["load"] = {
        "mismatched": mismatched,
        "max_rel_err": max_err,
        "n_params": len(flat_loaded),
        "qkv_spec": str(attn.qkv_proj.weight[...].sharding.spec),
        "o_spec": str(attn.o_proj.weight[...].sharding.spec),
        "embed_spec": str(loaded.embed_tokens[...].sharding.spec),
    }


def check_train(out: dict, tmp: Path) -> None:
    """Two adapter steps, single device vs data=2,fsdp=2,tensor=2.

    Plain SGD replaces AdamW here: Adam's first updates are ``lr * g / (|g| + eps)``, which
    turns the last-bit differences of near-zero gradients (summed in another order on the
    mesh) into differences of up to ~1e-4 * lr in the weights; SGD keeps the comparison a
    test of the sharded gradients themselves. (AdamW on the mesh: docs/sharding.md.)
    """
    import optax

    from lsw_jax import train
    from lsw_jax.train import TrainConfig, Trainer

    train.make_optimizer = lambda cfg: optax.sgd(cfg.lr)

    class ByteTokenizer:
        bos_token_id = None
        eos_token_id = 2

        def encode(self, text, add_special_tokens=False):
            return [3 + b for b in text.encode()]

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "switch", "router", "expert", "token"]
    txt = tmp / "text.txt"
    txt.write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(80)))
    cfg_model = CONFIGS["divisible"].__class__.tiny(
        vocab_size=264, num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=128
    )
    results = {}
    for name, spec in (("single", None), ("mesh", MESHES["data2_fsdp2_tensor2"])):
        cfg = TrainConfig(
            ckpt=str(tmp / "unused"),
            data=(str(txt),),
            out_dir=str(tmp / name),
            adapter=ADAPTER,
            seq_len=32,
            batch_size=4,
            steps=2,
            lr=0.5,
            warmup_steps=1,
            save_every=100,
        )
        mesh = sh.MeshConfig.parse(spec).make() if spec else None
        model = init_model(cfg_model, seed=0, dtype="float32")
        tr = Trainer(cfg, model=model, tokenizer=ByteTokenizer(), mesh=mesh)
        w0 = jax.tree.map(np.asarray, tr.trainable.to_pure_dict())
        hist = tr.run(progress=False)
        results[name] = (
            [h["loss"] for h in hist],
            jax.tree.map(np.asarray, tr.trainable.to_pure_dict()),
            tr.trainable,
        )
    (loss1, w1, _), (loss2, w2, sharded) = results["single"], results["mesh"]
    errs = jax.tree.leaves(jax.tree.map(rel_err, w2, w1))

    specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded) if isinstance(x, jax.Array)}
    out["train"] = {
        "loss_single": loss1,
        "loss_mesh": loss2,
        "loss_rel_err": max(abs(a - b) / abs(b) for a, b in zip(loss2, loss1, strict=True)),
        "weights_max_rel_err": max(errs),
        "adapter_specs": sorted(specs),
        "weights_change": max(
            jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), w1, w0))
        ),
    }


def main() -> None:
    out: dict = {"n_devices": jax.device_count(), "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for check in (check_forward_and_generate, check_bytes, check_sharded_load, check_train):
            t0 = time.perf_counter()
            check(out, Path(tmp))
            out["seconds"][check.__name__] = round(time.perf_counter() - t0, 1)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

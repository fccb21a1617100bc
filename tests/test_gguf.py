"""GGUF front end: q/k unpermutation, config, tensors, and the errors a bad file raises.

Oracles: a permutation written out index by index, transformers' own GGUF loader on the
shipped SmolLM2 file, and values quantised here with ``gguf.quants``.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import lsw_jax  # noqa: E402
from lsw_jax.cli import main  # noqa: E402
from lsw_jax.convert.gguf import (  # noqa: E402
    gguf_hf_config,
    iter_gguf_tensors,
    unpermute_qk_from_gguf,
)
from lsw_jax.tokenizer import Tokenizer  # noqa: E402

QT = gguf.GGMLQuantizationType


def permute_like_llama_cpp(hf: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, element by element: per head, interleave the two halves."""
    d = hf.shape[0] // n_heads
    out = np.empty_like(hf)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = hf[h * d + i]
            out[h * d + 2 * i + 1] = hf[h * d + d // 2 + i]
    return out


# ---------------------------------------------------------------- unpermute_qk_from_gguf


@pytest.mark.parametrize("n_heads,head_dim,cols", [(3, 4, 5), (1, 2, 1), (4, 8, 3)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, head_dim, cols):
    hf = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(-1, cols)
    np.testing.assert_array_equal(
        unpermute_qk_from_gguf(permute_like_llama_cpp(hf, n_heads), n_heads), hf
    )


def test_unpermute_hand_example_and_bias():
    # One head of 4 rows: GGUF order [x0, y0, x1, y1] -> HF order [x0, x1, y0, y1].
    gguf_rows = np.array([[10.0], [20.0], [11.0], [21.0]])
    np.testing.assert_array_equal(
        unpermute_qk_from_gguf(gguf_rows, 1)[:, 0], [10.0, 11.0, 20.0, 21.0]
    )
    bias = np.arange(12.0)
    np.testing.assert_array_equal(unpermute_qk_from_gguf(permute_like_llama_cpp(bias, 2), 2), bias)


def test_unpermute_rejects_bad_rows():
    with pytest.raises(ValueError, match="multiple of 2"):
        unpermute_qk_from_gguf(np.zeros((6, 2)), 2)


# ---------------------------------------------------------------- tiny synthetic files

TINY = dict(vocab=64, hidden=32, ffn=64, layers=2, heads=4, kv_heads=2, head_dim=8)


def tiny_hf_weights(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """Random HF-layout weights for the TINY shape."""
    rng = np.random.default_rng(seed)
    h, f, d = TINY["hidden"], TINY["ffn"], TINY["head_dim"]
    q, kv = TINY["heads"] * d, TINY["kv_heads"] * d
    w = {"model.embed_tokens.weight": (TINY["vocab"], h), "model.norm.weight": (h,)}
    if not tied:
        w["lm_head.weight"] = (TINY["vocab"], h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in w.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def to_gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def write_tiny_gguf(
    path, weights, *, arch="llama", name="tiny", qtype=QT.F32, extra_tensors=(), meta=None
):
    """Write ``weights`` (HF layout) as a llama.cpp-style GGUF; 2-D tensors stored as ``qtype``."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(TINY["layers"])
    w.add_context_length(128)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(50000.0)
    w.add_vocab_size(TINY["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for fn, value in (meta or {}).items():
        getattr(w, fn)(value)
    for hf_name, t in weights.items():
        if hf_name.endswith("q_proj.weight"):
            t = permute_like_llama_cpp(t, TINY["heads"])
        elif hf_name.endswith("k_proj.weight"):
            t = permute_like_llama_cpp(t, TINY["kv_heads"])
        if t.ndim == 2 and qtype == QT.F16:
            w.add_tensor(to_gguf_name(hf_name), t.astype(np.float16))
        elif t.ndim == 2 and qtype != QT.F32:
            w.add_tensor(to_gguf_name(hf_name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(to_gguf_name(hf_name), t)
    for tensor_name, raw, raw_dtype in extra_tensors:
        w.add_tensor(tensor_name, raw, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_config(tmp_path):
    config = gguf_hf_config(write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_weights()))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (
        64,
        32,
        64,
    )
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (2, 4)
    assert (config["num_key_value_heads"], config["head_dim"]) == (2, 8)
    assert config["rope_theta"] == 50000.0 and config["rope_scaling"] is None
    assert config["max_position_embeddings"] == 128
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["rms_norm_eps"] == pytest.approx(1e-6)
    assert "sliding_window" not in config


def test_mistral_named_llama_file_and_rope_scaling(tmp_path):
    path = write_tiny_gguf(
        tmp_path / "m.gguf",
        tiny_hf_weights(tied=True),
        name="Mistral 7B Instruct v0.2",
        meta={
            "add_sliding_window": 4096,
            "add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
            "add_rope_scaling_factor": 2.0,
        },
    )
    config = gguf_hf_config(path)
    assert config["architectures"] == ["MistralForCausalLM"] and config["model_type"] == "mistral"
    assert config["sliding_window"] == 4096
    assert config["tie_word_embeddings"] is True
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert config["rope_parameters"] == {
        "rope_type": "linear",
        "rope_theta": 50000.0,
        "factor": 2.0,
    }


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_tiny_round_trip(tmp_path, qtype):
    """Each tensor comes back in HF order, equal to what the stored type holds."""
    weights = tiny_hf_weights(seed=1)
    path = write_tiny_gguf(tmp_path / "t.gguf", weights, qtype=qtype)
    out = dict(iter_gguf_tensors(path))
    assert set(out) == set(weights)
    for name, w in weights.items():
        got = out[name]
        assert got.dtype == np.float32 and got.shape == w.shape, name
        if w.ndim == 1 or qtype == QT.F32:
            want = w
        elif qtype == QT.F16:
            want = w.astype(np.float16).astype(np.float32)
        else:  # the stored values, in HF row order
            want = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        np.testing.assert_array_equal(got, want, err_msg=name)
        # and close to the original: 8-bit within 1%, 4-bit within ~1/8 of each block's range
        np.testing.assert_allclose(got, w, atol={QT.Q4_0: 0.6, QT.Q4_1: 0.6}.get(qtype, 0.03))


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", tiny_hf_weights(), arch="gpt2")
    with pytest.raises(ValueError, match=r"g\.gguf.*'gpt2'.*supported.*llama"):
        gguf_hf_config(path)
    with pytest.raises(ValueError, match="'gpt2'"):
        next(iter_gguf_tensors(path))


def test_unsupported_tensor_type(tmp_path):
    weights = tiny_hf_weights()
    q5 = weights.pop("lm_head.weight")
    # Q5_0: blocks of 32 values in 22 bytes; contents never read.
    raw = np.zeros((q5.shape[0], q5.shape[1] // 32 * 22), np.uint8)
    path = write_tiny_gguf(
        tmp_path / "q.gguf", weights, extra_tensors=[("output.weight", raw, QT.Q5_0)]
    )
    with pytest.raises(ValueError, match=r"q\.gguf.*'output\.weight'.*Q5_0"):
        list(iter_gguf_tensors(path))


def test_unknown_and_missing_tensors(tmp_path):
    weights = tiny_hf_weights()
    extra = [("blk.0.attn_q.bias", np.zeros(32, np.float32), None)]
    path = write_tiny_gguf(tmp_path / "u.gguf", weights, extra_tensors=extra)
    with pytest.raises(ValueError, match=r"unknown GGUF tensor 'blk\.0\.attn_q\.bias'"):
        list(iter_gguf_tensors(path))
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_tiny_gguf(tmp_path / "m.gguf", weights)
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.mlp\.up_proj"):
        list(iter_gguf_tensors(path))


@pytest.mark.parametrize("keep", [10, 300, -100])
def test_truncated_file(tmp_path, keep):
    data = write_tiny_gguf(tmp_path / "full.gguf", tiny_hf_weights()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"cut\.gguf.*(truncated|corrupt)"):
        gguf_hf_config(cut)
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        list(iter_gguf_tensors(cut))


# ---------------------------------------------------------------- shipped SmolLM2 vs transformers


@pytest.fixture(scope="module")
def transformers_model(smollm2_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2_path, transformers_model):
    state = {k: v.detach().numpy() for k, v in transformers_model.state_dict().items()}
    seen = set()
    for name, w in iter_gguf_tensors(smollm2_path):
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, state[name], err_msg=name)  # bit-exact
        seen.add(name)
    # tied head: transformers reports lm_head.weight, the file (and we) do not
    assert set(state) - seen == {"lm_head.weight"}
    assert len(seen) == 2 + 9 * 30


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2_path, transformers_model):
    ours = gguf_hf_config(smollm2_path)
    ref = transformers_model.config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "model_type",
    ):
        assert ours[key] == getattr(ref, key), key
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-7)
    assert ours["rope_parameters"] == ref.rope_parameters
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours["architectures"] == ["LlamaForCausalLM"]


PARAGRAPH = (
    "The river had been rising for three days, and by the morning of the fourth the lower "
    "fields were under water. The farmers moved their animals to the high pasture and "
    "stacked sandbags along the road, while the children watched from the bridge as "
    "branches and whole trees drifted past toward the sea."
)


@pytest.mark.slow
def test_smollm2_logits_and_generate_match_transformers(
    smollm2_path, transformers_model, tmp_path_factory
):
    """Our GGUF conversion + model vs transformers' own GGUF loader on the same file."""
    import torch  # the transformers peer's; absent from some test environments

    ckpt = tmp_path_factory.mktemp("smol") / "ckpt"
    lsw_jax.convert_checkpoint(smollm2_path, ckpt, show_progress=False)
    tok = Tokenizer.from_hf_dir(ckpt)
    ids = np.asarray([tok.encode(PARAGRAPH, add_special_tokens=False)], np.int32)
    ours = lsw_jax.load_model(ckpt, dtype="float32")
    got = np.asarray(ours(ids))
    with torch.no_grad():
        want = transformers_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    agree = np.mean(got.argmax(-1) == want.argmax(-1))
    assert agree >= 0.99, agree
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-3, rel

    prompt = ids[:, :24]
    with torch.no_grad():
        hf_new = transformers_model.generate(
            torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=8, do_sample=False
        )[:, 24:].numpy()
    np.testing.assert_array_equal(
        lsw_jax.generate(ours, prompt, 8, eos_token_id=[])[:, : hf_new.shape[1]], hf_new
    )

    main(["generate", "--ckpt", str(ckpt), "--prompt", "Hi", "--chat", "--max-new-tokens", "4"])

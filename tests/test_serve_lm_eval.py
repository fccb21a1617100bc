"""EleutherAI lm-evaluation-harness against the server (``local-completions``, with the
server's own /tokenize as its tokenizer) and against transformers (``hf``, loading the same
SmolLM2 GGUF): a multiple-choice log-likelihood task and a generate-until task, defined from
local JSONL files, give the same scores, per-item log-likelihoods and generations; so do a
rolling perplexity task and ``lsw-jax eval``'s own scoring (``lsw_jax.evaluate``)."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

import lsw_jax
from lsw_jax.data import MultipleChoice
from lsw_jax.evaluate import multiple_choice, perplexity
from lsw_jax.loading import load_tokenizer
from lsw_jax.serve.server import build_server, uvicorn_server

TASKS = ["lsw_mc", "lsw_gen", "lsw_ppl"]

MC = [
    ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
    (
        "Water freezes at a temperature of zero degrees",
        ["Celsius", "Kelvin", "bananas", "miles"],
        0,
    ),
    ("The opposite of hot is", ["cold", "warm", "loud", "green"], 0),
    ("A week has seven", ["days", "hours", "cats", "years"], 0),
    ("The sun rises in the", ["west", "east", "north", "kitchen"], 1),
    ("Cats are animals that like to chase", ["mice", "clouds", "numbers", "trains"], 0),
    ("Two plus two equals", ["three", "four", "five", "seven"], 1),
    ("The color of grass is usually", ["purple", "blue", "green", "black"], 2),
]
GEN = [
    ("What is the capital of France?", " Paris"),
    ("What is 2 plus 3?", " 5"),
    ("What color is the sky on a clear day?", " Blue"),
    ("How many legs does a spider have?", " 8"),
    ("What is the largest planet in our solar system?", " Jupiter"),
    ("Who wrote Romeo and Juliet?", " William Shakespeare"),
]
TEXTS = [
    "The river had been rising for three days, and by the morning of the fourth the lower "
    "fields were under water. The farmers moved their animals to the high pasture and "
    "stacked sandbags along the road, while the children watched from the bridge as "
    "branches and whole trees drifted past toward the sea. By evening the rain had stopped, "
    "but the water kept climbing, and the old miller said he had never seen it so high.",
    "A hash map stores values under keys. It computes a hash of each key to pick a bucket, "
    "so that looking a key up takes about the same time however many entries there are.",
]
WINDOW = 64  # tokens per rolling window: the longer text needs three


def write_tasks(root):
    """The three lm-eval tasks (lsw_mc, lsw_gen, lsw_ppl) as YAML + JSONL files in ``root``."""
    with open(root / "mc.jsonl", "w") as f:
        for q, choices, a in MC:
            f.write(json.dumps({"question": q, "choices": choices, "answer": a}) + "\n")
    with open(root / "gen.jsonl", "w") as f:
        for q, a in GEN:
            f.write(json.dumps({"question": f"Question: {q}\nAnswer:", "answer": a}) + "\n")
    with open(root / "ppl.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (root / "ppl.yaml").write_text(
        f"task: lsw_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {root}/ppl.jsonl\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "mc.yaml").write_text(
        f"task: lsw_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root}/mc.jsonl\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    # Five stop strings, as lm-eval's generate-until tasks send (more than OpenAI's four).
    (root / "gen.yaml").write_text(
        f"task: lsw_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root}/gen.jsonl\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n"
        '  until: ["\\n", "Question:", ".", "</s>", "<|im_end|>"]\n'
        "  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
    )


@pytest.mark.slow
def test_lm_eval_local_completions_equals_hf_backend(smollm2_path, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local JSON files only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.pop("OPENAI_API_KEY", None)
    ckpt = tmp_path / "smol"
    lsw_jax.convert_checkpoint(smollm2_path, ckpt, show_progress=False)
    write_tasks(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path))

    server = build_server(ckpt, slots=4, max_len=512, warmup=False, model_id="smol")
    srv = uvicorn_server(server, host="127.0.0.1", port=0, log_level="warning")
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    try:
        api = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": url + "/v1/completions",
                "model": "smol",
                "tokenizer_backend": "remote",  # the server's /tokenize and /tokenizer_info
                "num_concurrent": 1,
                "max_retries": 1,
                "batch_size": 4,  # prompts as a list of token-id lists
                "max_length": WINDOW + 2,  # the API model's rolling windows: max_length - 2
            },
            tasks=TASKS,
            task_manager=tasks,
            log_samples=True,
        )
    finally:
        srv.should_exit = True
        th.join(10)
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(smollm2_path.parent),
            "gguf_file": smollm2_path.name,
            "dtype": "float32",
            "device": "cpu",
            "max_length": WINDOW,
        },
        tasks=TASKS,
        task_manager=tasks,
        log_samples=True,
        batch_size=1,
    )
    for task, metrics in (
        ("lsw_mc", ("acc,none", "acc_norm,none")),
        ("lsw_gen", ("exact_match,none",)),
    ):
        for m in metrics:
            assert api["results"][task][m] == hf["results"][task][m], (task, m)
    for a, b in zip(api["samples"]["lsw_mc"], hf["samples"]["lsw_mc"], strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(
            [r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True
        ):
            assert abs(ll_a - ll_b) < 1e-3 and greedy_a == greedy_b
    gens = [s["resps"] for s in api["samples"]["lsw_gen"]]
    assert gens == [s["resps"] for s in hf["samples"]["lsw_gen"]]
    assert sum(g[0][0] != "" for g in gens) >= 3  # the model says something
    assert api["results"]["lsw_mc"]["acc,none"] >= 0.5  # and knows some answers
    ppl = [s["resps"][0][0] for s in hf["samples"]["lsw_ppl"]]
    np.testing.assert_allclose(
        [s["resps"][0][0] for s in api["samples"]["lsw_ppl"]], ppl, rtol=1e-4
    )

    # `lsw-jax eval` (lsw_jax.evaluate) scores as lm-eval does: same acc, same log-likelihoods.
    model, tok = lsw_jax.load_model(ckpt, dtype="float32"), load_tokenizer(ckpt)
    items = [MultipleChoice(q, tuple(c), a) for q, c, a in MC]
    ours = multiple_choice(model, tok, items)
    assert ours["acc"] == hf["results"]["lsw_mc"]["acc,none"]
    assert ours["acc_norm"] == hf["results"]["lsw_mc"]["acc_norm,none"]
    for text, want in zip(TEXTS, ppl, strict=True):
        got = perplexity(model, tok, [text], max_len=WINDOW)
        assert got["tokens"] == len(tok.encode(text, add_special_tokens=False))
        np.testing.assert_allclose(-got["nll_per_token"] * got["tokens"], want, rtol=1e-4)

"""What sampling costs the serving engine's decode against greedy (target: a sampled row
<= 1.10x a greedy one per token, also in a batch that mixes settings).

Method. SmolLM2-135M-Instruct (fp32, converted from the shipped GGUF) in an ``Engine``
without adapters (what ``lsw-jax serve --ckpt CKPT`` runs), ``--slots`` rows, EOS ignored.
A round submits one request per row with the mode's settings (each row its own seed),
steps once (admission, prefill, first decode) and times every remaining decode step
(``bench_logprobs.decode_rates``): the step is the server's whole per-token work but the
HTTP layer, which does not depend on the settings. Modes: ``greedy``; ``temperature``
(1.0); ``top_p`` (0.9); ``top_k`` (50); ``openai`` (temperature 1, top_p 0.9, top_k 50);
``penalties`` (temperature 0.8 with presence 0.5, frequency 0.3, repetition 1.1 and a
logit_bias); ``mixed`` (rows cycle greedy / temperature / top_p / top_k). Each mode is
compiled and run once, then the modes take turns for ``--repeats`` rounds; per mode the
min / median / max of the rounds' median step time, and the ratio of medians to greedy.

    python scripts/bench_sampling.py --ckpt CKPT --repeats 5

Writes ``docs/figures/bench_sampling.{json,md,png}``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_logprobs import interleaved, run_cli  # noqa: E402

import lsw_jax  # noqa: E402
from lsw_jax.sampling import SamplingParams  # noqa: E402
from lsw_jax.serve.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLED = dict(temperature=1.0)
MODES = {
    "greedy": lambda i: {},
    "temperature": lambda i: SAMPLED,
    "top_p": lambda i: SAMPLED | dict(top_p=0.9),
    "top_k": lambda i: SAMPLED | dict(top_k=50),
    "openai": lambda i: SAMPLED | dict(top_p=0.9, top_k=50),
    "penalties": lambda i: dict(
        temperature=0.8,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.1,
        logit_bias=((13, -5.0), (29, 3.0)),
    ),
    "mixed": lambda i: [{}, SAMPLED, SAMPLED | dict(top_p=0.9), SAMPLED | dict(top_k=50)][i % 4],
}


def bench(ckpt: Path, slots: int, max_len: int, prompt: int, tokens: int, repeats: int) -> dict:
    model = lsw_jax.load_model(ckpt, dtype="float32")
    eng = Engine(model, slots=slots, max_len=max_len, max_prefill_rows=slots)
    eng.warm_up()
    modes = {
        mode: [
            SamplingParams(max_tokens=tokens, ignore_eos=True, seed=i, **settings(i))
            for i in range(slots)
        ]
        for mode, settings in MODES.items()
    }
    runs = interleaved(eng, modes, prompt, repeats)
    step_ms = {m: [1000 * s for _, s in r] for m, r in runs.items()}
    greedy = statistics.median(step_ms["greedy"])
    return {
        mode: {
            "step_ms_min": min(v),
            "step_ms_median": statistics.median(v),
            "step_ms_max": max(v),
            "ratio_to_greedy": statistics.median(v) / greedy,
            "tokens_per_s_median": statistics.median(rate for rate, _ in runs[mode]),
            "runs_step_ms": v,
        }
        for mode, v in step_ms.items()
    }


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"Decode step by sampling settings, SmolLM2-135M fp32, {m['slots']} rows, max_len "
        f"{m['max_len']}, prompt {m['prompt']} + {m['tokens']} tokens, {m['repeats']} rounds "
        f"(modes interleaved), {m['device']}, jax {m['jax']}, {m['date']}, load before/after "
        f"{m['load_before']} / {m['load_after']}.",
        "",
        "| mode | step ms min | median | max | ratio to greedy (medians) | tok/s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, r in res["modes"].items():
        lines.append(
            f"| {mode} | {r['step_ms_min']:.1f} | {r['step_ms_median']:.1f} | "
            f"{r['step_ms_max']:.1f} | {r['ratio_to_greedy']:.3f} | "
            f"{r['tokens_per_s_median']:.1f} |"
        )
    lines += ["", f"Command: `{m['command']}`", ""]
    return "\n".join(lines)


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(res["modes"])
    med = [res["modes"][m]["step_ms_median"] for m in modes]
    lo = [med[i] - res["modes"][m]["step_ms_min"] for i, m in enumerate(modes)]
    hi = [res["modes"][m]["step_ms_max"] - med[i] for i, m in enumerate(modes)]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(modes, med, yerr=[lo, hi], color="tab:blue", capsize=3)
    ax.axhline(1.1 * med[0], color="tab:red", ls="--", lw=1, label="1.10x greedy")
    ax.set_ylabel("decode step, ms (min-median-max)")
    ax.set_title("Engine decode step by sampling settings (SmolLM2, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    run_cli("bench_sampling", __doc__, bench, markdown, plot)

"""The engine's sampler outputs and controls against independent oracles: log-probabilities
against a full forward of the model (float64 log-softmax), logit adjustments against a numpy
reference of vLLM's order, stop strings against the text, step faults, cancels, warm-up."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_serve_fixtures import (
    EOS_ID,
    MAX_LEN,
    make_engine,
    make_tokenizer,
    prompts,
    reference_greedy,
    reference_model,
)

from lsw_jax.convert.gguf import gguf_tokenizer
from lsw_jax.sampling import LogitAdjust, RowSampling, SamplingParams, sample_rows, token_logprobs
from lsw_jax.serve import steps
from lsw_jax.serve.engine import Request
from lsw_jax.serve.steps import TRACE_COUNTS
from lsw_jax.serve.text import StreamText, held_back


def _full_logprobs(adapter, ids) -> np.ndarray:
    """log_softmax of a full forward (no cache) over ``ids``: [T, V] float64."""
    logits = np.asarray(reference_model(adapter)(np.asarray([ids])), np.float64)[0]
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _greedy(n=8, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def engine():
    return make_engine(policy="unmerged")


# ---------------------------------------------------------------- log-probabilities


def test_logprobs_equal_a_full_forward(engine):
    """Generated and prompt log-probabilities (and top-N) of mixed adapters in one batch
    equal the log-softmax of a full forward of prompt + output (fp32 < 1e-4)."""
    reqs = [
        engine.submit(Request(p, _greedy(6, logprobs=3, prompt_logprobs=True), adapter=a))
        for p, a in zip(prompts(3, 50), [None, "a1", "a3"], strict=True)
    ]
    plain = engine.submit(Request(prompts(1, 51)[0], _greedy(6), adapter="a2"))
    engine.run_until_idle()
    for r in reqs:
        assert r.output == reference_greedy(r.prompt, r.adapter, 6)
        ref = _full_logprobs(r.adapter, r.prompt + r.output)
        n = len(r.prompt)
        assert [e.token for e in r.logprobs] == r.output
        for j, e in enumerate(r.logprobs):
            row = ref[n - 1 + j]
            assert abs(e.logprob - row[e.token]) < 1e-4
            assert [t for t, _ in e.top] == np.argsort(-row)[:3].tolist()
            np.testing.assert_allclose([lp for _, lp in e.top], np.sort(row)[::-1][:3], atol=1e-4)
        assert [e.token for e in r.prompt_logprobs] == r.prompt[1:]
        for j, e in enumerate(r.prompt_logprobs):
            assert abs(e.logprob - ref[j, r.prompt[j + 1]]) < 1e-4
            assert len(e.top) == 3
    assert plain.logprobs == [] and plain.prompt_logprobs is None
    assert plain.output == reference_greedy(plain.prompt, "a2", 6)


def test_logprobs_are_raw_model_logprobs_under_sampling(engine):
    """With temperature, top-k and a repetition penalty the reported logprobs stay those
    of the raw model (vLLM's default), for whichever tokens were drawn."""
    p = prompts(1, 52)[0]
    sp = SamplingParams(
        max_tokens=6, temperature=1.5, top_k=5, seed=3, ignore_eos=True, logprobs=0,
        repetition_penalty=1.3,
    )  # fmt: skip
    r = engine.submit(Request(p, sp, adapter="a1"))
    engine.run_until_idle()
    ref = _full_logprobs("a1", p + r.output)
    for j, e in enumerate(r.logprobs):
        assert abs(e.logprob - ref[len(p) - 1 + j, e.token]) < 1e-4 and e.top == ()


def test_echo_with_zero_max_tokens_scores_the_prompt_only(engine):
    p = prompts(1, 53)[0]
    r = engine.submit(Request(p, _greedy(0, logprobs=1, prompt_logprobs=True)))
    engine.run_until_idle()
    assert r.finish_reason == "length" and r.output == [] and r.logprobs == []
    ref = _full_logprobs(None, p)
    got = [e.logprob for e in r.prompt_logprobs]
    np.testing.assert_allclose(got, [ref[j, p[j + 1]] for j in range(len(p) - 1)], atol=1e-4)


# ---------------------------------------------------------------- logit adjustments


def _reference_adjust(logits, sp, prompt, output, eos):
    """vLLM's order in float64: bias (+ -inf on stop ids before min_tokens), repetition
    penalty on prompt + output tokens, then presence / frequency on output counts."""
    x = logits.astype(np.float64).copy()
    for t, b in sp.logit_bias:
        x[t] += b
    if len(output) < sp.min_tokens:
        x[list(sp.stop_ids(eos))] = -np.inf
    for t in set(prompt + output):
        x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
    for t in set(output):
        x[t] -= sp.presence_penalty + sp.frequency_penalty * output.count(t)
    return x


def test_logit_adjust_counted_on_device_equals_a_rebuild():
    """The device state after a step (``counted``: each live row's sampled token) and
    after admission (``with_rows``) equals building it on the host from the new outputs;
    rows that ask for nothing and rows not live stay as they were."""
    v, eos = 30, (0,)
    rows = [
        (SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, min_tokens=2), [3], [5]),
        (SamplingParams(repetition_penalty=1.5), [4, 4], []),
        (SamplingParams(), [1], [2]),  # asks for nothing
        (SamplingParams(frequency_penalty=1.0), [2], [7]),  # not live this step
    ]
    tokens, live = [5, 9, 6, 7], [True, True, True, False]
    after = LogitAdjust.build(rows, v, eos).counted(jnp.asarray(tokens), jnp.asarray(live))
    grown = [
        (sp, p, o + [t] if ok else o) for (sp, p, o), t, ok in zip(rows, tokens, live, strict=True)
    ]
    want = LogitAdjust.build(grown, v, eos)
    for name in ("bias", "ban", "seen", "counts", "min_tokens", "on"):
        np.testing.assert_array_equal(getattr(after, name), getattr(want, name), err_msg=name)
    x = jnp.asarray(np.random.default_rng(1).normal(0, 2, (4, v)).astype(np.float32))
    generated = jnp.asarray([len(o) for _, _, o in grown])
    np.testing.assert_allclose(after(x, generated), want(x, generated), rtol=1e-6)
    admitted = LogitAdjust.build(grown[:3], v, eos)  # into rows 4 and 1; row 6 is padding
    state = LogitAdjust.identity(6, v).with_rows(jnp.asarray([4, 1, 6]), admitted)
    np.testing.assert_array_equal(state.on, [False, True, False, False, True, False])
    np.testing.assert_array_equal(state.counts[4], want.counts[0])
    np.testing.assert_array_equal(state.seen[1], want.seen[1])


def test_logit_adjust_matches_a_reference_per_row():
    rng = np.random.default_rng(0)
    v = 40
    logits = rng.normal(0, 3, (4, v)).astype(np.float32)
    rows = [
        (SamplingParams(repetition_penalty=1.7), [1, 2, 3], [3, 4]),
        (SamplingParams(presence_penalty=1.5, frequency_penalty=-0.5), [5], [6, 6, 7, 6]),
        (SamplingParams(logit_bias=((9, 100.0), (2, -5.0)), min_tokens=3), [1], [2]),
        None,
    ]
    adjust = LogitAdjust.build(rows, v, (0, 1))
    generated = [0 if r is None else len(r[2]) for r in rows]
    got = np.asarray(adjust(jnp.asarray(logits), jnp.asarray(generated)))
    for i, row in enumerate(rows):
        want = logits[i] if row is None else _reference_adjust(logits[i], *row, (0, 1))
        np.testing.assert_allclose(got[i], want, rtol=1e-6)
    params = [None if r is None else r[0] for r in rows]
    rs = RowSampling.from_params(params, generated, adjust=adjust)
    assert np.asarray(sample_rows(jnp.asarray(logits), rs)).tolist() == np.argmax(
        [logits[3] if r is None else _reference_adjust(logits[i], *r, (0, 1)) for i, r in
         enumerate(rows)], -1).tolist()  # fmt: skip
    lp = token_logprobs(jnp.asarray(logits), jnp.asarray([1, 2, 3, 4]), 2)
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lp.chosen), ref[np.arange(4), [1, 2, 3, 4]], atol=1e-5)


def test_penalties_and_bias_in_the_engine_equal_a_host_reference_decode(engine):
    """Greedy decoding with every adjustment at once equals a decode that applies the
    reference adjustment to full-forward logits at each step."""
    sp = SamplingParams(
        max_tokens=8, ignore_eos=False, presence_penalty=1.0, frequency_penalty=0.7,
        repetition_penalty=1.4, logit_bias=((7, 2.5), (EOS_ID, 3.0)), min_tokens=5,
    )  # fmt: skip
    p = prompts(1, 54)[0]
    r = engine.submit(Request(p, sp, adapter="a3"))
    engine.run_until_idle()
    assert r.output == reference_adjusted_greedy(p, "a3", sp)
    assert EOS_ID not in r.output[:5]


def test_penalised_rows_share_batches_survive_preemption_and_free_their_slot():
    """The device state per row: penalised and plain rows in one batch, a penalised row
    preempted and prefilled again mid-way, a plain request taking the slot a penalised
    one left: each output equals its own reference decode."""
    eng = make_engine(policy="unmerged", slots=2, max_prefill_rows=1)
    ps = prompts(4, 60)
    sp_a = SamplingParams(max_tokens=9, ignore_eos=True, presence_penalty=1.5,
                          frequency_penalty=0.5, repetition_penalty=1.3)  # fmt: skip
    sp_c = SamplingParams(max_tokens=6, ignore_eos=True, logit_bias=((9, 4.0),),
                          frequency_penalty=2.0)  # fmt: skip
    a = eng.submit(Request(ps[0], sp_a, adapter="a1"))
    b = eng.submit(Request(ps[1], _greedy(3), adapter="a2"))
    for _ in range(4):
        eng.step()
    eng.preempt(a)
    c = eng.submit(Request(ps[2], sp_c))
    eng.run_until_idle()
    d = eng.submit(Request(ps[3], _greedy(6), adapter="a1"))  # a slot a penalised row held
    eng.run_until_idle()
    assert a.preemptions == 1
    assert a.output == reference_adjusted_greedy(ps[0], "a1", sp_a)
    assert c.output == reference_adjusted_greedy(ps[2], None, sp_c)
    assert b.output == reference_greedy(ps[1], "a2", 3)
    assert d.output == reference_greedy(ps[3], "a1", 6)


def reference_adjusted_greedy(prompt, adapter, sp) -> list[int]:
    """Greedy decoding with ``_reference_adjust`` on full-forward logits at every step."""
    out: list[int] = []
    while len(out) < sp.max_tokens:
        logits = np.asarray(reference_model(adapter)(np.asarray([prompt + out])), np.float64)
        t = int(np.argmax(_reference_adjust(logits[0, -1], sp, prompt, out, (EOS_ID,))))
        out.append(t)
        if t in sp.stop_ids((EOS_ID,)):
            break
    return out


# ---------------------------------------------------------------- stop strings


def test_held_back_is_the_longest_suffix_that_may_start_a_stop():
    assert held_back("abc ab", ["abd"]) == 2
    assert held_back("abc", ["x", "cz"]) == 1
    assert held_back("abc", ["abc"]) == 0  # a complete stop is a match, not held back
    assert held_back("", ["ab"]) == 0


def test_stop_string_across_tokens_streamed_equals_whole():
    """A stop string spanning two tokens ends the request at the step whose token
    completes it; what was streamed equals the request's text, cut before the stop."""
    tok = make_tokenizer()
    eng = make_engine(policy="unmerged", detokenize=tok.decode)
    p = prompts(1, 55)[0]
    words = tok.decode(reference_greedy(p, "a1", 12)).split()
    k = next(
        i for i in range(2, 10) if f"{words[i]} {words[i + 1]}" not in " ".join(words[: i + 1])
    )
    stop = f"{words[k][1:]} {words[k + 1][:2]}"  # from inside one word into the next
    streamed = []
    r = Request(
        p, _greedy(12, stop=("never-there", stop)), adapter="a1",
        sink=lambda req, u: streamed.append(u.text),
    )  # fmt: skip
    eng.submit(r)
    eng.run_until_idle()
    full = " ".join(words)
    assert r.finish_reason == "stop" and "".join(streamed) == r.text
    assert r.text == full[: full.index(stop)]
    assert len(r.output) == k + 2  # the token that completed the stop, no more


def test_stream_text_holds_back_until_a_stop_is_ruled_out():
    for last, want in [("x", ("", True)), ("y", ("lo y", False))]:
        pieces = ["Hel", "lo", " ", last]
        st = StreamText(lambda ids, p=pieces: "".join(p[i] for i in ids), ["lo x", "!"])
        assert st.push([0]) == ("He", False)  # "l" may start "lo x"
        assert st.push([1]) == ("l", False)  # "lo" may
        assert st.push([2]) == ("", False)  # "lo " may
        assert st.push([3]) == want
    st = StreamText(lambda ids: "ab" * len(ids), ["bab"])
    assert st.push([0]) == ("a", False) and st.push([1], final=True) == ("", True)
    assert st.text == "a"  # the stop began inside what was held back


# ---------------------------------------------------------------- faults and cancels


def test_a_failing_adapter_fails_only_its_request():
    eng = make_engine(policy="unmerged")
    real = eng.pool.acquire

    def acquire(name):
        if name == "a2":
            raise RuntimeError("device memory exhausted")
        return real(name)

    eng.pool.acquire = acquire
    ps = prompts(4, 56)
    reqs = [
        eng.submit(Request(p, _greedy(), adapter=a))
        for p, a in zip(ps, ["a1", "a2", None, "a3"], strict=True)
    ]
    eng.run_until_idle()
    assert reqs[1].finish_reason == "error" and "device memory exhausted" in reqs[1].error
    for r in reqs[:1] + reqs[2:]:
        assert r.output == reference_greedy(r.prompt, r.adapter, 8)
    assert eng.stats["errors"] == 1 and eng.pool.pins() == 0


def test_a_failing_decode_step_fails_its_rows_and_the_engine_serves_on(monkeypatch, caplog):
    eng = make_engine(policy="unmerged")
    real = steps.decode_rows
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("XLA runtime error")
        return real(*args, **kw)

    monkeypatch.setattr(steps, "decode_rows", flaky)
    ps = prompts(3, 57)
    first = [eng.submit(Request(p, _greedy(), adapter="a1")) for p in ps[:2]]
    eng.run_until_idle()
    assert all(r.finish_reason == "error" for r in first)
    assert "engine step failed" in caplog.text
    later = eng.submit(Request(ps[2], _greedy(), adapter="a3"))
    eng.run_until_idle()
    assert later.output == reference_greedy(ps[2], "a3", 8)
    assert eng.pool.pins() == 0 and eng.num_running == 0


def test_a_failing_prefill_keeps_other_rows_by_preempting_them(monkeypatch):
    """A prefill that fails after consuming the donated cache: its chunk fails; rows that
    were decoding are prefilled again and still give their exact tokens."""
    eng = make_engine(policy="unmerged", max_prefill_rows=1)
    real = steps.prefill_insert
    ps = prompts(2, 58)
    running = eng.submit(Request(ps[0], _greedy(10), adapter="a1"))
    for _ in range(3):
        eng.step()

    def broken(*args, **kw):
        args[4].k[0].delete()  # what a donated-then-failed call leaves
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(steps, "prefill_insert", broken)
    bad = eng.submit(Request(ps[1], _greedy(), adapter="a3"))
    eng.step()
    monkeypatch.setattr(steps, "prefill_insert", real)
    eng.run_until_idle()
    assert bad.finish_reason == "error" and running.preemptions == 1
    assert running.output == reference_greedy(ps[0], "a1", 10)


def test_cancelling_a_waiting_request_is_immediate():
    eng = make_engine(policy="unmerged", slots=1)
    got = []
    ps = prompts(3, 59)
    run = eng.submit(Request(ps[0], _greedy(20)))
    eng.step()
    queued = eng.submit(Request(ps[1], _greedy(), sink=lambda r, u: got.append(u.finished)))
    eng.step()  # drained into the scheduler's queue, no row free
    inbox = eng.submit(Request(ps[2], _greedy()))  # still in the inbox
    eng.cancel(queued)
    eng.cancel(inbox)
    assert queued.finish_reason == inbox.finish_reason == "cancelled" and got == [True]
    assert eng.num_waiting == 0 and run.row is not None


# ---------------------------------------------------------------- context and warm-up


def test_served_context_defaults_to_the_models():
    eng = make_engine(max_len=None)
    assert eng.max_len == eng.cfg.max_position_embeddings == 128


def test_warm_up_compiles_every_shape_before_serving():
    eng = make_engine(policy="adaptive", max_len=MAX_LEN)
    eng.warm_up()
    before = dict(TRACE_COUNTS)
    lens = [3, 17, 40, 60]  # one prompt in each bucket, alone and together
    reqs = [eng.submit(Request(list(range(1, n + 1)), _greedy(2), adapter=a))
            for n, a in zip(lens, ["a1", None, "a2", "a1"], strict=True)]  # fmt: skip
    eng.run_until_idle()
    for n in lens:
        eng.submit(Request(list(range(2, n + 2)), _greedy(2), adapter="a3"))
        eng.run_until_idle()
    assert dict(TRACE_COUNTS) == before, "a step compiled after warm-up"
    assert all(r.finish_reason == "length" for r in reqs)


def test_incremental_text_equals_a_full_decode_with_a_real_tokenizer(smollm2_path):
    """SmolLM2's byte-level BPE, pushed one token at a time (multi-byte characters split
    across tokens, leading spaces, newlines): the settled text equals one full decode."""
    tok = gguf_tokenizer(smollm2_path)
    text = "Grüße aus Köln — 東京 and ☕️!\n  Spaces,\ttabs; the end. " * 3
    ids = tok.encode(text, add_special_tokens=False)
    st = StreamText(tok.decode, ["never"])
    out = "".join(st.push([t])[0] for t in ids) + st.push([], final=True)[0]
    assert out == tok.decode(ids) == st.text

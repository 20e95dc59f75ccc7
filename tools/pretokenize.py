"""Pre-tokenize a text corpus once into memory-mappable token shards (stage kind `pretokenize`).

Why: the original project re-tokenized its corpus on every launch (rank 0, while the other ranks
waited) and stored 8-byte ids. Here an array of tasks tokenizes the corpus once into raw
little-endian uint16 ids (uint32 when the vocabulary needs it), and every later run reuses them.

How the work is cut:
- Inputs: `.txt` (a document a line, or blank-line separated paragraphs: `txt_documents`),
  `.jsonl` (one JSON object a line) and `.json` (a list of objects), the text under `text_key`.
- Each file is cut at nominal offsets k * piece_bytes, each cut moved forward to the next document
  start, so a piece always holds whole documents and a 500 MB file spreads over many tasks.
  A `.json` file is one piece (it has to be parsed whole; use JSONL for big data).
- Pieces are given to tasks as contiguous runs balanced by bytes, so the concatenation of all
  shards in manifest order is the same token stream whatever the number of tasks.
- A task hands its pieces' documents to worker processes in batches of ~batch_bytes; a document
  longer than chunk_bytes (a single huge line) is encoded in chunks cut at whitespace or sentence
  punctuation, so memory never grows with the size of a file or a line.
- Encoding: with `encoder: auto` a tokenizer that has a tokenizer.model whose pieces map to the same
  ids in the HF tokenizer is encoded with the `sentencepiece` library directly (the original
  project's LlamaTokenizer semantics, and ~8x faster than the HF pipeline); anything else uses the
  HF fast tokenizer. Agreement of the two on a probe set is checked once per tokenizer and stored
  in the manifest (`tokenizer.encoder_check`).

Content-addressed cache (`cache_dir`, default $CHLA_CACHE/pretokenize, else
~/.cache/chla/pretokenize): one entry per piece, keyed by blake2b(tokenizer files, the piece's
bytes (its length and content hash), the options). `<key>.bin` holds the ids, `<key>.json` (written
last, the commit marker) the counts. Output shards are hard links to the entries (a copy when the
cache is on another filesystem). A re-run with nothing changed tokenizes nothing; a changed or
added file re-tokenizes only its changed pieces; a killed task leaves only hidden `.tmp` files,
and a re-run fills in what is missing.

Output directory:
    shard-FFFFF-PPPPP.bin   raw ids of piece P of source file F (documents in file order, EOS after
                            each document by default)
    shard-FFFFF-PPPPP.json  its counts (tokens, documents, bad input, encoder)
    tasks/task-T-of-N.json  what task T did (read by finalize)
    manifest.json           written last: tokenizer fingerprint, dtype, block size, sources with
                            sizes and hashes, per-shard counts, totals, bad-input counts
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chla_launcher.atomic import read_json, write_json
from chla_launcher.errors import ChlaError
from chla_launcher.progress import progress_writer

if TYPE_CHECKING:
    import multiprocessing.pool

    from chla_launcher.kinds.pretokenize import PretokenizeParams

FORMAT_VERSION = "chla-pretokenized-v1"
MANIFEST = "manifest.json"
TEXT_SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "json"}
# Where a too-long document may be cut (besides before a space): after these (UTF-8).
_CUT_MARKS = (b"\n", b"\t", "。".encode(), "，".encode(), "！".encode(), "？".encode(), "；".encode(), "、".encode())
_HASH_BLOCK = 1 << 22


def _blake(digest_size: int = 16) -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=digest_size)


def default_cache_dir() -> Path:
    root = os.environ.get("CHLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "chla")
    return Path(root) / "pretokenize"


@dataclass(frozen=True)
class PretokenizeOptions:
    """Everything that changes the produced ids (all of it goes into the cache key)."""

    text_format: str = "auto"  # auto (by suffix) | txt | jsonl | json
    txt_documents: str = "line"  # line | paragraph (blank-line separated)
    text_key: str = "text"
    append_eos: bool = True
    prepend_bos: bool = False
    encoder: str = "auto"  # auto | sentencepiece | hf
    # Documents longer than this many bytes are encoded in chunks (bounded memory).
    chunk_bytes: int = 1 << 20

    def key_fields(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    """How the work is cut. Does not change the token stream, only shard boundaries."""

    piece_bytes: int = 16 << 20
    batch_bytes: int = 1 << 20


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Globs -> sorted unique files. A pattern matching nothing is an error (a typo would
    otherwise silently drop data)."""
    if not patterns:
        raise ChlaError("pretokenize: no inputs given; pass --input GLOB (or `inputs:` in the recipe)")
    files: set[Path] = set()
    for pattern in patterns:
        matches = globlib.glob(os.path.expanduser(pattern), recursive=True)
        matched_files = [Path(m).resolve() for m in matches if os.path.isfile(m)]
        if not matched_files:
            raise ChlaError(f"pretokenize: input {pattern!r} matches no file; check the path or glob")
        files.update(matched_files)
    return sorted(files)


def file_format(path: Path, options: PretokenizeOptions) -> str:
    if options.text_format != "auto":
        return options.text_format
    fmt = TEXT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ChlaError(
            f"pretokenize: {path}: unknown input type {path.suffix!r}; use .txt, .jsonl or .json, or set text_format"
        )
    return fmt


# --------------------------------------------------------------------------------------------
# Tokenizer identity and encoder choice
# --------------------------------------------------------------------------------------------


def hash_file(path: Path, start: int = 0, end: int | None = None) -> str:
    digest = _blake()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            block = handle.read(_HASH_BLOCK if remaining is None else min(_HASH_BLOCK, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """Hash of every file of the tokenizer directory (names and contents)."""
    if not tokenizer_dir.is_dir():
        raise ChlaError(
            f"pretokenize: tokenizer {tokenizer_dir} is not a directory; pass an HF "
            f"tokenizer directory (tokenizer.model / tokenizer.json + tokenizer_config.json)"
        )
    digest = _blake()
    for path in sorted(p for p in tokenizer_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0" + hash_file(path).encode() + b"\n")
    return digest.hexdigest()


# Probe texts for the sentencepiece-vs-HF check: Chinese, English, mixed, digits, full-width,
# byte-fallback characters. Runs of spaces are checked separately (HF's conversion of
# SentencePiece BPE is known to merge "▁▁" differently; reported, not fatal).
_PROBES = [
    "中共中央总书记、国家主席江泽民发表１９９８年新年讲话《迈向充满希望的新世纪》。",
    "却说曹操引兵至汉中，见山势险峻，谓众将曰：“此处可以屯兵。”",
    "这款手机的屏幕很清晰，电池也耐用，就是价格有点贵！",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "混合 mixed text 与 English words 和数字 12345 以及 emoji 😀 and ÄÖÜ ß.",
    'Tabs\tand\nnewlines, (brackets) [1] {x: y} <tag> & "quotes" — dash… ellipsis',
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский текст.",
    "trailing spaces  ",
    "a",
    "。",
    "１２３ＡＢＣ　全角空格",
]
_SPACE_PROBES = ["  leading spaces", "hello  world", "double  space   triple", "x    y"]


@dataclass
class TokenizerInfo:
    path: str
    fingerprint: str
    vocab_size: int  # len(HF tokenizer): base vocabulary plus added tokens
    eos_id: int | None
    bos_id: int | None
    sp_model: str | None  # tokenizer.model usable for the fast path, else None
    encoder_check: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.vocab_size <= 1 << 16 else np.dtype("<u4")


def _load_hf_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # the library raises many types for a bad directory
        raise ChlaError(
            f"pretokenize: cannot load tokenizer from {tokenizer_dir}: {exc}; pass an HF tokenizer directory"
        ) from exc


def _inspect_tokenizer(tokenizer_dir: Path, fingerprint: str) -> TokenizerInfo:
    tokenizer = _load_hf_tokenizer(tokenizer_dir)
    info = TokenizerInfo(
        path=str(tokenizer_dir),
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
        eos_id=tokenizer.eos_token_id,
        bos_id=tokenizer.bos_token_id,
        sp_model=None,
    )
    sp_path = tokenizer_dir / "tokenizer.model"
    if not sp_path.is_file():
        info.encoder_check = {"sentencepiece": False, "reason": "no tokenizer.model"}
        return info
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    except Exception as exc:
        info.encoder_check = {"sentencepiece": False, "reason": f"tokenizer.model unreadable: {exc}"}
        return info
    # SentencePiece-based means: every piece has the same id in the HF tokenizer.
    vocab = tokenizer.get_vocab()
    same_ids = all(vocab.get(sp.id_to_piece(i)) == i for i in range(sp.get_piece_size()))
    # One text a call: a batch call would start the tokenizers thread pool, which then warns in
    # every forked worker.
    hf_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in _PROBES + _SPACE_PROBES]
    sp_ids = sp.encode(_PROBES + _SPACE_PROBES)
    agree = [a == b for a, b in zip(sp_ids, hf_ids)]
    disagreements = [text for text, ok in zip(_PROBES + _SPACE_PROBES, agree) if not ok]
    plain_agree = all(agree[: len(_PROBES)])
    info.encoder_check = {
        "sentencepiece": bool(same_ids and plain_agree),
        "same_piece_ids": same_ids,
        "probes": len(agree),
        "agree": sum(agree),
        "disagree_on": disagreements,
    }
    if same_ids and plain_agree:
        info.sp_model = str(sp_path)
    return info


def load_tokenizer_info(tokenizer_dir: str | Path, cache_dir: Path) -> TokenizerInfo:
    """Vocabulary size, special ids and encoder check, computed once per tokenizer fingerprint
    (it needs transformers, ~3 s to import) and kept in the cache."""
    tokenizer_dir = Path(tokenizer_dir).resolve()
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    record = cache_dir / "tokenizers" / f"{fingerprint}.json"
    cached = read_json(record)
    if cached is not None:
        cached["path"] = str(tokenizer_dir)
        return TokenizerInfo(**cached)
    info = _inspect_tokenizer(tokenizer_dir, fingerprint)
    write_json(record, asdict(info))
    return info


def choose_encoder(info: TokenizerInfo, options: PretokenizeOptions) -> str:
    if options.encoder == "hf":
        return "hf"
    if options.encoder == "sentencepiece":
        if not (Path(info.path) / "tokenizer.model").is_file():
            raise ChlaError(
                f"pretokenize: encoder: sentencepiece but {info.path} has no tokenizer.model; use encoder: auto or hf"
            )
        return "sentencepiece"
    return "sentencepiece" if info.sp_model else "hf"


# --------------------------------------------------------------------------------------------
# Finding document boundaries without reading whole files
# --------------------------------------------------------------------------------------------


def _is_blank(line: bytes) -> bool:
    return not line.strip()


def _line_start_at_or_after(handle, pos: int, end: int) -> int:
    if pos <= 0:
        return 0
    handle.seek(pos - 1)
    cursor = pos - 1
    while cursor < end:
        block = handle.read(min(1 << 16, end - cursor))
        if not block:
            break
        newline = block.find(b"\n")
        if newline >= 0:
            return min(cursor + newline + 1, end)
        cursor += len(block)
    return end


def next_document_start(handle, pos: int, end: int, fmt: str, txt_documents: str) -> int:
    """The first position >= pos where a document may start (`end` if none before it).

    Line formats: the start of a line. Paragraph format: the start of a line that follows a
    blank line. Reads in bounded windows, so a huge line costs a scan, never its size in memory."""
    line_start = _line_start_at_or_after(handle, pos, end)
    if not (fmt == "txt" and txt_documents == "paragraph"):
        return line_start
    while 0 < line_start < end:
        back = max(0, line_start - 4096)
        handle.seek(back)
        before = handle.read(line_start - back)
        previous_newline = before.rfind(b"\n", 0, len(before) - 1)
        if previous_newline >= 0 or back == 0:
            if _is_blank(before[previous_newline + 1 :]):
                return line_start
        line_start = _line_start_at_or_after(handle, line_start + 1, end)
    return line_start


def _chunk_cut(data: bytes) -> int:
    """A cut point in the last half of `data`: after whitespace/punctuation, else at a UTF-8
    character boundary."""
    half = len(data) // 2
    # Before a space (the next chunk then starts with " ", which SentencePiece turns into the
    # word-start "▁" exactly as in the whole text); after a newline, tab or CJK punctuation.
    best = data.rfind(b" ", half)
    for mark in _CUT_MARKS:
        found = data.rfind(mark, half)
        if found >= 0:
            best = max(best, found + len(mark))
    if best > 0:
        return best
    cut = len(data)
    while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose continuation was cut off
        cut -= 1
    return cut or len(data)


# --------------------------------------------------------------------------------------------
# Planning: pieces (cache units, shards) and their assignment to tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    file_index: int
    piece_index: int
    path: str
    fmt: str
    nominal_start: int
    nominal_end: int

    @property
    def name(self) -> str:
        return f"shard-{self.file_index:05d}-{self.piece_index:05d}"


def plan_pieces(files: list[Path], options: PretokenizeOptions, layout: Layout) -> list[Piece]:
    pieces = []
    for file_index, path in enumerate(files):
        size = path.stat().st_size
        fmt = file_format(path, options)
        step = size if fmt == "json" else layout.piece_bytes
        for piece_index, start in enumerate(range(0, size, max(step, 1))):
            pieces.append(Piece(file_index, piece_index, str(path), fmt, start, min(size, start + step)))
    return pieces


def assign_pieces(pieces: list[Piece], num_tasks: int) -> list[list[Piece]]:
    """Contiguous runs of pieces, balanced by bytes: piece j goes to the task whose byte range
    holds the middle of j. Deterministic, and order-preserving across tasks."""
    total = sum(p.nominal_end - p.nominal_start for p in pieces) or 1
    tasks: list[list[Piece]] = [[] for _ in range(num_tasks)]
    before = 0
    for piece in pieces:
        size = piece.nominal_end - piece.nominal_start
        middle = before + size / 2
        tasks[min(num_tasks - 1, int(middle * num_tasks / total))].append(piece)
        before += size
    return tasks


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def _items_for_range(
    path: str, fmt: str, txt_documents: str, start: int, end: int, batch_bytes: int, chunk_bytes: int
) -> Iterator[tuple]:
    """Work items for the worker processes, in stream order:
    ("docs", path, fmt, a, b) holds whole documents; ("chunk", path, fmt, a, b, first, last) is a
    part of one document longer than chunk_bytes (cut at whitespace/punctuation)."""
    if fmt in ("json", "jsonl"):  # a JSON record is parsed whole
        with open(path, "rb") as handle:
            cursor = start
            while cursor < end:
                stop = next_document_start(handle, min(end, cursor + batch_bytes), end, fmt, txt_documents)
                yield ("docs", path, fmt, cursor, stop, True, True)
                cursor = stop
        return
    with open(path, "rb") as handle:
        cursor = start
        while cursor < end:
            target = min(end, cursor + batch_bytes)
            stop = next_document_start(handle, target, end, fmt, txt_documents)
            if stop - cursor <= batch_bytes + chunk_bytes:
                yield ("docs", path, fmt, cursor, stop, True, True)
                cursor = stop
                continue
            # A document longer than chunk_bytes lies across `target`: first the whole documents
            # before it, then that document in chunks.
            handle.seek(cursor)
            window = handle.read(target - cursor)
            if txt_documents == "paragraph":
                blank_lines = list(_BLANK_LINE.finditer(window))
                last_start = cursor + blank_lines[-1].end() if blank_lines else cursor
            else:
                last_start = cursor + window.rfind(b"\n") + 1
            if last_start > cursor:
                yield ("docs", path, fmt, cursor, last_start, True, True)
                cursor = last_start
                continue
            doc_end = next_document_start(handle, cursor + 1, end, fmt, txt_documents)
            first = True
            while cursor < doc_end:
                handle.seek(cursor)
                data = handle.read(min(chunk_bytes, doc_end - cursor))
                cut = len(data) if cursor + len(data) >= doc_end else _chunk_cut(data)
                yield ("chunk", path, fmt, cursor, cursor + cut, first, cursor + cut >= doc_end)
                first = False
                cursor += cut


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    encoder: str  # sentencepiece | hf
    tokenizer_dir: str
    sp_model: str | None
    options: PretokenizeOptions
    eos_id: int | None
    bos_id: int | None
    dtype: str


class _Encoder:
    """Lives in each worker: encodes lists of documents to flat id arrays."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        if spec.encoder == "sentencepiece":
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2 as model_pb2

            model_bytes = Path(spec.sp_model or Path(spec.tokenizer_dir) / "tokenizer.model").read_bytes()
            sp = spm.SentencePieceProcessor(model_proto=model_bytes)
            self.encode = lambda texts: sp.encode(texts, num_threads=1)
            self._sp_continued: Any = None  # built on first use: most documents need none

            def encode_continued(texts: list[str]) -> list[list[int]]:
                # Continuation chunks of a long document must not get the dummy "▁" prefix.
                if self._sp_continued is None:
                    proto = model_pb2.ModelProto()
                    proto.ParseFromString(model_bytes)
                    proto.normalizer_spec.add_dummy_prefix = False
                    self._sp_continued = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
                return self._sp_continued.encode(texts, num_threads=1)

            self.encode_continued = encode_continued
            self._separator = self._joined_encoding_is_exact(sp)
        else:
            self._separator = None
            tokenizer = _load_hf_tokenizer(Path(spec.tokenizer_dir))
            backend = tokenizer.backend_tokenizer
            self.encode = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
            continued = backend
            try:
                from tokenizers import Tokenizer
                from tokenizers.pre_tokenizers import Metaspace

                if isinstance(backend.pre_tokenizer, Metaspace):
                    continued = Tokenizer.from_str(backend.to_str())
                    continued.pre_tokenizer = Metaspace(
                        replacement="▁", prepend_scheme="never", split=backend.pre_tokenizer.split
                    )
            except Exception:
                continued = backend
            self.encode_continued = lambda texts: [
                e.ids for e in continued.encode_batch(texts, add_special_tokens=False)
            ]

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """Documents -> one flat id array (EOS after each, BOS before each if asked)."""
        if (
            self._separator is not None
            and not self.spec.options.prepend_bos
            and not any(_SEPARATOR in doc for doc in docs)
        ):
            # Documents joined in groups as "doc1\x00 doc2\x00 doc3": with an identity normalizer
            # "\x00" is a byte-fallback piece no merge can cross, and " " gives each document the
            # dummy prefix, so the ids equal per-document encoding (checked at start). Fewer,
            # longer strings cut SentencePiece's per-call cost and the flattening.
            groups = [_JOIN.join(docs[i : i + _GROUP]) for i in range(0, len(docs), _GROUP)]
            encoded = self.encode(groups)
            separator = self._separator
            for ids in encoded:
                ids.append(separator)
            count = sum(map(len, encoded))
            flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=count)
            ends = flat == separator
            if self.spec.options.append_eos and self.spec.eos_id is not None:
                flat[ends] = self.spec.eos_id
            else:
                flat = flat[~ends]
            return flat.astype(self.spec.dtype)
        return self.flatten(self.encode(docs))

    def _joined_encoding_is_exact(self, sp) -> int | None:
        """The separator id if joined encoding equals per-document encoding on the probes."""
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        spec = proto.normalizer_spec
        if spec.name != "identity" or spec.remove_extra_whitespaces or not spec.add_dummy_prefix:
            return None
        separator_ids = sp.encode(_SEPARATOR + "a")
        separator = sp.piece_to_id("<0x00>")
        if separator not in separator_ids or separator == sp.unk_id():
            return None
        probes = _PROBES + _SPACE_PROBES + ["  ", " x ", "y  "]
        expected = [i for ids in sp.encode(probes) for i in ids + [separator]]
        joined = sp.encode(_JOIN.join(probes)) + [separator]
        return separator if joined == expected else None

    def flatten(self, encoded: list[list[int]], bos_first: bool = True, eos_last: bool = True) -> np.ndarray:
        opts = self.spec.options
        if opts.append_eos and eos_last and self.spec.eos_id is not None:
            eos = self.spec.eos_id
            for ids in encoded:
                ids.append(eos)
        if opts.prepend_bos and bos_first and self.spec.bos_id is not None:
            for ids in encoded:
                ids.insert(0, self.spec.bos_id)
        count = sum(map(len, encoded))
        return np.fromiter(chain.from_iterable(encoded), dtype=self.spec.dtype, count=count)


_WORKER: _Encoder | None = None
_SEPARATOR = "\x00"
_JOIN = _SEPARATOR + " "
_GROUP = 64


def _init_worker(spec: EncoderSpec) -> None:
    global _WORKER
    # A forked worker inherits the job's stop handlers (chla_train.preemption), which ignore a
    # repeated SIGTERM: with them, the pool could not terminate its workers.
    for signum in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    _WORKER = _Encoder(spec)


def _new_bad() -> dict[str, int]:
    return {
        "invalid_utf8_documents": 0,
        "invalid_json": 0,
        "not_an_object": 0,
        "missing_text_key": 0,
        "non_string_text": 0,
        "empty_documents": 0,
    }


def _decode(raw: bytes, bad: dict[str, int], where: dict) -> list[str]:
    """Lines of `raw` decoded; undecodable lines are decoded with U+FFFD and counted."""
    try:
        return raw.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = []
        for number, line in enumerate(raw.split(b"\n")):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad["invalid_utf8_documents"] += 1
                where.setdefault("invalid_utf8_documents", f"line {number + 1}")
                lines.append(line.decode("utf-8", errors="replace"))
        return lines


def _record_text(record: Any, key: str, bad: dict[str, int], where: dict, location: str) -> str | None:
    if not isinstance(record, dict):
        bad["not_an_object"] += 1
        where.setdefault("not_an_object", location)
        return None
    if key not in record:
        bad["missing_text_key"] += 1
        where.setdefault("missing_text_key", f"{location} (keys: {sorted(record)[:5]})")
        return None
    text = record[key]
    if not isinstance(text, str):
        bad["non_string_text"] += 1
        where.setdefault("non_string_text", f"{location} ({type(text).__name__})")
        return None
    return text


def documents_of(
    raw: bytes, fmt: str, options: PretokenizeOptions, bad: dict[str, int], where: dict, path: str
) -> list[str]:
    """Split a byte range holding whole documents into document texts."""
    if fmt == "json":
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ChlaError(f"pretokenize: {path}: not valid UTF-8 JSON ({exc}); fix the file or use JSONL") from None
        if not isinstance(records, list):
            raise ChlaError(
                f"pretokenize: {path}: top level is a JSON {type(records).__name__}, expected a "
                f"list of objects with key {options.text_key!r}"
            )
        docs = []
        for index, record in enumerate(records):
            text = _record_text(record, options.text_key, bad, where, f"record {index}")
            if text is not None:
                docs.append(text)
    else:
        lines = _decode(raw, bad, where)
        if lines and lines[-1] == "":
            lines.pop()
        if fmt == "jsonl":
            docs = []
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    bad["invalid_json"] += 1
                    where.setdefault("invalid_json", f"line {number + 1}")
                    continue
                text = _record_text(record, options.text_key, bad, where, f"line {number + 1}")
                if text is not None:
                    docs.append(text)
        elif options.txt_documents == "paragraph":
            docs, current = [], []
            for line in lines:
                if line.strip():
                    current.append(line.rstrip("\r"))
                elif current:
                    docs.append("\n".join(current))
                    current = []
            if current:
                docs.append("\n".join(current))
        else:
            docs = [line.rstrip("\r") for line in lines]
    kept = [doc for doc in docs if doc.strip()]
    bad["empty_documents"] += len(docs) - len(kept) if fmt != "txt" else 0
    return kept


def encode_item(item: tuple) -> tuple[bytes, int, dict, dict]:
    """Worker: one work item -> (ids as bytes, documents ended, bad counts, first-bad locations)."""
    assert _WORKER is not None
    spec = _WORKER.spec
    kind, path, fmt, start, end, first, last = item
    with open(path, "rb") as handle:
        handle.seek(start)
        raw = handle.read(end - start)
    bad, where = _new_bad(), dict[str, str]()
    if kind == "docs":
        docs = documents_of(raw, fmt, spec.options, bad, where, path)
        ids = _WORKER.encode_documents(docs) if docs else np.zeros(0, spec.dtype)
        # Line numbers count from the start of this item's byte range.
        where = {name: f"{location} counting from byte {start}" for name, location in where.items()}
        return ids.tobytes(), len(docs), bad, where
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    if last:
        text = text.rstrip() if spec.options.txt_documents == "paragraph" else text.rstrip("\r\n")
    encode = _WORKER.encode if first else _WORKER.encode_continued
    ids = _WORKER.flatten(encode([text]) if text else [[]], bos_first=first, eos_last=last)
    return ids.tobytes(), 1 if last else 0, bad, where


# --------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------


def _cache_key(
    info: TokenizerInfo, options: PretokenizeOptions, encoder: str, fmt: str, size: int, content_hash: str
) -> str:
    payload = json.dumps(
        {
            "v": FORMAT_VERSION,
            "tokenizer": info.fingerprint,
            "encoder": encoder,
            "dtype": info.dtype.str,
            "format": fmt,
            "options": options.key_fields(),
            "size": size,
            "blake2b": content_hash,
        },
        sort_keys=True,
    )
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


def _valid_entry(cache_dir: Path, key: str, itemsize: int) -> dict | None:
    counts = read_json(cache_dir / f"{key}.json")
    if counts is None:
        return None
    try:
        size = (cache_dir / f"{key}.bin").stat().st_size
    except FileNotFoundError:
        return None
    return counts if size == counts["tokens"] * itemsize else None


def _link_or_copy(src: Path, dst: Path) -> None:
    """Publish `src` as `dst` atomically (hard link, or a copy across filesystems)."""
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return
    except OSError:
        pass
    tmp = dst.with_name(f".{dst.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial copy (a full disk, a stop) is not left behind
        raise


def _remove_dead_tmp(directory: Path, prefix: str) -> None:
    """Remove temporary files of killed writers on this host (named .<prefix>.<host>.<pid>.tmp)."""
    host = socket.gethostname()
    for tmp in directory.glob(f".{prefix}.*.tmp"):
        parts = tmp.name[len(prefix) + 2 : -4].rsplit(".", 1)
        if len(parts) != 2 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass


class _WorkerPool:
    """Worker processes, started on first use only (a warm re-run starts none)."""

    def __init__(self, spec: EncoderSpec, workers: int) -> None:
        self.spec, self.workers = spec, workers
        self.pool: multiprocessing.pool.Pool | None = None

    def map_ordered(self, items: Iterator[tuple]) -> Iterator[tuple]:
        if self.pool is None:
            import multiprocessing

            # SentencePiece workers touch nothing of the parent but files, so fork (fast start) is
            # safe; HF tokenizers hold thread pools that do not survive a fork, so spawn for them.
            method = "fork" if self.spec.encoder == "sentencepiece" and os.name == "posix" else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(
                self.workers, initializer=_init_worker, initargs=(self.spec,)
            )
        window: deque = deque()
        for item in items:
            window.append(self.pool.apply_async(encode_item, (item,)))
            if len(window) >= 3 * self.workers:  # bounded memory: a few batches in flight
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def close(self, *, finished: bool) -> None:
        """After the work is done, let the workers finish; after an error or a stop, end them at once
        (a worker killed by the same SIGTERM leaves a task that would never complete)."""
        if self.pool is not None:
            if finished:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


def run_task(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    task_index: int = 0,
    num_tasks: int = 1,
    options: PretokenizeOptions = PretokenizeOptions(),
    layout: Layout = Layout(),
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    block_size: int | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Tokenize this task's share of the pieces (from the cache where possible) and publish them
    as shards in out_dir, plus tasks/task-T-of-N.json for finalize. `progress(done, total=...)`
    is told after every piece."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    (out_dir / "tasks").mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the corpus is being rebuilt: not complete now
    files = expand_inputs(inputs)
    info = load_tokenizer_info(tokenizer_dir, cache_dir)
    if options.append_eos and info.eos_id is None:
        raise ChlaError(f"pretokenize: tokenizer {tokenizer_dir} has no eos token; set append_eos: false")
    encoder = choose_encoder(info, options)
    pieces = assign_pieces(plan_pieces(files, options, layout), num_tasks)[task_index]
    workers = workers or len(os.sched_getaffinity(0))
    spec = EncoderSpec(encoder, str(info.path), info.sp_model, options, info.eos_id, info.bos_id, info.dtype.str)
    pool = _WorkerPool(spec, workers)
    shards, tokenized, reused, text_bytes = [], 0, 0, 0
    try:
        for number, piece in enumerate(pieces):
            with open(piece.path, "rb") as handle:
                end = piece.nominal_end
                size = os.fstat(handle.fileno()).st_size
                start = next_document_start(handle, piece.nominal_start, size, piece.fmt, options.txt_documents)
                if end < size:
                    end = next_document_start(handle, end, size, piece.fmt, options.txt_documents)
            record: dict[str, Any] = {
                "file": piece.name + ".bin",
                "source_index": piece.file_index,
                "source": piece.path,
                "piece": piece.piece_index,
                "byte_range": [start, end],
                "task": task_index,
            }
            if end <= start:  # a document that began in an earlier piece covers this one
                record.update(tokens=0, documents=0, blake2b=None, encoder=encoder, bad=_new_bad())
                shards.append(record)
                continue
            content_hash = hash_file(Path(piece.path), start, end)
            key = _cache_key(info, options, encoder, piece.fmt, end - start, content_hash)
            counts = _valid_entry(cache_dir, key, info.dtype.itemsize)
            if counts is None:
                counts = _tokenize_piece(piece, start, end, key, cache_dir, pool, spec, layout, log)
                tokenized += 1
                text_bytes += end - start
            else:
                reused += 1
            _link_or_copy(cache_dir / f"{key}.bin", out_dir / f"{piece.name}.bin")
            _link_or_copy(cache_dir / f"{key}.json", out_dir / f"{piece.name}.json")
            record.update(
                tokens=counts["tokens"],
                documents=counts["documents"],
                blake2b=content_hash,
                encoder=counts["encoder"],
                bad=counts["bad"],
                bad_where=counts.get("bad_where", {}),
                cache_key=key,
            )
            shards.append(record)
            if progress is not None:
                progress(number + 1, total=len(pieces))
            if tokenized and (number + 1) % 10 == 0:
                log(f"{number + 1}/{len(pieces)} pieces ({tokenized} tokenized, {reused} from cache)")
    except BaseException:
        pool.close(finished=False)
        raise
    pool.close(finished=True)
    summary = {
        "task": task_index,
        "num_tasks": num_tasks,
        "tokenizer": asdict(info),
        "encoder": encoder,
        "options": options.key_fields(),
        "layout": asdict(layout),
        "block_size": block_size,
        "inputs": [str(f) for f in files],
        "shards": shards,
        "pieces_tokenized": tokenized,
        "pieces_cached": reused,
    }
    write_json(out_dir / "tasks" / f"task-{task_index:05d}-of-{num_tasks:05d}.json", summary)
    seconds = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in shards)
    log(
        f"task {task_index}/{num_tasks}: {len(shards)} pieces, {tokenized} tokenized, {reused} from cache, "
        f"{tokens:,} tokens in {seconds:.1f} s"
    )
    return {
        "pieces": len(shards),
        "pieces_tokenized": tokenized,
        "pieces_cached": reused,
        "tokens": tokens,
        "text_bytes_tokenized": text_bytes,
        "seconds": round(seconds, 3),
    }


def _tokenize_piece(
    piece: Piece,
    start: int,
    end: int,
    key: str,
    cache_dir: Path,
    pool: _WorkerPool,
    spec: EncoderSpec,
    layout: Layout,
    log: Callable[[str], None],
) -> dict:
    _remove_dead_tmp(cache_dir, f"{key}.bin")
    tmp = cache_dir / f".{key}.bin.{socket.gethostname()}.{os.getpid()}.tmp"
    bad, where, tokens, documents = _new_bad(), dict[str, str](), 0, 0
    items = _items_for_range(
        piece.path, piece.fmt, spec.options.txt_documents, start, end, layout.batch_bytes, spec.options.chunk_bytes
    )
    try:
        with open(tmp, "wb") as out:
            for ids, docs, item_bad, item_where in pool.map_ordered(items):
                out.write(ids)
                tokens += len(ids) // np.dtype(spec.dtype).itemsize
                documents += docs
                for name, count in item_bad.items():
                    bad[name] += count
                for name, location in item_where.items():
                    where.setdefault(name, location)
            out.flush()
            os.fsync(out.fileno())
        if documents == 0 and any(
            bad[k] for k in ("invalid_json", "not_an_object", "missing_text_key", "non_string_text")
        ):
            first = next(f"{k}: {where[k]}" for k in where)
            raise ChlaError(
                f"pretokenize: {piece.path} (bytes {start}-{end}): no usable record "
                f"({first}); check text_key (now {spec.options.text_key!r}) and the format"
            )
        os.replace(tmp, cache_dir / f"{key}.bin")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    located = {name: f"{piece.path}: {location}" for name, location in where.items()}
    counts = {
        "key": key,
        "tokens": tokens,
        "documents": documents,
        "encoder": spec.encoder,
        "dtype": spec.dtype,
        "bad": bad,
        "bad_where": located,
        "source": {"path": piece.path, "byte_range": [start, end]},
    }
    write_json(cache_dir / f"{key}.json", counts)  # last: the commit marker of the entry
    for name, location in located.items():
        log(f"warning: {name} in {location} (counted in the manifest)")
    return counts


# --------------------------------------------------------------------------------------------
# Finalize: the manifest, written last
# --------------------------------------------------------------------------------------------


def finalize_corpus(out_dir: str | Path, num_tasks: int, log: Callable[[str], None] = print) -> dict:
    out_dir = Path(out_dir)
    records = []
    for task in range(num_tasks):
        record = read_json(out_dir / "tasks" / f"task-{task:05d}-of-{num_tasks:05d}.json")
        if record is None:
            raise ChlaError(
                f"pretokenize: task {task} of {num_tasks} has not finished in {out_dir}; "
                f"run the missing task, then finalize"
            )
        records.append(record)
    head = records[0]
    info = head["tokenizer"]
    dtype = np.dtype(TokenizerInfo(**info).dtype)
    shards = sorted((s for r in records for s in r["shards"]), key=lambda s: (s["source_index"], s["piece"]))
    for shard in shards:
        if shard["tokens"]:
            size = (out_dir / shard["file"]).stat().st_size
            if size != shard["tokens"] * dtype.itemsize:
                raise ChlaError(
                    f"pretokenize: {out_dir / shard['file']} has {size} bytes, expected "
                    f"{shard['tokens'] * dtype.itemsize}; re-run the pretokenize stage"
                )
    shards = [s for s in shards if s["tokens"]] + [s for s in shards if not s["tokens"]]
    shards.sort(key=lambda s: (s["source_index"], s["piece"]))
    sources = []
    bad_total = _new_bad()
    empty_files = 0
    for index, path in enumerate(head["inputs"]):
        own = [s for s in shards if s["source_index"] == index]
        tree = _blake()
        for shard in own:
            if shard["blake2b"]:
                tree.update(f"{shard['byte_range'][0]}:{shard['byte_range'][1]}:{shard['blake2b']}\n".encode())
        bad = _new_bad()
        for shard in own:
            for name, count in shard["bad"].items():
                bad[name] += count
                bad_total[name] += count
        size = os.path.getsize(path)
        empty_files += size == 0
        sources.append(
            {
                "path": path,
                "size": size,
                "hash": f"blake2b-pieces:{tree.hexdigest()}",
                "documents": sum(s["documents"] for s in own),
                "tokens": sum(s["tokens"] for s in own),
                "bad": {k: v for k, v in bad.items() if v},
                "bad_where": {k: v for s in own for k, v in s.get("bad_where", {}).items()},
            }
        )
    published = [s for s in shards if s["tokens"]]
    total_tokens = sum(s["tokens"] for s in published)
    if total_tokens == 0:
        raise ChlaError(
            f"pretokenize: the inputs ({len(sources)} files, {empty_files} empty) hold no text; "
            f"check --input and text_key"
        )
    manifest = {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        "vocab_size": info["vocab_size"],
        "eos_id": info["eos_id"],
        "bos_id": info["bos_id"],
        "block_size": head.get("block_size"),
        "tokenizer": {
            "path": info["path"],
            "fingerprint": info["fingerprint"],
            "encoder": head["encoder"],
            "encoder_check": info["encoder_check"],
        },
        "options": head["options"],
        "layout": head["layout"],
        "num_tasks": num_tasks,
        "sources": sources,
        "shards": [
            {
                "file": s["file"],
                "tokens": s["tokens"],
                "documents": s["documents"],
                "source_index": s["source_index"],
                "byte_range": s["byte_range"],
                "task": s["task"],
                "encoder": s["encoder"],
            }
            for s in published
        ],
        "totals": {
            "files": len(sources),
            "empty_files": empty_files,
            "bytes": sum(s["size"] for s in sources),
            "documents": sum(s["documents"] for s in sources),
            "tokens": total_tokens,
            "shards": len(published),
            "bad": bad_total,
        },
    }
    # Shards of earlier runs that this corpus no longer has, and leftovers of killed writers.
    keep = {s["file"] for s in published} | {s["file"][:-4] + ".json" for s in published}
    for stale in list(out_dir.glob("shard-*")) + list(out_dir.glob(".*.tmp")):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    write_json(out_dir / MANIFEST, manifest)
    log(
        f"manifest: {len(published)} shards, {total_tokens:,} tokens, {manifest['totals']['documents']:,} "
        f"documents, dtype {dtype.name}"
    )
    return manifest


def pretokenize(
    inputs: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    num_shards: int = 1,
    workers: int | None = None,
    options: PretokenizeOptions = PretokenizeOptions(),
    layout: Layout = Layout(),
    cache_dir: str | Path | None = None,
    block_size: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """All tasks one after the other on this machine (each on all cores), then the manifest."""
    totals = {"pieces_tokenized": 0, "pieces_cached": 0}
    for task in range(num_shards):
        result = run_task(
            inputs, tokenizer_dir, out_dir, task, num_shards, options, layout, cache_dir, workers, block_size, log
        )
        totals["pieces_tokenized"] += result["pieces_tokenized"]
        totals["pieces_cached"] += result["pieces_cached"]
    manifest = finalize_corpus(out_dir, num_shards, log)
    return {
        **totals,
        "tokens": manifest["totals"]["tokens"],
        "documents": manifest["totals"]["documents"],
        "shards": manifest["totals"]["shards"],
    }


# --------------------------------------------------------------------------------------------
# Stage runners (kind `pretokenize`)
# --------------------------------------------------------------------------------------------


def pretokenize_with_params(
    params: PretokenizeParams, out_dir: str | Path, num_shards: int = 1, log: Callable[[str], None] = print
) -> dict:
    """`pretokenize` as the stage kind's params describe it (`chla pretokenize`)."""
    options, layout = _from_params(params)
    return pretokenize(
        list(params.inputs),
        params.tokenizer,
        out_dir,
        num_shards=num_shards,
        workers=params.workers,
        options=options,
        layout=layout,
        cache_dir=params.cache_dir,
        block_size=params.block_size,
        log=log,
    )


def _from_params(params: PretokenizeParams) -> tuple[PretokenizeOptions, Layout]:
    options = PretokenizeOptions(
        text_format=params.text_format,
        txt_documents=params.txt_documents,
        text_key=params.text_key,
        append_eos=params.append_eos,
        prepend_bos=params.prepend_bos,
        encoder=params.encoder,
    )
    return options, Layout(piece_bytes=int(params.piece_mb * (1 << 20)))


def run(ctx) -> dict:
    params = ctx.params
    options, layout = _from_params(params)
    num_tasks = max(1, ctx.num_tasks)
    task_index = max(0, ctx.task_index)
    progress = progress_writer(ctx, total=0, unit="pieces")
    result = run_task(
        list(params.inputs),
        params.tokenizer,
        ctx.out_dir,
        task_index,
        num_tasks,
        options,
        layout,
        params.cache_dir,
        params.workers,
        params.block_size,
        ctx.log,
        progress=progress.update if progress else None,
    )
    if progress is not None:
        progress.close()
    if num_tasks == 1:  # no separate finalize step runs for a single task
        manifest = finalize_corpus(ctx.out_dir, 1, ctx.log)
        result["total_tokens"] = manifest["totals"]["tokens"]
    return result


def finalize(ctx) -> dict:
    manifest = finalize_corpus(ctx.out_dir, max(1, ctx.num_tasks), ctx.log)
    totals = manifest["totals"]
    return {
        "tokens": totals["tokens"],
        "documents": totals["documents"],
        "shards": totals["shards"],
        "bad_input": sum(totals["bad"].values()),
        "dtype": manifest["dtype"],
    }

"""Vocabulary extension: train a Chinese SentencePiece model, merge it into a LLaMA-style base
tokenizer, and measure how much shorter Chinese text becomes.

Three steps, each a library function, a stage kind and a `chla vocab` subcommand:

    train_spm        corpus files -> spm.model (BPE, the original project's settings)
    merge_tokenizers base tokenizer + spm.model -> merged.model + HF tokenizer dir
    vocab_report     tokenizers x corpora -> report.json / report.md / report.png

How the merged tokenizer stays exact. SentencePiece BPE encodes by repeatedly merging the
adjacent pair whose concatenation is the vocabulary piece with the highest score (leftmost on
ties). A HF fast tokenizer applies a ranked list of merges. transformers 5 ranks the merges it
derives from a .model by piece *id*, and LlamaTokenizer uses a Metaspace pre-tokenizer that
adds no "▁" before leading spaces; both disagree with SentencePiece (the LLaMA base already
differs on runs of spaces, because its whitespace pieces have low ids but score -1e9). So:
  * new pieces are appended after the base (ids unchanged) with strictly decreasing scores,
    all below every base score and distinct in float32: id order and score order agree for
    them, whatever converter reads the .model;
  * we write tokenizer.json ourselves: merges ranked by SentencePiece score (then id), and
    SentencePiece's normalisation ("▁" prepended, spaces -> "▁") instead of Metaspace;
  * merge_tokenizers checks fast == sentencepiece on the text of every piece before writing.
The original project appended every new piece with score 0, above every LLaMA piece and all
equal, so its HF fast tokenizer disagreed with SentencePiece on about half of Chinese lines;
`scores: original` reproduces that tokenizer exactly for models trained with it.

Non-UTF-8 input policy: a corpus line that is not valid UTF-8 is an error naming the file and
line (not skipped), so a mis-encoded corpus (GBK, GB18030) is never half-used silently.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chla_launcher.atomic import replace_dir, write_json, write_text
from chla_launcher.errors import ChlaError
from chla_tools.hf_tokenizer import PORTABLE_CLASS

if TYPE_CHECKING:
    from chla_launcher.kinds.merge_tokenizer import MergeTokenizerParams
    from chla_launcher.kinds.train_spm import TrainSpmParams
    from chla_train.context import StageContext

Log = Callable[[str], None]

# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PAD_TOKEN = "[PAD]"


def _print(message: str) -> None:
    print(message, flush=True)


# --- corpora ----------------------------------------------------------------------------------


@dataclass
class CorpusStats:
    lines: int = 0
    chars: int = 0


def iter_corpus_lines(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield the non-empty lines of a UTF-8 text file (without the newline), streaming."""
    path = Path(path)
    if not path.exists():
        raise ChlaError(f"{path}: corpus file not found; check the path")
    if not path.is_file():
        raise ChlaError(f"{path}: not a regular file; pass a text file, one sentence a line")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ChlaError(
                    f"{path}:{number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
                    f"{error.start + 1}); convert the file, e.g. `iconv -f GB18030 -t UTF-8`, "
                    "or remove the line"
                ) from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.rstrip("\r\n")
            if text.strip():
                yield text


def check_corpora(paths: Sequence[str | os.PathLike[str]]) -> CorpusStats:
    """Validate every file (exists, UTF-8, not empty) and count lines and characters."""
    if not paths:
        raise ChlaError("no corpus files given; pass at least one text file")
    total = CorpusStats()
    for path in paths:
        stats = CorpusStats()
        for line in iter_corpus_lines(path):
            stats.lines += 1
            stats.chars += len(line)
        if stats.lines == 0:
            raise ChlaError(
                f"{path}: corpus file is empty (no non-blank lines); "
                "pass a file with text, one sentence or paragraph a line"
            )
        total.lines += stats.lines
        total.chars += stats.chars
    return total


# --- train_spm --------------------------------------------------------------------------------


def train_spm(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 20000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    threads: int | None = None,
    input_sentence_size: int = 2_000_000,
    max_sentence_length: int = 16384,
    seed: int = 0,
    log: Log = _print,
) -> dict[str, Any]:
    """Train a SentencePiece model on `inputs`; write out_dir/spm.model and out_dir/spm.vocab.

    Defaults follow the Chinese-LLaMA-Alpaca 20K Chinese model: BPE, character coverage 0.9995,
    digits split (as in LLaMA, so merging adds no multi-digit pieces), no byte fallback (the
    base already has byte pieces) and identity normalisation (the base does not NFKC-normalise,
    so pieces must match raw text: with NFKC "，" would be learnt as ","). SentencePiece samples
    `input_sentence_size` lines (shuffled) from arbitrarily large inputs, so memory stays bounded.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ChlaError(f"model type {model_type!r} is not supported; use bpe or unigram")
    if vocab_size < 100:
        raise ChlaError(f"vocab size {vocab_size} is too small; use at least 100 (20000 is usual)")
    paths = [Path(p).resolve() for p in inputs]
    for path in paths:
        if "," in str(path):
            raise ChlaError(f"{path}: SentencePiece cannot read paths containing ','; rename it")
    started = time.monotonic()
    stats = check_corpora(paths)
    threads = threads or os.cpu_count() or 1
    log(
        f"training a {vocab_size}-piece {model_type} SentencePiece model on {len(paths)} file(s): "
        f"{stats.lines:,} lines, {stats.chars:,} characters, {threads} threads"
    )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    # Sentence sampling and shuffling use SentencePiece's global generator.
    spm.set_random_generator_seed(seed)
    try:
        try:
            spm.SentencePieceTrainer.train(
                input=[str(p) for p in paths],
                model_prefix=str(tmp / "spm"),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                num_threads=threads,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=max_sentence_length,
                split_digits=True,
                byte_fallback=False,
                normalization_rule_name="identity",
                minloglevel=2,
            )
        except RuntimeError as error:
            raise ChlaError(_explain_trainer_error(str(error), vocab_size, paths)) from None
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spm.model"))
    log(f"wrote {out_dir / 'spm.model'}: {sp.get_piece_size():,} pieces in {seconds:.1f} s")
    return {
        "vocab_size": sp.get_piece_size(),
        "model_type": model_type,
        "lines": stats.lines,
        "chars": stats.chars,
        "seconds": round(seconds, 2),
    }


def _explain_trainer_error(message: str, vocab_size: int, paths: list[Path]) -> str:
    first = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    where = paths[0] if len(paths) == 1 else f"{len(paths)} input files"
    if "smaller than required_chars" in message:
        return (
            f"{where}: a {vocab_size}-piece vocabulary cannot hold the characters the corpus "
            f"needs (SentencePiece: {first.split('] ')[-1].split(' Increase')[0]}); raise "
            "--vocab-size or lower --character-coverage"
        )
    if "Vocabulary size" in message or "vocab_size" in message:
        return (
            f"{where}: the corpus cannot support a {vocab_size}-piece vocabulary "
            f"(SentencePiece: {first.split('] ')[-1]}); lower --vocab-size or add text"
        )
    return f"{where}: SentencePiece training failed: {first}"


# --- SentencePiece models and HF tokenizer directories ----------------------------------------


def _model_pb2():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def load_sp_proto(path: str | os.PathLike[str], *, role: str = "tokenizer"):
    """Parse a SentencePiece .model file, refusing anything else with one clear line."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    data = path.read_bytes()
    proto = _model_pb2().ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        proto = None
    if proto is None or len(proto.pieces) == 0:
        hint = ""
        if data[:200].count(b" ") and all(line.count(b" ") == 1 for line in data.splitlines()[:5]):
            hint = " (it looks like a tiktoken vocabulary, as Llama 3 ships)"
        raise ChlaError(
            f"{path}: {role} is not a SentencePiece model{hint}; chla vocab merge "
            "extends SentencePiece BPE tokenizers (LLaMA 1/2, Mistral v1) only"
        )
    return proto


def resolve_sp_model(base: str | os.PathLike[str], *, role: str = "base tokenizer") -> Path:
    """The tokenizer.model behind `base`: a .model file, an HF dir, or a dir holding tokenizer/."""
    base = Path(base)
    if not base.exists():
        raise ChlaError(f"{base}: {role} not found; pass an HF tokenizer directory or a .model file")
    if base.is_file():
        return base
    for candidate in (base / "tokenizer.model", base / "tokenizer" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    if (base / "tokenizer.json").is_file() or (base / "tokenizer" / "tokenizer.json").is_file():
        raise ChlaError(
            f"{base}: {role} has only a tokenizer.json (a byte-level BPE / tiktoken "
            "vocabulary such as Llama 3's), not a SentencePiece tokenizer.model; "
            "vocabulary merging needs a SentencePiece base (LLaMA 1/2, Mistral v1)"
        )
    raise ChlaError(
        f"{base}: no tokenizer in this directory (no tokenizer.model); "
        "pass the directory of an HF tokenizer or model, or the .model file"
    )


def _mergeable(piece) -> bool:
    # SentencePiece's BPE merges into normal, user-defined and unused pieces, never into
    # control, unknown or byte pieces.
    return piece.type in (NORMAL, USER_DEFINED, UNUSED)


def build_fast_tokenizer(proto):
    """A `tokenizers.Tokenizer` that encodes exactly as SentencePiece BPE does with `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    ranked = []
    for piece_id, piece in enumerate(pieces):
        if not _mergeable(piece):
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                # SentencePiece takes the highest score first; ids break ties in score.
                ranked.append((-piece.score, piece_id, cut, left, right))
    ranked.sort()
    unk = pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
            dropout=None,
        )
    )
    # SentencePiece's add_dummy_prefix always prepends "▁"; Metaspace does not when the text
    # already starts with a space, so use plain normalizers instead.
    steps = []
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decode)
    specials = [p.piece for p in pieces if p.type in (UNKNOWN, CONTROL)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)]
        )
    return tokenizer


def write_hf_tokenizer(
    model: bytes | str | os.PathLike[str], out_dir: str | os.PathLike[str], pad_token: str | None = None
) -> Path:
    """Write an HF tokenizer directory for a SentencePiece model (bytes or a .model path):
    tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    Loads with AutoTokenizer.from_pretrained in transformers 4 and 5 (chla_tools.hf_tokenizer says
    why the class is the generic fast tokenizer). BOS is added, EOS not, as LLaMA does.
    `pad_token` must already be a piece of the model.
    """
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    proto = _model_pb2().ModelProto()
    proto.ParseFromString(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(data)
    build_fast_tokenizer(proto).save(str(out_dir / "tokenizer.json"))
    spec = proto.trainer_spec
    pieces = proto.pieces
    special = {
        "bos_token": pieces[spec.bos_id].piece,
        "eos_token": pieces[spec.eos_id].piece,
        "unk_token": pieces[spec.unk_id].piece,
    }
    if pad_token is not None:
        special["pad_token"] = pad_token
    config = {
        "tokenizer_class": PORTABLE_CLASS,
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "padding_side": "right",
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out_dir


# --- merge_tokenizers -------------------------------------------------------------------------


def _scores_below(lowest: float, count: int) -> list[float]:
    """`count` strictly decreasing float32 values below `lowest` (the step grows with the
    magnitude: near LLaMA's -1e9 whitespace scores float32 can only tell values 64 apart)."""

    def float32(value: float) -> float:
        return struct.unpack("f", struct.pack("f", value))[0]

    scores, current = [], float32(lowest)
    for _ in range(count):
        step = 1.0
        while (candidate := float32(current - step)) >= current:
            step *= 2  # float32 rounding swallowed the step
        scores.append(candidate)
        current = candidate
    return scores


# How the appended pieces are scored (merge_tokenizer.params.scores).
SCORES_BELOW_BASE = "below_base"
SCORES_ORIGINAL = "original"


def merge_tokenizers(
    base: str | os.PathLike[str],
    add_model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    pad_token: bool = False,
    scores: str = SCORES_BELOW_BASE,
    log: Log = _print,
) -> dict[str, Any]:
    """Append the pieces of `add_model` that the base lacks to the base SentencePiece model.

    Writes out_dir/merged.model, out_dir/tokenizer/ (HF tokenizer dir) and out_dir/merge.json.
    Base ids and scores are unchanged. With `pad_token`, exactly one control piece "[PAD]" is
    appended last (the SFT variant: the original project's 49953 -> 49954).

    `scores`: "below_base" (chla's) gives the new pieces strictly decreasing scores below every
    base score, so the HF fast tokenizer agrees with SentencePiece exactly (module docstring).
    "original" does what the original merge_tokenizers.py does, byte for byte: every piece of
    `add_model` whose text the base lacks is appended, in order, with only its text and score 0
    set (no type). Pieces, ids and the .model equal the original's; but where several pieces
    share a score SentencePiece merges the leftmost pair first and a ranked-merge tokenizer the
    higher-ranked one, so the fast tokenizer then disagrees with SentencePiece on some lines
    (vocab_report measures how many); the merge logs the share of its probe strings that agree.
    """
    import sentencepiece as spm

    started = time.monotonic()
    base_path = resolve_sp_model(base, role="base tokenizer")
    add_path = Path(add_model)
    if add_path.is_dir():
        add_path = resolve_sp_model(add_path, role="added SentencePiece model")
    if not add_path.exists():
        raise ChlaError(f"{add_path}: SentencePiece model to add not found; train one with `chla vocab train`")
    merged = load_sp_proto(base_path, role="base tokenizer")
    added = load_sp_proto(add_path, role="added model")
    if merged.trainer_spec.model_type != _model_pb2().TrainerSpec.BPE:
        raise ChlaError(
            f"{base_path}: base tokenizer is a SentencePiece "
            f"{_model_pb2().TrainerSpec.ModelType.Name(merged.trainer_spec.model_type)}"
            " model; merging appends BPE pieces and needs a BPE base (LLaMA 1/2)"
        )
    if pad_token and any(p.piece == PAD_TOKEN for p in merged.pieces):
        raise ChlaError(f"{base_path}: base already has a {PAD_TOKEN} piece; drop --pad-token")

    if scores not in (SCORES_BELOW_BASE, SCORES_ORIGINAL):
        raise ChlaError(f"scores {scores!r}: use {SCORES_BELOW_BASE} or {SCORES_ORIGINAL}")

    base_size = len(merged.pieces)
    known = {p.piece for p in merged.pieces}
    piece_class = _model_pb2().ModelProto.SentencePiece
    new_pieces = []
    if scores == SCORES_ORIGINAL:
        for piece in added.pieces:
            if piece.piece not in known:
                new_pieces.append(piece.piece)
                merged.pieces.append(piece_class(piece=piece.piece, score=0))
    else:
        for piece in added.pieces:
            if piece.type == NORMAL and piece.piece not in known:
                known.add(piece.piece)
                new_pieces.append(piece.piece)
        lowest = min(p.score for p in merged.pieces if _mergeable(p))
        for text, score in zip(new_pieces, _scores_below(lowest, len(new_pieces))):
            merged.pieces.append(piece_class(piece=text, score=score, type=NORMAL))
    merged_size = len(merged.pieces)
    if pad_token:
        merged.pieces.append(_model_pb2().ModelProto.SentencePiece(piece=PAD_TOKEN, score=0.0, type=CONTROL))
    data = merged.SerializeToString()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "merged.model").write_bytes(data)
        write_hf_tokenizer(data, tmp / "tokenizer", pad_token=PAD_TOKEN if pad_token else None)
        checked, agreeing = _check_fast_matches_sentencepiece(
            tmp / "tokenizer", new_pieces, log, exact=scores == SCORES_BELOW_BASE
        )
        summary = {
            "base": str(base_path),
            "added_model": str(add_path),
            "base_size": base_size,
            "added_model_size": len(added.pieces),
            "new_pieces": len(new_pieces),
            "merged_size": merged_size,
            "pad_token": PAD_TOKEN if pad_token else None,
            "final_size": len(merged.pieces),
            "scores": scores,
            "fast_slow_checked_strings": checked,
            "fast_slow_agreeing_strings": agreeing,
        }
        write_json(tmp / "merge.json", summary)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    arithmetic = f"{base_size} + {len(new_pieces)} new = {merged_size}"
    if pad_token:
        arithmetic += f"; + {PAD_TOKEN} = {len(merged.pieces)}"
    log(f"merged vocabulary: {arithmetic} ({time.monotonic() - started:.1f} s) -> {out_dir}")
    summary["arithmetic"] = arithmetic
    summary["seconds"] = round(time.monotonic() - started, 2)
    # sentencepiece must accept what we wrote
    spm.SentencePieceProcessor(model_file=str(out_dir / "merged.model"))
    return summary


def _check_fast_matches_sentencepiece(
    tokenizer_dir: Path, new_pieces: list[str], log: Log, exact: bool = True
) -> tuple[int, int]:
    """Encode the text of every new piece (alone and in runs) both ways. With `exact`, any
    difference is a bug in build_fast_tokenizer, not a user error; otherwise (scores: original)
    the agreement is only reported. Returns (strings checked, strings that agree)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    slow = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    texts = [p.replace("▁", " ") for p in new_pieces]
    texts += ["".join(texts[i : i + 16]) for i in range(0, len(texts), 16)]
    fast_ids = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    slow_ids = slow.encode(texts)
    bad = [t for t, f, s in zip(texts, fast_ids, slow_ids) if f != s]
    if bad and exact:
        raise RuntimeError(
            f"fast tokenizer disagrees with SentencePiece on {len(bad)} of {len(texts)} strings, e.g. {bad[0]!r}"
        )
    if bad:
        log(
            f"scores: original: fast tokenizer == SentencePiece on {len(texts) - len(bad):,} of "
            f"{len(texts):,} probe strings (pieces with equal scores: SentencePiece merges the "
            "leftmost pair first, the fast tokenizer the higher-ranked one)"
        )
    else:
        log(f"fast tokenizer == SentencePiece on {len(texts):,} probe strings")
    return len(texts), len(texts) - len(bad)


# --- vocab_report -----------------------------------------------------------------------------


def parse_named(items: list[str], what: str) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ChlaError(f"--{what} {item!r}: expected NAME=PATH")
        if name in named:
            raise ChlaError(f"--{what} {name}: given twice; names must be unique")
        named[name] = path
    return named


def load_tokenizer_pair(tokenizer_dir: str | os.PathLike[str]):
    """(HF fast tokenizer via AutoTokenizer, SentencePieceProcessor) for one tokenizer dir."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model_path = resolve_sp_model(tokenizer_dir, role="tokenizer")
    return (
        AutoTokenizer.from_pretrained(str(model_path.parent)),
        spm.SentencePieceProcessor(model_file=str(model_path)),
    )


def measure(fast, slow, corpus: str | os.PathLike[str]) -> dict:
    """Token statistics of one tokenizer on one corpus (one line = one sequence, no BOS)."""
    byte_ids = {i for i in range(slow.get_piece_size()) if slow.is_byte(i)}
    unk_id = slow.unk_id()
    chars = nbytes = tokens = byte_tokens = unk_tokens = lines = agree = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal chars, nbytes, tokens, byte_tokens, unk_tokens, lines, agree
        fast_ids = fast(batch, add_special_tokens=False)["input_ids"]
        for text, f_ids, s_ids in zip(batch, fast_ids, slow.encode(batch)):
            lines += 1
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            tokens += len(s_ids)
            byte_tokens += sum(i in byte_ids for i in s_ids)
            unk_tokens += sum(i == unk_id for i in s_ids)
            agree += f_ids == s_ids
        batch.clear()

    for line in iter_corpus_lines(corpus):
        batch.append(line)
        if len(batch) >= 2048:
            flush()
    if batch:
        flush()
    if lines == 0:
        raise ChlaError(f"{corpus}: corpus file is empty (no non-blank lines)")
    return {
        "chars": chars,
        "bytes": nbytes,
        "tokens": tokens,
        "lines": lines,
        "tokens_per_char": tokens / chars,
        "bytes_per_token": nbytes / tokens,
        "byte_fallback_rate": byte_tokens / tokens,
        "unk_rate": unk_tokens / tokens,
        "fast_slow_agreement": agree / lines,
        "lines_agree": agree,
        "vocab_size": len(fast),
    }


def vocab_report(
    tokenizers: dict[str, str], corpora: dict[str, str], out_dir: str | os.PathLike[str], log: Log = _print
) -> dict[str, Any]:
    """Measure every tokenizer on every corpus; write report.json, report.md and report.png."""
    if not tokenizers:
        raise ChlaError("no tokenizers given; pass --tokenizer NAME=DIR at least once")
    if not corpora:
        raise ChlaError("no corpora given; pass --corpus NAME=FILE at least once")
    for name, path in tokenizers.items():
        resolve_sp_model(path, role=f"tokenizer {name}")
    for name, path in corpora.items():
        if not Path(path).is_file():
            raise ChlaError(f"{path}: corpus {name} not found; check the path")

    started = time.monotonic()
    report: dict[str, Any] = {"tokenizers": {}, "corpora": {n: str(p) for n, p in corpora.items()}, "results": []}
    first = next(iter(tokenizers))
    baseline: dict[str, int] = {}
    for tok_name, tok_dir in tokenizers.items():
        fast, slow = load_tokenizer_pair(tok_dir)
        for corpus_name, corpus in corpora.items():
            stats = measure(fast, slow, corpus)
            report["tokenizers"][tok_name] = {"vocab_size": stats.pop("vocab_size"), "path": str(tok_dir)}
            if tok_name == first:
                baseline[corpus_name] = stats["tokens"]
            change = stats["tokens"] / baseline[corpus_name] - 1
            report["results"].append(
                {"tokenizer": tok_name, "corpus": corpus_name, **stats, "tokens_change_vs_first": change}
            )
            log(
                f"{tok_name} on {corpus_name}: {stats['tokens_per_char']:.3f} tokens/char "
                f"({change:+.1%} tokens vs {first}), fast/slow agree on "
                f"{stats['lines_agree']}/{stats['lines']} lines"
            )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_json(tmp / "report.json", report)
        write_text(tmp / "report.md", render_markdown(report, first))
        plot_report(report, first, tmp / "report.png")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}/report.json, report.md, report.png ({time.monotonic() - started:.1f} s)")
    return report


def render_markdown(report: dict, first: str) -> str:
    rows = [
        "| tokenizer | vocab | corpus | chars | tokens | tokens/char | bytes/token | "
        f"byte-fallback | unk | fast=slow | tokens vs {first} |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        vocab = report["tokenizers"][r["tokenizer"]]["vocab_size"]
        rows.append(
            f"| {r['tokenizer']} | {vocab:,} | {r['corpus']} | {r['chars']:,} | "
            f"{r['tokens']:,} | {r['tokens_per_char']:.3f} | {r['bytes_per_token']:.2f} | "
            f"{r['byte_fallback_rate']:.1%} | {r['unk_rate']:.2%} | "
            f"{r['fast_slow_agreement']:.2%} | {r['tokens_change_vs_first']:+.1%} |"
        )
    return "# Vocabulary efficiency\n\n" + "\n".join(rows) + "\n"


def plot_report(report: dict, first: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok_names = list(report["tokenizers"])
    corpus_names = list(report["corpora"])
    by_key = {(r["tokenizer"], r["corpus"]): r for r in report["results"]}
    width = 0.8 / len(tok_names)
    fig, ax = plt.subplots(figsize=(max(6, 2.6 * len(corpus_names) + 2), 4.5), dpi=110)
    palette = plt.get_cmap("tab10")
    colors = [palette(i) for i in range(palette.N)]
    top = max(r["tokens_per_char"] for r in report["results"])
    for t, tok in enumerate(tok_names):
        xs = [c + (t - (len(tok_names) - 1) / 2) * width for c in range(len(corpus_names))]
        values = [by_key[(tok, c)]["tokens_per_char"] for c in corpus_names]
        vocab = report["tokenizers"][tok]["vocab_size"]
        ax.bar(xs, values, width * 0.92, label=f"{tok} ({vocab:,} pieces)", color=colors[t % len(colors)])
        for x, corpus, value in zip(xs, corpus_names, values):
            change = by_key[(tok, corpus)]["tokens_change_vs_first"]
            label = f"{value:.2f}" if tok == first else f"{value:.2f}\n{change:+.0%}"
            ax.text(x, value + top * 0.015, label, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(corpus_names)), corpus_names, fontsize=11)
    ax.set_ylabel("tokens per character (lower is better)")
    ax.set_ylim(0, top * 1.3)
    ax.set_title(f"Tokens per character by corpus (bar labels: value, change vs. {first})", fontsize=11)
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- stage runners (see chla_launcher/kinds/{train_spm,merge_tokenizer,vocab_report}.py) -------


def train_spm_with_params(p: TrainSpmParams, out_dir: str | Path, log: Log = _print) -> dict:
    """`train_spm` as the stage kind's params describe it (`chla vocab train` and the stage)."""
    return train_spm(
        p.inputs,
        out_dir,
        vocab_size=p.vocab_size,
        model_type=p.model_type,
        character_coverage=p.character_coverage,
        threads=p.threads,
        input_sentence_size=p.input_sentence_size,
        max_sentence_length=p.max_sentence_length,
        seed=p.seed,
        log=log,
    )


def merge_tokenizers_with_params(p: MergeTokenizerParams, out_dir: str | Path, log: Log = _print) -> dict:
    """`merge_tokenizers` as the stage kind's params describe it (`chla vocab merge` and the stage)."""
    return merge_tokenizers(p.base, p.add, out_dir, pad_token=p.pad_token, scores=p.scores, log=log)


def run_train_spm(ctx: StageContext[TrainSpmParams]) -> dict:
    return train_spm_with_params(ctx.params, ctx.out_dir, log=ctx.log)


def run_merge_tokenizer(ctx: StageContext[MergeTokenizerParams]) -> dict:
    summary = merge_tokenizers_with_params(ctx.params, ctx.out_dir, log=ctx.log)
    return {k: summary[k] for k in ("base_size", "new_pieces", "merged_size", "final_size", "arithmetic")}


def run_vocab_report(ctx) -> dict:
    p = ctx.params
    report = vocab_report(dict(p.tokenizers), dict(p.corpora), ctx.out_dir, log=ctx.log)
    return {
        f"{r['tokenizer']}/{r['corpus']}/tokens_per_char": round(r["tokens_per_char"], 4) for r in report["results"]
    }

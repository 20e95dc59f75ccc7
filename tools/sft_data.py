"""Instruction (SFT) data: Alpaca JSON/JSONL records -> input ids and labels, cached by content.

As the original project's build_instruction_dataset:
- prompt = PROMPT_TEMPLATE with {instruction}; a non-empty `input` is appended to the instruction
  after a newline; the prompt is tokenized with the tokenizer's special tokens (BOS);
- target = output + EOS;
- labels are -100 on the prompt, the target ids elsewhere; input_ids and labels are cut to
  max_seq_length (which may cut the target).
Differences, on purpose: the output is tokenized as the continuation of the prompt, where the
original tokenizes it on its own (`encode_pair`, lm-evaluation-harness's rule). SentencePiece
gives text on its own a dummy "▁" prefix, so the original trains on "Response:", "▁", "▁正",
"面" while a model generating after that prompt has to produce the same "▁正" after a "▁" that
the joint text never has; the demo's greedy answers began with a lone "▁" and never completed
a label. Here the prompt's trailing whitespace moves into the answer, the pair is encoded as one
string and the answer is the tokens past the prompt's ("Response:", "▁正", "面"), and generation
encodes the prompt the same way (`encode_prompt`), so training and generation see the same
token boundary. An example whose prompt fills max_seq_length (no target token left) is
dropped and counted (`stats["no_target"]`): its loss would be 0/0; a record with a missing key or
a non-string value is an error naming file and record, or skipped and counted with
on_bad_record="skip"; optional packing of several examples into one sequence (`packing`: they
attend to each other, as in the usual simple packing), or of each micro-batch's examples into
rows where each attends only to itself (`collate_sft_packed`: no padding, the same loss).

Padding: the original adds a "[PAD]" token when the tokenizer has none (LLaMA has none), so the
vocabulary becomes base + 1 (49953 -> 49954); `load_sft_tokenizer` does the same, and the
trainer must resize the embeddings to `len(tokenizer)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from chla_launcher.contract.atomic import read_json, replace_dir, write_json
from chla_launcher.contract.errors import ChlaError
from chla_launcher.contract.kinds.sft import SftParams

IGNORE_INDEX = -100
PAD_TOKEN = "[PAD]"
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
)
# `template: chat`: the tokenizer's own chat template, one user turn and the assistant's cue
CHAT_TEMPLATE = "chat"


def format_prompt(instruction: str, input: str = "", template: str | None = None) -> str:  # noqa: A002
    """The prompt text for one record (as in training; use it for generation too)."""
    if input:
        instruction = f"{instruction}\n{input}"
    # str.replace, not str.format: a template may contain other braces (JSON examples, code).
    return (template or PROMPT_TEMPLATE).replace("{instruction}", instruction)


def resolve_template(template: str | None, tokenizer=None) -> str:
    """The template text (with {instruction}) that `template` names: None or "alpaca" the Alpaca
    template; "chat" the tokenizer's chat template rendered for one user turn whose content is
    {instruction}, with the assistant's cue (an instruction-tuned base answers in the format it
    was tuned in); anything else is a template text itself. The BOS token the rendering starts
    with is dropped: encoding adds exactly one (`encode_prompt`)."""
    if template is None or template == "alpaca":
        return PROMPT_TEMPLATE
    if template == CHAT_TEMPLATE:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ChlaError("template: chat needs a tokenizer with a chat template; this tokenizer has none")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "{instruction}"}], add_generation_prompt=True, tokenize=False
        )
        if text.count("{instruction}") != 1:
            raise ChlaError("template: chat: the tokenizer's chat template does not show a user message verbatim")
        bos = tokenizer.bos_token
        return text[len(bos) :] if bos and text.startswith(bos) else text
    if "{instruction}" not in template:
        raise ChlaError(f"template {template[:40]!r} is neither alpaca, chat nor a template text with {{instruction}}")
    return template


def split_prompt(prompt: str) -> tuple[str, str]:
    """The prompt without its trailing whitespace, and that whitespace (which starts the answer)."""
    context = prompt.rstrip()
    return context, prompt[len(context) :]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids a model continues from: BOS (exactly one, whatever the tokenizer's add_bos
    setting) and the prompt without its trailing whitespace, as SFT encodes it (`encode_pairs`)."""
    return _with_bos(tokenizer, [split_prompt(prompt)[0]])[0]


def _with_bos(tokenizer, texts: list[str]) -> list[list[int]]:
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [bos + ids for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def encode_pairs(tokenizer, prompts: list[str], answers: list[str]) -> list[tuple[list[int], list[int], bool]]:
    """(prompt ids, answer ids, joined) of each pair: the prompt as `encode_prompt` encodes it and
    the answer as its continuation, the tokens of prompt + answer (encoded as one string) past the
    prompt's. When the pair's tokens do not start with the prompt's (a token spans the boundary,
    which the prompt's trailing whitespace moved into the answer makes rare), the answer is
    encoded on its own and `joined` is False."""
    if not prompts:
        return []
    heads = _with_bos(tokenizer, [split_prompt(prompt)[0] for prompt in prompts])
    wholes = _with_bos(tokenizer, [prompt + answer for prompt, answer in zip(prompts, answers)])
    pairs = []
    for prompt, answer, head, whole in zip(prompts, answers, heads, wholes):
        if whole[: len(head)] == head:
            pairs.append((head, whole[len(head) :], True))
        else:
            lead = split_prompt(prompt)[1]
            pairs.append((head, tokenizer(lead + answer, add_special_tokens=False).input_ids, False))
    return pairs


def load_sft_tokenizer(tokenizer_dir: str | Path):
    """The HF tokenizer with a pad token: "[PAD]" added when it has none (vocabulary base + 1)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # many exception types for a bad directory
        raise ChlaError(f"cannot load tokenizer from {tokenizer_dir}: {exc}; pass an HF tokenizer directory") from exc
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.eos_token_id is None:
        raise ChlaError(f"tokenizer {tokenizer_dir} has no eos token; SFT targets end with EOS")
    return tokenizer


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChlaError(f"SFT data {path} not found; check the path") from None
    except UnicodeDecodeError as exc:
        raise ChlaError(f"{path}: not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    if not text.strip():
        raise ChlaError(f"{path}: file is empty; expected Alpaca records (instruction, input, output)")
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ChlaError(f"{path}: line {number + 1}: invalid JSON ({exc.msg}); fix the line") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChlaError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg}); fix the file") from None
    if not isinstance(records, list):
        raise ChlaError(
            f"{path}: top level is a JSON {type(records).__name__}, expected a list of "
            f"{{instruction, input, output}} records"
        )
    return records


def _check_record(record: Any, path: Path, index: int) -> str | None:
    """Why the record is unusable, or None."""
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        return f"{where}: is a {type(record).__name__}, expected an object with instruction/input/output"
    for key in ("instruction", "output"):
        if key not in record:
            return f"{where}: missing key {key!r} (has {sorted(record)})"
        if not isinstance(record[key], str):
            return f"{where}: {key!r} is a {type(record[key]).__name__}, expected a string"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return f"{where}: 'input' is a {type(record['input']).__name__}, expected a string"
    return None


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


@dataclass
class SFTDataset:
    """Examples as flat id/label arrays plus offsets (memory-mapped from the cache)."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray  # example i is [offsets[i], offsets[i+1])
    pad_id: int
    vocab_size: int  # len(tokenizer) including the added [PAD]
    stats: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False  # read from an entry an earlier call wrote

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each example (for length-grouped batching)."""
        return np.diff(np.asarray(self.offsets, dtype=np.int64))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range ({len(self)} examples)")
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return {
            "input_ids": np.asarray(self.input_ids[start:stop], dtype=np.int64),
            "labels": np.asarray(self.labels[start:stop], dtype=np.int64),
        }


def _fingerprint_dir(directory: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0" + hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("CHLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "chla")
    return Path(root) / "sft"


@cache  # once per process: the code and the version do not change while it runs
def _reader_fingerprint() -> str:
    """This module's code and the tokenizer library's version: an entry written by other code
    (a changed template, boundary rule or cut) is never read, with no version to bump by hand."""
    from importlib.metadata import version

    digest = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=16)
    digest.update(version("tokenizers").encode())
    return digest.hexdigest()


def load_sft_dataset(
    path: str | Path,
    tokenizer_dir: str | Path,
    max_seq_length: int = 512,
    template: str | None = None,
    on_bad_record: str = "error",
    cache_dir: str | Path | None = None,
    packing: bool = False,
    max_records: int | None = None,
) -> SFTDataset:
    """Tokenize (or load from the cache) an Alpaca JSON/JSONL file, or its first `max_records`
    records. See the module docstring."""
    path, tokenizer_dir = Path(path).resolve(), Path(tokenizer_dir).resolve()
    # (the chat template is the tokenizer's: load it only for that)
    template = resolve_template(template, load_sft_tokenizer(tokenizer_dir) if template == CHAT_TEMPLATE else None)
    if on_bad_record not in ("error", "skip"):
        raise ChlaError(f"on_bad_record must be 'error' or 'skip' (got {on_bad_record!r})")
    if max_seq_length < 2:
        raise ChlaError(f"max_seq_length must be >= 2 (got {max_seq_length})")
    if not path.is_file():
        raise ChlaError(f"SFT data {path} not found; check the path")
    if not tokenizer_dir.is_dir():
        raise ChlaError(f"tokenizer {tokenizer_dir} is not a directory; pass an HF tokenizer directory")
    key_fields = {
        "reader": _reader_fingerprint(),
        "tokenizer": _fingerprint_dir(tokenizer_dir),
        "data": hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest(),
        "size": path.stat().st_size,
        "suffix": path.suffix.lower(),
        "max_seq_length": max_seq_length,
        "template": template,
        "on_bad_record": on_bad_record,
        "packing": packing,
        "max_records": max_records,
    }
    key = hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(), digest_size=20).hexdigest()
    entry = Path(cache_dir or default_cache_dir()) / key
    from_cache = (entry / "stats.json").is_file()
    if not from_cache:
        _build_entry(path, tokenizer_dir, max_seq_length, template, on_bad_record, packing, max_records, entry)
    meta = read_json(entry / "stats.json")
    return SFTDataset(
        input_ids=np.load(entry / "input_ids.npy", mmap_mode="r"),
        labels=np.load(entry / "labels.npy", mmap_mode="r"),
        offsets=np.load(entry / "offsets.npy"),
        pad_id=meta["pad_id"],
        vocab_size=meta["vocab_size"],
        stats=meta["stats"],
        from_cache=from_cache,
    )


def load_stage_examples(path: str | Path, params: SftParams) -> SFTDataset:
    """One instruction file as an `sft` stage with these params reads it (its tokenizer, cut,
    template, bad-record rule, packing, record limit and cache)."""
    return load_sft_dataset(
        path,
        params.tokenizer,
        params.max_seq_length,
        params.template,
        params.on_bad_record,
        params.cache_dir,
        params.packing,
        params.max_records,
    )


def _build_entry(
    path: Path,
    tokenizer_dir: Path,
    max_seq_length: int,
    template: str,
    on_bad_record: str,
    packing: bool,
    max_records: int | None,
    entry: Path,
) -> None:
    tokenizer = load_sft_tokenizer(tokenizer_dir)
    records = _read_records(path)[:max_records]
    stats = {
        "records": len(records),
        "skipped": 0,
        "truncated": 0,
        "no_target": 0,
        "split_boundary": 0,
        "examples": 0,
        "packed_sequences": 0,
    }
    good = []
    for index, record in enumerate(records):
        problem = _check_record(record, path, index)
        if problem is None:
            good.append(record)
        elif on_bad_record == "skip":
            stats["skipped"] += 1
        else:
            raise ChlaError(f"{problem}; fix it or set on_bad_record: skip")
    prompts = [format_prompt(r["instruction"], r.get("input") or "", template) for r in good]
    examples = []
    for source, target, joined in encode_pairs(tokenizer, prompts, [r["output"] for r in good]):
        stats["split_boundary"] += not joined
        target = target + [tokenizer.eos_token_id]
        ids = (source + target)[:max_seq_length]
        labels = ([IGNORE_INDEX] * len(source) + target)[:max_seq_length]
        if len(source) + len(target) > max_seq_length:
            stats["truncated"] += 1
        if all(label == IGNORE_INDEX for label in labels):
            stats["no_target"] += 1
            continue
        examples.append((ids, labels))
    stats["examples"] = len(examples)
    if packing:
        examples = _pack(examples, max_seq_length)
        stats["packed_sequences"] = len(examples)
    if not examples:
        raise ChlaError(f"{path}: no usable example ({stats}); check the records and max_seq_length")
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat_ids = np.fromiter((i for ids, _ in examples for i in ids), dtype=np.int32, count=int(offsets[-1]))
    flat_labels = np.fromiter((i for _, labels in examples for i in labels), dtype=np.int32, count=int(offsets[-1]))
    # Build in a temporary directory beside the entry, then rename: never a half-written entry.
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        np.save(tmp / "input_ids.npy", flat_ids)
        np.save(tmp / "labels.npy", flat_labels)
        np.save(tmp / "offsets.npy", offsets)
        write_json(
            tmp / "stats.json",
            {
                "source": str(path),
                "tokenizer": str(tokenizer_dir),
                "pad_id": tokenizer.pad_token_id,
                "vocab_size": len(tokenizer),
                "stats": stats,
            },
        )
        replace_dir(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pack(examples: list[tuple[list[int], list[int]]], max_seq_length: int) -> list[tuple[list[int], list[int]]]:
    """Greedy in-order packing: examples are appended to the current sequence while it fits.
    Attention is not masked between packed examples (the usual simple packing)."""
    packed: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for example_ids, example_labels in examples:
        if ids and len(ids) + len(example_ids) > max_seq_length:
            packed.append((ids, labels))
            ids, labels = [], []
        ids = ids + example_ids
        labels = labels + example_labels
    if ids:
        packed.append((ids, labels))
    return packed


def collate_sft(batch: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a list of examples: input_ids with pad_id, labels with -100, attention_mask 1 on
    real tokens (from the lengths, so a real token equal to pad_id is still attended)."""
    if not batch:
        raise ValueError("collate_sft got an empty batch")
    longest = max(len(example["input_ids"]) for example in batch)
    input_ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    labels = np.full((len(batch), longest), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(batch), longest), dtype=np.int64)
    weights = np.zeros((len(batch), longest), dtype=np.float32) if "label_weights" in batch[0] else None
    for row, example in enumerate(batch):
        length = len(example["input_ids"])
        input_ids[row, :length] = example["input_ids"]
        labels[row, :length] = example["labels"]
        attention_mask[row, :length] = 1
        if weights is not None:
            weights[row, :length] = example["label_weights"]
    padded: dict[str, np.ndarray] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if weights is not None:
        padded["label_weights"] = weights
    return padded


def sft_collate(
    pad_id: int,
    *,
    pack_batches: bool = False,
    row_length: int = 0,
    share_prefix: bool = False,
    example_mean: bool = False,
):
    """The collate function of an `sft` stage's params: padded batches, or packed rows
    (`pack_batches`, rows of `row_length` = max_seq_length, optionally with the shared prefix);
    with `example_mean`, each example's label tokens weighted to count as one example together
    (`weigh_examples`)."""
    if pack_batches:
        collate = partial(collate_sft_packed, pad_id=pad_id, row_length=row_length, share_prefix=share_prefix)
    else:
        collate = partial(collate_sft, pad_id=pad_id)
    return weigh_examples(collate) if example_mean else collate


def example_label_weights(labels: np.ndarray) -> np.ndarray:
    """1/n on each of an example's n predicted label tokens (its first position predicts nothing
    of its own), 0 elsewhere: the batch's loss is then the mean over examples of each example's
    mean token loss, where the token mean lets a 40-token answer weigh 20 times a 2-token label."""
    labelled = np.asarray(labels) != IGNORE_INDEX
    predicted = int(labelled[1:].sum())
    return labelled.astype(np.float32) / max(predicted, 1)


def weigh_examples(collate):
    """`collate`, with `label_weights` (example_label_weights of each example) placed like its
    labels: the trainer divides the weighted loss sum by the sum of the weights."""

    def weighed(batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return collate([{**example, "label_weights": example_label_weights(example["labels"])} for example in batch])

    return weighed


def collate_sft_packed(
    batch: list[dict[str, np.ndarray]], pad_id: int, row_length: int, share_prefix: bool = False
) -> dict[str, np.ndarray]:
    """The examples of one micro-batch packed into as few rows of at most `row_length` tokens as
    first-fit-decreasing finds, each example still attending only to itself.

    Padded batches of reviews are about half padding; packing removes it without the label skew of
    length-grouped batches (there, long and short reviews land in different batches, and length
    correlates with the label). `position_ids` restart at 0 for every example, so RoPE sees the
    padded batch's positions. Each attention backend is told the boundaries in its own form
    (chla_train.packed_attention): sdpa reads the restarts itself (masking_utils builds a
    block-diagonal causal mask from them), eager gets that mask as an additive float mask, and
    flash_attention_2 gets `cu_seq_lens` (below) as varlen boundaries, because transformers reads
    restarting position ids as boundaries for FlashAttention only when the batch has one row.
    So attention and the loss are those of the padded batch under each. The trailing pad of each
    row is its own segment, after every real token, so no real token attends to it.
    `attention_mask` marks the tokens computed, for counting only; the trainer does not pass it
    (a 2-D mask would turn the packed detection off). `cu_seq_lens` are the segment starts of the
    rows flattened into one sequence (row r starts at r * width), then the total: FlashAttention's
    cumulative sequence lengths; `max_seq_len` is the longest segment.

    share_prefix: the prompt tokens that every example of the batch starts with (the template and
    a shared instruction: about half of each sentiment example) are put once at the start of each
    row, and every example's remaining tokens attend to that copy and to themselves
    (`packed_attention_mask`, rows x query x key, True = attend), with positions continuing after
    it. A causal model computes the prefix the same way in every example, so the loss and the
    gradients are those of the padded batch, from fewer tokens. The prefix stops before the first
    position that predicts a label in any example, so every label is still predicted from its own
    example's context. Such a row has no varlen form (an example's keys, the prefix and its own
    tokens, are not one contiguous segment), so it carries no `cu_seq_lens`."""
    if not batch:
        raise ValueError("collate_sft_packed got an empty batch")
    lengths = [len(example["input_ids"]) for example in batch]
    prefix = shared_prompt_prefix(batch) if share_prefix else 0
    sizes = [length - prefix for length in lengths]
    capacity = row_length - prefix
    if max(sizes) > capacity:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a row of {row_length}")
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []  # tokens left per row
    for index in sorted(range(len(batch)), key=lambda i: -sizes[i]):
        row = next((r for r, left in enumerate(free) if left >= sizes[index]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= sizes[index]
    width = row_length - min(free)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    weights = np.zeros((len(rows), width), dtype=np.float32) if "label_weights" in batch[0] else None
    # which key each query attends to, when a prefix is shared (else empty: varlen boundaries say it)
    attend = np.zeros((len(rows), width, width) if share_prefix else (0, 0, 0), dtype=bool)
    segment_starts: list[int] = []
    for row, members in enumerate(rows):
        if prefix:
            input_ids[row, :prefix] = batch[0]["input_ids"][:prefix]
            position_ids[row, :prefix] = np.arange(prefix)
            attention_mask[row, :prefix] = 1
            attend[row, :prefix, :prefix] = np.tri(prefix, dtype=bool)
        start = prefix
        for index in members:
            segment_starts.append(row * width + start)
            stop = start + sizes[index]
            input_ids[row, start:stop] = batch[index]["input_ids"][prefix:]
            labels[row, start:stop] = batch[index]["labels"][prefix:]
            if weights is not None:
                weights[row, start:stop] = batch[index]["label_weights"][prefix:]
            position_ids[row, start:stop] = np.arange(prefix, lengths[index])
            attention_mask[row, start:stop] = 1
            if share_prefix:
                attend[row, start:stop, :prefix] = True
                attend[row, start:stop, start:stop] = np.tri(sizes[index], dtype=bool)
            start = stop
        position_ids[row, start:] = np.arange(width - start)  # the pad tail: a segment of its own
        if start < width:
            segment_starts.append(row * width + start)
        if share_prefix:
            attend[row, start:, start:] = np.tri(width - start, dtype=bool)  # no query row without a key
    packed: dict[str, np.ndarray] = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }
    if weights is not None:
        packed["label_weights"] = weights
    if share_prefix:
        packed["packed_attention_mask"] = attend
    else:
        cu_seq_lens = np.array(segment_starts + [len(rows) * width], dtype=np.int32)
        packed["cu_seq_lens"] = cu_seq_lens
        packed["max_seq_len"] = np.array(int(np.diff(cu_seq_lens).max()), dtype=np.int64)
    return packed


def shared_prompt_prefix(batch: list[dict[str, np.ndarray]]) -> int:
    """How many leading tokens all examples share and may compute once: the common prefix of their
    input ids, cut so that no position in it predicts a label (labels[1..prefix] are all -100)."""
    first = np.asarray(batch[0]["input_ids"])
    prefix = len(first) - 1
    for example in batch:
        ids, labels = np.asarray(example["input_ids"]), np.asarray(example["labels"])
        common = min(prefix, len(ids))
        differ = np.flatnonzero(ids[:common] != first[:common])
        prefix = int(differ[0]) if len(differ) else common
        labelled = np.flatnonzero(labels != IGNORE_INDEX)
        prefix = min(prefix, int(labelled[0]) - 1 if len(labelled) else len(ids) - 1)
    return max(prefix, 0)

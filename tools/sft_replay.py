"""Replay of pretraining text during SFT (`sft.params.replay_corpus`): blocks of a pre-tokenized
corpus mixed into the instruction batches by weight, each a plain language-modelling example.

Why: SFT on short answers with the vocabulary matrices trainable pulls every token's rows towards
the few answer tokens; the demo's Chinese perplexity per character went from 145 after
pretraining to 4,312 after SFT. Training on some pretraining text at the same time keeps the
language model (the standard cure for forgetting; Chinese-LLaMA-Alpaca-2's users report the same
forgetting without it).

The mixing is a chla_tools.blocks.WeightedBlend of the instruction examples and the replay
blocks, so it is exact, seeded and resumable like a pretraining blend. In a batch, the replay
blocks get rows of their own: the instruction examples are collated as without replay (packed
rows with their shared prompt prefix included, which a replay block would otherwise cut to
nothing), and each replay block is one more row, attending only to itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from chla_launcher.contract.errors import ChlaError
from chla_tools.blocks import BlockDataset
from chla_tools.sft_data import IGNORE_INDEX

Batch = dict[str, np.ndarray]


class ReplayBlocks:
    """The blocks of a pre-tokenized corpus as SFT items whose every token is a label."""

    def __init__(self, corpus_dir: str, block_size: int, vocab_size: int) -> None:
        self.blocks = BlockDataset(corpus_dir, block_size)
        if self.blocks.corpus.vocab_size > vocab_size:
            raise ChlaError(
                f"replay_corpus {corpus_dir}: pre-tokenized with a {self.blocks.corpus.vocab_size}-token "
                f"vocabulary, larger than the tokenizer's {vocab_size}; pre-tokenize it with a "
                "tokenizer this model knows"
            )

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block, "replay": True}


def collate_with_replay(
    collate_examples: Callable[[list[dict]], Batch], pad_id: int, *, weighted: bool = False
) -> Callable[[list[dict]], Batch]:
    """A collate function for batches that mix instruction examples and replay blocks;
    `weighted`: collate_examples gives `label_weights`, and each replay block weighs as one example."""

    def collate(batch: list[dict]) -> Batch:
        replay = [item for item in batch if item.get("replay")]
        examples = [item for item in batch if not item.get("replay")]
        if not replay:
            return collate_examples(examples)
        replay_rows = np.stack([item["input_ids"] for item in replay]).astype(np.int64)
        if not examples:
            return _replay_only(replay_rows, weighted)
        return _stack_rows(collate_examples(examples), replay_rows, pad_id)

    return collate


def _replay_only(rows: np.ndarray, weighted: bool) -> Batch:
    batch = {"input_ids": rows, "labels": rows.copy(), "attention_mask": np.ones_like(rows)}
    if weighted:
        batch["label_weights"] = _block_weights(rows.shape, rows.shape[1])
    return batch


def _block_weights(shape: tuple[int, int], length: int) -> np.ndarray:
    """A replay block weighs as one example (chla_tools.sft_data.example_label_weights): 1/(length
    - 1) on its tokens, of which all but the first are predicted."""
    weights = np.zeros(shape, dtype=np.float32)
    weights[:, :length] = 1.0 / max(length - 1, 1)
    return weights


def _stack_rows(main: Batch, replay: np.ndarray, pad_id: int) -> Batch:
    """The collated instruction rows plus one row per replay block, padded to one width the way
    each kind of row pads (pad tokens unlabelled and unattended, or a segment of their own)."""
    width = max(main["input_ids"].shape[1], replay.shape[1])
    count, length = replay.shape
    out: Batch = {}
    for key, value in main.items():
        if key in ("cu_seq_lens", "max_seq_len"):
            continue  # recomputed below from the rows' positions
        value = _pad_columns(key, value, width, pad_id)
        if key in ("input_ids", "labels"):
            extra = np.full((count, width), pad_id if key == "input_ids" else IGNORE_INDEX, dtype=value.dtype)
            extra[:, :length] = replay
        elif key == "attention_mask":
            extra = np.zeros((count, width), dtype=value.dtype)
            extra[:, :length] = 1
        elif key == "position_ids":
            extra = np.concatenate([np.arange(length), np.arange(width - length)])[None].repeat(count, 0)
        elif key == "label_weights":
            extra = _block_weights((count, width), length)
        elif key == "packed_attention_mask":
            extra = np.zeros((count, width, width), dtype=value.dtype)
            extra[:, :length, :length] = np.tri(length, dtype=bool)
            extra[:, length:, length:] = np.tri(width - length, dtype=bool)
        else:
            raise ValueError(f"collate_with_replay: unknown batch key {key!r}")
        out[key] = np.concatenate([value, extra.astype(value.dtype)])
    if "cu_seq_lens" in main:  # packed rows: every segment, pad tails and replay rows too, starts at position 0
        positions = out["position_ids"].reshape(-1)
        cu_seq_lens = np.append(np.flatnonzero(positions == 0), positions.size).astype(np.int32)
        out["cu_seq_lens"] = cu_seq_lens
        out["max_seq_len"] = np.array(int(np.diff(cu_seq_lens).max()), dtype=np.int64)
    return out


def _pad_columns(key: str, value: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    missing = width - value.shape[1]
    if missing == 0:
        return value
    rows = value.shape[0]
    if key == "input_ids":
        return np.concatenate([value, np.full((rows, missing), pad_id, dtype=value.dtype)], axis=1)
    if key == "labels":
        return np.concatenate([value, np.full((rows, missing), IGNORE_INDEX, dtype=value.dtype)], axis=1)
    if key in ("attention_mask", "label_weights"):
        return np.concatenate([value, np.zeros((rows, missing), dtype=value.dtype)], axis=1)
    if key == "position_ids":  # the added tail is a segment of its own
        return np.concatenate([value, np.arange(missing)[None].repeat(rows, 0).astype(value.dtype)], axis=1)
    if key == "packed_attention_mask":
        grown = np.zeros((rows, width, width), dtype=value.dtype)
        grown[:, : value.shape[1], : value.shape[1]] = value
        grown[:, value.shape[1] :, value.shape[1] :] = np.tri(missing, dtype=bool)
        return grown
    raise ValueError(f"collate_with_replay: unknown batch key {key!r}")

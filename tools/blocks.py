"""Reading a pre-tokenized corpus for training: memory-mapped token stream, fixed-size blocks,
a seeded train/validation split and a sampler whose position survives checkpoints.

Block semantics (the original project's `group_texts`): documents are concatenated in manifest
order, each followed by the separator the corpus was built with (EOS by default), and the stream is
cut into consecutive blocks of `block_size` tokens; blocks ignore document boundaries; labels are
the inputs (the model shifts them). Remainder policy: the last `num_tokens % block_size` tokens of
the whole corpus are dropped. (The original dropped a remainder per `.map` batch of 1000 lines,
losing up to block_size-1 tokens every 1000 lines; here only once per corpus.)

Split: `split_indices` shuffles with a seed and takes a validation count or fraction (the
original's unseeded 0.001 split changed on every launch).

Sampler: `ResumableSampler` yields item indices forever, epoch after epoch, each epoch a new
permutation seeded by (seed, epoch). Its state is the GLOBAL number of items consumed, so a run
resumed from `state_dict()` continues with exactly the items not yet seen, with any world size.
With world_size w, rank r takes global positions r, r+w, r+2w, ...: every global batch of B items
(B divisible by w) is split among the ranks, and the ranks together see the same samples as one
rank with batch B. The trainer consumes `take(n)` per step (n = per-rank batch size) and saves
`state_dict()` with its checkpoint.

Length grouping (SFT's `group_by_length`, as HF Trainer's): given each item's length, every
epoch's permutation is cut into groups of `length_group` consecutive items; each group is sorted
longest first and cut into global batches, whose order is then shuffled. A batch holds items of
similar length and pads little (random batches of reviews pad to ~2x their mean length). The
order is still a pure function of (seed, epoch), so resuming stays exact.

Blends (`corpus: [{path, weight}, ...]`, Megatron's BlendableDataset and LLaMA-Factory's
interleave_probs): `WeightedBlend` is a fixed-length, deterministic stream whose item k comes from
the source that is furthest behind its weight (counts after k items: c_i; the next item goes to
the i with the largest w_i * (k + 1) - c_i, the lowest index on ties). So every prefix of the
stream holds each source within one sample of its weight, and the totals are exact up to that
rounding. Inside a source, its items are drawn without replacement, each pass over it a new
permutation seeded by (seed, source, pass). Item k is a pure function of (sources, weights, seed,
k), so the trainer reads the blend in order (no further shuffle) and the sampler's one integer
position is the whole resume state: a resumed run reads exactly the items it had not read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chla_launcher.contract.errors import ChlaError

MANIFEST = "manifest.json"


class TokenCorpus:
    """The concatenated token stream of a pretokenize output directory, memory-mapped."""

    def __init__(self, corpus_dir: str | Path) -> None:
        self.corpus_dir = Path(corpus_dir)
        manifest_path = self.corpus_dir / MANIFEST
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ChlaError(
                f"{manifest_path} not found: {self.corpus_dir} is not a finished pretokenized "
                f"corpus; run the pretokenize stage (or `chla pretokenize`) first"
            ) from None
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int | None = self.manifest["eos_id"]
        self.bos_id: int | None = self.manifest.get("bos_id")
        self.shards: list[np.ndarray] = []
        for shard in self.manifest["shards"]:
            path = self.corpus_dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ChlaError(
                    f"{path}: missing or not {expected} bytes as manifest.json says; re-run the pretokenize stage"
                )
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        # starts[i] = position of shard i's first token in the concatenated stream.
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream as int64 (a copy)."""
        stop = self.num_tokens if stop is None else min(stop, self.num_tokens)
        start = max(0, start)
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        out = np.empty(stop - start, dtype=np.int64)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        shard = first
        while filled < len(out):
            offset = start + filled - int(self.starts[shard])
            piece = self.shards[shard][offset : offset + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.num_tokens)
            return self.tokens(start, stop)[::step] if step != 1 else self.tokens(start, stop)
        if index < 0:
            index += self.num_tokens
        if not 0 <= index < self.num_tokens:
            raise IndexError(f"token {index} out of range (corpus has {self.num_tokens})")
        return int(self.tokens(index, index + 1)[0])


class BlockDataset:
    """Map-style dataset of consecutive `block_size`-token blocks (see the module docstring)."""

    def __init__(self, corpus_dir: str | Path | TokenCorpus, block_size: int) -> None:
        if block_size < 1:
            raise ChlaError(f"block_size must be >= 1 (got {block_size})")
        self.corpus = corpus_dir if isinstance(corpus_dir, TokenCorpus) else TokenCorpus(corpus_dir)
        self.block_size = block_size
        if self.corpus.num_tokens < block_size:
            raise ChlaError(
                f"{self.corpus.corpus_dir}: {self.corpus.num_tokens} tokens, fewer than one block "
                f"of {block_size}; use more text or a smaller block_size"
            )

    def __len__(self) -> int:
        return self.corpus.num_tokens // self.block_size

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range ({len(self)} blocks)")
        return self.corpus.tokens(index * self.block_size, (index + 1) * self.block_size)


def split_indices(
    num_items: int, valid_count: int | None = None, valid_fraction: float | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, valid_idx), disjoint, each sorted, chosen by a seeded permutation.

    valid_fraction is rounded to the nearest count, at least 1 when the fraction is > 0. Neither
    given: no validation items."""
    if valid_count is not None and valid_fraction is not None:
        raise ChlaError("give either valid_count or valid_fraction, not both")
    if valid_fraction is not None:
        if not 0 <= valid_fraction < 1:
            raise ChlaError(f"valid_fraction must be in [0, 1) (got {valid_fraction})")
        valid_count = max(1, round(valid_fraction * num_items)) if valid_fraction > 0 else 0
    valid_count = valid_count or 0
    if valid_count < 0 or (valid_count and valid_count >= num_items):
        raise ChlaError(
            f"validation set of {valid_count} items leaves no training items out of {num_items}; "
            f"lower valid_count/valid_fraction or use more data"
        )
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(order[valid_count:]), np.sort(order[:valid_count])


class ResumableSampler:
    """Endless, epoch-by-epoch seeded stream of items of `indices`, shardable across ranks, whose
    position can be saved and restored (see the module docstring)."""

    def __init__(
        self,
        indices,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        global_batch_size: int | None = None,
        lengths=None,
        length_group: int = 0,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ChlaError("the sampler got no items (empty dataset or split)")
        # lengths[i] is the length of item indices[i]; used only when length_group > 1
        self.lengths = None if lengths is None or length_group <= 1 else np.asarray(lengths, dtype=np.int64)
        if self.lengths is not None and self.lengths.shape != self.indices.shape:
            raise ValueError(f"{len(self.lengths)} lengths for {len(self.indices)} items")
        self.length_group = int(length_group)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), shuffle, rank, world_size
        # drop_last: each epoch is cut to a multiple of the global batch (world_size if not given)
        # so that no batch mixes two epochs.
        unit = global_batch_size or world_size
        self.global_batch_size = unit
        self.epoch_length = (len(self.indices) // unit) * unit if drop_last else len(self.indices)
        if self.epoch_length == 0:
            raise ChlaError(f"drop_last with a global batch of {unit} leaves no items of {len(self.indices)}")
        self.consumed = 0  # global items consumed by all ranks together
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
                if self.lengths is not None:
                    permutation = self._grouped_by_length(permutation, self.lengths, epoch)
                order = self.indices[permutation[: self.epoch_length]]
            else:
                order = self.indices[: self.epoch_length]
            self._order, self._order_epoch = order, epoch
        assert self._order is not None  # set above for this epoch
        return self._order

    def _grouped_by_length(self, permutation: np.ndarray, lengths: np.ndarray, epoch: int) -> np.ndarray:
        """Each run of `length_group` positions of the permutation sorted longest first, cut into
        global batches, and those batches put in a seeded random order (not long-to-short: with
        a decaying learning rate the last steps would otherwise see only the shortest items)."""
        batch = self.global_batch_size
        rng = np.random.default_rng([self.seed, epoch, 1])
        grouped = permutation.copy()
        for start in range(0, len(grouped), self.length_group):
            group = grouped[start : start + self.length_group]
            group = group[np.argsort(-lengths[group], kind="stable")]
            batches = [group[i : i + batch] for i in range(0, len(group), batch)]
            grouped[start : start + len(group)] = np.concatenate([batches[i] for i in rng.permutation(len(batches))])
        return grouped

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self._next()

    def __next__(self) -> int:
        return self._next()

    def _next(self) -> int:
        position = self.consumed + self.rank
        epoch, offset = divmod(position, self.epoch_length)
        item = int(self._epoch_order(epoch)[offset])
        self.consumed += self.world_size
        return item

    def take(self, n: int) -> np.ndarray:
        """The next n items of this rank (one step's per-rank batch)."""
        return np.array([self._next() for _ in range(n)], dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self.consumed // self.epoch_length

    def state_dict(self) -> dict:
        return {
            "epoch": self.consumed // self.epoch_length,
            "position": self.consumed % self.epoch_length,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._order_epoch = -1
        self.consumed = int(state["epoch"]) * self.epoch_length + int(state["position"])


@dataclass
class BlendSource:
    """One part of a blend: `dataset[indices[j]]` are its items, `weight` its share of the stream."""

    name: str
    dataset: Any
    indices: np.ndarray
    weight: float


class WeightedBlend:
    """`num_samples` items interleaved from several sources by weight (see the module docstring)."""

    def __init__(self, sources: Sequence[BlendSource], num_samples: int, seed: int = 0) -> None:
        if not sources:
            raise ValueError("a blend needs at least one source")
        for source in sources:
            if source.weight <= 0:
                raise ChlaError(f"blend source {source.name}: weight must be > 0 (got {source.weight})")
            if len(source.indices) == 0:
                raise ChlaError(f"blend source {source.name}: no items to draw from")
        self.sources = list(sources)
        self.seed = int(seed)
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.source_of, self.ordinal = interleave_by_weight(self.weights, num_samples)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.source_of)

    def __getitem__(self, k: int):
        source_index, ordinal = int(self.source_of[k]), int(self.ordinal[k])
        source = self.sources[source_index]
        item_pass, offset = divmod(ordinal, len(source.indices))
        return source.dataset[int(self._order(source_index, item_pass)[offset])]

    def _order(self, source_index: int, item_pass: int) -> np.ndarray:
        key = (source_index, item_pass)
        if key not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            indices = self.sources[source_index].indices
            permutation = np.random.default_rng([self.seed, source_index, item_pass]).permutation(len(indices))
            self._orders[key] = np.asarray(indices)[permutation]
        return self._orders[key]

    def counts(self, stop: int | None = None) -> dict[str, int]:
        """Items each source contributes to the first `stop` items (all by default)."""
        counted = np.bincount(self.source_of[:stop], minlength=len(self.sources))
        return {source.name: int(n) for source, n in zip(self.sources, counted)}


def interleave_by_weight(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of `num_samples` positions: the source it draws from (largest deficit against the
    weights, lowest index on ties), and how many items that source gave before it."""
    source_of = np.empty(num_samples, dtype=np.int32)
    ordinal = np.empty(num_samples, dtype=np.int64)
    counts = np.zeros(len(weights), dtype=np.int64)
    for k in range(num_samples):
        chosen = int(np.argmax(weights * (k + 1) - counts))
        source_of[k] = chosen
        ordinal[k] = counts[chosen]
        counts[chosen] += 1
    return source_of, ordinal


def part_name(path: str | Path) -> str:
    """A short name for a blend part: the stage that wrote it (<stage>/out), else its file or
    directory name without the extension."""
    path = Path(path)
    return path.parent.name if path.name == "out" and path.parent.name else path.stem


class ItemList:
    """Items picked from several datasets, as one indexable list: item i is dataset[index] of
    the i-th (dataset, index) pair (a blend's validation blocks, drawn from every source)."""

    def __init__(self, picks: Sequence[tuple[Any, int]]) -> None:
        self.picks = list(picks)

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i: int):
        dataset, index = self.picks[int(i)]
        return dataset[index]

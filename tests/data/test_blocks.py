"""Training reader: blocks over the memory-mapped stream, seeded split, resumable sampler."""

from __future__ import annotations

import numpy as np
import pytest

from chla_launcher.contract.errors import ChlaError
from chla_tools import pretokenize as pt
from chla_tools.blocks import BlockDataset, ResumableSampler, TokenCorpus, split_indices


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, zh_lines, demo_assets):
    root = tmp_path_factory.mktemp("blocks")
    for name, part in (("a.txt", zh_lines[:300]), ("b.txt", zh_lines[300:500])):
        (root / name).write_text("\n".join(part) + "\n", encoding="utf-8")
    pt.pretokenize(
        [str(root / "*.txt")],
        demo_assets["base_tokenizer"],
        root / "out",
        workers=1,
        layout=pt.Layout(piece_bytes=16 << 10),
        cache_dir=root / "cache",
        log=lambda m: None,
    )
    return root / "out"


def test_corpus_and_blocks_follow_group_texts(corpus_dir, zh_lines, sp_reference):
    corpus = TokenCorpus(corpus_dir)
    expected = np.array(sp_reference(zh_lines[:500]), dtype=np.int64)
    assert len(corpus.shards) > 2 and corpus.num_tokens == len(expected)
    assert corpus.vocab_size == 32000 and corpus.eos_id == 2
    assert np.array_equal(corpus.tokens(), expected)
    assert corpus[5] == expected[5] and np.array_equal(corpus[100:200], expected[100:200])

    block_size = 97  # blocks straddle shard boundaries
    blocks = BlockDataset(corpus_dir, block_size)
    assert len(blocks) == len(expected) // block_size  # the remainder is dropped
    for index in (0, 1, len(blocks) // 2, len(blocks) - 1):
        block = blocks[index]
        assert block.dtype == np.int64 and len(block) == block_size
        assert np.array_equal(block, expected[index * block_size : (index + 1) * block_size])
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    with pytest.raises(ChlaError, match="fewer than one block"):
        BlockDataset(corpus_dir, corpus.num_tokens + 1)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ChlaError, match="manifest.json not found"):
        TokenCorpus(tmp_path)


def test_split_is_seeded_disjoint_and_sized():
    train, valid = split_indices(1000, valid_fraction=0.05, seed=7)
    assert len(valid) == 50 and len(train) == 950
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(range(1000))
    again = split_indices(1000, valid_fraction=0.05, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(valid, again[1])
    assert not np.array_equal(valid, split_indices(1000, valid_fraction=0.05, seed=8)[1])
    assert len(split_indices(1000, valid_count=3)[1]) == 3
    assert len(split_indices(100, valid_fraction=0.001)[1]) == 1  # never silently empty
    with pytest.raises(ChlaError):
        split_indices(10, valid_count=10)


def test_resumed_sampler_yields_exactly_the_remaining_samples():
    indices = np.arange(100, 137)  # 37 items: epochs do not align with batches
    uninterrupted = ResumableSampler(indices, seed=3).take(200)
    # Every epoch is a permutation of the items, and epochs differ.
    assert sorted(uninterrupted[:37]) == list(indices) and sorted(uninterrupted[37:74]) == list(indices)
    assert not np.array_equal(uninterrupted[:37], uninterrupted[37:74])

    first = ResumableSampler(indices, seed=3)
    seen = first.take(83)
    state = first.state_dict()
    assert state == {"epoch": 2, "position": 9, "seed": 3}
    resumed = ResumableSampler(indices, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    assert np.array_equal(np.concatenate([seen, resumed.take(117)]), uninterrupted)
    assert np.array_equal(ResumableSampler(indices, shuffle=False).take(40), np.concatenate([indices, indices[:3]]))


def test_ranks_share_each_global_batch_and_resume_across_world_sizes():
    indices = np.arange(50)
    global_batch = 8
    single = ResumableSampler(indices, seed=1).take(10 * global_batch).reshape(10, global_batch)
    ranks = [ResumableSampler(indices, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(6):
        together = np.concatenate([rank.take(global_batch // 2) for rank in ranks])
        assert sorted(together) == sorted(single[step])
    # Resume the 2-rank run on 4 ranks: the remaining global batches are still the same sets.
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    four = [ResumableSampler(indices, seed=0, rank=r, world_size=4) for r in range(4)]
    for sampler in four:
        sampler.load_state_dict(state)
    for step in range(6, 10):
        together = np.concatenate([rank.take(global_batch // 4) for rank in four])
        assert sorted(together) == sorted(single[step])


def test_drop_last_keeps_batches_inside_an_epoch():
    sampler = ResumableSampler(np.arange(10), seed=0, drop_last=True, global_batch_size=4)
    first_epoch = sampler.take(8)
    assert len(set(first_epoch)) == 8 and sampler.state_dict() == {"epoch": 1, "position": 0, "seed": 0}


def test_length_grouped_batches_pad_less_and_resume_exactly():
    rng = np.random.default_rng(0)
    indices = np.arange(1000, 1640)
    lengths = rng.integers(5, 300, size=len(indices))
    length_of = dict(zip(indices.tolist(), lengths.tolist()))
    global_batch = 16

    def padded_tokens(order):
        batches = order[: len(order) // global_batch * global_batch].reshape(-1, global_batch)
        return sum(max(length_of[int(i)] for i in batch) * global_batch for batch in batches)

    plain = ResumableSampler(indices, seed=5, global_batch_size=global_batch).take(len(indices))
    grouped_sampler = ResumableSampler(
        indices, seed=5, global_batch_size=global_batch, lengths=lengths, length_group=8 * global_batch
    )
    grouped = grouped_sampler.take(len(indices))
    assert sorted(grouped) == sorted(indices)  # still every item once per epoch
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    # Batches are not ordered long to short across a group (a decaying LR would see only short ones).
    maxima = [max(length_of[int(i)] for i in batch) for batch in grouped[: 8 * global_batch].reshape(8, -1)]
    assert maxima != sorted(maxima, reverse=True)
    # A new epoch is a new grouping; resuming mid-epoch continues exactly; two ranks share batches.
    second_epoch = grouped_sampler.take(len(indices))
    assert not np.array_equal(second_epoch, grouped)
    first = ResumableSampler(
        indices, seed=5, global_batch_size=global_batch, lengths=lengths, length_group=8 * global_batch
    )
    head = first.take(700)
    resumed = ResumableSampler(
        indices, seed=5, global_batch_size=global_batch, lengths=lengths, length_group=8 * global_batch
    )
    resumed.load_state_dict(first.state_dict())
    assert np.array_equal(np.concatenate([head, resumed.take(580)]), np.concatenate([grouped, second_epoch]))
    ranks = [
        ResumableSampler(
            indices,
            seed=5,
            rank=r,
            world_size=2,
            global_batch_size=global_batch,
            lengths=lengths,
            length_group=8 * global_batch,
        )
        for r in range(2)
    ]
    together = np.concatenate([rank.take(global_batch // 2) for rank in ranks])
    assert sorted(together) == sorted(grouped[:global_batch])


# --- weighted blends ---------------------------------------------------------------------------


def _blend(weights, num_samples, seed=5, sizes=(40, 13, 7)):
    from chla_tools.blocks import BlendSource, WeightedBlend

    # item values say where they come from: source s, item i -> 1000 * s + i
    sources = [
        BlendSource(f"s{s}", np.arange(size) + 1000 * s, np.arange(size), w)
        for s, (size, w) in enumerate(zip(sizes, weights))
    ]
    return WeightedBlend(sources, num_samples, seed=seed)


def test_blend_keeps_every_prefix_within_one_sample_of_the_weights():
    weights = np.array([0.62, 0.27, 0.11])
    blend = _blend(weights, 500)
    items = np.array([blend[k] for k in range(len(blend))])
    source = items // 1000
    for k in range(1, len(items) + 1):
        counts = np.bincount(source[:k], minlength=3)
        assert np.all(np.abs(counts - weights * k) < 1), (k, counts)
    assert blend.counts() == {"s0": 310, "s1": 135, "s2": 55}  # 500 x weights, exactly
    # Within a source, each pass draws every item once, in a new seeded order.
    small = items[source == 2] - 2000
    assert sorted(small[:7]) == list(range(7)) and sorted(small[7:14]) == list(range(7))
    assert not np.array_equal(small[:7], small[7:14])
    assert not np.array_equal(items, [_blend(weights, 500, seed=6)[k] for k in range(500)])


def test_resumed_blend_yields_exactly_the_remaining_samples():
    """A run stopped at a saved position and resumed in a new process (the blend rebuilt from the
    recipe, the sampler from its saved state) reads exactly the samples it had not read."""
    weights, total = [0.85, 0.15, 0.05], 240
    uninterrupted = ResumableSampler(np.arange(total), shuffle=False)
    stream = [_blend(weights, total)[int(k)] for k in uninterrupted.take(total)]

    for world_size in (1, 2):
        blend = _blend(weights, total)
        ranks = [
            ResumableSampler(np.arange(total), shuffle=False, rank=r, world_size=world_size, global_batch_size=8)
            for r in range(world_size)
        ]
        seen = []
        for _ in range(11):  # 11 global batches of 8, then the job is preempted
            for rank in ranks:
                seen += [blend[int(k)] for k in rank.take(8 // world_size)]
        state = ranks[0].state_dict()
        assert all(rank.state_dict() == state for rank in ranks)

        rebuilt = _blend(weights, total)
        resumed = [
            ResumableSampler(np.arange(total), shuffle=False, rank=r, world_size=world_size, global_batch_size=8)
            for r in range(world_size)
        ]
        for rank in resumed:
            rank.load_state_dict(state)
        rest = []
        for _ in range((total - len(seen)) // 8):
            for rank in resumed:
                rest += [rebuilt[int(k)] for k in rank.take(8 // world_size)]
        assert sorted(seen + rest) == sorted(stream)
        assert sorted(rest) == sorted(stream[len(seen) :])  # exactly the unread samples
        if world_size == 1:
            assert seen + rest == stream
        # Control: resuming from another saved position reads other samples.
        early = ResumableSampler(np.arange(total), shuffle=False)
        early.load_state_dict({"epoch": 0, "position": 80, "seed": 0})
        assert [rebuilt[int(k)] for k in early.take(len(rest))] != rest

"""The length-bucketed batch sampler: every post once per epoch, batches of similar lengths,
an order fixed by (seed, epoch), and accelerate's sharding over it as over a plain sampler."""

import numpy as np
import pytest
from accelerate.data_loader import BatchSamplerShard

from app.training.loop_parts import LengthBucketSampler


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short posts and a long tail, like tweets beside SMS and comments."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(4.3, 1.0, n), 1, 5000)]


def padded_cells(batches: list[list[int]], lengths: list[int]) -> int:
    """What a batch costs when it pads to its longest post."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_each_epoch_is_every_index_once_in_full_batches_but_the_last() -> None:
    sampler = LengthBucketSampler(skewed_lengths(1003), 10, seed=3, bucket_batches=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 101
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert [len(b) for b in batches[:-1]] == [10] * 100 and len(batches[-1]) == 3


def test_order_depends_on_seed_and_epoch_only() -> None:
    lengths = skewed_lengths(300)
    first = LengthBucketSampler(lengths, 8, seed=1)
    again = LengthBucketSampler(lengths, 8, seed=1)
    assert list(first) == list(first) == list(again)  # iterating changes nothing
    first.set_epoch(1)
    assert list(first) != list(again)
    again.set_epoch(1)
    assert list(first) == list(again)
    assert list(LengthBucketSampler(lengths, 8, seed=2)) != list(
        LengthBucketSampler(lengths, 8, seed=1)
    )


def test_buckets_pad_far_less_than_random_batches() -> None:
    lengths = skewed_lengths(2000)
    bucketed = padded_cells(list(LengthBucketSampler(lengths, 32, seed=0)), lengths)
    order = np.random.default_rng(0).permutation(len(lengths)).tolist()
    shuffled = padded_cells([order[i : i + 32] for i in range(0, len(order), 32)], lengths)
    assert bucketed < 0.5 * shuffled


@pytest.mark.parametrize("n", [48, 50])  # a whole number of batches per rank, and not
def test_accelerate_shards_give_each_rank_its_own_batches_and_as_many(n: int) -> None:
    sampler = LengthBucketSampler(skewed_lengths(n), 4, seed=0)
    shards = [list(BatchSamplerShard(sampler, 2, rank)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(BatchSamplerShard(sampler, 2, 0))
    assert all(len(b) == 4 for shard in shards for b in shard)  # even_batches tops up
    seen = [set(i for b in shard for i in b) for shard in shards]
    assert seen[0] | seen[1] == set(range(n))
    if n % 8 == 0:
        assert not seen[0] & seen[1]

"""Sharding batch scoring across the processes of `accelerate launch` (or torchrun).

`radar teach`, `radar evaluate` and `radar calibrate` are one pass of a router over a data
file: the part that grows with the data. Under `accelerate launch` each process scores one
contiguous slice of the records and the main process merges the slices in input order, so the
output is the one a single process writes (the path for 1.7 M posts and several devices).

Slices fall on whole batches: a post is scored in the same batch as in a single process. Scores
depend on the batch a post was computed in (padding, in the last float bits), so this is what
makes 1 and N processes give the same bytes, not just close scores.

The launch is read from `WORLD_SIZE` / `RANK` / `LOCAL_RANK`, which torchrun sets for every
process (`accelerate launch` starts several processes through it); unset, it is one process.
A process group is created (through accelerate's `PartialState`) only when scores are gathered.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class ShardDone(SystemExit):
    """Raised on a non-main process once its slice is handed to the main process.

    A `SystemExit` with status 0: the process has nothing left to do, and the caller's own
    code after the scoring (measuring, writing the report or the thresholds file) must run on
    the main process only. Ending the process here enforces that for every caller without
    each of them knowing it was sharded; a caller that wants to go on can catch it.
    """

    def __init__(self, rank: int) -> None:
        super().__init__(0)
        self.rank = rank


@dataclass(frozen=True)
class Shard:
    """This process's place in the launch: `rank` of `world` processes (0 of 1 alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} of {self.world} processes")

    @property
    def sharded(self) -> bool:
        """Several processes share the work."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """The process that merges the slices and writes the output."""
        return self.rank == 0

    def span(self, n: int, batch_size: int) -> range:
        """The records this process scores (see `spans`)."""
        return spans(n, batch_size, self.world)[self.rank]

    def device(self, device: torch.device | str) -> torch.device:
        """`device` for this process: an unnumbered CUDA device is this process's own GPU.

        Without it every process of a multi-GPU launch would run on `cuda:0`.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and self.sharded:
            return torch.device("cuda", self.local_rank)
        return device


def spans(n: int, batch_size: int, world: int) -> list[range]:
    """Each process's contiguous slice of `n` records, in rank order, on whole batches.

    The `ceil(n / batch_size)` batches of a single process are split as evenly as whole
    batches allow (the last process may get a partial last batch; with more processes than
    batches, some get none). The slices tile `range(n)` in order.
    """
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch_size {batch_size} and world {world} must be at least 1")
    batches = -(-n // batch_size)
    bounds = [min(batches * rank // world * batch_size, n) for rank in range(world + 1)]
    return [range(bounds[rank], bounds[rank + 1]) for rank in range(world)]


def current_shard() -> Shard:
    """This process's `Shard`, from the variables torchrun sets (0 of 1 when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return Shard(rank=rank, world=world, local_rank=local)


def gather_in_rank_order(shard: Shard, value: Any, *, cpu: bool) -> list[Any]:
    """Every process's `value` (picklable), in rank order, on every process.

    A collective: every process of the launch must call it, the same number of times. `cpu`
    picks gloo for the process group (else the accelerator's backend, e.g. NCCL); gloo is
    what a CPU-only launch has. Alone, it is `[value]` and creates no process group.
    """
    if not shard.sharded:
        return [value]
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=cpu)
    if state.num_processes != shard.world or state.process_index != shard.rank:
        raise RuntimeError(
            f"the launch says rank {shard.rank} of {shard.world}, the process group "
            f"{state.process_index} of {state.num_processes}"
        )
    gathered: Sequence[Any] = gather_object([value])
    return list(gathered)

"""Evaluation work split across the ranks of a multi-process run, with the results gathered on every rank.

Work comes in batches (the batches a single process would run, in its order). Batch `i` goes to rank `i mod N`, so
each batch holds the same items, padded together, as in a 1-process run, and the gathered results equal that run's.
When the model is sharded (FSDP2 `DTensor`s, ZeRO-3 partitions) every forward is a collective, so the ranks must run
in lockstep: a rank with fewer batches runs one of them again (its result dropped) until every rank has made the same
number of calls. `RankSplit()` (one rank) runs everything and gathers nothing.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class RankSplit:
    """This process's rank and the number of ranks that share the work."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "RankSplit":
        """The default process group's rank and size (one rank when no group is initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def schedule(self, num_batches: int, lockstep: bool) -> list[tuple[int, bool]]:
        """The batches this rank runs, as (batch index, keep the result); with `lockstep` every rank gets the same
        number of entries, the extra ones a repeat whose result is not kept."""
        mine = list(range(self.rank, num_batches, self.world))
        schedule = [(index, True) for index in mine]
        if lockstep and self.world > 1:
            rounds = -(-num_batches // self.world)
            schedule += [(mine[0] if mine else 0, False)] * (rounds - len(mine))
        return schedule

    def gather(self, results: dict[int, object]) -> dict[int, object]:
        """Every rank's {batch index: result}, merged, on every rank."""
        if self.world == 1:
            return results
        everyone: list[dict | None] = [None] * self.world
        dist.all_gather_object(everyone, results)
        return {index: result for part in everyone for index, result in part.items()}

    def map(self, num_batches: int, run: Callable[[int], object], lockstep: bool, progress=None) -> list:
        """`run(i)` for the batches `i < num_batches`, shared out; their results in batch order, on every rank.
        `progress` wraps this rank's own schedule (e.g. tqdm)."""
        schedule = self.schedule(num_batches, lockstep)
        done = {}
        for index, keep in progress(schedule) if progress else schedule:
            result = run(index)
            if keep:
                done[index] = result
        done = self.gather(done)
        return [done[index] for index in range(num_batches)]

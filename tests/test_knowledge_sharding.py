"""`knowledge.sharding`: how the ranks share generation batches, and why their answers equal one process's.

The 2-process runs themselves are in `test_distributed_knowledge.py`; here, the schedule each rank follows and the
per-batch seeding of sampled generation, on one process.
"""

import pytest
import torch
from conftest import tiny_model

from trl_selfdistill.knowledge import Generator
from trl_selfdistill.knowledge.sharding import RankSplit


@pytest.mark.parametrize("num_batches", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("world", [2, 3])
def test_every_batch_is_run_and_kept_by_exactly_one_rank(num_batches, world):
    for lockstep in (False, True):
        schedules = [RankSplit(rank, world).schedule(num_batches, lockstep) for rank in range(world)]
        kept = sorted(index for schedule in schedules for index, keep in schedule if keep)
        assert kept == list(range(num_batches))  # each batch once, on the rank `index mod world`
        assert all(index % world == rank for rank, schedule in enumerate(schedules) for index, keep in schedule
                   if keep)
        if lockstep:  # a sharded model: every rank makes the same number of calls, the extra ones repeats
            assert len({len(schedule) for schedule in schedules}) == 1
            assert all(0 <= index < max(num_batches, 1) for schedule in schedules for index, _ in schedule)


def test_one_rank_runs_everything_and_gathers_nothing():
    calls = []
    assert RankSplit().map(3, lambda i: calls.append(i) or i * 10, lockstep=True) == [0, 10, 20]
    assert calls == [0, 1, 2]


def test_sampled_answers_depend_on_the_batch_not_on_what_ran_before(tokenizer):
    """A rank that never ran batch 0 must sample batch 1 as one process does: each sampled batch is seeded from the
    generator's seed and its index, whatever the global random state, which is left as it was."""
    prompts = [f"Q: What is the capital of {c}?\nA:" for c in ("France", "Peru", "Chile", "Kenya", "Cuba", "Laos")]
    generate = Generator(tiny_model(), tokenizer, batch_size=4, max_new_tokens=4, progress=False, seed=3,
                         temperature=1.5)
    torch.manual_seed(123)
    first = generate(prompts, greedy=False, num_samples=2)
    torch.manual_seed(999)
    state = torch.random.get_rng_state()
    again = generate(prompts, greedy=False, num_samples=2)
    assert again == first
    assert torch.equal(torch.random.get_rng_state(), state)  # the training's random state is untouched
    other_seed = Generator(tiny_model(), tokenizer, batch_size=4, max_new_tokens=4, progress=False, seed=4,
                           temperature=1.5)(prompts, greedy=False, num_samples=2)
    assert other_seed != first  # the samples do come from the seed

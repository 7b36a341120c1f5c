"""`knowledge.stats`: intervals, paired differences and matched-plasticity readings, against direct computations."""

import math
import random

import pytest

from trl_selfdistill.knowledge.stats import (
    bootstrap,
    discordant,
    mean_interval,
    percentile,
    reading_at,
    relative_forgetting,
    sign_test,
    student_t_quantile,
)


def test_relative_forgetting_is_the_relative_drop_over_the_chosen_facts():
    start, end = [1, 1, 1, 1, 0], [1, 0, 1, 0, 1]
    assert relative_forgetting(start, end) == pytest.approx(1 - 3 / 4)
    assert relative_forgetting(start, end, [0, 1, 1]) == pytest.approx(1 - 1 / 3)  # a resample repeats facts
    assert relative_forgetting([0, 0], [1, 1]) is None  # S knows none of them: undefined, not 0


@pytest.mark.parametrize("dof, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_student_t_quantiles_match_the_textbook_table(dof, expected):
    assert student_t_quantile(0.975, dof) == pytest.approx(expected, abs=1e-3)


def test_mean_interval_is_mean_plus_minus_t_times_standard_error():
    values = [0.1, 0.2, 0.4]
    cell = mean_interval(values)
    sd = math.sqrt(sum((v - 0.7 / 3) ** 2 for v in values) / 2)
    assert cell["mean"] == pytest.approx(0.7 / 3)
    assert cell["high"] - cell["mean"] == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
    assert mean_interval([0.3])["low"] is None and mean_interval([])["mean"] is None


def test_percentile_interpolates_between_order_statistics():
    assert percentile([3, 1, 2, 4], 0.5) == 2.5 and percentile([5], 0.9) == 5
    assert percentile(list(range(101)), 0.025) == pytest.approx(2.5)


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(2, 8) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 1024)
    assert sign_test(8, 2) == sign_test(2, 8)
    assert discordant([1, 1, 0, 0], [1, 0, 1, 0]) == (1, 1)


def test_reading_at_interpolates_at_the_first_crossing():
    points = [(0.1, 0.9), (0.5, 0.8), (0.9, 0.6), (0.7, 0.5), (1.0, 0.4)]
    assert reading_at(points, 0.7) == pytest.approx(0.8 + (0.6 - 0.8) * (0.7 - 0.5) / (0.9 - 0.5))
    assert reading_at(points, 0.9) == 0.6  # an evaluation exactly at the target
    assert reading_at(points, 0.05) == 0.9  # reached at the first evaluation
    assert reading_at(points[:3], 0.95) is None  # never reached


def test_bootstrap_of_a_constant_statistic_has_a_zero_width_interval():
    cell = bootstrap([5, 5, 5], lambda s, idx: 0.25, resamples=50)
    assert cell == {"mean": 0.25, "low": 0.25, "high": 0.25, "seeds": 3}


def test_bootstrap_interval_covers_a_known_mean_and_narrows_with_more_facts():
    rng = random.Random(0)
    widths = []
    for n in (50, 800):
        data = [[int(rng.random() < 0.3) for _ in range(n)] for _ in range(4)]
        cell = bootstrap([n] * 4, lambda s, idx, data=data: sum(data[s][i] for i in idx) / len(idx), resamples=400)
        assert cell["low"] <= cell["mean"] <= cell["high"]
        assert cell["low"] < 0.3 < cell["high"]
        widths.append(cell["high"] - cell["low"])
    assert widths[1] < widths[0] / 2


def test_bootstrap_keeps_differences_paired_on_the_same_facts():
    """Two methods that differ on exactly the same 10 of 100 facts in every seed: every resample of the paired
    difference is positive, while the unpaired accuracies overlap."""
    rng = random.Random(1)
    start = [[1] * 100 for _ in range(3)]
    sft = [[int(rng.random() < 0.7) for _ in range(100)] for _ in range(3)]
    better = [list(row) for row in sft]
    for row in better:
        for i in [i for i, ok in enumerate(row) if not ok][:10]:
            row[i] = 1

    def difference(s, idx):
        return relative_forgetting(start[s], sft[s], idx) - relative_forgetting(start[s], better[s], idx)

    cell = bootstrap([100] * 3, difference, resamples=300)
    assert cell["mean"] == pytest.approx(0.10)
    assert cell["low"] > 0

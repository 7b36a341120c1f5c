"""Statistics of a multi-seed forgetting study: intervals, paired differences, and readings at matched plasticity.

A study runs every method on the same seeds; within a seed all methods share the splits, the snapshot S and the
evaluation, so each held-out fact is scored once by S (step 0) and once by each method at the end. With
`start[s]` and `end[s][m]` the per-fact correctness (0/1) of seed s:

- **Relative forgetting** of method m on facts I: F_m(I) = 1 − Σ_I end[m] / Σ_I start, i.e. the relative drop of
  held-out Known accuracy from the snapshot. All methods of a seed share the denominator, so the paired difference
  F_a − F_b = (Σ_I end[b] − Σ_I end[a]) / Σ_I start compares the same facts.
- **Intervals** (`bootstrap`): a two-level bootstrap that resamples seeds with replacement, then held-out facts with
  replacement within each drawn seed (the same facts for every method of that seed, which keeps differences paired),
  and averages the statistic over the drawn seeds; the 95% interval is the 2.5th–97.5th percentile of `resamples`
  draws. It carries both sources of noise: seed (splits, snapshot, data order) and the finite held-out set.
- **Per-fact paired test** (`sign_test`): over all seeds, the facts one method keeps and the other loses (discordant
  pairs, b and c) decide an exact two-sided binomial (McNemar) test of b = c.
- **Matched plasticity** (`reading_at`): along one run's evaluations (new-fact accuracy x, held-out accuracy y), y is
  linearly interpolated at the first point where x reaches the target; a run that never reaches it reads None.
"""

import math
import random
from collections.abc import Callable, Sequence

Correct = Sequence[bool]


def relative_forgetting(start: Correct, end: Correct, indices: Sequence[int] | None = None) -> float | None:
    """1 − Σ end / Σ start over `indices` (all facts when None); None when S answers none of them."""
    indices = range(len(start)) if indices is None else indices
    known = sum(start[i] for i in indices)
    return None if known == 0 else 1 - sum(end[i] for i in indices) / known


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) of `values`, linearly interpolated between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bootstrap(
    sizes: Sequence[int],
    statistic: Callable[[int, Sequence[int]], float | None],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """
    Point estimate and two-level bootstrap interval of the mean over seeds of `statistic(seed_index, fact_indices)`.
    `sizes[s]` is the number of facts of seed s. Seeds whose statistic is None are left out of that draw's mean.
    Returns {"mean", "low", "high", "seeds"}; with one seed the interval covers the fact resampling only.
    """
    if not sizes:
        raise ValueError("No seeds to summarise.")

    def mean_over(draw):
        values = [v for v in (statistic(s, idx) for s, idx in draw) if v is not None]
        return sum(values) / len(values) if values else None

    point = mean_over([(s, range(n)) for s, n in enumerate(sizes)])
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        seeds = [rng.randrange(len(sizes)) for _ in sizes] if len(sizes) > 1 else [0]
        value = mean_over([(s, [rng.randrange(sizes[s]) for _ in range(sizes[s])]) for s in seeds])
        if value is not None:
            draws.append(value)
    tail = (1 - confidence) / 2
    low, high = (percentile(draws, tail), percentile(draws, 1 - tail)) if draws else (None, None)
    return {"mean": point, "low": low, "high": high, "seeds": len(sizes)}


def sign_test(b: int, c: int) -> float:
    """Exact two-sided binomial p-value of b successes in b + c trials at p = 1/2 (McNemar's exact test)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def discordant(a_end: Correct, b_end: Correct) -> tuple[int, int]:
    """(facts a answers and b does not, facts b answers and a does not)."""
    return (
        sum(x and not y for x, y in zip(a_end, b_end, strict=True)),
        sum(y and not x for x, y in zip(a_end, b_end, strict=True)),
    )


def reading_at(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """
    y at the first crossing of x = `target` along `points` [(x, y), ...] in training order, linearly interpolated
    between the two evaluations around it (exactly y where an evaluation hits the target); None if x never reaches it.
    """
    previous = None
    for x, y in points:
        if x >= target:
            if previous is None or x == previous[0]:
                return y
            (x0, y0) = previous
            if x0 >= target:
                return y0
            return y0 + (y - y0) * (target - x0) / (x - x0)
        previous = (x, y)
    return None


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean and Student-t interval of `values` (one per seed); the interval is None with fewer than two values."""
    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def student_t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t with `dof` degrees of freedom (bisection on the regularized incomplete beta)."""
    low, high = 0.0, 1000.0
    for _ in range(200):
        mid = (low + high) / 2
        if _t_cdf(mid, dof) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _t_cdf(t: float, dof: int) -> float:
    x = dof / (dof + t * t)
    return 1 - 0.5 * _betainc(dof / 2, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return front * h / a

"""95% intervals for task scores measured on a sample of a test set.

Every task's metric is a function of counts summed over items (correct/items, tp/fp/fn, summed
ROUGE-L), so one method serves all: the percentile bootstrap over items, resampling the items'
count vectors with replacement and recomputing the metric from their sums. It needs no formula
per metric (micro-averaged F1 has none that is simple) and for an accuracy it agrees with the
Wilson interval to about a point at the demo's sample sizes. Seeded: the same items give the same
interval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

RESAMPLES = 2000
SEED = 0


def bootstrap_interval(
    item_counts: Sequence[Mapping[str, float]],
    metric: Callable[[Mapping[str, float]], float],
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """The `level` percentile-bootstrap interval of `metric(summed counts)` over the items."""
    if not item_counts:
        raise ValueError("no items to take an interval over")
    keys = sorted({key for counts in item_counts for key in counts})
    table = np.array([[counts.get(key, 0.0) for key in keys] for counts in item_counts], dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(table), size=(resamples, len(table)))
    # one column at a time: resamples x items floats, not x keys as well
    sums = np.stack([column[draws].sum(axis=1) for column in table.T], axis=1)
    values = np.array([metric(dict(zip(keys, row))) for row in sums])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)

"""The one balancing rule of the project: contiguous runs of costs minimising the largest run.

Both the pipeline cut (segments of local stages) and the default split of a model's blocks into K
local modules use it, so it lives apart from both: the methods cannot import the engines (the engines
run the methods' stages).
"""
from __future__ import annotations

from typing import Sequence


def min_max_split(costs: Sequence[float], parts: int) -> list[int]:
    """Start index of each of ``parts`` contiguous, non-empty runs of ``costs`` minimising the largest
    run sum (exact dynamic programme, O(parts·n²), n ≤ a few hundred).

    Among optimal splits the one with the latest boundaries is returned, a deterministic choice. The
    callers check ``1 <= parts <= len(costs)`` and non-negative costs with errors in their own words.
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest possible max run cost covering [0, i) with k runs.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    arg = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value <= best[k][i]:
                    best[k][i], arg[k][i] = value, j
    starts = []
    i = n
    for k in range(parts, 0, -1):
        i = arg[k][i]
        starts.append(i)
    return starts[::-1]

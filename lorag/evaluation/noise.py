"""The noise bound of a paired comparison: one rule for `lorag eval`'s verdicts and the promotion gate.

Two systems answer the same items; the per-item score differences have a mean and a 95% bound
of 1.96 standard errors. A difference inside the bound is noise at that sample size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_ITEMS = 5  # fewer paired items than this: no verdict either way
Z_95 = 1.96


def paired_difference(differences: Sequence[float]) -> tuple[float, float]:
    """(mean difference, its 95% margin); the margin is infinite below two items and 0 with no spread."""
    if not differences:
        return 0.0, math.inf
    mean = sum(differences) / len(differences)
    if len(differences) < 2:
        return mean, math.inf
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, Z_95 * math.sqrt(variance / len(differences))

"""The exact probabilities with which the policy shows each eligible candidate.

Serving samples from these and logs them; the off-policy evaluator recomputes them
for a model version's target policy; the simulator's logging policy uses them too.
One implementation, so the logged propensities and the evaluated policies agree.

For K candidates with expected values ``v`` and the default message at index ``d``::

    greedy  g = argmax(v)                 (first index on ties)
    epsilon π = (1-ε)·onehot(g) + ε/K
    softmax π = exp((v - max v)/T) / Σ exp((v - max v)/T)
    holdout p = (1-h)·π + h·onehot(d)     (when there is no default, h has no effect)

Non-finite values (NaN, ±inf) are never greedy; if every value is non-finite the
greedy mass goes to the default (or index 0).
"""

from __future__ import annotations

import bisect
import math
from typing import Literal

import numpy as np

Scheme = Literal["epsilon", "softmax"]


def action_probabilities(
    values: np.ndarray,
    *,
    epsilon: float = 0.0,
    scheme: str = "epsilon",
    temperature: float = 1.0,
    holdout: float = 0.0,
    default_index: int | None = None,
) -> np.ndarray:
    """Return a float64 vector of K probabilities summing to 1 (see the module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    k = v.shape[0]
    if k == 0:
        raise ValueError("no candidates")
    finite = np.isfinite(v)
    if scheme == "epsilon":
        p = np.full(k, epsilon / k)
        if finite.any():
            g = int(np.argmax(np.where(finite, v, -np.inf)))
        else:
            g = default_index if default_index is not None else 0
        p[g] += 1.0 - epsilon
    elif scheme == "softmax":
        if not finite.any():
            p = np.zeros(k)
            p[default_index if default_index is not None else 0] = 1.0
        else:
            z = np.where(finite, v, -np.inf)
            z = (z - z.max()) / temperature
            e = np.exp(z)
            p = e / e.sum()
    else:
        raise ValueError(f"unknown exploration scheme {scheme!r}")
    if holdout > 0.0 and default_index is not None:
        p *= 1.0 - holdout
        p[default_index] += holdout
    return p


def epsilon_probabilities_list(
    values: list[float], epsilon: float, holdout: float = 0.0, default_index: int | None = None
) -> list[float]:
    """:func:`action_probabilities` for the epsilon scheme on a short Python list, bit for bit the same result.

    The request path scores a handful of candidates; for K=8 a dozen NumPy calls on 8-element arrays
    cost more than the arithmetic. Same operations in the same order (IEEE 754 gives the same bits);
    ``tests/unit/test_exploration.py`` checks the two against each other.
    """
    k = len(values)
    if k == 0:
        raise ValueError("no candidates")
    g = -1
    best = -math.inf
    for i, x in enumerate(values):
        if math.isfinite(x) and (g < 0 or x > best):
            g, best = i, x
    if g < 0:
        g = default_index if default_index is not None else 0
    base = epsilon / k
    p = [base] * k
    p[g] = base + (1.0 - epsilon)
    if holdout > 0.0 and default_index is not None:
        keep = 1.0 - holdout
        p = [x * keep for x in p]
        p[default_index] = p[default_index] + holdout
    return p


def sample_list(probabilities: list[float], u: float) -> int:
    """:func:`sample` on a Python list (the same index for the same inputs)."""
    c: list[float] = []
    total = 0.0
    for x in probabilities:
        total += x
        c.append(total)
    return min(bisect.bisect_right(c, u * total), len(probabilities) - 1)


def sample(probabilities: np.ndarray, u: float) -> int:
    """Return the index drawn by inverse CDF for a uniform `u` in [0, 1)."""
    c = np.cumsum(probabilities)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    return min(i, len(probabilities) - 1)


def greedy_index(values: np.ndarray) -> int:
    """Return the index of the highest finite value (first on ties)."""
    v = np.asarray(values, dtype=np.float64)
    return int(np.argmax(np.where(np.isfinite(v), v, -np.inf)))

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

:class:`Exploration` holds ε, the scheme, T and h: the server's settings build it, and the
evaluator reads the same ``RETENTION_*`` variables (:meth:`Exploration.from_env`) so that its
target policy explores as serving does.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

Scheme = Literal["epsilon", "softmax"]
SCHEMES: tuple[str, ...] = ("epsilon", "softmax")


@dataclasses.dataclass(frozen=True)
class Exploration:
    """How the policy explores: ε (share, [0, 1]), scheme, softmax temperature T (value units, > 0), holdout h.

    The server's settings of the same meaning are ``RETENTION_EPSILON``, ``RETENTION_EXPLORATION``,
    ``RETENTION_TEMPERATURE`` and ``RETENTION_HOLDOUT`` (defaults here); the off-policy evaluator's target
    policy must use the same. Raises ValueError for a value out of range or an unknown scheme.
    """

    epsilon: float = 0.05
    scheme: str = "epsilon"
    temperature: float = 1.0
    holdout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be within [0, 1], not {self.epsilon}")
        if not 0.0 <= self.holdout <= 1.0:
            raise ValueError(f"holdout must be within [0, 1], not {self.holdout}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"exploration must be epsilon or softmax, not {self.scheme!r}")
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0")

    _VARIABLES = (
        ("epsilon", "RETENTION_EPSILON", float),
        ("scheme", "RETENTION_EXPLORATION", str),
        ("temperature", "RETENTION_TEMPERATURE", float),
        ("holdout", "RETENTION_HOLDOUT", float),
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Exploration:
        """Return the exploration a server started with these ``RETENTION_*`` variables uses (unset or empty: default).

        Raises ValueError naming the variable when a value is not a number or out of range.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable, kind in cls._VARIABLES:
            raw = env.get(variable)
            if raw:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{variable}: {raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-able data."""
        return dataclasses.asdict(self)

    def probabilities(self, values: np.ndarray, default_index: int | None) -> np.ndarray:
        """Return the (K,) action probabilities serving uses for K candidate values (:func:`action_probabilities`)."""
        return action_probabilities(
            values,
            epsilon=self.epsilon,
            scheme=self.scheme,
            temperature=self.temperature,
            holdout=self.holdout,
            default_index=default_index,
        )


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

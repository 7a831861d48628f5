"""Online experiments: which arm a subscriber is in, and the exact probability of the message shown.

A live experiment serves a *challenger* model version to a share ``S`` of subscribers and the
current version to the rest. Both serving and training use this module, so the arm a decision
was logged under and the probability the evaluator recomputes cannot drift apart.

Assignment is by subscriber, not by request: ``arm = challenger`` when the first 8 bytes of
``SHA-256(experiment_id ":" originalTransactionId)``, read as a big-endian integer and divided by
2**64, fall below ``S``. The same subscriber therefore stays in one arm for the whole experiment
(every request, every worker, every replica), and a new experiment id reshuffles everyone.

The logged propensity of the message shown is the exact mixture over the assignment::

    p(m | x) = (1 - S) · π_current(m | x) + S · π_challenger(m | x)

where each π is that arm's exploration distribution (``models.exploration``). The hash is
independent of the subscriber's outcome, so over subscribers it acts as a coin with bias ``S``
and the mixture is the logging policy's probability: the experiment's decisions stay valid for
off-policy evaluation of any later model (Dudík, Langford and Li, "Doubly Robust Policy
Evaluation and Learning", ICML 2011, need only the logging probability of the action taken).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Arm = Literal["current", "challenger"]
ARMS: tuple[Arm, Arm] = ("current", "challenger")
EXPERIMENT_FILE = "experiment.json"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ExperimentError(ValueError):
    """An experiment definition that cannot be used (the message says which field and why)."""


def bucket(experiment_id: str, original_transaction_id: str) -> float:
    """Return the subscriber's position in [0, 1) for this experiment (stable, uniform over ids)."""
    digest = hashlib.sha256(f"{experiment_id}:{original_transaction_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 18446744073709551616.0  # 2**64


def assign_arm(experiment_id: str, original_transaction_id: str, share: float) -> Arm:
    """Return ``"challenger"`` for a ``share`` of subscribers (by stable hash), else ``"current"``."""
    return "challenger" if bucket(experiment_id, original_transaction_id) < share else "current"


def mixture_probabilities(current: Sequence[float], challenger: Sequence[float], share: float) -> list[float]:
    """Return ``(1 - share)·current + share·challenger`` element by element (K floats summing to 1).

    Raises ValueError when the two vectors differ in length (both arms must score the same candidates).
    """
    if len(current) != len(challenger):
        raise ValueError(f"the arms scored {len(current)} and {len(challenger)} candidates")
    keep = 1.0 - share
    return [keep * a + share * b for a, b in zip(current, challenger, strict=True)]


@dataclass(frozen=True)
class Experiment:
    """A live experiment as the fleet reads it from ``<registry>/experiment.json``.

    ``experiment_id``: a short name (letters, digits, ``.``, ``_``, ``-``; at most 64) that also salts
    the assignment hash. ``challenger``: a model version of the same registry. ``share``: the
    fraction of subscribers in the challenger arm, in (0, 1). ``active``: False once stopped (the
    file stays, so status can still name the last experiment). ``started_at_ms``: when it started.
    """

    experiment_id: str
    challenger: str
    share: float
    active: bool = True
    started_at_ms: int = 0

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.experiment_id):
            raise ExperimentError(
                f"experiment id {self.experiment_id!r}: use 1-64 letters, digits, '.', '_' or '-'"
            )
        if not self.challenger:
            raise ExperimentError("the experiment names no challenger version")
        if not (0.0 < float(self.share) < 1.0):
            raise ExperimentError(f"challenger share {self.share!r}: must be strictly between 0 and 1")

    def arm_of(self, original_transaction_id: str) -> Arm:
        """Return the arm of one subscriber (see :func:`assign_arm`)."""
        return assign_arm(self.experiment_id, original_transaction_id, self.share)

    def to_json(self) -> bytes:
        """Return the file's bytes (UTF-8 JSON, keys sorted)."""
        return (json.dumps(asdict(self), sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str = EXPERIMENT_FILE) -> Experiment:
        """Parse the file's bytes; raises ExperimentError naming `where` when they are not an experiment."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            fields: dict[str, type | tuple[type, ...]] = {
                "experiment_id": str, "challenger": str, "share": (int, float), "active": bool, "started_at_ms": int,
            }
            for name, kind in fields.items():
                if name in raw and (not isinstance(raw[name], kind) or (kind is int and isinstance(raw[name], bool))
                                    or (name == "share" and isinstance(raw[name], bool))):
                    raise TypeError(f"{name} is {type(raw[name]).__name__} {raw[name]!r}")
            return cls(
                experiment_id=raw["experiment_id"],
                challenger=raw["challenger"],
                share=float(raw["share"]),
                active=raw.get("active", True),
                started_at_ms=raw.get("started_at_ms", 0),
            )
        except ExperimentError as exc:
            raise ExperimentError(f"{where}: {exc}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise ExperimentError(f"{where}: not an experiment definition ({type(exc).__name__}: {exc})") from None


def read_experiment(registry_root: str | Path) -> Experiment | None:
    """Return the registry's experiment (active or stopped), or None when it has none.

    Raises ExperimentError when the file exists but cannot be used.
    """
    path = Path(registry_root) / EXPERIMENT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ExperimentError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return Experiment.from_json(data, str(path))


def write_experiment(registry_root: str | Path, experiment: Experiment) -> Path:
    """Write the experiment atomically (as the registry writes its current pointer) and return its path."""
    from models.registry import _write_atomic

    path = Path(registry_root) / EXPERIMENT_FILE
    _write_atomic(path, experiment.to_json())
    return path

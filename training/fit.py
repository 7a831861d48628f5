"""Fitting P(stay | context, message), exporting it to ONNX, and checking the two agree.

Models:
- ``hgb`` (default): HistGradientBoostingClassifier on the featurizer's one-hot/numeric
  columns (never its native categorical support: skl2onnx scores that wrongly);
- ``logreg``: StandardScaler + LogisticRegression, for a linear baseline.

A held-out share of the labelled rows (10%, at most 100k) is never fitted by the base
model; it serves four purposes at once: early stopping of the boosting (``X_val``, rather
than HistGradientBoosting carving another 10% out of the fitted rows), fitting the sigmoid
(Platt) calibration on top of the frozen base model, the held-out metrics and the parity
check. One base fit instead of the k+1 fits of cross-validated calibration keeps 1M
decisions within minutes, and the trees see 90% of the labelled rows instead of about 70%.
Below 2,000 rows the sigmoid is cross-validated instead. The sigmoid converts to ONNX exactly; isotonic calibration does not. Two conversion traps
found here and avoided: a Pipeline *inside* CalibratedClassifierCV converts to a wrong
graph (probabilities off by up to 0.5), so the scaler sits outside the calibrator; and the
calibrator must hold the bare fitted estimator, not its FrozenEstimator wrapper, for
skl2onnx to recognise it.

The ONNX graph takes float32 rows (the featurizer's dtype on both sides) and has
outputs ``label`` and ``probabilities`` (zipmap off).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# OpenMP threads that spin while waiting collapse when the 2 cores are shared with other
# processes: HistGradientBoosting fits measured 6x slower with 2 spinning threads than with
# 1 on a busy machine, and no slower than 1 with passive waiting. Must be set before sklearn
# loads the OpenMP runtime; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd

MODELS: tuple[str, ...] = ("hgb", "logreg")
TARGET_OPSET = 17  # ai.onnx opset 17 runs on onnxruntime 1.31 and on older runtimes a deployment may have
PARITY_TOLERANCE = 1e-5
SMALL_DATA_ROWS = 2000  # below this, calibrate by cross-validation rather than on a held-out share
HELDOUT_FRACTION = 0.1  # share of labelled rows the base model never fits: early stopping, sigmoid, metrics, parity
HELDOUT_CAP = 100_000
#: Two values P × (V − cost) closer than this share of their size are a tie that float32 may break either way:
#: ONNX Runtime computes P in float32 (rounding alone moves P by ~6e-8 relative, the trees' float32 sums by a
#: few times that), so 1e-5 (about 80 float32 ulps) of the values compared covers both, whatever their scale
#: (an absolute margin was too small for values near 150 and too large for values near 0.01).
TIE_RELATIVE = 1e-5

HGB_DEFAULTS: dict[str, Any] = {
    "learning_rate": 0.08,
    "max_iter": 400,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
    "early_stopping": True,
    "n_iter_no_change": 20,
}
LOGREG_DEFAULTS: dict[str, Any] = {"C": 1.0, "max_iter": 2000}


@dataclass(frozen=True)
class ModelChoice:
    """One model family and setting that :func:`select_model` may choose."""

    name: str
    model: str = "hgb"
    params: dict[str, Any] = field(default_factory=dict)


# The candidates of the cross-validated choice: which one wins on given data is what the held-out policy
# value says. (A message-only model used to be one of them, for data too few to learn who responds to
# what; the message factors of credibility_factors and the baseline of fit_baseline now keep the policy
# to what the logs back instead.)
MODEL_CHOICES: tuple[ModelChoice, ...] = (
    ModelChoice("hgb"),
    ModelChoice("hgb-plain", params={"learning_rate": 0.1, "max_iter": 100, "max_leaf_nodes": 31,
                                     "min_samples_leaf": 20, "l2_regularization": 0.0, "early_stopping": True,
                                     "n_iter_no_change": 10}),
    ModelChoice("hgb-smooth", params={"learning_rate": 0.05, "max_iter": 600, "max_leaf_nodes": 15,
                                      "min_samples_leaf": 200, "l2_regularization": 5.0, "early_stopping": True,
                                      "n_iter_no_change": 30}),
)
# The policy acts on a pessimistic value D − c·SE²/|D| of each message (credibility_factors): a penalty of c times
# the squared relative standard error, so it fades as 1/n with more data (the lower bound D − 1·SE fades as 1/√n,
# and cost up to 0.08 of the gap at 200,000 decisions on some worlds). Measured on the Apple-sized presets
# (BENCHMARKS.md, issue 16).
CREDIBILITY_C = 2.0
# A message whose pessimistic value is not above zero keeps this share of its doubly robust mean: it is chosen
# only where no message has credible value, and then the one the logs say earns most.
CREDIBILITY_FLOOR = 1e-3
# The logging policy's own choice (fit_baseline): a decision whose shown message had at least this
# probability showed it; at least this many such decisions, else no baseline.
BASELINE_MIN_PROPENSITY = 0.5
BASELINE_MIN_DECISIONS = 1000
BASELINE_MIN_SHOWN = 30  # a message the logging policy chose fewer times than this keeps its own factor
BASELINE_MAX_DECISIONS = 50_000  # the newest decisions: the logging policy as it acted most recently
SELECTION_FOLDS = 3
SELECTION_MAX_ROWS = 30_000
SELECTION_MARGIN_SE = 1.0  # a later choice replaces the first only if it wins by this many standard errors


@dataclass
class FitInfo:
    """What a fit did: model kind, parameters, rows used, seconds spent."""

    model: str
    params: dict[str, Any]
    calibration: str
    rows_fit: int
    rows_calibration: int
    n_iter: int | None = None
    seconds: float = 0.0
    selection: dict[str, Any] | None = None  # the cross-validated choice (select_model), when one was made
    credibility: dict[str, Any] | None = None  # the per-message factors (credibility_factors) and their evidence
    # positions of the rows the base model never fitted (calibration, early stopping): the held-out share
    heldout_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the info as JSON-able data (the manifest's hyperparameters)."""
        d = asdict(self)
        d.pop("heldout_index")
        return d


def split_heldout(n: int, seed: int = 0, fraction: float = HELDOUT_FRACTION, cap: int = HELDOUT_CAP) -> np.ndarray:
    """Return the sorted positions of the held-out share of `n` rows (empty below SMALL_DATA_ROWS)."""
    if n < SMALL_DATA_ROWS:
        return np.zeros(0, dtype=np.int64)
    k = min(round(n * fraction), cap)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


@dataclass
class ParityResult:
    """How far ONNX Runtime's probabilities are from sklearn's, and whether the greedy choices agree."""

    rows: int
    requests: int
    requests_compared: int
    max_abs_diff: float
    choice_mismatches: int
    tolerance: float = PARITY_TOLERANCE
    tie_margin: float = TIE_RELATIVE  # relative: a share of |best| + |second best|
    mismatched_requests: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Return True when both checks hold."""
        return self.max_abs_diff <= self.tolerance and self.choice_mismatches == 0

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-able data (the manifest's parity entry)."""
        d = asdict(self)
        d["passed"] = self.passed
        d["mismatched_requests"] = d["mismatched_requests"][:10]
        return d


def fit_model(
    X: np.ndarray,
    y: np.ndarray,
    *,
    model: str = "hgb",
    seed: int = 0,
    params: dict[str, Any] | None = None,
    heldout_index: np.ndarray | None = None,
) -> tuple[Any, FitInfo]:
    """Return (calibrated estimator with predict_proba, FitInfo) fitted on float32 rows `X` and 0/1 labels `y`.

    The base model fits every row except the held-out share (`heldout_index`, default
    :func:`split_heldout`); that share stops the boosting early and fits the sigmoid.
    With fewer than SMALL_DATA_ROWS rows there is no held-out share: the sigmoid is
    cross-validated and the base model refitted on every row.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
    y = np.asarray(y, dtype=np.int64)
    X = np.asarray(X, dtype=np.float32)
    t0 = time.perf_counter()
    n = len(y)
    minority = int(min(np.sum(y == 0), np.sum(y == 1)))
    if minority < 2:
        raise ValueError(f"too few rows of one outcome to learn from ({minority} of {n})")
    held = split_heldout(n, seed) if heldout_index is None else np.asarray(heldout_index, dtype=np.int64)
    small = len(held) == 0
    p = {**(HGB_DEFAULTS if model == "hgb" else LOGREG_DEFAULTS), **(params or {})}
    if model == "hgb" and small and not params:
        p.update(early_stopping=False, max_iter=100)  # no validation share: a short fixed run
    scaler = None
    if model == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        base: Any = HistGradientBoostingClassifier(random_state=seed, **p)
        Xs = X
    else:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        base = LogisticRegression(random_state=seed, **p)
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X).astype(np.float32)

    if not small:
        if len(np.unique(y[held])) < 2:
            raise ValueError("the held-out share holds only one outcome: too few rows of the other")
        fit_mask = np.ones(n, dtype=bool)
        fit_mask[held] = False
        kw: dict[str, Any] = {}
        if model == "hgb" and p.get("early_stopping"):
            # stop on the held-out share rather than carving another 10% out of the fitted rows
            kw.update(X_val=Xs[held], y_val=y[held])
        base.fit(Xs[fit_mask], y[fit_mask], **kw)
        cal = CalibratedClassifierCV(FrozenEstimator(base), method="sigmoid")
        cal.fit(Xs[held], y[held])
        cal.calibrated_classifiers_[0].estimator = base  # see the module docstring
        calibration, rows_fit, rows_cal = "sigmoid on the held-out share", int(fit_mask.sum()), len(held)
    else:
        k = max(2, min(5, minority))
        cal = CalibratedClassifierCV(base, method="sigmoid", cv=k, ensemble=False)
        cal.fit(Xs, y)
        base = cal.calibrated_classifiers_[0].estimator
        calibration, rows_fit, rows_cal = f"sigmoid, {k}-fold cross-validated", n, n
    estimator: Any = cal
    if scaler is not None:
        from sklearn.pipeline import Pipeline

        estimator = Pipeline([("scale", scaler), ("calibrated", cal)])
    n_iter = int(base.n_iter_) if model == "hgb" else int(np.max(base.n_iter_))
    info = FitInfo(
        model=model,
        params=p,
        calibration=calibration,
        rows_fit=rows_fit,
        rows_calibration=rows_cal,
        n_iter=n_iter,
        seconds=round(time.perf_counter() - t0, 3),
        heldout_index=held,
    )
    return estimator, info


class MessageCredibility:
    """A fitted P(stay) model whose output is scaled, per message, by how well the logs back that message.

    ``predict_proba(X)[:, 1]`` is the model's P(stay) × the row's factor; column 0 is 1 minus that.
    `columns` are the feature positions of the message one-hot of `X` (one per message) and
    ``factors`` the pessimistic factor of each message (:func:`credibility_factors`). With a
    `baseline` (:class:`Baseline`: the probability b(x, m) that the logging policy's own choice for
    this subscriber is m, 0 for a message it never learned), the row's factor is
    ``factors[m] + b(x, m) × (1 − factors[m])``: a message is judged pessimistically where the logs
    rarely showed it to subscribers like this one, and at the model's own value where the logging
    policy shows it to them nearly every time (the model learned that P(stay) from those very
    decisions). Serving
    multiplies the output by V(product after m) − cost(m) and takes the highest
    (docs/choosing-a-message.md). The same arithmetic is appended to the ONNX graph (:func:`export_onnx`).
    """

    def __init__(self, estimator: Any, columns: np.ndarray, factors: np.ndarray,
                 baseline: Baseline | None = None) -> None:
        self.estimator = estimator
        self.columns = np.asarray(columns, dtype=np.int64)
        self.factors = np.asarray(factors, dtype=np.float32)
        self.baseline = baseline

    def row_factors(self, X: np.ndarray) -> np.ndarray:
        """Return the (n,) float32 factor of each row of `X`, as the ONNX graph computes it."""
        X = np.asarray(X, dtype=np.float32)
        onehot = X[:, self.columns]
        factor = onehot @ self.factors
        if self.baseline is not None:
            b = self.baseline.model.predict_proba(X)[:, 1].astype(np.float32)
            factor = factor + b * (onehot @ self.baseline_shift())
        return factor

    def baseline_shift(self) -> np.ndarray:
        """Return (n_messages,) float32 (1 − factors) where the baseline learned the message, else 0."""
        if self.baseline is None:
            return np.zeros_like(self.factors)
        return (np.float32(1.0) - self.factors) * self.baseline.messages.astype(np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return (n, 2) float64 [1 − P′, P′] with P′ = P(stay) × the row's factor."""
        X = np.asarray(X, dtype=np.float32)
        p1 = self.estimator.predict_proba(X)[:, 1] * self.row_factors(X).astype(np.float64)
        return np.column_stack([1.0 - p1, p1])


@dataclass
class Baseline:
    """What :func:`fit_baseline` learned: a classifier of b(x, m), and the messages it may vouch for.

    ``model.predict_proba(X)[:, 1]`` is b for each candidate row of `X`; ``messages`` (n_messages,)
    bool marks the message codes the logging policy chose at least BASELINE_MIN_SHOWN times in the
    classifier's rows. Any other message (``<other>``, one added to the catalog after training, one
    the logging policy never chose) keeps its own factor whatever b says: the classifier never
    learned it.
    """

    model: Any
    messages: np.ndarray

    def b(self, X: np.ndarray, code: np.ndarray) -> np.ndarray:
        """Return (n,) float32 b(x, m) of each row of `X`, 0 for a message outside ``messages`` (`code` (n,))."""
        b = self.model.predict_proba(np.asarray(X, dtype=np.float32))[:, 1].astype(np.float32)
        return b * self.messages[np.asarray(code, dtype=np.int64)].astype(np.float32)


def fit_baseline(
    X: np.ndarray, owner: np.ndarray, shown: np.ndarray, propensities: np.ndarray, code: np.ndarray,
    n_messages: int, *, seed: int = 0, min_propensity: float = BASELINE_MIN_PROPENSITY,
    min_decisions: int = BASELINE_MIN_DECISIONS, min_shown: int = BASELINE_MIN_SHOWN,
) -> tuple[Baseline | None, dict[str, Any]]:
    """Return the logging policy's own choice b(x, m) = P(m is its choice | x) as a :class:`Baseline`, and the evidence.

    Rows are (decision, candidate) pairs: `X` (m, n_features) float32 candidate rows, `owner` (m,)
    the decision's position 0..n−1, `shown` (m,) bool, `code` (m,) the message code
    0..n_messages−1; `propensities` (n,) the shown message's logged probability. A decision of at
    least two candidates whose shown message had probability >= `min_propensity` and above
    1 / (its number of candidates) showed the logging policy's own choice (ε-greedy and holdout
    logging show it with probability at least 1 − ε; a uniform policy has none); those decisions
    are the classifier's rows, target = shown. Returns (None, evidence) when fewer than
    `min_decisions` decisions qualify. The same boosted trees as the P(stay) model, short and
    uncalibrated: only where b is near 0 or 1 matters. Safe policy improvement with baseline
    bootstrapping (SPIBB; Laroche, Trichelair & Tachet des Combes, ICML 2019) is the idea: keep to
    the logging policy's choice where the data cannot show something better.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    owner = np.asarray(owner, dtype=np.int64)
    prop = np.asarray(propensities, dtype=np.float64)
    k = np.bincount(owner, minlength=len(prop))
    with np.errstate(divide="ignore", invalid="ignore"):
        own = (k >= 2) & (prop >= min_propensity) & (prop > 1.0 / k)  # NaN compares False
    rows = np.flatnonzero(own[owner])
    decisions = int(own.sum())
    evidence: dict[str, Any] = {"decisions": decisions, "min_propensity": min_propensity}
    y = np.asarray(shown, dtype=bool)[rows]
    if decisions < min_decisions:
        evidence.update(fitted=False, why=f"{decisions:,} decisions of two or more candidates showed a message with "
                                          f"probability >= {min_propensity:g} (and above 1 / candidates), fewer than "
                                          f"{min_decisions:,}: no dominant choice to learn")
        return None, evidence
    if y.all() or not y.any():
        evidence.update(fitted=False, why="every such decision showed the same candidate row: nothing to tell apart")
        return None, evidence
    Xr = np.asarray(X[rows], dtype=np.float32)
    model = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=31, min_samples_leaf=40,
                                           early_stopping=False, random_state=seed)
    model.fit(Xr, y.astype(np.int64))
    b = model.predict_proba(Xr)[:, 1]
    messages = np.bincount(np.asarray(code, dtype=np.int64)[rows][y], minlength=n_messages) >= min_shown
    evidence.update(fitted=True, rows=len(rows), mean_b_shown=float(b[y].mean()),
                    mean_b_not_shown=float(b[~y].mean()), messages=int(messages.sum()))
    return Baseline(model, messages), evidence


def credibility_factors(
    p_stay: np.ndarray, value_after: np.ndarray, message: np.ndarray, owner: np.ndarray, shown: np.ndarray,
    rewards: np.ndarray, propensities: np.ndarray, *, c: float, n_messages: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return one factor per message code 0..n_messages−1 that turns the model's values into pessimistic ones.

    Rows are (decision, candidate) pairs as in :func:`greedy_dr_terms`, `message` (m,) the candidate's
    code. Per message m, over the decisions where it was a candidate: the model's mean value
    M = mean r̂(x, m), r̂ = P(stay) × value_after, and the doubly robust mean
    D = mean [r̂(x, m) + 1{a = m} / μ · (r − r̂(x, m))] (Dudík, Langford & Li 2011) with its standard
    error s. The pessimistic value is L = D − c·s²/|D| (= D·(1 − c·(s/D)²) for D > 0), the first-order shrinkage of D
    towards zero under a normal prior of standard deviation D/√c (c = CREDIBILITY_C = 2, chosen on the
    simulator's Apple-sized presets); the factor is min(1, max(L, 0.001·D) / M): the model's values of m
    rescaled so that they average L (a thousandth of D where L is not above zero, s ≥ D/√c, so such
    messages rank below every credible one and by D among themselves; factor 0 where D ≤ 0). A message the logs rarely
    showed has a wide interval and a small factor, so the policy does not switch to it on the
    strength of a few dozen rows. The penalty falls as s², 1/n: with c = 2 a value known to ±10%
    loses 2%, one known to ±30% loses 18%; with enough data the factor is D / M, the model's own
    values recalibrated downwards. A lower bound D − z·s falls only as 1/√n; at Apple's effect
    sizes it cost up to 0.08 of the gap at 200,000 decisions on some worlds. It is never above 1, so the scaled P(stay) that serving
    logs and that the evaluation's reward model reads stays a probability (a message the model
    undervalues keeps the model's own values).
    A message no decision had as a candidate gets 0.
    """
    q = np.asarray(p_stay, dtype=np.float64) * np.asarray(value_after, dtype=np.float64)
    gamma = q.copy()
    idx = np.flatnonzero(shown)
    gamma[idx] += (rewards[owner[idx]] - q[idx]) / propensities[owner[idx]]
    count = np.bincount(message, minlength=n_messages).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        model_mean = np.bincount(message, weights=q, minlength=n_messages) / count
        dr_mean = np.bincount(message, weights=gamma, minlength=n_messages) / count
        second = np.bincount(message, weights=gamma * gamma, minlength=n_messages) / count
        se = np.sqrt(np.maximum(second - dr_mean**2, 0.0) * count / np.maximum(count - 1.0, 1.0) / count)
        floor = CREDIBILITY_FLOOR * np.maximum(dr_mean, 0.0)
        pessimistic = dr_mean - c * se * se / np.abs(dr_mean)
        factors = np.minimum(np.maximum(pessimistic, floor) / model_mean, 1.0)  # P(stay) stays a probability
    factors = np.where(np.isfinite(factors) & (count > 1), factors, 0.0)
    return factors, {"model_mean": model_mean, "dr_mean": dr_mean, "se": se, "count": count}


def export_onnx(estimator: Any, n_features: int) -> bytes:
    """Return the serialized ONNX model of a fitted estimator (float32 input ``X``, zipmap off).

    A :class:`MessageCredibility` exports its model, then scales the ``probabilities`` output in the
    graph: Gather the message one-hot columns of ``X``, MatMul with the factors (float32), plus, with
    a baseline, its classifier's b times the one-hot MatMul the shift (:meth:`MessageCredibility.baseline_shift`),
    Mul with P(stay); column 0 becomes 1 minus that.
    """
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    def convert(model: Any) -> Any:
        return to_onnx(
            model,
            initial_types=[("X", FloatTensorType([None, n_features]))],
            options={id(_classifier_of(model)): {"zipmap": False}},
            target_opset={"": TARGET_OPSET, "ai.onnx.ml": 3},
        )

    base = estimator.estimator if isinstance(estimator, MessageCredibility) else estimator
    onx = convert(base)
    if isinstance(estimator, MessageCredibility):
        baseline = convert(estimator.baseline.model) if estimator.baseline is not None else None
        _append_message_factors(onx, estimator.columns, estimator.factors, baseline, estimator.baseline_shift())
    return onx.SerializeToString()


def _append_message_factors(
    onx: Any, columns: np.ndarray, factors: np.ndarray, baseline: Any = None, shift: np.ndarray | None = None,
) -> None:
    """Rewire the graph's ``probabilities`` output through the per-message scaling (in place).

    With a `baseline` graph (:func:`fit_baseline`'s classifier, input ``X``), its nodes join this graph
    under the prefix ``baseline_`` and the factor becomes ``onehot·factors + b × onehot·shift``
    (:meth:`MessageCredibility.row_factors`); the baseline graph's opset imports must match this one's.
    """
    from onnx import compose, helper, numpy_helper

    g = onx.graph
    raw = "credibility_p_model"
    for node in g.node:  # the model's own nodes (the label among them) keep reading the model's P
        for names in (node.output, node.input):
            for i, name in enumerate(names):
                if name == "probabilities":
                    names[i] = raw
    g.initializer.extend([
        numpy_helper.from_array(np.asarray(columns, dtype=np.int64), "credibility_columns"),
        numpy_helper.from_array(np.asarray(factors, dtype=np.float32).reshape(-1, 1), "credibility_factors"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "credibility_one_i"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "credibility_two_i"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "credibility_one"),
    ])
    g.node.extend([
        helper.make_node("Gather", ["X", "credibility_columns"], ["credibility_onehot"], axis=1),
        helper.make_node("MatMul", ["credibility_onehot", "credibility_factors"],
                         ["credibility_factor" if baseline is None or shift is None else "credibility_factor_pessimistic"]),
    ])
    if baseline is not None and shift is not None:
        ours = {o.domain: o.version for o in onx.opset_import}
        theirs = {o.domain: o.version for o in baseline.opset_import}
        if any(ours.get(d, v) != v for d, v in theirs.items()):
            raise ValueError(f"the baseline's ONNX opsets {theirs} differ from the model's {ours}")
        onx.opset_import.extend(helper.make_opsetid(d, v) for d, v in theirs.items() if d not in ours)
        b = compose.add_prefix(baseline, "baseline_")
        delta = np.asarray(shift, dtype=np.float32)
        g.initializer.extend([*b.graph.initializer, numpy_helper.from_array(delta.reshape(-1, 1), "credibility_delta")])
        g.node.extend([
            helper.make_node("Identity", ["X"], ["baseline_X"]),
            *b.graph.node,
            helper.make_node("Slice", ["baseline_probabilities", "credibility_one_i", "credibility_two_i",
                                       "credibility_one_i"], ["credibility_b"]),
            helper.make_node("MatMul", ["credibility_onehot", "credibility_delta"], ["credibility_onehot_delta"]),
            helper.make_node("Mul", ["credibility_b", "credibility_onehot_delta"], ["credibility_shift"]),
            helper.make_node("Add", ["credibility_factor_pessimistic", "credibility_shift"], ["credibility_factor"]),
        ])
    g.node.extend([
        helper.make_node("Slice", [raw, "credibility_one_i", "credibility_two_i", "credibility_one_i"],
                         ["credibility_p1"]),
        helper.make_node("Mul", ["credibility_p1", "credibility_factor"], ["credibility_p1_scaled"]),
        helper.make_node("Sub", ["credibility_one", "credibility_p1_scaled"], ["credibility_p0_scaled"]),
        helper.make_node("Concat", ["credibility_p0_scaled", "credibility_p1_scaled"], ["probabilities"], axis=1),
    ])


def _classifier_of(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return steps[-1][1] if steps else estimator


def onnx_session(onnx_bytes: bytes, threads: int = 0) -> Any:
    """Return an onnxruntime InferenceSession for batch scoring (all cores by default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_p_stay(session: Any, X: np.ndarray, batch: int = 200_000) -> np.ndarray:
    """Return float64 P(stay) for the rows of `X` scored by an ONNX session, in batches."""
    name = session.get_inputs()[0].name
    out = np.empty(len(X), dtype=np.float64)
    for s in range(0, len(X), batch):
        out[s : s + batch] = session.run(["probabilities"], {name: np.ascontiguousarray(X[s : s + batch])})[0][:, 1]
    return out


def greedy_choices(groups: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return, per group (codes 0..G-1), (index of the best row, its value, best minus second-best value).

    Non-finite values never win; the first row wins ties (the policy's rule). A group with
    one finite row has an infinite margin.
    """
    df = pd.DataFrame({"g": groups, "v": np.where(np.isfinite(values), values, -np.inf), "i": np.arange(len(values))})
    df = df.sort_values(["g", "v", "i"], ascending=[True, False, True], kind="stable")
    first = ~df["g"].duplicated().to_numpy()
    second = np.zeros(len(df), dtype=bool)
    pos_first = np.flatnonzero(first)
    nxt = pos_first + 1
    ok = (nxt < len(df)) & np.isin(nxt, pos_first, invert=True)
    second[nxt[ok]] = True
    g_sorted = df["g"].to_numpy()
    v_sorted = df["v"].to_numpy()
    n_groups = int(g_sorted.max()) + 1 if len(g_sorted) else 0
    best_idx = np.full(n_groups, -1, dtype=np.int64)
    best_val = np.full(n_groups, -np.inf)
    second_val = np.full(n_groups, -np.inf)
    best_idx[g_sorted[first]] = df["i"].to_numpy()[first]
    best_val[g_sorted[first]] = v_sorted[first]
    second_val[g_sorted[second]] = v_sorted[second]
    with np.errstate(invalid="ignore"):
        margin = np.where(np.isfinite(second_val), best_val - second_val, np.inf)
    return best_idx, best_val, margin


def check_parity(
    p_sklearn: np.ndarray,
    p_onnx: np.ndarray,
    request_ids: np.ndarray,
    values_after: np.ndarray,
) -> ParityResult:
    """Return the parity of two P(stay) vectors over (request, candidate) rows.

    The max abs difference of P must be at most 1e-5, and the greedy choice (argmax of
    P × value_after) must be identical for every request whose two best sklearn values
    differ by more than :data:`TIE_RELATIVE` of their size, |best| + |second best| (closer
    ones are ties that float32 may break either way).
    """
    codes, uniques = pd.factorize(pd.Series(request_ids))
    v_sk = np.asarray(p_sklearn) * np.asarray(values_after)
    v_ox = np.asarray(p_onnx) * np.asarray(values_after)
    best_sk, best_val, margin = greedy_choices(codes, v_sk)
    best_ox, _, _ = greedy_choices(codes, v_ox)
    second_val = best_val - margin  # -inf for a request with one finite value (its margin is inf)
    with np.errstate(invalid="ignore"):
        scale = np.abs(best_val) + np.where(np.isfinite(second_val), np.abs(second_val), 0.0)
        compared = margin > TIE_RELATIVE * scale
    bad = compared & (best_sk != best_ox)
    diff = np.abs(np.asarray(p_sklearn, dtype=np.float64) - np.asarray(p_onnx, dtype=np.float64))
    return ParityResult(
        rows=len(diff),
        requests=len(uniques),
        requests_compared=int(compared.sum()),
        max_abs_diff=float(diff.max()) if len(diff) else 0.0,
        choice_mismatches=int(bad.sum()),
        mismatched_requests=[str(u) for u in uniques[np.flatnonzero(bad)][:10]],
    )


def greedy_dr_terms(
    p_stay: np.ndarray, value_after: np.ndarray, owner: np.ndarray, shown: np.ndarray, rewards: np.ndarray,
    propensities: np.ndarray,
) -> np.ndarray:
    """Return per decision the doubly robust term of the greedy policy argmax P(stay) × value_after.

    Rows are (decision, candidate) pairs: `owner` (m,) the decision's position 0..n-1, `shown` (m,)
    whether the logging policy showed that candidate; `rewards` and `propensities` (n,) per decision.
    The term is r̂(x, g) + 1{a = g} / μ · (r − r̂(x, a)) with r̂ = P(stay) × value_after (Dudík, Langford
    & Li 2011); its mean over decisions is the policy's doubly robust value.
    """
    n = len(rewards)
    q = np.asarray(p_stay, dtype=np.float64) * np.asarray(value_after, dtype=np.float64)
    best, q_best, _ = greedy_choices(np.asarray(owner), q)
    q_shown = np.zeros(n)
    q_shown[owner[shown]] = q[shown]
    is_greedy_shown = np.zeros(n, dtype=bool)
    chosen = best[best >= 0]
    is_greedy_shown[owner[chosen]] = shown[chosen]
    return np.where(np.isfinite(q_best), q_best, 0.0) + is_greedy_shown / propensities * (rewards - q_shown)


def select_model(
    X: np.ndarray,
    y: np.ndarray,
    *,
    rewards: np.ndarray,
    propensities: np.ndarray,
    groups: np.ndarray,
    candidate_rows: Any,
    n_messages: int,
    seed: int = 0,
    choices: tuple[ModelChoice, ...] = MODEL_CHOICES,
    folds: int = SELECTION_FOLDS,
    margin_se: float = SELECTION_MARGIN_SE,
    max_rows: int = SELECTION_MAX_ROWS,
    baseline: Baseline | None = None,
) -> tuple[ModelChoice, dict[str, Any]]:
    """Return the model choice with the best cross-validated doubly robust policy value, and the evidence.

    `X`, `y`: the shown rows (one per labelled decision); `rewards` = label × value_after of the shown
    message, `propensities` its logged probability; `groups` a subscriber code per decision (a
    subscriber's decisions share a fold). `candidate_rows(idx)` returns (X_c, owner, shown,
    value_after, message code 0..n_messages−1) for every candidate of decisions `idx`, owner indexing
    into `idx`. Each choice is fitted on the other folds, its message factors
    (:func:`credibility_factors`) computed there too, and the greedy policy of the scaled values
    (what serving would run: with `baseline`, :func:`fit_baseline`'s classifier, each row's factor is
    moved to 1 in proportion to b, as :class:`MessageCredibility` does; b reads no outcome, so one fit on
    all decisions serves every fold) valued on the held-out fold with :func:`greedy_dr_terms`; the first
    choice stays unless another beats it by `margin_se` paired standard errors (selection on noisy
    values otherwise favours whichever overfits the noise most). Above `max_rows` decisions the
    choice is made on a random share of the subscribers, so that its folds × choices fits cost the
    same whatever the size of the data (9 fits of about 20,000 rows).
    """
    codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    fold_of_group = rng.integers(0, folds, size=n_groups)
    if len(y) > max_rows:  # a random share of the subscribers: the choice costs folds × choices fits of this size
        keep = np.flatnonzero((rng.random(n_groups) < max_rows / len(y))[codes])
        X, y, rewards, propensities, codes = X[keep], y[keep], rewards[keep], propensities[keep], codes[keep]
        inner = candidate_rows

        def candidate_rows(idx: np.ndarray) -> Any:
            return inner(keep[idx])
    n = len(y)
    fold = fold_of_group[codes]
    terms = np.full((len(choices), n), np.nan)
    for f in range(folds):
        test = np.flatnonzero(fold == f)
        train = np.flatnonzero(fold != f)
        if len(test) == 0 or len(np.unique(y[train])) < 2:
            continue
        Xc, owner, shown, va, code = candidate_rows(test)
        Xt, owner_t, shown_t, va_t, code_t = candidate_rows(train)
        b = baseline.b(Xc, code) if baseline is not None else np.zeros(len(Xc), dtype=np.float32)
        for c, choice in enumerate(choices):
            est, _ = fit_model(X[train], y[train], model=choice.model, seed=seed, params=choice.params or None)
            factors, _ = credibility_factors(est.predict_proba(Xt)[:, 1], va_t, code_t, owner_t, shown_t,
                                             rewards[train], propensities[train], c=CREDIBILITY_C,
                                             n_messages=n_messages)
            p = est.predict_proba(Xc)[:, 1] * (factors[code] + b * (1.0 - factors[code]))
            terms[c, test] = greedy_dr_terms(p, va, owner, shown, rewards[test], propensities[test])
    ok = np.isfinite(terms).all(axis=0)
    t = terms[:, ok]
    m = int(ok.sum())
    values = t.mean(axis=1) if m else np.full(len(choices), np.nan)
    diff = t - t[0]
    se = diff.std(axis=1, ddof=1) / np.sqrt(m) if m > 1 else np.full(len(choices), np.inf)
    score = np.where(np.arange(len(choices)) == 0, 0.0, (values - values[0]) - margin_se * se)
    pick = int(np.argmax(score)) if m and score.max() > 0 else 0
    evidence = {
        "rule": f"{folds}-fold cross-validated doubly robust value of each choice's greedy policy, message "
                f"factors{' and baseline' if baseline is not None else ''} included (folds by "
                f"subscriber); {choices[0].name} unless another wins by {margin_se:g} paired standard errors",
        "decisions": m,
        "values": {ch.name: float(v) for ch, v in zip(choices, values, strict=True)},
        "se_vs_first": {ch.name: float(s_) for ch, s_ in zip(choices, se, strict=True)},
        "chosen": choices[pick].name,
    }
    return choices[pick], evidence

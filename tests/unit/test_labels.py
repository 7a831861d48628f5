"""The DESIGN.md label rule, case by case, on hand-built decisions and events."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

from training.labels import LabelStats, label_decisions, reward

DAY = 86_400_000
H = 30 * DAY
T0 = 1_767_225_600_000


def _decisions(*rows: tuple[str, int], index: list[int] | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(len(rows))],
            "original_transaction_id": [s for s, _ in rows],
            "signed_date": [t for _, t in rows],
        },
        index=index,
    )


def _outcomes(*rows: tuple[str, str, int]) -> pd.DataFrame:
    return pd.DataFrame(
        {"original_transaction_id": [r[0] for r in rows], "event": [r[1] for r in rows], "at": [r[2] for r in rows]},
        columns=["original_transaction_id", "event", "at"],
    ).astype({"at": "int64"})


def _one(outcomes: pd.DataFrame, *, t: int = T0, as_of_ms: int | None = None) -> float:
    labels, _ = label_decisions(_decisions(("s", t)), outcomes, horizon_ms=H, as_of_ms=as_of_ms)
    return float(labels.iloc[0])


def _far_event() -> tuple[str, str, int]:
    """An event of another subscription long after, so 'the newest event' makes every window pass."""
    return ("other", "renewed", T0 + 400 * DAY)


def test_cancelled_last_is_churned() -> None:
    assert _one(_outcomes(("s", "cancelled", T0 + DAY))) == 0.0
    assert _one(_outcomes(("s", "reenabled", T0 + DAY), ("s", "cancelled", T0 + 2 * DAY))) == 0.0


def test_cancelled_beats_a_renewal_in_the_same_window() -> None:
    assert _one(_outcomes(("s", "renewed", T0 + DAY), ("s", "cancelled", T0 + 2 * DAY))) == 0.0


def test_reenabled_last_is_not_churn() -> None:
    ev = [("s", "cancelled", T0 + DAY), ("s", "reenabled", T0 + 2 * DAY)]
    # not churned, and neither renewed nor passed: censored
    assert math.isnan(_one(_outcomes(*ev)))
    # with a renewal: retained
    assert _one(_outcomes(*ev, ("s", "renewed", T0 + 3 * DAY))) == 1.0
    # once the window has passed: retained
    assert _one(_outcomes(*ev, _far_event())) == 1.0


def test_expired_is_churned_even_when_reenabled_last() -> None:
    ev = _outcomes(("s", "cancelled", T0 + DAY), ("s", "expired", T0 + 2 * DAY), ("s", "reenabled", T0 + 3 * DAY))
    assert _one(ev) == 0.0
    assert _one(_outcomes(("s", "expired", T0 + DAY), ("s", "renewed", T0 + 2 * DAY))) == 0.0


def test_renewed_is_retained_before_the_window_passes() -> None:
    assert _one(_outcomes(("s", "renewed", T0 + 5 * DAY))) == 1.0


def test_window_fully_passed_without_events_is_retained() -> None:
    assert _one(_outcomes(_far_event())) == 1.0
    # exactly at the window's end counts as passed
    assert _one(_outcomes(("other", "renewed", T0 + H))) == 1.0


def test_no_evidence_yet_is_censored() -> None:
    assert math.isnan(_one(_outcomes(("s", "offer_redeemed", T0 + DAY))))
    assert math.isnan(_one(_outcomes(("other", "renewed", T0 + H - 1))))
    # no events at all: the newest decision stands in for the newest event
    assert math.isnan(_one(_outcomes()))


def test_other_events_do_not_decide() -> None:
    for event in ("switched", "offer_redeemed", "refunded"):
        assert math.isnan(_one(_outcomes(("s", event, T0 + DAY)))), event


def test_window_bounds_t_included_end_excluded() -> None:
    assert _one(_outcomes(("s", "cancelled", T0))) == 0.0
    assert _one(_outcomes(("s", "cancelled", T0 - 1), _far_event())) == 1.0  # before the decision
    assert _one(_outcomes(("s", "cancelled", T0 + H), _far_event())) == 1.0  # past the horizon
    assert _one(_outcomes(("s", "cancelled", T0 + H - 1))) == 0.0


def test_events_of_other_subscriptions_are_ignored() -> None:
    assert _one(_outcomes(("t", "cancelled", T0 + DAY), ("t", "expired", T0 + DAY), _far_event())) == 1.0


def test_window_cut_short_by_next_decision() -> None:
    d = _decisions(("s", T0), ("s", T0 + 5 * DAY))
    out = _outcomes(("s", "cancelled", T0 + 6 * DAY))
    labels, stats = label_decisions(d, out, horizon_ms=H)
    # the cancel belongs to the second decision; the first window ended at the second decision,
    # which is before the newest event, so it has passed
    assert labels.tolist() == [1.0, 0.0]
    assert stats == LabelStats(total=2, retained=1, churned=1, censored=0)
    # an event at exactly the next decision's time belongs to the next decision
    out = _outcomes(("s", "cancelled", T0 + 5 * DAY))
    labels, _ = label_decisions(d, out, horizon_ms=H)
    assert labels.tolist() == [1.0, 0.0]
    # a cut window that has not passed yet is censored
    labels, _ = label_decisions(d, _outcomes(("s", "offer_redeemed", T0 + DAY)), horizon_ms=H)
    assert math.isnan(labels.iloc[0]) and math.isnan(labels.iloc[1])


def test_next_decision_after_the_horizon_does_not_extend_the_window() -> None:
    d = _decisions(("s", T0), ("s", T0 + 40 * DAY))
    out = _outcomes(("s", "cancelled", T0 + 35 * DAY))
    labels, _ = label_decisions(d, out, horizon_ms=H)
    # the cancel falls between the first window's end and the second decision: nobody's
    assert labels.iloc[0] == 1.0 and math.isnan(labels.iloc[1])


def test_decisions_at_the_same_time_share_a_window() -> None:
    d = _decisions(("s", T0), ("s", T0))
    labels, _ = label_decisions(d, _outcomes(("s", "cancelled", T0 + DAY)), horizon_ms=H)
    assert labels.tolist() == [0.0, 0.0]


def test_as_of_decides_whether_the_window_passed() -> None:
    quiet = _outcomes(("s", "offer_redeemed", T0 + DAY))
    assert math.isnan(_one(quiet, as_of_ms=T0 + H - 1))
    assert _one(quiet, as_of_ms=T0 + H) == 1.0
    # as_of overrides a far newest event
    assert math.isnan(_one(_outcomes(_far_event()), as_of_ms=T0 + 10 * DAY))
    # a churn is a churn whatever as_of says
    assert _one(_outcomes(("s", "cancelled", T0 + DAY)), as_of_ms=T0 + 2 * DAY) == 0.0


def test_same_time_cancel_and_reenable_keep_file_order() -> None:
    at = T0 + DAY
    assert _one(_outcomes(("s", "cancelled", at), ("s", "reenabled", at), ("s", "renewed", at))) == 1.0
    assert _one(_outcomes(("s", "reenabled", at), ("s", "cancelled", at))) == 0.0


def test_horizon_is_a_parameter() -> None:
    d = _decisions(("s", T0))
    out = _outcomes(("s", "cancelled", T0 + 10 * DAY), _far_event())
    assert label_decisions(d, out, horizon_ms=30 * DAY)[0].iloc[0] == 0.0
    assert label_decisions(d, out, horizon_ms=7 * DAY)[0].iloc[0] == 1.0
    with pytest.raises(ValueError, match="horizon"):
        label_decisions(d, out, horizon_ms=0)


def test_labels_align_with_the_decisions_index_and_count() -> None:
    d = _decisions(("a", T0), ("b", T0), ("c", T0), ("d", T0 + 100 * DAY), index=[10, 7, 3, 99])
    out = _outcomes(
        ("a", "cancelled", T0 + DAY),
        ("b", "renewed", T0 + DAY),
        ("d", "offer_redeemed", T0 + 100 * DAY + 1),
    )
    labels, stats = label_decisions(d, out, horizon_ms=H)
    assert list(labels.index) == [10, 7, 3, 99]
    assert labels.loc[10] == 0.0 and labels.loc[7] == 1.0 and labels.loc[3] == 1.0 and math.isnan(labels.loc[99])
    assert stats == LabelStats(total=4, retained=2, churned=1, censored=1)


def test_empty_decisions() -> None:
    labels, stats = label_decisions(_decisions(), _outcomes(), horizon_ms=H)
    assert len(labels) == 0 and stats == LabelStats(0, 0, 0, 0)


def test_reward_is_label_times_value_after() -> None:
    r = reward(pd.Series([1.0, 0.0, np.nan]), np.array([100.0, 50.0, 10.0]))
    assert r[0] == 100.0 and r[1] == 0.0 and math.isnan(r[2])


def test_many_decisions_label_quickly() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    subs = rng.integers(0, 150_000, n).astype(str)
    d = pd.DataFrame({"original_transaction_id": subs, "signed_date": T0 + rng.integers(0, 60 * DAY, n)})
    m = 300_000
    out = pd.DataFrame(
        {
            "original_transaction_id": rng.integers(0, 150_000, m).astype(str),
            "event": rng.choice(["cancelled", "reenabled", "renewed", "expired", "switched"], m),
            "at": T0 + rng.integers(0, 90 * DAY, m),
        }
    )
    started = time.perf_counter()
    labels, stats = label_decisions(d, out, horizon_ms=H)
    assert time.perf_counter() - started < 20.0
    assert stats.total == n == stats.retained + stats.churned + stats.censored
    assert len(labels) == n


def test_mature_only_censors_early_labels_until_the_window_passes() -> None:
    def label(outcomes: pd.DataFrame) -> float:
        labels, _ = label_decisions(_decisions(("s", T0)), outcomes, horizon_ms=H, mature_only=True)
        return float(labels.iloc[0])

    # churned or renewed early, window not passed yet: censored, not a churn-leaning early label
    assert math.isnan(label(_outcomes(("s", "cancelled", T0 + DAY))))
    assert math.isnan(label(_outcomes(("s", "renewed", T0 + DAY))))
    # once the window has passed, the same events decide as usual
    assert label(_outcomes(("s", "cancelled", T0 + DAY), _far_event())) == 0.0
    assert label(_outcomes(("s", "renewed", T0 + DAY), _far_event())) == 1.0
    assert label(_outcomes(_far_event())) == 1.0


# ---- involuntary ends, raw types, and offers credited to the right answer ----------------------------
@pytest.mark.parametrize("event", ["expired_involuntary", "grace_expired"])
def test_an_involuntary_end_without_cancellation_is_censored_by_default(event: str) -> None:
    ev = _outcomes(("s", event, T0 + 5 * DAY), _far_event())
    labels, stats = label_decisions(_decisions(("s", T0)), ev, horizon_ms=H)
    assert math.isnan(labels.iloc[0]) and stats.involuntary == 1 and stats.censored == 1
    # the setting makes it churn
    churn, _ = label_decisions(_decisions(("s", T0)), ev, horizon_ms=H, involuntary="churn")
    assert churn.iloc[0] == 0.0
    # a cancellation before it is churn whatever the setting
    cancelled = _outcomes(("s", "cancelled", T0 + DAY), ("s", event, T0 + 5 * DAY), _far_event())
    assert _one(cancelled) == 0.0


def test_billing_signals_and_plan_changes_are_read_by_no_label() -> None:
    for event in ("billing_failed", "upgraded", "downgraded", "downgrade_reverted", "resubscribed", "other",
                  "refund_reversed", "subscribed"):
        assert _one(_outcomes(("s", event, T0 + DAY), _far_event())) == 1.0, event  # the window passed: retained


def test_old_logs_are_read_with_today_s_meaning_of_their_raw_type() -> None:
    """A log written when every EXPIRED was 'expired' still says which were billing failures."""
    ev = _outcomes(("s", "expired", T0 + DAY), _far_event())
    ev["raw_type"] = ["EXPIRED", None]
    ev["raw_subtype"] = ["BILLING_RETRY", None]
    assert math.isnan(_one(ev))
    ev["raw_subtype"] = ["VOLUNTARY", None]
    assert _one(ev) == 0.0
    ev["raw_type"], ev["raw_subtype"] = ["DID_CHANGE_RENEWAL_PREF", None], [None, None]  # once 'switched'
    ev["event"] = ["switched", "renewed"]
    assert _one(ev) == 1.0


def test_the_involuntary_rule_must_be_known() -> None:
    with pytest.raises(ValueError, match="involuntary"):
        label_decisions(_decisions(("s", T0)), _outcomes(), involuntary="maybe")


def _redemptions(*rows: tuple[str, int, int, str | None]) -> pd.DataFrame:
    return pd.DataFrame({
        "original_transaction_id": [r[0] for r in rows], "event": ["offer_redeemed"] * len(rows),
        "at": [r[1] for r in rows], "offer_type": pd.array([r[2] for r in rows], dtype="Int64"),
        "offer_identifier": [r[3] for r in rows],
    })


def test_only_our_promotional_offer_for_the_same_subscription_in_the_window_is_credited() -> None:
    from training.labels import apple_choice, credited_offers

    decisions = pd.DataFrame({
        "request_id": ["a", "b", "c", "d", "e", "f"],
        "original_transaction_id": ["s1", "s2", "s3", "s4", "s5", "s6"],
        "signed_date": [T0] * 6,
        "message_id": ["offer-msg"] * 6,
        "policy": ["ml:epsilon-greedy"] * 5 + ["apple_fallback"],
    })
    outcomes = _redemptions(
        ("s1", T0 + 3_600_000, 2, "com.example.offer50"),  # ours: type 2, our offerIdentifier, in the window
        ("s2", T0 + 3_600_000, 2, "com.example.other"),  # a promotional offer, not the one we answered
        ("s3", T0 + 3_600_000, 5, "apple-retention-1"),  # Apple's own retention offer: never ours
        ("s4", T0 + 8 * DAY, 2, "com.example.offer50"),  # ours, but after the 7-day window
        ("s1", T0 + 3_600_000, 2, "com.example.offer50"),  # s5 has nothing; a second s1 changes nothing
    )
    offers = {"offer-msg": "com.example.offer50"}
    credit = credited_offers(decisions, outcomes, offers, window_ms=7 * DAY)
    assert credit.tolist() == ["ours", "", "apple", "", "", ""]
    assert credited_offers(decisions, outcomes, offers, window_ms=9 * DAY).tolist()[3] == "ours"
    # a redemption before the decision is not its outcome
    early = _redemptions(("s1", T0 - 1, 2, "com.example.offer50"))
    assert credited_offers(decisions, early, offers).tolist()[0] == ""
    apple, ours = apple_choice(decisions, outcomes, offers, window_ms=7 * DAY)
    assert apple.tolist() == [False, False, True, False, False, True]
    assert ours.tolist() == [True, False, False, False, False, False]

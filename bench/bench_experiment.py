"""A simulated season of live experiments at Apple's published effect sizes.

How often, and how fast, ``retention experiment promote`` (the anytime-valid confidence sequence of
training/experiment.py, read once a day) promotes a challenger that is truly better, and how often it
promotes one that is not, beside a naive fixed-level z-test read every day on the same data.

Worlds (save rate = share of cancel-intent subscribers who keep the subscription; Apple, WWDC 2026
"Explore Retention Messaging in App Store Connect": messages +1.4 points on a base of about 1.7%
(an 82% relative increase), promotional offers +5.5 points on about 2.5% (223%)):
- ``message``: current 1.71%, a better challenger 3.11% (+1.4 points);
- ``offer``:   current 2.47%, a better challenger 7.97% (+5.5 points), the offer's cost paid by savers;
- each also with a challenger that is no better (same rates).
Each decision's reward is its label × (value − cost). Labels close ``--horizon-days`` after the
decision; the status is read every day on the decisions whose window has closed.

    .venv/bin/python bench/bench_experiment.py [--replicates 200] [--traffic 1000] [--days 120] [--visits 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.experiment import aipw_terms, confidence_sequence

VALUE = 59.88  # a year of a 4.99 monthly plan, the demo catalog's value
WORLDS = {
    # name: (current save rate, challenger save rate if better, challenger cost per saved subscriber)
    "message": (0.0171, 0.0171 + 0.014, 0.0),
    "offer": (0.0247, 0.0247 + 0.055, 15.0),
}


def season(rng: np.random.Generator, p0: float, p1: float, cost1: float, *, share: float, traffic: int,
           days: int, horizon: int, level: float, visits: float = 1.0) -> tuple[int | None, ...]:
    """Return (day promoted, day the current won, day a daily z-test first called the challenger better, day
    promoted had the sequence counted each decision as independent).

    `visits`: the mean number of decisions per subscriber (1 + Poisson(visits − 1)); a subscriber's decisions fall
    within one label window, share the subscriber's arm and one outcome (the strongest dependence the label
    window allows). With 1, every decision is its own subscriber.
    """
    n = traffic * days
    if visits <= 1.0:
        sub = np.arange(n)
        t = np.repeat(np.arange(days, dtype=np.float64), traffic)
    else:
        m = int(n / visits)
        k = 1 + rng.poisson(visits - 1.0, m)
        sub = np.repeat(np.arange(m), k)
        t = rng.uniform(0, days, m)[sub] + rng.uniform(0, horizon, len(sub))
        keep = t < days
        order = np.argsort(t[keep], kind="stable")
        sub, t = sub[keep][order], t[keep][order]
    arm = rng.random(int(sub.max()) + 1) < share
    z = arm[sub]
    saved = (rng.random(len(arm)) < np.where(arm, p1, p0))[sub]
    y = saved * np.where(z, VALUE - cost1, VALUE)
    psi = aipw_terms(z, y, share)
    look_days = np.arange(horizon + 1, days + 1)
    counts = np.searchsorted(t, look_days - horizon, side="left")  # decisions whose window closed by that day
    ok = counts >= 2
    look_days, counts = look_days[ok], counts[ok]
    grouped = confidence_sequence(psi, 1.0 - level, 10 * traffic, counts, groups=None if visits <= 1.0 else sub)
    plain = grouped if visits <= 1.0 else confidence_sequence(psi, 1.0 - level, 10 * traffic, counts)
    promoted = won = naive = per_decision = None
    zq = {0.9: 1.6449, 0.95: 1.96}.get(level, 1.96)
    for day, s, s_plain in zip(look_days, grouped, plain, strict=True):
        if naive is None and s_plain.estimate > zq * s_plain.sd / math.sqrt(s_plain.n):
            naive = int(day)
        if per_decision is None and s_plain.lower > 0:
            per_decision = int(day)
        if promoted is None and won is None:
            if s.lower > 0:
                promoted = int(day)
            elif s.upper < 0:
                won = int(day)
    return promoted, won, naive, per_decision


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicates", type=int, default=200)
    ap.add_argument("--traffic", type=int, default=1000, help="decisions per day (both arms)")
    ap.add_argument("--days", type=int, default=120, help="season length in days")
    ap.add_argument("--horizon-days", type=int, default=30)
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--visits", type=float, default=1.0,
                    help="mean decisions per subscriber, within one label window and sharing one outcome (default 1)")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{args.replicates} seasons per row, {args.traffic} decisions/day, {args.days} days, labels close after "
          f"{args.horizon_days} days, share {args.share}, level {args.level}, {args.visits:g} decisions per "
          "subscriber; status read daily")
    print(f"{'world':<8} {'challenger':<10} {'promoted':>9} {'current won':>11} {'median day':>10} "
          f"{'p90 day':>8} {'daily z-test says better':>25} {'promoted, visits independent':>29}")
    t0 = time.perf_counter()
    for world, (p0, p1, cost1) in WORLDS.items():
        for better in (True, False):
            q1, c1 = (p1, cost1) if better else (p0, 0.0)
            results = [season(rng, p0, q1, c1, share=args.share, traffic=args.traffic, days=args.days,
                              horizon=args.horizon_days, level=args.level, visits=args.visits)
                       for _ in range(args.replicates)]
            prom = [r[0] for r in results if r[0] is not None]
            won = sum(r[1] is not None for r in results)
            naive = sum(r[2] is not None for r in results)
            per_decision = sum(r[3] is not None for r in results)
            med = f"{np.median(prom):.0f}" if prom else "-"
            p90 = f"{np.percentile(prom, 90):.0f}" if prom else "-"
            print(f"{world:<8} {'better' if better else 'no better':<10} {len(prom) / args.replicates:>9.1%} "
                  f"{won / args.replicates:>11.1%} {med:>10} {p90:>8} {naive / args.replicates:>25.1%} "
                  f"{per_decision / args.replicates:>29.1%}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

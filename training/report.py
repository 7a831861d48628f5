"""The self-contained HTML report of an evaluation: tables, warnings and matplotlib plots as embedded PNGs.

``render(summary)`` takes the JSON summary that training.evaluate builds (nothing else), so a
report can be rebuilt from a saved ``summary.json``. The page loads nothing from anywhere:
styles are inline and every plot is a ``data:image/png;base64`` URI.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

import numpy as np

_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} th,td{padding:.3em .7em;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6;text-align:center} td.l,th.l{text-align:left} tr.policy-start td{border-top:2px solid #ccc}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.6em 1em;margin:.8em 0}
.warn li{margin:.3em 0} .ok{background:#eef8ee;border-left:4px solid #4a4;padding:.6em 1em}
.muted{color:#777;font-size:.85em} img{max-width:100%;height:auto;display:block;margin:.8em 0}
.bad{color:#b00;font-weight:600} .good{color:#070;font-weight:600} code{background:#f3f3f3;padding:0 .25em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ci(lo: Any, hi: Any) -> str:
    return "n/a" if lo is None or hi is None else f"[{lo:,.3f}, {hi:,.3f}]"


def _short(name: str) -> str:
    return name if len(name) <= 26 else name[:23] + "…"


def _png(draw: Callable[[Any], None], width: float, height: float) -> str:
    """Return a data URI of the PNG that `draw(fig)` paints on a new figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height), dpi=100)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---- plots ---------------------------------------------------------------------------------------
def _plot_estimates(summary: dict[str, Any]) -> str:
    policies = summary["policies"]
    rows: list[tuple[str, str, dict[str, Any], Any]] = []
    for p in policies:
        for est, e in p["estimates"].items():
            rows.append((p["name"], est, e, p.get("true_value")))

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        names = [p["name"] for p in policies]
        truth_labelled = False
        for i, (name, _est, e, truth) in enumerate(rows):
            y = len(rows) - 1 - i
            color = _COLORS[names.index(name) % len(_COLORS)]
            v, lo, hi = e.get("estimate"), e.get("ci_low"), e.get("ci_high")
            if v is None:
                continue
            if lo is not None and hi is not None:
                # a bootstrap interval may exclude its estimate (by rounding, or a skewed percentile one)
                ax.errorbar([v], [y], xerr=[[max(v - lo, 0.0)], [max(hi - v, 0.0)]], fmt="o", color=color, capsize=3)
            else:
                ax.plot([v], [y], "o", color=color)
            if truth is not None:
                ax.plot([truth], [y], marker="*", color="k", markersize=9, linestyle="none",
                        label=None if truth_labelled else "true value (simulator)")
                truth_labelled = True
        obs = policies[0]["estimates"].get("observed", {})
        if obs.get("estimate") is not None:
            ax.axvline(obs["estimate"], color="#888", linestyle="--", linewidth=1, label="logging policy (observed)")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{_short(n)} · {est}" for n, est, _, _ in reversed(rows)], fontsize=8)
        ax.set_xlabel(f"value per request ({summary['settings']['level']:.0%} bootstrap interval)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
        ax.grid(axis="x", alpha=0.3)

    return _png(draw, 9, max(2.8, 0.32 * len(rows) + 1.6))


def _plot_calibration(summary: dict[str, Any]) -> str | None:
    models = [p for p in summary["policies"] if p.get("predictive", {}).get("calibration")]
    if not models:
        return None

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        ax.plot([0, 1], [0, 1], color="#999", linestyle=":", label="perfect calibration")
        for i, p in enumerate(models):
            bins = p["predictive"]["calibration"]
            x = [b["mean_predicted"] for b in bins]
            y = [b["observed"] for b in bins]
            sizes = [max(8.0, 200.0 * b["count"] / max(1, p["predictive"]["n"])) for b in bins]
            color = _COLORS[(i + 1) % len(_COLORS)]
            ax.plot(x, y, "-", color=color, label=f"{_short(p['name'])} (ECE {_num(p['predictive']['ece'])})")
            ax.scatter(x, y, s=sizes, color=color, alpha=0.7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted P(stay) of the message shown")
        ax.set_ylabel("observed stay rate")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)

    return _png(draw, 6.5, 5.5)


def _plot_message_share(summary: dict[str, Any]) -> str | None:
    policies = summary["policies"]
    labels = summary.get("message_labels", {})
    msgs: list[str] = []
    for p in policies:
        for m in p.get("message_share", {}):
            if m not in msgs:
                msgs.append(m)
    if not msgs:
        return None

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        height = 0.8 / len(policies)
        y = np.arange(len(msgs))
        for i, p in enumerate(policies):
            share = [p.get("message_share", {}).get(m, 0.0) for m in msgs]
            ax.barh(y + i * height, share, height=height, color=_COLORS[i % len(_COLORS)], label=_short(p["name"]))
        ax.set_yticks(y + 0.4 - height / 2)
        ax.set_yticklabels([labels.get(m, m[:8]) for m in msgs], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("share of requests (expected, exploration included)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)

    return _png(draw, 9, max(2.5, 0.3 * len(msgs) * len(policies) + 1.2))


MAX_PLOTTED_SEGMENTS = 20


def _product_labels(products: list[str]) -> dict[str, str]:
    """Return short product names: the ids without the prefix they all share (``com.example.``)."""
    parts = [p.split(".") for p in products]
    shared = 0
    if len(parts) > 1:
        while all(len(x) > shared + 1 and x[shared] == parts[0][shared] for x in parts):
            shared += 1
    return {p: ".".join(x[shared:]) for p, x in zip(products, parts, strict=True)}


def _plot_segments(summary: dict[str, Any]) -> str | None:
    segs = sorted(summary.get("segments") or [], key=lambda s: -s["n"])[:MAX_PLOTTED_SEGMENTS]
    if not segs:
        return None
    names = [p["name"] for p in summary["policies"]]
    short = _product_labels(sorted({s["product_id"] for s in summary.get("segments") or []}))

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        height = 0.8 / len(names)
        y = np.arange(len(segs))
        for i, name in enumerate(names):
            vals = [s["values"].get(name, {}) for s in segs]
            est = np.array([v.get("estimate") if v.get("estimate") is not None else np.nan for v in vals], dtype=float)
            lo = np.array([v.get("ci_low") if v.get("ci_low") is not None else np.nan for v in vals], dtype=float)
            hi = np.array([v.get("ci_high") if v.get("ci_high") is not None else np.nan for v in vals], dtype=float)
            err = np.clip(np.vstack([np.nan_to_num(est - lo), np.nan_to_num(hi - est)]), 0.0, None)
            ax.barh(y + i * height, np.nan_to_num(est), height=height, xerr=err, capsize=2,
                    color=_COLORS[i % len(_COLORS)], label=_short(name) + (" (observed)" if i == 0 else " (DR)"),
                    error_kw={"elinewidth": 0.8})
        ax.set_yticks(y + 0.4 - height / 2)
        ax.set_yticklabels([f"{short[s['product_id']]} · {s['user_locale']} (n={s['n']:,})" for s in segs],
                           fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("value per request")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)

    return _png(draw, 9, max(3.0, 0.22 * len(segs) * len(names) + 1.5))


def _plot_ess(summary: dict[str, Any]) -> str | None:
    models = [p for p in summary["policies"] if p.get("kind") == "model"]
    if not models:
        return None
    floor = summary["settings"].get("min_ess")

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(111)
        ess = [p.get("ess") or 0.0 for p in models]
        colors = ["#C44E52" if floor is not None and e < floor else "#55A868" for e in ess]
        ax.barh(range(len(models)), ess, color=colors)
        if floor is not None:
            ax.axvline(floor, color="#C44E52", linestyle="--", linewidth=1, label=f"warning below {floor:,.0f}")
            ax.legend(fontsize=8)
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels([_short(p["name"]) for p in models], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"effective sample size of the importance weights (of {summary['data']['evaluated']:,} requests)")
        ax.grid(axis="x", alpha=0.3)

    return _png(draw, 8, 1.0 + 0.45 * len(models))


# ---- tables ------------------------------------------------------------------------------------
def _estimates_table(summary: dict[str, Any]) -> str:
    level = summary["settings"]["level"]
    truth = summary.get("ground_truth") is not None
    head = ["policy", "estimator", "estimate", f"{level:.0%} interval", "ESS", "ESS share", "max weight",
            "unsupported mass"] + (["true value"] if truth else [])
    out = ['<table id="estimates" class="estimates"><thead><tr>',
           "".join(f'<th class="{"l" if i < 2 else ""}">{_e(h)}</th>' for i, h in enumerate(head)), "</tr></thead><tbody>"]
    for p in summary["policies"]:
        label = p["name"] + (" (current)" if p.get("is_current") else "")
        for j, (est, e) in enumerate(p["estimates"].items()):
            n = e.get("n") or 0
            ess = e.get("ess")
            cells = [
                f'<td class="l">{_e(label) if j == 0 else ""}</td>',
                f'<td class="l">{_e(est)}</td>',
                f"<td>{_num(e.get('estimate'))}</td>",
                f"<td>{_ci(e.get('ci_low'), e.get('ci_high'))}</td>",
                f"<td>{_num(ess, 0)}</td>",
                f"<td>{_pct(ess / n if ess is not None and n else None)}</td>",
                f"<td>{_num(e.get('max_weight'), 2)}</td>",
                f"<td class=\"{'bad' if (e.get('unsupported_mass') or 0) > 1e-9 else ''}\">{_pct(e.get('unsupported_mass'))}</td>",
            ]
            if truth:
                cells.append(f"<td>{_num(p.get('true_value')) if j == 0 else ''}</td>")
            cls = ' class="policy-start"' if j == 0 else ""
            out.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _differences_table(summary: dict[str, Any]) -> str:
    level = summary["settings"]["level"]
    rows = []
    for p in summary["policies"]:
        for key, against in (("vs_current", f"current ({summary.get('current')})"), ("vs_logging", "logging policy")):
            for est, d in (p.get(key) or {}).items():
                lo, hi = d.get("ci_low"), d.get("ci_high")
                verdict = ""
                if d.get("too_few"):
                    verdict = f"too few effective samples ({d['too_few']['ess']:,.0f})"
                elif lo is not None and lo > 0:
                    verdict = '<span class="good">better</span>'
                elif hi is not None and hi < 0:
                    verdict = '<span class="bad">worse</span>'
                elif lo is not None:
                    verdict = "not distinguishable"
                need = d.get("decisions_for_one_percent")  # evaluate leaves it (and the MDD) out when too_few
                differ = d.get("choices_differ")
                rows.append(
                    f'<tr><td class="l">{_e(p["name"])}</td><td class="l">{_e(against)}</td><td class="l">{_e(est)}</td>'
                    f"<td>{_num(d.get('estimate'))}</td><td>{_ci(lo, hi)}</td><td class=\"l\">{verdict}</td>"
                    f"<td>{_num(d.get('mdd')) if d.get('mdd') is not None else ''}</td>"
                    f"<td>{f'{need:,}' if need is not None else ''}</td>"
                    f"<td>{f'{differ:.1%}' if differ is not None else ''}</td></tr>"
                )
    if not rows:
        return '<p class="muted">No paired differences (no bootstrap resamples, or a single policy).</p>'
    return (
        '<table id="differences"><thead><tr><th class="l">policy</th><th class="l">minus</th><th class="l">estimator</th>'
        f"<th>difference</th><th>{level:.0%} paired interval</th><th class=\"l\">verdict</th>"
        "<th>MDD (80% power)</th><th>decisions a 1% advantage needs</th><th>choices that differ</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
        + '<p class="muted">MDD: the smallest true difference these decisions detect 80% of the time (DR rows). The '
        "decisions a 1% advantage needs hold for a candidate whose choices differ from the other policy's on as many "
        "requests as this one's do.</p>"
    )


def _predictive_table(summary: dict[str, Any]) -> str:
    models = [p for p in summary["policies"] if p.get("predictive")]
    if not models:
        return ""
    rows = "".join(
        f'<tr><td class="l">{_e(p["name"])}</td><td>{p["predictive"]["n"]:,}</td><td>{_num(p["predictive"]["auc"])}</td>'
        f'<td>{_num(p["predictive"]["log_loss"], 4)}</td><td>{_num(p["predictive"]["brier"], 4)}</td>'
        f'<td>{_num(p["predictive"]["ece"], 4)}</td><td>{_num(p["predictive"]["base_rate"])}</td>'
        f'<td>{_num(p["predictive"]["mean_predicted"])}</td></tr>'
        for p in models
    )
    return (
        '<table id="predictive"><thead><tr><th class="l">version</th><th>held-out rows</th><th>AUC</th><th>log loss</th>'
        "<th>Brier</th><th>ECE</th><th>stay rate</th><th>mean predicted</th></tr></thead><tbody>" + rows + "</tbody></table>"
    )


def _segments_table(summary: dict[str, Any]) -> str:
    segs = summary.get("segments") or []
    if not segs:
        return ""
    names = [p["name"] for p in summary["policies"]]
    head = "".join(f"<th>{_e(_short(n))}</th>" for n in names)
    rows = []
    for s in segs:
        cells = "".join(
            f"<td>{_num(s['values'].get(n, {}).get('estimate'))}<br><span class=\"muted\">"
            f"{_ci(s['values'].get(n, {}).get('ci_low'), s['values'].get(n, {}).get('ci_high'))}</span></td>"
            for n in names
        )
        rows.append(f'<tr><td class="l">{_e(s["product_id"])}</td><td class="l">{_e(s["user_locale"])}</td>'
                    f"<td>{s['n']:,}</td>{cells}</tr>")
    return (f'<table id="segments"><thead><tr><th class="l">product</th><th class="l">locale</th><th>n</th>{head}'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _img(uri: str | None, alt: str) -> str:
    return "" if uri is None else f'<img src="{uri}" alt="{_e(alt)}">'


def render(summary: dict[str, Any]) -> str:
    """Return the HTML page for an evaluation summary (see training.evaluate), self-contained."""
    d = summary["data"]
    s = summary["settings"]
    ex = s["exploration"]
    warnings = summary.get("warnings") or []
    warn_html = (
        '<div class="warn" id="warnings"><strong>Read these first</strong><ul>'
        + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>"
        if warnings else '<div class="ok" id="warnings">No warnings: every policy has enough effective sample size and '
        "full support under the logging policy.</div>"
    )
    gt = summary.get("ground_truth")
    gt_html = ""
    if gt:
        gt_html = (
            f"<h2>Ground truth (simulator)</h2><p>On these {gt['requests']:,} requests: oracle {_num(gt['oracle'])}, "
            f"best static message {_num(gt['best_static'])} (<code>{_e(summary.get('message_labels', {}).get(gt['best_static_message'], gt['best_static_message']))}</code>), "
            f"logging policy {_num(gt['policies'].get('logging'))}.</p>"
        )
    current = summary.get("current")
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>Off-policy evaluation of retention models</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Off-policy evaluation of retention models</h1>",
        f'<p class="muted">Generated {_e(summary.get("generated", ""))}. Current version: '
        f"<code>{_e(current or 'none')}</code>. Target policies use exploration {_e(ex['scheme'])} "
        f"(ε={ex['epsilon']}, temperature {ex['temperature']}, holdout {ex['holdout']}), as serving does.</p>",
        f"<p>{d['evaluated']:,} of {d['decisions']:,} logged decisions evaluated ({_e(d['first_decision'])} to "
        f"{_e(d['last_decision'])}; {d['retained']:,} retained, {d['churned']:,} churned, {d['censored']:,} censored; "
        f"{d['fallback_decisions']:,} fallback decisions counted as the logging policy's own with probability 1). "
        f"Reward = label × (V(product after message) − cost). Mean observed reward {_num(d['mean_reward'])}.</p>",
        warn_html,
        "<h2>Estimated value per request</h2>",
        "<p>Each model version's policy is evaluated with every estimator: <b>ips</b> (inverse propensity), "
        "<b>snips</b> (self-normalised), <b>dm</b> (direct method: the reward model alone, its interval ignores the "
        "model's own error), <b>dr</b> (doubly robust) and <b>switch-dr</b>. The logging policy's value is the "
        "observed mean. <b>Unsupported mass</b> is the share of the policy's probability on candidates the logging "
        "policy could not show: no logged outcome speaks for them.</p>",
        _estimates_table(summary),
        _img(_plot_estimates(summary), "estimates with intervals"),
        "<h2>Paired differences</h2>",
        "<p>Differences are bootstrapped on the same resampled requests, so shared noise cancels. A version is promoted "
        "only when the DR difference to the current version has a lower bound above zero.</p>",
        _differences_table(summary),
        gt_html,
        "<h2>Effective sample size</h2>",
        f"<p>ESS = (Σw)²/Σw² of the importance weights; below {_num(s.get('min_ess'), 0)} the importance-weighted "
        "estimates are flagged as too noisy to trust.</p>",
        _img(_plot_ess(summary), "effective sample size per version"),
        "<h2>Predictive quality on the time-based held-out split</h2>",
        f"<p>The latest {d['holdout']['fraction']:.0%} of evaluated decisions ({d['holdout']['rows']:,} rows, from "
        f"{_e(d['holdout']['from'])}): each version's P(stay) for the message actually shown against the outcome.</p>",
        _predictive_table(summary),
        _img(_plot_calibration(summary), "calibration curves"),
        "<h2>Share of each message chosen</h2>",
        "<p>Logging policy: the messages it showed. Versions: the expected share under their policy, exploration "
        "included.</p>",
        _img(_plot_message_share(summary), "share of each message"),
        "<h2>Value by segment (product, locale)</h2>",
        "<p>Doubly robust estimate per version, observed mean for the logging policy; small segments have wide "
        f"intervals. The plot shows the {MAX_PLOTTED_SEGMENTS} largest segments, the table all of them.</p>",
        _img(_plot_segments(summary), "value by segment"),
        _segments_table(summary),
        "<h2>Settings</h2>",
        f'<p class="muted">confidence level {s["level"]:.0%}, {s["n_resamples"]:,} bootstrap resamples (seed '
        f"{s['seed']}), label horizon {s['horizon_days']:g} days, reward model: {_e(s['reward_model'])}, "
        f"only decisions whose label window has passed: {_e(s.get('mature_only'))}.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)

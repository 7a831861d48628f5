"""``retention demo`` (what ``bash scripts/demo.sh`` runs) end to end, on a small world.

It trains into an empty registry, serves, answers signed requests, refuses a forged one, and
prints one report in order: the server's own log lines come in their own section after the
requests, never in the middle of the tables.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.test_loop import retention


def test_the_demo_trains_serves_refuses_a_forgery_and_reports_in_order(tmp_path: Path) -> None:
    run = retention("demo", "--registry", str(tmp_path / "registry"), "--decisions", "3000", "--requests", "3",
                    timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "model: trained " in out and "server: ready=True" in out
    answers = [line for line in out.splitlines() if " -> " in line]
    assert len(answers) == 4 and all(" -> 200 " in a for a in answers[:3])
    assert "forged request" in answers[3] and "-> 401" in answers[3] and "untrusted_chain" in answers[3]
    # the server's refusal is logged, in its own section between the answers and the decisions
    log_at, forged_at, decisions_at = (out.index("server log (warnings and errors):"), out.index("forged request"),
                                       out.index("decisions logged"))
    assert forged_at < log_at < decisions_at
    assert "WARNING retention.requests: refused a request with untrusted_chain" in out[log_at:decisions_at]
    assert "retention.requests" not in run.stderr
    assert out.count("policy=ml:") == 3  # every answered request was logged with the model's policy
    assert out.rstrip().endswith("demo: done; the server stopped cleanly")

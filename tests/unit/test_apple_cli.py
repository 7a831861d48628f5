"""``retention apple``: realtime URL and Apple's performance test, against the loopback Apple server."""

from __future__ import annotations

import pytest

from serving import apple_cli

OTID = "2000000123456789"
FAST = ["--min-interval", "0"]


def test_realtime_url_show_set_delete(apple, capsys):
    assert apple_cli.main(["realtime-url", "show", *FAST]) == 0
    assert "no realtime URL configured in Sandbox" in capsys.readouterr().out
    assert apple_cli.main(["realtime-url", "set", "https://retention.example.com/retention/message", *FAST]) == 0
    assert apple.account.realtime_url == "https://retention.example.com/retention/message"
    assert apple_cli.main(["realtime-url", "show", *FAST]) == 0
    assert "Sandbox realtime URL: https://retention.example.com/retention/message" in capsys.readouterr().out
    assert apple_cli.main(["realtime-url", "delete", *FAST]) == 0
    assert apple.account.realtime_url is None
    assert apple_cli.main(["realtime-url", "delete", *FAST]) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_a_plain_http_url_is_refused_before_calling_apple(apple, capsys):
    assert apple_cli.main(["realtime-url", "set", "http://retention.example.com/m", *FAST]) == 2
    assert "https URL of at most 256" in capsys.readouterr().err
    assert apple.server.log == []


def test_production_url_before_a_passing_test_is_one_line_saying_what_to_do(apple, capsys):
    apple.account.environment = "Production"
    argv = ["realtime-url", "set", "https://retention.example.com/m", "--environment", "Production", *FAST]
    assert apple_cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only after a Sandbox performance test has passed" in err[0]


def test_performance_test_waits_prints_apples_figures_and_passes(apple, capsys):
    apple.account.realtime_url = "https://retention.example.com/m"
    apple.account.pending_polls = 2
    apple.account.performance_result = {
        "result": "PASS", "successRate": 100, "numPending": 0,
        "responseTimes": {"average": 81, "p50": 70, "p90": 120, "p95": 150, "p99": 210}, "failures": {"TIMED_OUT": 1}}
    assert apple_cli.main(["performance-test", "--original-transaction-id", OTID, "--wait", *FAST]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert ("config: maxConcurrentRequests 50, totalRequests 2000, totalDuration 60000 ms, responseTimeThreshold 700 ms, "
            "successRateThreshold 99%") in out
    assert "responseTimes (ms): average 81, p50 70, p90 120, p95 150, p99 210" in out
    assert "successRate: 100%" in out and "failures: TIMED_OUT 1" in out and out.rstrip().endswith("result: PASS")
    assert captured.err.count("PENDING") == 2
    # Apple now accepts a Production URL
    apple.account.environment = "Production"
    assert apple_cli.main(["realtime-url", "set", "https://retention.example.com/m", "--environment", "Production",
                           *FAST]) == 0


def test_a_failed_test_exits_1_and_a_pending_one_3(apple, capsys):
    apple.account.realtime_url = "https://retention.example.com/m"
    apple.account.performance_result = {"result": "FAIL", "successRate": 91, "responseTimes": {"p99": 1900},
                                        "failures": {"TIMED_OUT": 150, "UNSUCCESSFUL_HTTP_RESPONSE_CODE": 30}}
    assert apple_cli.main(["performance-test", "--original-transaction-id", OTID, *FAST]) == 3
    captured = capsys.readouterr()
    request_id = captured.out.splitlines()[0].split()[4]
    assert "still PENDING: read it later with --request-id" in captured.err
    assert apple_cli.main(["performance-test", "--request-id", request_id, *FAST]) == 1
    out = capsys.readouterr().out
    assert "failures: TIMED_OUT 150, UNSUCCESSFUL_HTTP_RESPONSE_CODE 30" in out and "result: FAIL" in out


@pytest.mark.parametrize(("setup", "expected"), [
    ("running", "already running a performance test"),
    ("family", "is a Family Sharing purchase"),
    ("not_original", "is not an original transaction id"),
    ("no_url", "no realtime URL is configured in Sandbox"),
    ("no_access", "no access to the Retention Messaging API"),
])
def test_apples_refusals_are_one_line_each(apple, capsys, setup, expected):
    acct = apple.account
    acct.realtime_url = "https://retention.example.com/m"
    if setup == "running":
        acct.pending_polls = 5
        assert apple_cli.main(["performance-test", "--original-transaction-id", "1000", *FAST]) == 3
        capsys.readouterr()
    elif setup == "family":
        acct.family_transactions.add(OTID)
    elif setup == "not_original":
        acct.non_original_transactions.add(OTID)
    elif setup == "no_url":
        acct.realtime_url = None
    else:
        acct.no_access = True
    assert apple_cli.main(["performance-test", "--original-transaction-id", OTID, "--wait", *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_the_hints_name_commands_that_run(apple, capsys):
    apple.account.realtime_url = None
    assert apple_cli.main(["performance-test", "--original-transaction-id", OTID, *FAST]) == 1
    err = capsys.readouterr().err
    assert "`retention apple realtime-url set https://... --environment Sandbox`" in err
    from appstoreserverlibrary.api_client import APIException

    line = apple_cli.refusal(APIException(403, 4030026, "x"), environment="Production")
    assert "`retention apple performance-test --environment Sandbox --original-transaction-id ID --wait`" in line


def test_wrong_credentials_are_one_line(apple, capsys):
    assert apple_cli.main(["realtime-url", "show", "--key-id", "WRONG", *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 401" in err[0]


def test_the_test_runs_in_sandbox_only(apple, capsys):
    assert apple_cli.main(["performance-test", "--original-transaction-id", OTID, "--environment", "Production"]) == 2
    assert "Sandbox only" in capsys.readouterr().err


def test_the_verb_is_wired(apple, capsys):
    import retention

    assert retention.main(["apple", "realtime-url", "show", *FAST]) == 0

"""Metrics: the scrape shows every series; in multiprocess mode it sums the workers' samples."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def test_render_includes_every_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = Metrics()
    m.observe_request(0.0012, "message", "11111111-1111-4111-8111-111111111111")
    m.observe_request(0.0040, "promotionalOffer", "22222222-2222-4222-8222-222222222222")
    m.observe_request(0.0008, "none", None)
    m.fallback("deadline")
    m.fallback("deadline")
    m.verification_failure("bad_signature")
    m.set_model_version("v1")
    m.set_model_version("v2")
    m.reload_failure("catalog")
    m.decision_log_dropped(3)
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    s = _samples(body)
    assert s[("retention_request_latency_seconds_count", ())] == 3
    assert s[("retention_request_latency_seconds_bucket", (("le", "0.001"),))] == 1
    assert s[("retention_request_latency_seconds_bucket", (("le", "0.005"),))] == 3
    assert (
        s[("retention_answers_total", (("kind", "message"), ("message_id", "11111111-1111-4111-8111-111111111111")))]
        == 1
    )
    assert s[("retention_answers_total", (("kind", "none"), ("message_id", "none")))] == 1
    assert s[("retention_fallbacks_total", (("reason", "deadline"),))] == 2
    assert s[("retention_verification_failures_total", (("code", "bad_signature"),))] == 1
    assert s[("retention_model_version_info", (("version", "v2"),))] == 1
    assert s[("retention_model_version_info", (("version", "v1"),))] == 0
    assert s[("retention_reload_failures_total", (("what", "catalog"),))] == 1
    assert s[("retention_decision_log_dropped_total", ())] == 3
    # a second app in the same process has its own counts (nothing global)
    assert _samples(Metrics().render()[0]).get(("retention_fallbacks_total", (("reason", "deadline"),))) is None


_WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from serving.metrics import Metrics
    m = Metrics()
    for _ in range({n}):
        m.observe_request(0.002, "message", "m1")
    m.fallback("no_model")
    m.verification_failure("stale_request")
    m.set_model_version({version!r})
    """
)


def test_multiprocess_aggregates_two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp), "PATH": "/usr/bin:/bin"}
    for n, version in ((5, "v1"), (7, "v1")):
        code = _WORKER.format(repo=str(REPO), n=n, version=version)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    # any process pointed at the folder (here this one, which imported prometheus_client long ago) sums them
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp))
    scraper = Metrics()
    scraper.observe_request(0.3, "message", "m1")
    s = _samples(scraper.render()[0])
    assert s[("retention_answers_total", (("kind", "message"), ("message_id", "m1")))] == 13
    assert s[("retention_request_latency_seconds_count", ())] == 13
    assert s[("retention_request_latency_seconds_bucket", (("le", "0.003"),))] == 12
    assert s[("retention_fallbacks_total", (("reason", "no_model"),))] == 2
    assert s[("retention_verification_failures_total", (("code", "stale_request"),))] == 2
    assert s[("retention_model_version_info", (("version", "v1"),))] == 1  # max over workers, not a sum
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert _samples(Metrics().render()[0])[("retention_request_latency_seconds_count", ())] == 0  # back to in-process


def test_bad_multiprocess_dir_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="not a folder"):
        Metrics()


def test_latency_buckets_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = Metrics()
    for latency in (0.0001, 0.001, 0.0010001, 0.049, 0.7, 1.5) * 100:
        m.observe_request(latency, "message", "m1")
    s = _samples(m.render()[0])
    bucket = lambda le: s[("retention_request_latency_seconds_bucket", (("le", le),))]  # noqa: E731
    assert bucket("0.0005") == 100
    assert bucket("0.001") == 200  # a latency equal to a bound counts in that bucket (Prometheus "le")
    assert bucket("0.002") == 300
    assert bucket("0.05") == 400
    assert bucket("0.7") == 500
    assert bucket("+Inf") == 600 == s[("retention_request_latency_seconds_count", ())]
    assert s[("retention_request_latency_seconds_sum", ())] == pytest.approx(
        100 * (0.0001 + 0.001 + 0.0010001 + 0.049 + 0.7 + 1.5)
    )


_LIVE_WORKER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from serving.metrics import Metrics
    m = Metrics(flush_interval_s=0.1)
    for _ in range(4):
        m.observe_request(0.002, "alternateProduct", "m2")
    print("answered", flush=True)
    time.sleep(30)
    """
)


def test_a_running_worker_shows_up_in_another_workers_scrape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mp = tmp_path / "prom"
    mp.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _LIVE_WORKER.format(repo=str(REPO))],
        env={"PROMETHEUS_MULTIPROC_DIR": str(mp), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "answered"
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp))
        scraper = Metrics()
        key = ("retention_answers_total", (("kind", "alternateProduct"), ("message_id", "m2")))
        deadline = time.monotonic() + 10
        while _samples(scraper.render()[0]).get(key) != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _samples(scraper.render()[0]).get(key) == 4
    finally:
        child.kill()
        child.wait()

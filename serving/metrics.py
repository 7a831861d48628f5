"""Prometheus metrics of the endpoint, aggregated across uvicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``retention serve --workers N`` sets it to a fresh folder
before the workers start), every process writes its samples to memory-mapped files in that
folder and ``render`` merges all of them, so one scrape of any worker shows the whole server.
Without it, each :class:`Metrics` has its own registry (tests build as many as they like).

Series:
- ``retention_request_latency_seconds`` histogram, buckets from 0.5 ms to 700 ms (Apple's limit);
- ``retention_answers_total{kind, message_id}``;
- ``retention_fallbacks_total{reason}``;
- ``retention_verification_failures_total{code}``;
- ``retention_model_version_info{version}`` 1 for the version a worker serves (max over workers);
- ``retention_reload_failures_total{what}``;
- ``retention_decision_log_dropped_total`` (rows the log could not keep: queue full, or unwritable at shutdown);
- ``retention_decision_log_faults_total{reason}`` (a log file deleted, replaced or corrupt and a fresh one
  started; ``unavailable``: writing began to fail, disk full or read-only);
- ``retention_http_5xx_total{path, status}`` every answer with a 5xx status the app sent (``path`` is one of
  the app's routes, or ``other``);
- ``retention_connections_refused_total{code}`` (connections answered and closed by serving/http_limits.py:
  request_timeout, too_many_connections, request_header_fields_too_large, uri_too_long, malformed_request);
- with a database (``RETENTION_DATABASE_URL``): ``retention_database_up`` (1 while it takes the log's batches,
  min over workers), ``retention_database_spilled_records`` (records waiting in the local spill files, summed),
  ``retention_database_misses_total{what}`` (request-path reads that did not answer within the budget).

The request path calls ``observe_request`` once per answer. It only adds to per-process tallies
under a lock (about 1 µs); the tallies are moved into the Prometheus series at most every
`flush_interval_s` (by the next request, a small background thread, or a scrape), because
prometheus_client's own histogram update costs several µs, and twice that in multiprocess mode
where every increment writes a memory-mapped file. A scrape therefore sees other workers'
answers up to `flush_interval_s` late, and its own worker's exactly.
"""

from __future__ import annotations

import atexit
import bisect
import os
import threading
import time
import weakref
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.35, 0.5, 0.7,
)  # fmt: skip
NO_MESSAGE = "none"


def multiprocess_dir() -> str | None:
    """Return the folder of multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), or None for a single process."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _ensure_value_class(multiprocess: bool) -> None:
    """Make new metric children count where this mode reads, whatever the import order.

    prometheus_client picks its value class once, when it is imported; a server that imports it
    before setting PROMETHEUS_MULTIPROC_DIR would otherwise count in memory that no scrape reads
    (and, the other way round, fail to open files in a folder that is no longer set).
    """
    if bool(getattr(_values.ValueClass, "_multiprocess", False)) != multiprocess:
        _values.ValueClass = _values.MultiProcessValue() if multiprocess else _values.MutexValue


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (call from the supervisor when a worker exits)."""
    directory = multiprocess_dir()
    if directory:
        prometheus_client.multiprocess.mark_process_dead(pid, directory)


class Metrics:
    """The endpoint's counters, histogram and gauges; :meth:`render` gives the scrape body."""

    def __init__(self, *, flush_interval_s: float = 1.0) -> None:
        self._dir = multiprocess_dir()
        if self._dir and not os.path.isdir(self._dir):
            raise ValueError(f"PROMETHEUS_MULTIPROC_DIR {self._dir!r} is not a folder")
        _ensure_value_class(bool(self._dir))
        # Metrics are registered in a private registry: nothing global, so several apps can live in one
        # process (tests). In multiprocess mode the samples go to the files whatever the registry.
        self._registry = CollectorRegistry(auto_describe=True)
        reg = self._registry
        self._latency = Histogram(
            "retention_request_latency_seconds",
            "Time from request received to answer, seconds (Apple gives up at 0.7 s).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._answers = Counter(
            "retention_answers", "Answers by kind (message, alternateProduct, promotionalOffer, none) and message.",
            ["kind", "message_id"], registry=reg,
        )  # fmt: skip
        self._fallbacks = Counter(
            "retention_fallbacks", "Answers given by the fallback policy, by reason.", ["reason"], registry=reg
        )
        self._verification = Counter(
            "retention_verification_failures",
            "Requests refused by verification, by stable error code.",
            ["code"],
            registry=reg,
        )
        self._model = Gauge(
            "retention_model_version_info",
            "1 for the model version a worker serves (max over workers); all 0 when none is loaded.",
            ["version"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self._reload = Counter(
            "retention_reload_failures",
            "Model or catalog reloads refused (the old one kept serving), by what.",
            ["what"],
            registry=reg,
        )
        self._dropped = Counter(
            "retention_decision_log_dropped",
            "Decisions and outcomes the log could not keep (queue full, or still unwritable at shutdown).",
            registry=reg,
        )
        self._log_faults = Counter(
            "retention_decision_log_faults",
            "Decision log faults by reason: deleted, replaced, corrupt (a fresh file was started), "
            "unavailable (writes began to fail).",
            ["reason"],
            registry=reg,
        )
        self._connections_refused = Counter(
            "retention_connections_refused",
            "Connections refused by the HTTP limits, by stable error code (request_timeout, too_many_connections, "
            "request_header_fields_too_large, uri_too_long, malformed_request).",
            ["code"],
            registry=reg,
        )
        self._db_up = Gauge(
            "retention_database_up",
            "1 while the database takes the decision log's batches, 0 while they go to the spill file (min over workers).",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self._db_spilled = Gauge(
            "retention_database_spilled_records",
            "Decisions and outcomes waiting in the local spill files for the database (summed over workers).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._db_misses = Counter(
            "retention_database_misses",
            "Request-path reads of the database that failed or did not answer within the budget, by what (replay).",
            ["what"],
            registry=reg,
        )
        self._http_5xx = Counter(
            "retention_http_5xx",
            "Answers sent with a 5xx status, by route path and status (a 503 /ready or outcome_not_stored included).",
            ["path", "status"],
            registry=reg,
        )
        self._replay_store_errors = Counter(
            "retention_replay_store_errors",
            "Requests whose id the shared replay store could not record (answered on the worker's own replay memory).",
            registry=reg,
        )
        self._lock = threading.Lock()
        self._answer_children: dict[tuple[str, str], Any] = {}
        self._fallback_children: dict[str, Any] = {}
        self._version: str | None = None
        # batched histogram: needs prometheus_client's per-bucket values (pinned version; the tests check the counts)
        self._bounds: list[float] = list(getattr(self._latency, "_upper_bounds", []))
        self._batched = bool(self._bounds) and hasattr(self._latency, "_buckets") and hasattr(self._latency, "_sum")
        self.flush_interval_s = flush_interval_s
        self._pending_buckets = [0] * len(self._bounds)
        self._pending_sum = 0.0
        self._pending_answers: dict[tuple[str, str], int] = {}
        self._next_flush = time.monotonic() + flush_interval_s
        self._flusher: threading.Thread | None = None
        global _latest
        _latest = weakref.ref(self)

    # -- request path ------------------------------------------------------------------------------
    def observe_request(self, latency_s: float, kind: str, message_id: str | None) -> None:
        """Count one answer and its latency (``kind`` none / message_id None for no_eligible_message)."""
        key = (kind, message_id or NO_MESSAGE)
        if not self._batched:
            self._latency.observe(latency_s)
            self._answer_child(key).inc()
            return
        i = bisect.bisect_left(self._bounds, latency_s)  # first bucket whose bound >= latency (le semantics)
        with self._lock:
            self._pending_buckets[i] += 1
            self._pending_sum += latency_s
            pa = self._pending_answers
            pa[key] = pa.get(key, 0) + 1
        if time.monotonic() >= self._next_flush:
            self.flush()
        if self._flusher is None:
            self._start_flusher()

    def _answer_child(self, key: tuple[str, str]) -> Any:
        child = self._answer_children.get(key)
        if child is None:
            child = self._answer_children.setdefault(key, self._answers.labels(*key))
        return child

    def flush(self) -> None:
        """Move the tallies of observed requests into the Prometheus series (and the multiprocess files)."""
        with self._lock:
            self._next_flush = time.monotonic() + self.flush_interval_s
            buckets, self._pending_buckets = self._pending_buckets, [0] * len(self._bounds)
            total, self._pending_sum = self._pending_sum, 0.0
            answers, self._pending_answers = self._pending_answers, {}
        if not answers:
            return
        h: Any = self._latency
        for i, n in enumerate(buckets):
            if n:
                h._buckets[i].inc(n)
        h._sum.inc(total)
        for key, n in answers.items():
            self._answer_child(key).inc(n)

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is not None:
                return
            ref = weakref.ref(self)
            interval = self.flush_interval_s

            def run() -> None:
                # holds only a weak reference: the thread ends when its Metrics is gone
                while True:
                    time.sleep(interval)
                    me = ref()
                    if me is None:
                        return
                    me.flush()
                    del me

            def at_exit() -> None:
                me = ref()
                if me is not None:
                    me.flush()

            self._flusher = threading.Thread(target=run, name="metrics-flush", daemon=True)
            self._flusher.start()
            atexit.register(at_exit)  # a worker that exits cleanly leaves its last tallies in the files

    def close(self) -> None:
        """Flush the tallies (call at shutdown; also done at interpreter exit)."""
        self.flush()

    def fallback(self, reason: str) -> None:
        """Count one fallback answer by its reason (no_model, error, nan, deadline, kill_switch...)."""
        child = self._fallback_children.get(reason)
        if child is None:
            child = self._fallback_children.setdefault(reason, self._fallbacks.labels(reason))
        child.inc()

    def verification_failure(self, code: str) -> None:
        """Count one refused request by its stable error code."""
        self._verification.labels(code).inc()

    # -- lifecycle ---------------------------------------------------------------------------------
    def set_model_version(self, version: str | None) -> None:
        """Record the model version this process now serves (None: no model, the rule policy answers)."""
        with self._lock:
            if self._version is not None and self._version != version:
                self._model.labels(self._version).set(0)
            if version is not None:
                self._model.labels(version).set(1)
            self._version = version

    def reload_failure(self, what: str) -> None:
        """Count one refused reload (``model``, ``catalog``, ``shadow``, ``experiment`` or ``challenger``)."""
        self._reload.labels(what).inc()

    def decision_log_dropped(self, n: int) -> None:
        """Count `n` decisions the log could not keep."""
        if n > 0:
            self._dropped.inc(n)

    def decision_log_fault(self, reason: str) -> None:
        """Count one decision log fault (deleted, replaced, corrupt, unavailable)."""
        self._log_faults.labels(reason).inc()

    def http_5xx(self, path: str, status: int) -> None:
        """Count one answer sent with a 5xx `status` on route `path` (keep `path` to a bounded set)."""
        self._http_5xx.labels(path, str(status)).inc()

    def connection_refused(self, code: str) -> None:
        """Count one connection refused by the HTTP limits, by its stable error code."""
        self._connections_refused.labels(code).inc()

    def database_state(self, up: bool, spilled: int) -> None:
        """Set the database gauges: whether it takes batches, and the records waiting in the spill file."""
        self._db_up.set(1 if up else 0)
        self._db_spilled.set(spilled)

    def database_miss(self, what: str) -> None:
        """Count one request-path read of the database that failed or came too late (`what`: replay)."""
        self._db_misses.labels(what).inc()

    def replay_store_error(self) -> None:
        """Count one request the shared replay store could not record."""
        self._replay_store_errors.inc()

    def render(self) -> tuple[bytes, str]:
        """Return the Prometheus text body (every worker's samples in multiprocess mode) and its content type."""
        self.flush()
        if self._dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._dir)
            return generate_latest(registry), CONTENT_TYPE
        return generate_latest(self._registry), CONTENT_TYPE


_latest: weakref.ref[Metrics] | None = None  # the process's Metrics (the app's): the last one made


def connection_refused(code: str) -> None:
    """Count a refused connection on the process's :class:`Metrics` (none yet: not counted).

    The HTTP protocol (serving/http_limits.py) runs below the application and has no reference to its Metrics.
    """
    m = _latest() if _latest is not None else None
    if m is not None:
        m.connection_refused(code)

"""The server's log: one format on stderr for our lines, uvicorn's and Litestar's; text or JSON.

``retention serve`` hands :func:`logging_config` to uvicorn, which applies it in the main process
and in every worker, so every line on stderr has one shape:

* ``text`` (default): ``2026-11-30T02:51:07.123Z INFO retention.server: message``
* ``json``: one object per line, ``{"time", "level", "logger", "message"}`` plus ``"exception"`` when
  there is a traceback, for log shippers (Loki, CloudWatch, Datadog) that parse fields.

Access lines (uvicorn's ``uvicorn.access`` logger: client, method, path, status) are written only with
the ``access_log`` setting. :class:`RefusalLog` turns refused requests into at most one line per
error code per interval, so a flood of bad requests cannot flood the log.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

log = logging.getLogger("retention.requests")


class UtcFormatter(logging.Formatter):
    """Text lines with an ISO 8601 UTC timestamp to the millisecond."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(UtcFormatter):
    """One JSON object per line: time, level, logger, message (and exception, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)



class WorkerDiedFilter(logging.Filter):
    """Raise uvicorn's ``Child process [N] died`` (a worker killed or crashed; uvicorn logs it at INFO) to ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and str(record.msg).startswith("Child process [") and "died" in str(record.msg):
            record.levelno, record.levelname = logging.ERROR, "ERROR"
            record.msg = f"{record.msg}: a worker process ended unexpectedly; uvicorn starts a new one"
        return True

def logging_config(level: str = "info", fmt: str = "text", access_log: bool = False) -> dict[str, Any]:
    """Return a :func:`logging.config.dictConfig` dict: every logger to one stderr handler in format `fmt`.

    `level` is a logging level name (debug, info, warning, error); `fmt` is ``text`` or ``json``;
    `access_log` turns uvicorn's per-request lines on. Raises ValueError for an unknown `fmt`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    formatter: dict[str, Any] = (
        {"()": JsonFormatter} if fmt == "json" else {"()": UtcFormatter, "fmt": TEXT_FORMAT}
    )
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"worker_died": {"()": WorkerDiedFilter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn and Litestar write through the root handler, never their own
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True, "filters": ["worker_died"]},
            "uvicorn.access": {"handlers": [], "level": "INFO" if access_log else "CRITICAL", "propagate": True},
            "litestar": {"handlers": [], "level": level, "propagate": True},
        },
    }


class RefusalLog:
    """Log refused requests by error code, at most one line per code per `interval_s` seconds.

    The first refusal of a code is logged at once; later ones are counted and the count is logged
    with the next refusal of that code after the interval ("refused 17 request(s) with
    untrusted_chain in the last 10 s"). Thread-safe; costs a dict lookup per refusal.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # code -> (last line at, refusals since)

    def note(self, code: str, detail: str) -> None:
        """Count one refusal with `code`; log a line when the code's interval has passed."""
        now = time.monotonic()
        with self._lock:
            last, count = self._state.get(code, (-1e18, 0))
            count += 1
            if now - last < self.interval_s:
                self._state[code] = (last, count)
                return
            self._state[code] = (now, 0)
        if last < -1e17:
            log.warning("refused a request with %s: %s", code, detail)
        else:
            log.warning("refused %d request(s) with %s in the last %.0f s; latest: %s",
                        count, code, now - last, detail)


refusals = RefusalLog()
"""The process's refusal log (requests to both endpoints)."""

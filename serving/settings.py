"""The server's settings: one typed object, each field a CLI flag and a ``RETENTION_<NAME>`` variable.

A field's ``help`` metadata is its documentation; ``retention serve --help`` prints it.
Precedence: command-line flag, then environment variable, then the default here. A setting that was removed
(:data:`REMOVED_SETTINGS`) is refused, as a flag or a variable, with one line naming what replaced it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.catalog import DEMO_CATALOG
from models.exploration import Exploration

#: models.registry.DEFAULT_REGISTRY, spelled out: importing models.registry here would load NumPy for every verb
DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "models" / "registry"


#: Settings that were removed (field name -> what replaced them), sorted by name: ``--log-writer X`` or
#: ``RETENTION_LOG_WRITER=X`` stops the start with :class:`SettingsError`, one line, rather than being ignored.
REMOVED_SETTINGS: dict[str, str] = {
    "log_writer": "the decision log is always written by a thread of the server process",
    "score_in_thread": "requests are always scored on the event loop, batched with the others ready in the same "
    "loop turn, behind the circuit breaker (--budget-ms)",
    "verify_threads": "request signatures are always checked on the event loop; a never-seen certificate chain's "
    "CA signatures run on the worker thread, bounded by --chain-checks",
    "verify_with": "request signatures are always checked on the event loop (no signature process or thread)",
}


def _f(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything `create_app` and `retention serve` need; build with :meth:`from_env` or :meth:`from_args`."""

    # ---- trust and identity ----
    root_certs: tuple[str, ...] = _f((), "Root certificates to trust (DER or PEM files, comma-separated). Trust comes only from these.")
    app_apple_id: int | None = _f(None, "Your app's appAppleId; a request for another app is refused (wrong_app).")
    environment: str = _f("Production", "Sandbox or Production; a request from the other environment is refused.")
    relax_app_id_in_sandbox: bool = _f(
        False,
        "Accept a Sandbox request whose appAppleId differs (Apple's own library does this; "
        "useful only when testing with an app id you cannot control).",
    )
    max_age_s: float = _f(300.0, "Refuse a request whose signedDate is older than this many seconds (stale_request).")
    max_skew_s: float = _f(60.0, "Refuse a request whose signedDate is further than this in the future.")
    max_body_bytes: int = _f(65536, "Refuse a body larger than this (payload_too_large, 413), before reading it whole.")
    # ---- paths ----
    catalog: str = _f(str(DEMO_CATALOG), "Catalog JSON file of approved messages.")
    model: str = _f(str(DEFAULT_REGISTRY), "Model registry folder, optionally DIR@VERSION to pin a version.")
    data_dir: str = _f("data", "Folder of the decision and outcome log (SQLite) and the profile store.")
    # ---- HTTP ----
    message_path: str = _f("/retention/message", "Path of the Get Retention Message endpoint.")
    notifications_path: str = _f("/apple/notifications", "Path of the App Store Server Notifications V2 endpoint.")
    host: str = _f("127.0.0.1", "Address to listen on.")
    port: int = _f(8000, "Port to listen on.")
    workers: int = _f(1, "Number of uvicorn worker processes.")
    ssl_certfile: str | None = _f(None, "TLS certificate (PEM); with --ssl-keyfile the server terminates TLS 1.2+ itself.")
    ssl_keyfile: str | None = _f(None, "TLS private key (PEM file).")
    log_level: str = _f("info", "Log level of the server (debug, info, warning, error).")
    request_timeout_s: float = _f(
        10.0,
        "A request's line, headers and body must arrive within this many seconds (from the connection's opening, "
        "or the request's first byte); otherwise it is answered 408 request_timeout and its connection closed.",
    )
    max_connections: int = _f(
        1000,
        "Open connections per worker process; one more is answered 503 too_many_connections and closed at once.",
    )
    max_header_bytes: int = _f(
        16384,
        "Largest request line and headers of a request, in bytes; a larger one is answered 431 "
        "request_header_fields_too_large (a URL over 8 KiB: 414 uri_too_long) and its connection closed.",
    )
    log_format: str = _f("text", "Log line format on stderr: text, or json (one object per line, for log shippers).")
    access_log: bool = _f(False, "Log one line per HTTP request (client, method, path, status).")
    # ---- policy ----
    epsilon: float = _f(Exploration.epsilon, "Exploration: share of requests answered uniformly at random among eligible candidates.")
    exploration: str = _f(Exploration.scheme, "Exploration scheme: epsilon (epsilon-greedy) or softmax.")
    temperature: float = _f(Exploration.temperature, "Softmax temperature, in value units, when exploration is softmax.")
    holdout: float = _f(Exploration.holdout, "Share of requests that always get the default message (a control group).")
    kill_switch: bool = _f(False, "Send every request to the rule policy (no model).")
    shadow_model: str | None = _f(None, "A second registry version scored beside the serving one, logged, never shown.")
    challenger: str | None = _f(
        None,
        "Start a live experiment: this registry version serves a share of subscribers (by a stable hash of "
        "originalTransactionId). Written to the registry's experiment.json, which every server hot-reloads; "
        "'retention experiment share|stop' change it later.",
    )
    challenger_share: float | None = _f(
        None, "Share of subscribers in the challenger arm, in (0, 1), with --challenger (default 0.5)."
    )
    experiment_id: str | None = _f(None, "Experiment id with --challenger (default exp-<challenger version>).")
    budget_ms: float = _f(50.0, "Internal deadline for featurizing and scoring; past it the default message is answered.")
    apple_wait_ms: float = _f(
        700.0,
        "How long Apple waits for an answer (its responseTimeThreshold); a decision that took longer, or was "
        "answered 404, is logged with policy apple_fallback: Apple showed its own message.",
    )
    chain_checks: int = _f(
        2,
        "Never-seen certificate chains checked at once per worker (their CA signatures, on the worker thread); "
        "one more is refused at once with chain_check_busy (503). Known chains are not counted.",
    )
    replay_store: str = _f(
        "sqlite",
        "Where answered requestIdentifiers are remembered: sqlite (replay.sqlite in the data folder, shared by "
        "every worker of the host and kept across restarts, behind each worker's in-process memory) or memory "
        "(each worker's own, forgotten on restart). With --database-url, the database's, shared by the fleet.",
    )
    seed: int | None = _f(None, "Seed of the exploration generator (tests and benchmarks); unset means OS entropy.")
    reload_interval_s: float = _f(2.0, "How often the catalog file and the registry's current pointer are checked for changes.")
    log_batch_ms: float = _f(100.0, "Decision log batch window: rows are written at least this often.")
    # ---- a fleet of replicas sharing PostgreSQL (docs/deployment-postgresql.md) ----
    database_url: str | None = _f(
        None,
        "postgresql:// URL of the database every replica shares for decisions, outcomes, replay and profiles; "
        "unset: this host's SQLite files in the data folder.",
    )
    database_budget_ms: float = _f(
        20.0,
        "Longest the request path waits for the database (the replay check); past it the request is answered on "
        "the replica's own replay memory and the miss counted.",
    )
    database_migrate: bool = _f(False, "Create or migrate the database schema at start (as `retention db migrate`).")
    database_write: str = _f("copy", "How decision batches are written: copy (COPY, then one INSERT) or insert.")
    spill_max_bytes: int = _f(
        1 << 30,
        "Bound of the local spill file that holds decisions while the database is unreachable; past it they "
        "are dropped, counted and logged.",
    )
    # ---- promotional offers (In-App Purchase key) ----
    offer_key_file: str | None = _f(None, "In-App Purchase private key (.p8 file) that signs promotional offers.")
    offer_key_id: str | None = _f(None, "Key id of the In-App Purchase key.")
    offer_issuer_id: str | None = _f(None, "Issuer id of the In-App Purchase key.")
    bundle_id: str | None = _f(
        None,
        "Your app's bundle id (required): a notification for another bundle id is refused (wrong_app); "
        "also the bid claim of offer signatures.",
    )

    # ------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        """Return the setting names in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Return settings from ``RETENTION_*`` variables, then `overrides` (keyword per field)."""
        env = os.environ if environ is None else environ
        for name in REMOVED_SETTINGS:
            if env.get("RETENTION_" + name.upper()):
                raise _removed(name)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get("RETENTION_" + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag`` per setting to `parser` (value None means: not given)."""
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = "RETENTION_" + f.name.upper()
            help_ = f"{f.metadata['help']} [env {env}; default {f.default!r}]"
            if _kind(f) is bool:
                parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_)
            else:
                parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_)
        for name in REMOVED_SETTINGS:  # accepted by the parser only to be refused by from_args, in one line
            flag = "--" + name.replace("_", "-")
            parser.add_argument(flag, "--no-" + flag[2:], dest=_REMOVED_DEST + name, nargs="?", const="",
                                default=None, help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
        """Return settings from parsed flags over the environment over the defaults."""
        for name in REMOVED_SETTINGS:
            if getattr(args, _REMOVED_DEST + name, None) is not None:
                raise _removed(name)
        overrides: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in fields.items():
            raw = getattr(args, name, None)
            if raw is None:
                continue
            overrides[name] = raw if isinstance(raw, bool) else _convert(f, str(raw))
        return cls.from_env(environ, **overrides)

    def __post_init__(self) -> None:
        if self.environment not in ("Sandbox", "Production"):  # Xcode and LocalTesting data is not signed by Apple
            raise SettingsError(
                f"environment (RETENTION_ENVIRONMENT, --environment) must be Sandbox or Production, not {self.environment!r}"
            )
        Exploration(self.epsilon, self.exploration, self.temperature, self.holdout)  # raises ValueError out of range
        if self.workers < 1:
            raise ValueError(f"workers must be 1 or more, not {self.workers}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise SettingsError(
                f"log_level (RETENTION_LOG_LEVEL, --log-level) must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
            )
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port (RETENTION_PORT, --port) must be within 0-65535, not {self.port}")
        if self.bundle_id is not None and self.bundle_id != self.bundle_id.strip():
            what = "is blank" if not self.bundle_id.strip() else "has spaces around it"
            raise SettingsError(f"bundle_id (RETENTION_BUNDLE_ID, --bundle-id) {what}: {self.bundle_id!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.replay_store not in ("sqlite", "memory"):
            raise ValueError(f"replay_store must be sqlite or memory, not {self.replay_store!r}")
        if self.chain_checks < 1:
            raise ValueError(f"chain_checks must be >= 1, not {self.chain_checks}")
        if self.challenger_share is not None and not 0.0 < self.challenger_share < 1.0:
            raise ValueError(f"challenger_share must be strictly between 0 and 1, not {self.challenger_share}")
        if self.challenger is None and (self.challenger_share is not None or self.experiment_id is not None):
            raise ValueError("--challenger-share and --experiment-id start an experiment only with --challenger VERSION")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, not {self.request_timeout_s}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {self.max_connections}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, not {self.max_header_bytes}")
        if self.max_body_bytes < 256:
            raise ValueError("max_body_bytes must be at least 256")
        if self.database_url is not None:
            from serving.database import check_url

            check_url(self.database_url)
        if not self.database_budget_ms > 0:
            raise ValueError(f"database_budget_ms must be > 0, not {self.database_budget_ms}")
        if self.database_write not in ("copy", "insert"):
            raise ValueError(f"database_write must be copy or insert, not {self.database_write!r}")
        if self.spill_max_bytes < 0:
            raise ValueError(f"spill_max_bytes must be >= 0, not {self.spill_max_bytes}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")


#: The log levels ``--log-level`` takes (any case).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class SettingsError(ValueError):
    """A setting's value cannot be read; the message names the variable."""


_REMOVED_DEST = "removed_setting_"


def _removed(name: str) -> SettingsError:
    """Return the one-line refusal of the removed setting `name` (a key of :data:`REMOVED_SETTINGS`)."""
    flag, env = "--" + name.replace("_", "-"), "RETENTION_" + name.upper()
    return SettingsError(f"{flag} ({env}) was removed: {REMOVED_SETTINGS[name]}")


def _kind(f: dataclasses.Field[Any]) -> type:
    t = str(f.type)
    if t.startswith("bool"):
        return bool
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    if t.startswith("tuple"):
        return tuple
    return str


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _kind(f)
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is tuple:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        flag = "--" + f.name.replace("_", "-")
        raise SettingsError(f"setting {f.name} ({flag} or RETENTION_{f.name.upper()}): {raw!r} is not a valid "
                            f"{kind.__name__}") from None
    return raw


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Return settings parsed from `argv` (for tests and scripts)."""
    p = argparse.ArgumentParser()
    Settings.add_arguments(p)
    return Settings.from_args(p.parse_args(argv))

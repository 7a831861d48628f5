"""``retention serve``: run the endpoint with uvicorn (httptools + uvloop, with our request limits), one or several workers.

Settings are resolved once here (flags over ``RETENTION_*`` over defaults) and handed to the
worker processes through the environment, so every worker builds the same app with
:func:`app_factory`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import logging.config
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from models.catalog import DEMO_CATALOG
from models.registry import RegistryError
from retention import VerbParser
from serving.settings import Settings, SettingsError
from serving.stderr_log import logging_config

log = logging.getLogger("retention.server")


def app_factory() -> Any:
    """Return the app for the settings in the environment (uvicorn calls this in each worker)."""
    from serving.app import create_app

    return create_app(Settings.from_env())


def settings_to_env(settings: Settings) -> dict[str, str]:
    """Return ``RETENTION_*`` variables that reproduce `settings` exactly."""
    env: dict[str, str] = {}
    for name in Settings.field_names():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env["RETENTION_" + name.upper()] = str(value)
    return env


@dataclasses.dataclass(frozen=True)
class Startup:
    """What :func:`preflight` found: the facts the start-up banner reports."""

    root_fingerprints: tuple[str, ...]
    catalog_sha256: str
    model_version: str | None  # None: no model yet, the rule policy serves
    shadow_version: str | None


def preflight(settings: Settings) -> Startup:
    """Return what the server will serve with; raise SettingsError when it cannot start with `settings`.

    The error's message is one line per problem (Production lists all its missing settings at once).
    """
    from models.catalog import Catalog
    from models.registry import DEFAULT_REGISTRY, ModelLoadError, Registry
    from serving.catalog_content import content_problems
    from serving.notifications import configured_bundle_id
    from serving.verify import fingerprint_sha256, has_apple_root_g3, load_roots

    if not settings.root_certs:
        raise SettingsError(
            "no root certificate configured: set RETENTION_ROOT_CERTS (or --root-certs) to Apple Root CA - G3 "
            "(or your test CA); trust comes only from configured roots"
        )
    if settings.app_apple_id is None:
        raise SettingsError("no app id configured: set RETENTION_APP_APPLE_ID (or --app-apple-id) to your appAppleId")
    configured_bundle_id(settings)
    registry, pinned = Registry.parse(settings.model)
    if settings.environment == "Production":
        problems = []
        if Path(settings.catalog).resolve() == DEMO_CATALOG.resolve():
            problems.append(f"Production refuses the demo catalog {settings.catalog}: set RETENTION_CATALOG (or --catalog) "
                            "to your own (Apple does not know the demo's message ids)")
        if registry.root.resolve() == DEFAULT_REGISTRY.resolve():
            problems.append(f"Production refuses the checkout's demo model registry {registry.root}: set RETENTION_MODEL "
                            "(or --model) to your own registry folder")
        if not Path(settings.data_dir).is_absolute():
            problems.append(f"Production needs an absolute data folder: RETENTION_DATA_DIR (or --data-dir) is "
                            f"{settings.data_dir!r}, relative to wherever the server is started")
        if problems:
            raise SettingsError("\n".join(problems))
    try:
        roots = load_roots(settings.root_certs)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if settings.environment == "Production" and not has_apple_root_g3(roots):
        log.warning(
            "Production, but no configured root is Apple Root CA - G3 (SHA-256 63343abf...9179); "
            "Apple's requests will be refused"
        )
    _check_data_dir(settings)
    _check_tls_files(settings)
    if settings.offer_key_file:  # an unreadable key or a missing id: one line now, not after the app has started
        from serving.offers import OfferSigner

        try:
            OfferSigner.from_settings(settings)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    catalog = Catalog.load(settings.catalog, settings.environment)  # raises CatalogError with the entry and the reason
    content = content_problems(catalog, Path(settings.catalog).resolve().parent)
    if content:  # the same check as `retention catalog validate`: Apple would refuse this content
        raise SettingsError("\n".join([f"catalog {settings.catalog}: {line}" for line in content]
                                      + [f"catalog {settings.catalog}: {len(content)} problem(s) with Apple's limits "
                                         "(retention catalog validate lists them too)"]))
    model_version = shadow_version = None
    try:
        if pinned is not None or registry.root.resolve() != DEFAULT_REGISTRY.resolve():
            registry.require_folder()  # a typo in an explicit registry must not start on the rules
        if pinned is not None:
            model_version = registry.load(pinned).version  # a pinned version must load now, not fail every reload
        elif registry.root.is_dir():
            model_version = registry.current()
    except (ModelLoadError, RegistryError) as exc:
        raise SettingsError(f"model (--model, RETENTION_MODEL): {exc}") from None
    if settings.shadow_model:
        try:
            shadow_version = registry.load(settings.shadow_model).version
        except (ModelLoadError, RegistryError) as exc:
            raise SettingsError(f"shadow model (--shadow-model, RETENTION_SHADOW_MODEL): {exc}") from None
    if settings.challenger:
        from serving.snapshot import start_experiment

        start_experiment(settings.model.split("@", 1)[0], settings.challenger, settings.challenger_share,
                         settings.experiment_id)  # raises ExperimentError (a ValueError) in one sentence
    if settings.database_url is not None:
        from serving.database import DatabaseError, require_schema

        try:  # unreachable, or a schema newer than this release knows (or older, not migrated): one line
            require_schema(settings.database_url, run_migrations=settings.database_migrate)
        except DatabaseError as exc:
            raise SettingsError(str(exc)) from None
    return Startup(tuple(fingerprint_sha256(r) for r in roots), catalog.sha256, model_version, shadow_version)


def _check_data_dir(settings: Settings) -> None:
    """Raise SettingsError (one line) unless the data folder exists or can be made, is a folder and takes files."""
    folder = Path(settings.data_dir)
    what = f"data folder {settings.data_dir} (--data-dir, RETENTION_DATA_DIR)"
    if folder.exists() and not folder.is_dir():
        raise SettingsError(f"{what} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"{what} cannot be created: {exc.strerror or exc}") from None
    try:  # a real file: permissions, a read-only mount, root's bypass of permission bits all answer here
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".retention-write-check-"):
            pass
    except OSError as exc:
        raise SettingsError(f"{what} is not writable: {exc.strerror or exc}") from None


def _check_tls_files(settings: Settings) -> None:
    if settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return
    import ssl

    for flag, path in (("--ssl-certfile", settings.ssl_certfile), ("--ssl-keyfile", settings.ssl_keyfile)):
        if not Path(path).is_file():
            raise SettingsError(f"TLS file {path} ({flag}) does not exist")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(
            f"TLS certificate {settings.ssl_certfile} with key {settings.ssl_keyfile} cannot be used: "
            f"{getattr(exc, 'reason', None) or exc}"
        ) from None


def banner(settings: Settings, startup: Startup) -> str:
    """Return the one start-up line: version, identity, files and their hashes, model, roots, workers, exploration."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("retention-endpoint")
    except PackageNotFoundError:
        ours = "unknown"
    if settings.exploration == "softmax":
        exploration = f"softmax temperature={settings.temperature:g}"
    else:
        exploration = f"epsilon-greedy epsilon={settings.epsilon:g}"
    model = startup.model_version or "none (the rule policy serves until one is promoted)"
    roots = ",".join(fp[:16] for fp in startup.root_fingerprints)
    return (
        f"retention-endpoint {ours} starting: environment={settings.environment} app_apple_id={settings.app_apple_id} "
        f"bundle_id={settings.bundle_id or '-'} catalog={settings.catalog} catalog_sha256={startup.catalog_sha256[:16]} "
        f"model={model} registry={settings.model} shadow={startup.shadow_version or '-'} "
        f"data_dir={Path(settings.data_dir).resolve()} root_sha256={roots} workers={settings.workers} "
        f"exploration={exploration} holdout={settings.holdout:g} kill_switch={'on' if settings.kill_switch else 'off'} "
        f"listen={'https' if settings.ssl_certfile else 'http'}://{settings.host}:{settings.port}"
    )


def bind(settings: Settings) -> socket.socket:
    """Return the listening socket for `settings`; raise SettingsError in one line when the port is taken."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
        raise SettingsError(f"port {settings.port} on {settings.host} {why}: set --port (RETENTION_PORT)") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(settings: Settings) -> Any:
    """Return a uvicorn Config that refuses anything older than TLS 1.2 when it terminates TLS, closes requests
    that do not arrive whole within the request timeout and caps each worker's connections."""
    from serving.http_limits import LimitedConfig

    return LimitedConfig(
        "serving.server:app_factory",
        request_timeout_s=settings.request_timeout_s,
        max_connections=settings.max_connections,
        max_header_bytes=settings.max_header_bytes,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        lifespan="on",
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level, settings.log_format, settings.access_log),
        access_log=settings.access_log,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        timeout_graceful_shutdown=10,
    )


def serve(settings: Settings, sock: socket.socket | None = None) -> None:
    """Run the server on `sock` (else a socket bound here) until SIGINT/SIGTERM, which flush the decision log."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from serving.http_limits import ensure_fd_limit

    os.environ.update(settings_to_env(settings))
    # uvicorn's workers start as `python -c ...`, which would put the working directory first on their
    # sys.path while they import multiprocessing: safe-path mode for them, as for every child (serving/children.py)
    os.environ["PYTHONSAFEPATH"] = "1"
    made_metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # metrics aggregated across workers (prometheus_client's multiprocess mode)
        made_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="retention-metrics-")
    config = _uvicorn_config(settings)
    ensure_fd_limit(settings.max_connections)  # before the workers start: they inherit it
    server = uvicorn.Server(config)
    sock = sock if sock is not None else bind(settings)
    try:
        if settings.workers > 1:
            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])
    finally:
        sock.close()
        if made_metrics_dir is not None:  # the workers are gone: their sample files go with them
            shutil.rmtree(made_metrics_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Entry point of ``retention serve``."""
    parser = VerbParser(prog="retention serve", description="Run the Get Retention Message endpoint.")
    Settings.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_args(args)
        # before the checks: their warnings come once, in the configured format
        logging.config.dictConfig(logging_config(settings.log_level, settings.log_format, settings.access_log))
        startup = preflight(settings)
        sock = bind(settings)  # a port in use is one line now, not a traceback after "startup complete"
    except ValueError as exc:  # SettingsError, CatalogError and bad values: one line each, exit 2
        for line in str(exc).splitlines():
            print(f"retention serve: {line}", file=sys.stderr)
        return 2
    log.info("%s", banner(settings, startup))
    serve(settings, sock)
    return 0

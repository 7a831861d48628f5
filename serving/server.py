"""``retention serve``: run the endpoint with uvicorn (httptools + uvloop, with our request limits), one or several workers.

Settings are resolved once here (flags over ``RETENTION_*`` over defaults) and handed to the
worker processes through the environment, so every worker builds the same app with
:func:`app_factory`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

from serving.settings import Settings, SettingsError

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


def preflight(settings: Settings) -> None:
    """Raise SettingsError with one clear sentence when the server cannot start with `settings`."""
    from serving.catalog import Catalog
    from serving.verify import has_apple_root_g3, load_roots

    if not settings.root_certs:
        raise SettingsError(
            "no root certificate configured: set RETENTION_ROOT_CERTS (or --root-certs) to Apple Root CA - G3 "
            "(or your test CA); trust comes only from configured roots"
        )
    if settings.app_apple_id is None:
        raise SettingsError("no app id configured: set RETENTION_APP_APPLE_ID (or --app-apple-id) to your appAppleId")
    try:
        roots = load_roots(settings.root_certs)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if settings.environment == "Production" and not has_apple_root_g3(roots):
        log.warning("Production, but no configured root is Apple Root CA - G3 (SHA-256 63343abf...9179)")
        print(
            "warning: Production, but no configured root is Apple Root CA - G3; Apple's requests will be refused",
            file=sys.stderr,
        )
    Catalog.load(settings.catalog)  # raises CatalogError with the entry and the reason
    if settings.challenger:
        from serving.state import start_experiment

        start_experiment(settings.model.split("@", 1)[0], settings.challenger, settings.challenger_share,
                         settings.experiment_id)  # raises ExperimentError (a ValueError) in one sentence


def _uvicorn_config(settings: Settings) -> Any:
    """Return a uvicorn Config that refuses anything older than TLS 1.2 when it terminates TLS, closes requests
    that do not arrive whole within the request timeout and caps each worker's connections."""
    from serving.http_limits import LimitedConfig

    return LimitedConfig(
        "serving.server:app_factory",
        request_timeout_s=settings.request_timeout_s,
        max_connections=settings.max_connections,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        timeout_graceful_shutdown=10,
    )


def serve(settings: Settings) -> None:
    """Run the server until SIGINT/SIGTERM (which flush the decision log before exit)."""
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
    try:
        if settings.workers > 1:
            sock = config.bind_socket()
            Multiprocess(config, sockets=[sock]).run()
        else:
            server.run()
    finally:
        if made_metrics_dir is not None:  # the workers are gone: their sample files go with them
            shutil.rmtree(made_metrics_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Entry point of ``retention serve``."""
    parser = argparse.ArgumentParser(prog="retention serve", description="Run the Get Retention Message endpoint.")
    Settings.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_args(args)
        preflight(settings)
    except ValueError as exc:  # SettingsError, CatalogError and bad values: one line, exit 2
        print(f"retention serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings)
    return 0

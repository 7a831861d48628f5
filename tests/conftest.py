"""Shared fixtures: a test PKI minted at test time, a small trained model registry, settings, in-process clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from models.catalog import DEMO_CATALOG
from serving.settings import Settings

APP_ID = 1234567890
BUNDLE_ID = "com.example.app"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@contextlib.contextmanager
def off_loop(threads: int = 1) -> Iterator[Callable[..., Awaitable[Any]]]:
    """Yield ``await off(fn, *args)``, which runs ``fn`` on a pool of `threads` threads, as the server does
    (``RetentionService.off_loop``: ``loop.run_in_executor``); the pool is shut down on exit."""
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="test-off-loop")

    async def off(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    try:
        yield off
    finally:
        pool.shutdown()


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a folder holding a freshly minted Apple-shaped test CA (root.pem among its files)."""
    from serving.testpki import TestPKI

    folder = tmp_path_factory.mktemp("pki")
    TestPKI.mint().write(folder)
    return folder


@pytest.fixture(scope="session")
def pki(pki_dir: Path) -> Any:
    """Return the session's TestPKI."""
    from serving.testpki import TestPKI

    return TestPKI.load(pki_dir)


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a registry folder with one small model trained on the simulator (current)."""
    from training.train import train_demo_model

    reg = tmp_path_factory.mktemp("registry")
    train_demo_model(reg, n_decisions=6000, seed=3)
    return reg


@pytest.fixture
def make_settings(pki_dir: Path, trained_registry: Path, tmp_path: Path) -> Callable[..., Settings]:
    """Return a factory of Settings for the test CA, the demo catalog and the trained registry."""

    def make(**overrides: Any) -> Settings:
        from serving.testpki import TestPKI  # noqa: F401  (the CA exists in pki_dir)

        base: dict[str, Any] = {
            "root_certs": (str(next(p for p in pki_dir.iterdir() if p.name.startswith("root") and p.suffix == ".pem")),),
            "app_apple_id": APP_ID,
            "bundle_id": BUNDLE_ID,
            "environment": "Sandbox",
            "catalog": str(DEMO_CATALOG),
            "model": str(trained_registry),
            "data_dir": str(tmp_path / "data"),
            "seed": 7,
            "reload_interval_s": 0.0,
            "log_batch_ms": 20.0,
        }
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def client_for(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Any]]:
    """Return a factory of in-process clients (Litestar's TestClient) of apps built from `make_settings`."""
    from litestar.testing import TestClient

    from serving.app import create_app

    clients: list[Any] = []

    def make(**overrides: Any) -> Any:
        c = TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


class AppleFixture:
    """The loopback Apple server and the In-App Purchase key its tokens must be signed with."""

    KEY_ID, ISSUER_ID, BUNDLE_ID = "TESTKEY123", "57246542-96fe-1a63-e053-0824d011072a", "com.example.app"

    def __init__(self, tmp_path: Path, environment: str = "Sandbox") -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        from tests.apple_server import AppleServer, signing_key_pem

        key = ec.generate_private_key(ec.SECP256R1())
        self.key_file = tmp_path / "SubscriptionKey_TESTKEY123.p8"
        self.key_file.write_bytes(signing_key_pem(key))
        self.environment = environment
        self.server = AppleServer(key_id=self.KEY_ID, issuer_id=self.ISSUER_ID, bundle_id=self.BUNDLE_ID,
                                  public_key=key.public_key(), environment=environment).start()

    @property
    def account(self) -> Any:
        return self.server.account

    def client(self) -> Any:
        """Return Apple's client (serving.apple_api) pointed at the loopback server."""
        from serving.apple_api import make_client

        return make_client(self.key_file, self.KEY_ID, self.ISSUER_ID, self.BUNDLE_ID, self.environment,
                           base_url=self.server.base_url)

    def env(self) -> dict[str, str]:
        """Return the RETENTION_* variables a CLI run needs to reach the loopback server."""
        return {"RETENTION_APPLE_API_URL": self.server.base_url, "RETENTION_OFFER_KEY_FILE": str(self.key_file),
                "RETENTION_OFFER_KEY_ID": self.KEY_ID, "RETENTION_OFFER_ISSUER_ID": self.ISSUER_ID,
                "RETENTION_BUNDLE_ID": self.BUNDLE_ID, "RETENTION_ENVIRONMENT": self.environment}


@pytest.fixture
def apple(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Yield an AppleFixture: Apple's Retention Messaging API on loopback, its settings in the environment."""
    fx = AppleFixture(tmp_path)
    for k, v in fx.env().items():
        monkeypatch.setenv(k, v)
    yield fx
    fx.server.stop()


# -- PostgreSQL (issue 19) ----------------------------------------------------------------------------------
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_unavailable(url: str) -> str | None:
    """Return why the test server at `url` cannot be used, or None when it answers."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"no PostgreSQL at {url} ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
    return None


@pytest.fixture(scope="session")
def pg_server() -> str:
    """Return the URL of the PostgreSQL test server (``RETENTION_TEST_DATABASE_URL``).

    Without a reachable server the test is skipped with the reason, except under ``CI=true``, where a missing
    server fails the run: no green CI that never touched PostgreSQL.
    """
    import os

    url = os.environ.get("RETENTION_TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL
    why = _pg_unavailable(url)
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why}; CI=true requires the PostgreSQL server", pytrace=False)
        pytest.skip(why)
    return url


@pytest.fixture
def pg_url(pg_server: str) -> Any:
    """Yield a URL of the test server whose search_path is a fresh schema of this test's own (dropped after)."""
    import uuid
    from urllib.parse import quote

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_server else "?"
    yield f"{pg_server}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")

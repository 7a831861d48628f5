"""Shared fixtures: a test PKI minted at test time, a small trained model registry, settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serving.settings import DEMO_CATALOG, Settings

APP_ID = 1234567890
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


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

"""Settings: flags over RETENTION_* variables over defaults; clear errors; start-up refusals and warnings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from serving.server import preflight, settings_to_env
from serving.settings import Settings, SettingsError, parse_settings


def test_env_then_flags_override_defaults() -> None:
    env = {"RETENTION_EPSILON": "0.2", "RETENTION_ROOT_CERTS": "a.pem, b.der", "RETENTION_KILL_SWITCH": "yes",
           "RETENTION_APP_APPLE_ID": "42"}
    s = Settings.from_env(env)
    assert s.epsilon == 0.2 and s.root_certs == ("a.pem", "b.der") and s.kill_switch is True and s.app_apple_id == 42
    p = argparse.ArgumentParser()
    Settings.add_arguments(p)
    s2 = Settings.from_args(p.parse_args(["--epsilon", "0.3", "--no-kill-switch"]), env)
    assert s2.epsilon == 0.3 and s2.kill_switch is False and s2.root_certs == ("a.pem", "b.der")
    assert Settings.from_env(settings_to_env(s2)) == s2


@pytest.mark.parametrize(
    ("env", "phrase"),
    [
        ({"RETENTION_EPSILON": "lots"}, "RETENTION_EPSILON"),
        ({"RETENTION_EPSILON": "1.5"}, "epsilon must be within"),
        ({"RETENTION_ENVIRONMENT": "Staging"}, "Sandbox or Production"),
        ({"RETENTION_SSL_CERTFILE": "c.pem"}, "both"),
    ],
)
def test_bad_values_say_which_setting(env: dict[str, str], phrase: str) -> None:
    with pytest.raises((SettingsError, ValueError), match=phrase):
        Settings.from_env(env)


def test_preflight_refuses_without_roots_or_app_id(pki_dir: Path) -> None:
    with pytest.raises(SettingsError, match="no root certificate"):
        preflight(parse_settings(["--app-apple-id", "1"]))
    with pytest.raises(SettingsError, match="no app id"):
        preflight(parse_settings(["--root-certs", str(pki_dir / "root.pem")]))
    with pytest.raises(SettingsError):
        preflight(parse_settings(["--root-certs", str(pki_dir / "absent.pem"), "--app-apple-id", "1"]))


def test_production_without_apple_root_warns(pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preflight(parse_settings(["--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", "1",
                              "--environment", "Production"]))
    assert "Apple Root CA - G3" in capsys.readouterr().err
    preflight(parse_settings(["--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", "1",
                              "--environment", "Sandbox"]))
    assert capsys.readouterr().err == ""

"""Settings: flags over RETENTION_* variables over defaults; clear errors; start-up refusals and warnings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from models.catalog import DEMO_CATALOG
from serving.server import preflight, settings_to_env
from serving.settings import REMOVED_SETTINGS, Settings, SettingsError, parse_settings
from tests.conftest import BUNDLE_ID


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
        preflight(parse_settings(["--root-certs", str(pki_dir / "absent.pem"), "--app-apple-id", "1", "--bundle-id", BUNDLE_ID]))


def explicit(registry: Path, tmp_path: Path) -> list[str]:
    """Return the flags Production requires: a catalog of one's own, a registry, an absolute data folder."""
    catalog = tmp_path / "catalog.json"
    catalog.write_bytes(DEMO_CATALOG.read_bytes())
    return ["--catalog", str(catalog), "--model", str(registry), "--data-dir", str(tmp_path / "data")]


def test_production_without_apple_root_warns(pki_dir: Path, trained_registry: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    preflight(parse_settings(["--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", "1", "--bundle-id", BUNDLE_ID,
                              "--environment", "Production", *explicit(trained_registry, tmp_path)]))
    assert [r.levelname for r in caplog.records if "Apple Root CA - G3" in r.getMessage()] == ["WARNING"]
    caplog.clear()
    preflight(parse_settings(["--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", "1", "--bundle-id", BUNDLE_ID,
                              "--environment", "Sandbox", "--data-dir", str(tmp_path / "data")]))
    assert not caplog.records


def test_production_refuses_the_demo_catalog_the_checkout_registry_and_a_relative_data_folder(
    pki_dir: Path, trained_registry: Path, tmp_path: Path
) -> None:
    base = ["--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", "1", "--bundle-id", BUNDLE_ID, "--environment", "Production"]
    with pytest.raises(SettingsError) as caught:
        preflight(parse_settings(base))
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert "RETENTION_CATALOG" in lines[0] and "RETENTION_MODEL" in lines[1] and "RETENTION_DATA_DIR" in lines[2]
    with pytest.raises(SettingsError, match="absolute data folder") as caught:
        preflight(parse_settings([*base, *explicit(trained_registry, tmp_path), "--data-dir", "data"]))
    assert len(str(caught.value).splitlines()) == 1
    startup = preflight(parse_settings([*base, *explicit(trained_registry, tmp_path)]))
    assert startup.model_version is not None
    # Sandbox keeps the demo defaults working
    preflight(parse_settings([*base[:-1], "Sandbox"]))


def test_a_pinned_or_shadow_version_that_does_not_exist_refuses_to_start(pki_dir: Path, trained_registry: Path,
                                                                          tmp_path: Path) -> None:
    base = ["--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", "1", "--bundle-id", BUNDLE_ID, "--environment", "Sandbox"]
    with pytest.raises(SettingsError, match="nosuchversion"):
        preflight(parse_settings([*base, "--model", f"{trained_registry}@nosuchversion"]))
    with pytest.raises(SettingsError, match=r"shadow model.*nosuchversion"):
        preflight(parse_settings([*base, "--model", str(trained_registry), "--shadow-model", "nosuchversion"]))
    with pytest.raises(SettingsError, match="does not exist"):
        preflight(parse_settings([*base, "--model", str(tmp_path / "typo")]))
    startup = preflight(parse_settings([*base, "--model", f"{trained_registry}@latest", "--shadow-model", "current"]))
    assert startup.model_version == startup.shadow_version and startup.model_version is not None


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--log-writer", "process"], {}), (["--log-writer"], {}), ([], {"RETENTION_LOG_WRITER": "thread"})],
)
def test_the_removed_log_writer_flag_or_variable_is_refused_in_one_line_naming_what_replaced_it(
    argv: list[str], env: dict[str, str]
) -> None:
    p = argparse.ArgumentParser()
    Settings.add_arguments(p)
    with pytest.raises(SettingsError) as exc:
        Settings.from_args(p.parse_args(argv), env)
    assert str(exc.value) == ("--log-writer (RETENTION_LOG_WRITER) was removed: the decision log is always written "
                              "by a thread of the server process")
    assert list(REMOVED_SETTINGS) == sorted(REMOVED_SETTINGS)
    assert not set(REMOVED_SETTINGS) & set(Settings.field_names())
    assert "--log-writer" not in p.format_help()  # not offered in --help either


@pytest.mark.parametrize(
    ("argv", "env", "want"),
    [
        (["--verify-with", "process"], {}, "--verify-with (RETENTION_VERIFY_WITH) was removed: request signatures are "
         "always checked on the event loop"),
        (["--verify-threads", "2"], {}, "--verify-threads (RETENTION_VERIFY_THREADS) was removed: "),
        (["--score-in-thread"], {}, "--score-in-thread (RETENTION_SCORE_IN_THREAD) was removed: requests are always "
         "scored on the event loop"),
        (["--no-score-in-thread"], {}, "--score-in-thread (RETENTION_SCORE_IN_THREAD) was removed: "),
        ([], {"RETENTION_VERIFY_WITH": "thread"}, "--verify-with (RETENTION_VERIFY_WITH) was removed: "),
        ([], {"RETENTION_VERIFY_THREADS": "0"}, "--verify-threads (RETENTION_VERIFY_THREADS) was removed: "),
        ([], {"RETENTION_SCORE_IN_THREAD": "true"}, "--score-in-thread (RETENTION_SCORE_IN_THREAD) was removed: "),
    ],
)
def test_the_removed_signature_and_scoring_flags_or_variables_are_refused_in_one_line_naming_what_replaced_them(
    argv: list[str], env: dict[str, str], want: str
) -> None:
    p = argparse.ArgumentParser()
    Settings.add_arguments(p)
    with pytest.raises(SettingsError) as exc:
        Settings.from_args(p.parse_args(argv), env)
    assert str(exc.value).startswith(want) and "\n" not in str(exc.value)
    assert "--verify-with" not in p.format_help() and "--score-in-thread" not in p.format_help()


def test_workers_zero_and_missing_tls_files_are_named(pki_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be 1 or more"):
        parse_settings(["--workers", "0"])
    base = ["--root-certs", str(pki_dir / "root.pem"), "--app-apple-id", "1", "--bundle-id", BUNDLE_ID, "--environment", "Sandbox"]
    key = tmp_path / "tls.key"
    key.write_text("not a key")
    with pytest.raises(SettingsError, match=f"TLS file {tmp_path / 'absent.pem'} \\(--ssl-certfile\\) does not exist"):
        preflight(parse_settings([*base, "--ssl-certfile", str(tmp_path / "absent.pem"), "--ssl-keyfile", str(key)]))
    with pytest.raises(SettingsError, match="cannot be used"):
        preflight(parse_settings([*base, "--ssl-certfile", str(pki_dir / "root.pem"), "--ssl-keyfile", str(key)]))


def test_the_settings_table_of_the_operations_doc_has_every_setting_with_its_flag_variable_default_and_meaning() -> None:
    import dataclasses
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = doc.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(--[a-z0-9-]+)` \| `(RETENTION_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$", section, re.M)
    fields = dataclasses.fields(Settings)
    # one row per setting, in declaration order (retention serve --help's order), and no row for a setting gone
    assert [(flag, env) for flag, env, _, _ in rows] == [
        ("--" + f.name.replace("_", "-"), "RETENTION_" + f.name.upper()) for f in fields
    ]
    computed = {"catalog", "model"}  # paths in the checkout, described in words
    for (flag, _, default, meaning), f in zip(rows, fields, strict=True):
        if f.name not in computed:
            assert default == f"`{f.default!r}`", flag
        assert f.metadata["help"].replace("|", "\\|") in meaning, flag

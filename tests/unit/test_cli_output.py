"""What the ``retention`` commands write when their output goes to a pipe, a log file or a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest


def test_output_piped_into_head_ends_without_a_broken_pipe_error(pki_dir: Path) -> None:
    r = subprocess.run(f"{sys.executable} -m retention sign --ca {pki_dir} --count 3000 | head -n 1",
                       shell=True, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith('{"signedPayload"') and len(r.stdout.splitlines()) == 1
    assert "Broken pipe" not in r.stderr and "BrokenPipeError" not in r.stderr and "Traceback" not in r.stderr
    assert r.stderr == ""


def test_no_verb_is_a_usage_error_on_stderr() -> None:
    r = subprocess.run([sys.executable, "-m", "retention"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, "") and r.stderr.startswith("usage: retention VERB")


@pytest.mark.parametrize("args", [["--help"], ["help"]])
def test_usage_to_a_reader_that_went_away_ends_quietly(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `retention --help | head -0`: nobody reads, the first write fails
    try:
        r = subprocess.run([sys.executable, "-m", "retention", *args], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")  # as a command stopped by SIGPIPE; no BrokenPipeError traceback


def test_progress_bars_only_on_a_terminal(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "retention", "simulate", "--n", "2000", "--seed", "0"]
    with open(tmp_path / "log", "w+b") as log_file:
        r = subprocess.run([*argv, "--out", str(tmp_path / "a")], stdout=subprocess.DEVNULL, stderr=log_file,
                           timeout=120)
        log_file.seek(0)
        logged = log_file.read()
    assert r.returncode == 0
    assert b"\r" not in logged and b"\x1b[" not in logged  # no bar redraws, no escape codes in a log file
    # on a terminal the bar is drawn
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    try:
        proc = subprocess.Popen([*argv, "--out", str(tmp_path / "b")], stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        drawn = b""
        while True:  # read while it runs, so a full terminal buffer never blocks the child
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child is gone and everything it wrote was read
                break
            if not chunk:
                break
            drawn += chunk
        returncode = proc.wait(timeout=120)
    finally:
        os.close(leader)
    assert returncode == 0 and b"simulate" in drawn and b"\r" in drawn


def test_retention_help_names_every_action_of_decisions_models_and_sign(capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    assert retention.main(["--help"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")}
    for verb, actions in {
        "decisions": ("export", "show", "compact"),
        "models": ("list", "show", "promote", "roll back", "prune"),
        "sign": ("requests", "notifications", "In-App Purchase key"),
        "experiment": ("start", "status", "promote", "plan", "share", "stop"),
    }.items():
        assert all(a in lines[verb] for a in actions), lines[verb]
    # every description starts in one column
    assert len({len(ln) - len(ln.split(maxsplit=1)[1]) for ln in lines.values()}) == 1, list(lines.values())


@pytest.mark.parametrize("verb", [
    "serve", "demo", "sign", "catalog", "apple", "loadtest", "decisions", "notifications", "db", "profiles",
    "simulate", "train", "score", "evaluate", "models", "experiment",
])
def test_a_bad_flag_is_one_line_naming_the_verb(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    with pytest.raises(SystemExit) as exit_:
        retention.main([verb, "--bogus"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"retention {verb}: error: "), lines
    assert lines[0].endswith(f"(see retention {verb} --help)")  # not the whole usage block


def test_every_verb_is_in_the_parametrized_list() -> None:
    import retention

    assert set(retention.VERBS) == {"serve", "demo", "sign", "catalog", "apple", "loadtest", "decisions",
                                    "notifications", "db", "profiles", "simulate", "train", "score", "evaluate",
                                    "models", "experiment"}


def test_a_missing_required_option_of_an_action_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    with pytest.raises(SystemExit) as exit_:
        retention.main(["sign", "notification", "--ca", "ca"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("retention sign notification: error: the following arguments are required: "
                                       "--type (see retention sign notification --help)\n")


@pytest.mark.parametrize("doc", ["docs/cli.md"])
def test_every_verb_is_in_the_verb_tables_with_its_actions(doc: str, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    import retention

    text = (Path(__file__).resolve().parents[2] / doc).read_text()
    rows = dict(re.findall(r"^\| `retention ([a-z]+)([^`]*)` \|", text, re.M))
    assert set(rows) == set(retention.VERBS), doc
    with_actions = 0
    for verb in retention.VERBS:  # a verb with actions names every one of them in its row
        with pytest.raises(SystemExit):
            retention.main([verb, "--help"])
        if not re.search(r"usage: retention [a-z]+ \[-h\] (\[[^]]*\] )*COMMAND", capsys.readouterr().out):
            continue
        with pytest.raises(SystemExit):  # no action given: the error names them all
            retention.main([verb])
        choices = re.search(r"a command is needed: one of ([a-z, -]+) \(see", capsys.readouterr().err)
        assert choices, verb
        named = {a.strip() for a in rows[verb].split("/") if a.strip()}
        assert named == set(choices.group(1).split(", ")), (doc, verb)
        with_actions += 1
    assert with_actions >= 8  # catalog, apple, decisions, notifications, db, profiles, models, experiment


def test_an_os_error_is_one_plain_line_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    taken = tmp_path / "taken"
    taken.write_text("a file where a folder should go\n")
    assert retention.main(["simulate", "--n", "100", "--out", str(taken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"retention simulate: error: {taken}: file exists"], err


@pytest.mark.parametrize(("argv", "expected"), [
    (["models"], "retention models: error: a command is needed: one of list, show, promote, rollback, prune "
                 "(see retention models --help)"),
    (["models", "lst"], "retention models: error: unknown command 'lst': one of list, show, promote, rollback, "
                        "prune (see retention models --help)"),
    (["models", "list", "--bogus"], "retention models list: error: unrecognized arguments: --bogus "
                                    "(see retention models list --help)"),
    (["models", "--registry=/tmp/r", "list"], "retention models: error: --registry goes after the command: "
                                              "retention models list --registry ... (see retention models --help)"),
    (["models", "--registry", "/tmp/r", "list"], "retention models: error: --registry goes after the command: "
                                                 "retention models list --registry ... (see retention models --help)"),
    (["decisions", "--data-dir", "d", "show"], "retention decisions: error: --data-dir goes after the command: "
                                               "retention decisions show --data-dir ... "
                                               "(see retention decisions --help)"),
    (["demo", "--requests", "-2"], "retention demo: error: argument --requests: must be from 1 to 1,000, not -2 "
                                   "(see retention demo --help)"),
])
def test_usage_errors_name_the_command_and_what_it_takes(argv: list[str], expected: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    with pytest.raises(SystemExit) as exit_:
        retention.main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err == expected + "\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device whose writes fail: disk full)")
@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["models", "list", "--help"], ["experiment", "plan", "--baseline-rate", "0.0171", "--lift", "0.014", "--traffic", "1000/day"]])
def test_output_to_a_full_disk_is_one_line_not_a_traceback(args: list[str]) -> None:
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "retention", *args], stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in r.stderr, lines


def test_version_and_a_mistyped_verb(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import retention

    assert retention.main(["--version"]) == 0
    assert capsys.readouterr().out == f"retention {version('retention-endpoint')}\n"
    assert retention.main(["trian"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("retention: unknown verb 'trian'; did you mean 'train'? verbs: serve,")


def test_a_time_option_takes_an_iso_date_or_milliseconds(capsys: pytest.CaptureFixture[str]) -> None:
    import retention

    assert retention.parse_time("2026-02-01") == retention.parse_time("1769904000000") == 1_769_904_000_000
    assert retention.parse_time("2026-02-01T01:00:00+01:00") == retention.parse_time("20260201") == 1_769_904_000_000
    assert retention.parse_time("2004-03-15T07:55:47.472Z") == 1_079_337_347_472  # exact, no float rounding
    for bad in ("²", "99999999999999999999999", "-5", "yesterday"):
        with pytest.raises(ValueError):
            retention.parse_time(bad)
    with pytest.raises(SystemExit) as exit_:
        retention.main(["train", "--decisions", "d", "--outcomes", "o", "--catalog", "c", "--as-of", "yesterday"])
    assert exit_.value.code == 2
    assert "argument --as-of: 'yesterday' is neither milliseconds since 1970 nor an ISO 8601 date" in capsys.readouterr().err


def test_an_empty_option_value_is_refused_not_read_as_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    """`--registry "$UNSET"` must not mean the checkout's registry: prune would delete its versions."""
    import retention

    for argv in (["models", "prune", "--keep", "1", "--registry", ""], ["models", "prune", "--registry= "],
                 ["evaluate", "--versions", "", "--decisions", "d", "--outcomes", "o", "--catalog", "c"]):
        with pytest.raises(SystemExit) as exit_:
            retention.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "error: argument --" in err and ": is empty (see retention " in err, argv


def test_empty_output_folders_are_refused_and_a_replaced_world_is_said(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`--out "$UNSET"` must not write a world (or a test CA's private keys) into the current folder."""
    import retention

    for argv, flag in ((["simulate", "--n", "50", "--out", ""], "--out"), (["sign", "--ca", "", "--count", "1"], "--ca")):
        with pytest.raises(SystemExit) as exit_:
            retention.main(argv)
        assert exit_.value.code == 2 and f"argument {flag}: is empty" in capsys.readouterr().err
    assert retention.main(["simulate", "--n", "50", "--out", str(tmp_path / "w")]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert retention.main(["simulate", "--n", "50", "--out", str(tmp_path / "w")]) == 0
    assert "the world that was there is replaced" in capsys.readouterr().out

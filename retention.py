"""The ``retention`` command: a thin dispatcher that imports each verb's code only when it runs.

So ``retention train`` never loads Litestar and ``retention serve`` never loads scikit-learn.
Every verb module exposes ``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

VERBS: dict[str, tuple[str, str]] = {
    "serve": ("serving.server", "run the endpoint (uvicorn)"),
    "demo": ("retention_demo", "train a model, serve it, send signed requests, show the decisions"),
    "sign": ("serving.sign_cli", "signed test requests and notifications from a local test CA; a test In-App Purchase key"),
    "catalog": ("serving.catalog_cli", "validate the catalog, check default coverage, sync from Apple, plan/apply to Apple"),
    "apple": ("serving.apple_cli", "Apple's realtime URL and Sandbox performance test"),
    "loadtest": ("serving.loadtest", "run Apple's performance test shape against an endpoint, locally"),
    "decisions": ("serving.decisions_cli", "export the decision log as training files, show the latest, compact old files"),
    "notifications": ("serving.notifications_cli", "record outcomes missed from Apple's notification history"),
    "db": ("serving.database", "the fleet's PostgreSQL database: migrate the schema, the fleet's kill switch"),
    "profiles": ("serving.profiles_cli", "import the developer's subscriber profiles into the embedded store"),
    "simulate": ("training.simulate", "write a synthetic world's decisions, outcomes and profiles"),
    "train": ("training.train", "fit on decisions joined with outcomes, export ONNX, write a model version"),
    "score": ("training.score", "batch-score logged requests with a model version"),
    "evaluate": ("training.evaluate_cli", "compare model versions off-policy; HTML report and JSON summary"),
    "models": ("training.models_cli", "list, show, promote, roll back and prune model versions"),
    "experiment": ("training.experiment", "a challenger on live traffic: start, status, promote, plan, share, stop"),
}


class VerbParser(argparse.ArgumentParser):
    """The argument parser of every verb: a usage error is one line on stderr and exit status 2.

    argparse would print the whole usage block first; the user gets ``retention VERB: error: MESSAGE``
    and where the options are listed instead. Sub-commands (``add_subparsers``) inherit the class.
    """

    _commands: Any = None  # the sub-commands action, when the verb has sub-commands

    def add_subparsers(self, **kwargs: Any) -> Any:
        """Add sub-commands, shown as COMMAND unless a metavar is given (never the internal dest name)."""
        kwargs.setdefault("metavar", "COMMAND")
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Parse as argparse does; an unknown argument is reported by the sub-command it was given to.

        An option of the sub-commands given before the command (``retention models --registry R list``)
        is refused with where it goes, rather than read as an unknown command.
        """
        if args is not None:
            self._refuse_empty_values(list(args))
        if self._commands is not None and args is not None:
            for arg in args:
                if arg in self._commands.choices or not arg.startswith("-"):
                    break
                name = arg.split("=", 1)[0]
                if name in self._option_string_actions:
                    continue
                takers = [c for c, sub in self._commands.choices.items() if name in sub._option_string_actions]
                given = [a for a in args if a in takers]  # the command typed later, when it takes the option
                if takers:
                    self.error(f"{name} goes after the command: {self.prog} {(given or takers)[0]} {name} ...")
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            target: argparse.ArgumentParser = self
            if self._commands is not None:
                target = self._commands.choices.get(getattr(ns, self._commands.dest, None), self)
            target.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _refuse_empty_values(self, args: list[str]) -> None:
        """Refuse an option given an empty value (``--registry "$UNSET"``): it would quietly mean a default."""
        parsers = [self, *(self._commands.choices.values() if self._commands is not None else ())]
        takes_value = {name for p in parsers for name, action in p._option_string_actions.items() if action.nargs != 0}
        for i, arg in enumerate(args):
            if arg == "--":
                return
            name, eq, value = arg.partition("=")
            if name not in takes_value:
                continue
            if (eq and not value.strip()) or (not eq and i + 1 < len(args) and not args[i + 1].strip()):
                self.error(f"argument {name}: is empty")

    def _print_message(self, message: str, file: Any = None) -> None:
        """Write as argparse does, but let a failed write (a full disk) raise: argparse would swallow it, exit 0."""
        if message:
            with contextlib.suppress(AttributeError):  # no stream at all (descriptor closed): nothing to tell
                (file or sys.stderr).write(message)

    def error(self, message: str) -> NoReturn:
        if self._commands is not None:
            names = ", ".join(self._commands.choices)
            if message.endswith(f"required: {self._commands.metavar}"):
                message = f"a command is needed: one of {names}"
            elif message.startswith(f"argument {self._commands.metavar}: invalid choice: "):
                given = message.removeprefix(f"argument {self._commands.metavar}: invalid choice: ").split(" (")[0]
                message = f"unknown command {given}: one of {names}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """Return an argparse ``type`` that accepts whole numbers from `low` to `high` (inclusive; None: no top).

    A value outside is a usage error: ``retention VERB: error: argument --FLAG: must be ...`` and exit 2.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f"from {low:,} to {high:,}" if high is not None else f"{low:,} or more"
            raise argparse.ArgumentTypeError(f"must be {span}, not {value:,}")
        return value

    return parse


_YEAR_10000_MS = 253_402_300_800_000


def parse_time(text: str) -> int:
    """Return a time given as milliseconds since 1970 or as an ISO 8601 date/time (UTC when no zone), in ms.

    Raises ValueError with one sentence.
    """
    from datetime import UTC, datetime, timedelta

    t = text.strip()
    bad = f"{text!r} is neither milliseconds since 1970 nor an ISO 8601 date such as 2026-11-01T00:00:00Z"
    if t.isascii() and t.isdigit() and len(t) != 8:  # 8 digits are a date, 20260201 (as ms: 5 hours into 1970)
        ms = int(t)
    else:
        try:
            when = datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(bad) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ms = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)  # exact: no float rounding
    if not 0 <= ms < _YEAR_10000_MS:
        raise ValueError(f"{text!r} is outside the years 1970 to 9999")
    return ms


def time_ms(text: str) -> int:
    """argparse ``type`` of a time option: :func:`parse_time`, a bad value being a usage error (exit 2)."""
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _usage() -> str:
    lines = ["usage: retention VERB [options]   (retention VERB --help for a verb's options; retention --version)", "",
             "verbs:"]
    width = max(map(len, VERBS))
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def _reader_gone() -> int:
    """Return 141 after the reader went away (`retention ... | head`): quiet, as a command killed by SIGPIPE.

    stdout goes to /dev/null so the interpreter's final flush cannot raise again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # no stdout (descriptor 1 closed), or a replaced one
        fd = 1
    os.dup2(devnull, fd)
    return 141


def _flush_stdout() -> None:
    """Flush stdout, if there is one (a closed descriptor 1 leaves sys.stdout None)."""
    if sys.stdout is not None:
        sys.stdout.flush()


def _stdout_broken() -> bool:
    """Return True when writing to stdout fails (a full disk, a closed descriptor)."""
    try:
        _flush_stdout()
    except (OSError, ValueError):
        return True
    return False


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def _cannot_write(prog: str, exc: OSError) -> int:
    """Say in one line that the output could not be written; return 1.

    When stdout itself is what failed, it then goes to /dev/null (as in _reader_gone), so the
    interpreter's final flush cannot raise again.
    """
    reason = (exc.strerror or str(exc)).lower()
    print(f"{prog}: error: cannot write: {reason}", file=sys.stderr)
    if _stdout_broken():
        _reader_gone()
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run one verb and return its exit status; bad input is one line on stderr, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        try:
            print(_usage(), file=sys.stdout if args else sys.stderr, flush=True)  # no verb: a usage error, on stderr
        except BrokenPipeError:
            return _reader_gone()
        except OSError as exc:
            _reader_gone()
            return _cannot_write("retention", exc)
        return 0 if args else 2
    if args[0] in ("--version", "-V"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = f"retention {version('retention-endpoint')}"
        except PackageNotFoundError:  # run from a checkout that was never installed
            text = "retention (not installed: run bash scripts/setup.sh)"
        try:
            print(text, flush=True)
        except BrokenPipeError:
            return _reader_gone()
        except OSError as exc:
            _reader_gone()
            return _cannot_write("retention", exc)
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if verb.startswith("-"):
            print(f"retention: unknown option {verb!r}: options go after the verb (retention VERB {verb} ...); "
                  f"verbs: {', '.join(VERBS)} (see retention --help)", file=sys.stderr)
        else:
            print(f"retention: unknown verb {verb!r}; {hint}verbs: {', '.join(VERBS)} (see retention --help)",
                  file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        status = int(module.main(rest) or 0)
        _flush_stdout()  # a write that fails (a full disk) fails here, not silently at exit
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except SystemExit:  # argparse's --help and usage errors
        try:
            _flush_stdout()
        except BrokenPipeError:
            return _reader_gone()
        except OSError as exc:
            return _cannot_write(f"retention {verb}", exc)
        raise
    except Exception as exc:  # the user gets one line; RETENTION_DEBUG=1 shows the traceback
        if os.environ.get("RETENTION_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.filename is None and exc.errno in _WRITE_ERRNOS:
            return _cannot_write(f"retention {verb}", exc)
        if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:  # not "[Errno 17] File exists: 'x'"
            text = f"{exc.filename}: {exc.strerror.lower()}"
        else:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"retention {verb}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

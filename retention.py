"""The ``retention`` command: a thin dispatcher that imports each verb's code only when it runs.

So ``retention train`` never loads Litestar and ``retention serve`` never loads scikit-learn.
Every verb module exposes ``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

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

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _usage() -> str:
    lines = ["usage: retention VERB [options]   (retention VERB --help for a verb's options)", "", "verbs:"]
    width = max(map(len, VERBS))
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def _reader_gone() -> int:
    """Return 141 after the reader went away (`retention ... | head`): quiet, as a command killed by SIGPIPE.

    stdout goes to /dev/null so the interpreter's final flush cannot raise again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    """Run one verb and return its exit status; bad input is one line on stderr, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        try:
            print(_usage(), flush=True)
        except BrokenPipeError:
            return _reader_gone()
        return 0 if args else 2
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"retention: unknown verb {verb!r}; one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except SystemExit:
        raise
    except Exception as exc:  # the user gets one line; RETENTION_DEBUG=1 shows the traceback
        if os.environ.get("RETENTION_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:  # not "[Errno 17] File exists: 'x'"
            text = f"{exc.filename}: {exc.strerror.lower()}"
        else:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"retention {verb}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""How the server starts Python child processes: they import our package and the interpreter's, never the working directory's.

``python -m pkg.mod`` puts the directory it was started from first on ``sys.path`` (and ``python -c`` puts
``''``, the same directory), so a ``retention.py`` or ``serving/server.py`` lying in that folder would be run in
place of ours. Every Python child started by our code (the server ``retention demo`` starts, uvicorn's worker
processes) therefore runs in Python 3.11's safe-path mode, ``-P`` (``PYTHONSAFEPATH``), which leaves that directory off
``sys.path`` and keeps everything else.

Why ``-P`` and not ``-I`` (isolated mode): ``-I`` would also drop ``PYTHONPATH`` and the user's site-packages.
The child must import the very ``serving`` package the server runs, which is not always the installed one
(a checkout run with ``PYTHONPATH``), so the folder holding the server's own package is put first on the
child's ``PYTHONPATH``; the rest of ``PYTHONPATH`` is the operator's environment, which already decides
what the server itself imports. The working directory is not configuration: it is wherever the command
was typed. See docs/security.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

#: The folder that holds the server's own ``serving`` package (the repository, or site-packages).
PACKAGE_ROOT: Final = str(Path(__file__).resolve().parent.parent)


def command(module: str, *args: str, python: str = sys.executable) -> list[str]:
    """Return the argv that runs ``module`` as ``__main__`` in a child, safe-path mode (``-P``)."""
    return [python, "-P", "-m", module, *args]


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the child's environment: `base` (default ``os.environ``), the server's package folder first on
    ``PYTHONPATH``, and ``PYTHONSAFEPATH=1`` so that the child's own children are started the same way."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONSAFEPATH"] = "1"
    return env

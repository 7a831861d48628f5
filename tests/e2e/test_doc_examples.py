"""Every shell and Python example of README.md and docs/*.md runs as written.

The examples run the way a reader runs them after the two set-up commands (``bash scripts/demo.sh``
or ``bash scripts/test.sh``): with the checkout's ``.venv/bin`` first on PATH (what
``source .venv/bin/activate`` gives), in a fresh folder that shows the checkout's files (symbolic
links to its top-level entries, so ``models/data/demo_catalog.json`` and ``.venv`` resolve) and
where everything an example writes lands. ``RETENTION_MODEL`` points at a registry in that folder,
so no example writes into the checkout's registry; no other ``RETENTION_*`` variable is set.

* A fenced block whose info string is ``sh``, ``bash``, ``shell`` or ``console`` runs with
  ``bash -euo pipefail``; ``python`` or ``py`` runs with the venv's Python. Other blocks (plain
  ``````` fences, ``text``, ``json``) are not run.
* The blocks of one file run in order in one folder, so a block can use what an earlier one wrote.
* A block that cannot run here (it needs TLS files, ``/etc``, Apple's servers, or it is the set-up
  command itself) is marked by an HTML comment on the line before its fence, with the reason::

      <!-- skip-example: needs your TLS certificate and key -->

Files are discovered (README.md, then docs/**/*.md sorted), so a new doc is tested without
touching this file. A failure names the file, the line of the fence and the block's output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SHELL = ("sh", "bash", "shell", "console")
PYTHON = ("python", "py")
SKIP = re.compile(r"<!--\s*skip-example:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Example:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str  # "shell" or "python"
    code: str
    skip: str | None  # the reason of a skip-example marker, else None

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    """Return README.md and every Markdown file under docs/, in a stable order."""
    files = [ROOT / "README.md"]
    docs = ROOT / "docs"
    if docs.is_dir():
        files += sorted(docs.rglob("*.md"))
    return files


def examples(path: Path) -> list[Example]:
    """Return the shell and Python blocks of the Markdown file `path`, with their skip markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Example] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        language = "shell" if info in SHELL else "python" if info in PYTHON else None
        if language is None:
            continue
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(before)
        found.append(Example(path, start + 1, language, "\n".join(body) + "\n", marker.group("reason") if marker else None))
    return found


def reader_folder(tmp: Path) -> dict[str, str]:
    """Fill `tmp` with links to the checkout's top-level entries; return the environment the examples run in."""
    for entry in ROOT.iterdir():
        if entry.name in (".git", "data", "out") or entry.name.startswith((".pytest", ".mypy", ".ruff")):
            continue
        (tmp / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETENTION_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["RETENTION_MODEL"] = str(tmp / "registry")
    return env


def run_example(example: Example, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if example.language == "shell":
        argv = ["bash", "-euo", "pipefail", "-c", example.code]
    else:
        argv = [sys.executable, "-c", example.code]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_of_a_doc_run_as_written(doc: Path, tmp_path: Path) -> None:
    blocks = examples(doc)
    runnable = [b for b in blocks if b.skip is None]
    if not runnable:
        pytest.skip(f"{doc.relative_to(ROOT)} has no runnable shell or Python example")
    env = reader_folder(tmp_path)
    for block in runnable:
        try:
            r = run_example(block, tmp_path, env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.where()}: the {block.language} example ran past {BLOCK_TIMEOUT_S} s:\n{block.code}")
        if r.returncode != 0:
            pytest.fail(
                f"{block.where()}: the {block.language} example exited {r.returncode}\n"
                f"--- example ---\n{block.code}--- stdout (last 3000 characters) ---\n{r.stdout[-3000:]}\n"
                f"--- stderr (last 3000 characters) ---\n{r.stderr[-3000:]}\n"
                "(mark an example that cannot run here with <!-- skip-example: REASON --> on the line before its fence)"
            )


def test_the_examples_parser_finds_blocks_and_markers(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# t\n\n```sh\necho one\n```\n\n<!-- skip-example: needs TLS files -->\n```bash\ncat /etc/x\n```\n\n"
        "````python\nprint('```')\n````\n\n```json\n{}\n```\n\n```\nplain\n```\n"
    )
    found = examples(doc)
    assert [(b.line, b.language, b.skip) for b in found] == [
        (3, "shell", None), (8, "shell", "needs TLS files"), (12, "python", None)
    ]
    assert found[2].code == "print('```')\n"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_skip_marker_gives_a_reason_and_stands_before_a_block(doc: Path) -> None:
    lines = doc.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        marker = SKIP.match(line.strip())  # a marker on a line of its own (prose may name the marker)
        if marker is None:
            continue
        where = f"{doc.relative_to(ROOT)}:{i + 1}"
        assert marker.group("reason"), f"{where}: a skip-example marker must say why the block cannot run here"
        after = next((ln for ln in lines[i + 1 :] if ln.strip()), "")
        assert FENCE.match(after), f"{where}: a skip-example marker must stand on the line before a fenced block"

"""``retention decisions``: export the server's decision and outcome logs, show the latest, compact old files.

``retention decisions export --data-dir DIR --out decisions.parquet [--outcomes-out outcomes.parquet]``
reads every process's ``decisions-*.sqlite`` in DIR (several workers, or replicas' files copied
together, and the archive of ``compact``) and writes the decisions file that ``retention train``
reads. A damaged file is read row by row: its unreadable rows (or a file that cannot be read at all)
are counted and the file named in one line on stderr, and the rest exported; ``--strict`` makes that an
error (exit 1) and writes nothing. ``show`` skips and names such files the same way.

``retention decisions compact --data-dir DIR`` merges the files no running server holds into
``decisions-archive.sqlite`` and deletes them (docs/failure-modes.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retention import VerbParser, int_in
from serving.log_reader import count_unanswered, export_decisions, export_outcomes, latest_decisions, log_files
from serving.log_schema import prepare_output
from serving.log_writer import compact_logs


def _data_dirs(args: argparse.Namespace) -> list[Path]:
    dirs = args.data_dir or [os.environ.get("RETENTION_DATA_DIR") or "data"]
    return [Path(d) for d in dirs]


def _files(args: argparse.Namespace) -> list[Path]:
    dirs = _data_dirs(args)
    files = [f for d in dirs for f in log_files(d)]
    if not files:
        raise ValueError(f"no decision log (decisions-*.sqlite) in {', '.join(map(str, dirs))}")
    return files


def main(argv: Sequence[str]) -> int:
    """Run ``retention decisions export|show|compact``; return the exit status."""
    parser = VerbParser(prog="retention decisions", description="Work with the server's decision log.")
    sub = parser.add_subparsers(dest="command", required=True)
    data_help = "data folder of the server; repeat for several replicas [env RETENTION_DATA_DIR; default 'data']"
    exp = sub.add_parser("export", help="write the decisions (and outcomes) files that retention train reads")
    exp.add_argument("--data-dir", action="append", help=data_help)
    exp.add_argument("--database-url", default=None,
                     help="read the fleet's PostgreSQL database instead of log files (postgresql:// URL) "
                     "[env RETENTION_DATABASE_URL]")
    exp.add_argument("--out", required=True, help="decisions file to write (.parquet or .csv)")
    exp.add_argument("--outcomes-out", help="outcomes file to write too (.parquet or .csv)")
    exp.add_argument("--answered-only", action="store_true",
                     help="leave out the requests answered with no message (404, policy apple_fallback); by default "
                     "they are kept: retention evaluate reports them as Apple's own arm, and training leaves them out")
    exp.add_argument("--include-unanswered", action="store_true", help=argparse.SUPPRESS)  # a no-op: kept is the default
    exp.add_argument("--strict", action="store_true",
                     help="exit 1 and write nothing when a log file cannot be read in full (default: name it on stderr, export the rest)")
    comp = sub.add_parser("compact", help="merge the log files no running server holds into decisions-archive.sqlite")
    comp.add_argument("--data-dir", help="data folder of the server [env RETENTION_DATA_DIR; default 'data']")
    comp.add_argument("--strict", action="store_true", help="exit 1 when a log file cannot be read (it is left in place)")
    show = sub.add_parser("show", help="print the latest decisions: candidates, scores, probabilities, chosen message")
    show.add_argument("--data-dir", action="append", help=data_help)
    show.add_argument("--database-url", default=None,
                      help="read the fleet's PostgreSQL database instead of a data folder [env RETENTION_DATABASE_URL]")
    show.add_argument("--last", type=int_in(1, 1_000_000), default=10,
                      help="how many decisions, 1 to 1,000,000 (default 10)")
    args = parser.parse_args(list(argv))
    bad: dict[Path, list[str]] = {}
    strict = getattr(args, "strict", False)
    url = getattr(args, "database_url", None) or (None if args.data_dir else os.environ.get("RETENTION_DATABASE_URL"))
    if args.command == "export":
        if args.outcomes_out and Path(args.outcomes_out).resolve() == Path(args.out).resolve():
            parser._commands.choices["export"].error(f"--out and --outcomes-out name the same file ({args.out}): the outcomes would replace the "
                         "decisions")
        for out in (args.out, args.outcomes_out):  # both places checked before either file is written
            if out:
                prepare_output(Path(out))
        if url:
            return _export_database(args, url)

    class _UnreadableError(Exception):
        pass

    def on_bad_file(path: Path, why: str) -> None:
        whys = bad.setdefault(path, [])
        if why not in whys:
            whys.append(why)
        if strict and args.command == "export":  # stop: the export's temporary file is removed, nothing written
            raise _UnreadableError(f"retention decisions: cannot read {path}: {why}; --strict: nothing written")

    def report() -> None:
        for path, whys in bad.items():
            print(f"retention decisions: cannot read {path}: {'; '.join(whys)} (skipped)", file=sys.stderr)

    if args.command == "compact":
        folder = Path(args.data_dir or os.environ.get("RETENTION_DATA_DIR") or "data")
        done = compact_logs(folder, on_bad_file=on_bad_file)
        report()
        print(
            f"compacted {len(done.merged)} log file(s) into {done.archive}: {done.decisions} decisions and "
            f"{done.outcomes} outcomes added; {len(done.live)} file(s) left to running servers"
        )
        return 1 if bad and args.strict else 0

    if args.command == "show" and args.database_url and args.data_dir:
        print("retention decisions show: error: give --database-url or --data-dir, not both", file=sys.stderr)
        return 2
    if args.command == "show" and url:
        from serving import pg_log
        from serving.database import check_url, safe_url

        rows = pg_log.latest_decisions(check_url(url), args.last)
        if not rows:
            print(f"retention decisions show: error: no decisions in {safe_url(url)}", file=sys.stderr)
            return 1
        _print_decisions(rows)
        return 0
    files = _files(args)
    if args.command == "export":
        n = None
        try:
            n = export_decisions(
                files, args.out, progress=True, shown_only=args.answered_only, on_bad_file=on_bad_file
            )
            n_outcomes = export_outcomes(files, args.outcomes_out, on_bad_file=on_bad_file) if args.outcomes_out else None
        except _UnreadableError as exc:
            if n is not None:  # the outcomes were unreadable: take back the decisions file too
                Path(args.out).unlink(missing_ok=True)
            print(exc, file=sys.stderr)
            return 1
        report()
        unread = f" ({len(bad)} not read in full)" if bad else ""
        print(f"exported {n} decisions from {len(files)} log file(s){unread} to {args.out}")
        unanswered = count_unanswered(files, on_bad_file=lambda path, why: None)  # named above
        if unanswered:
            print(f"{'left out' if args.answered_only else 'kept'} {unanswered} request(s) answered with no message "
                  "(404, Apple's own arm)")
        if n_outcomes is not None:
            print(f"exported {n_outcomes} outcomes to {args.outcomes_out}")
        return 0

    rows = latest_decisions(files, args.last, on_bad_file=on_bad_file)
    report()
    _print_decisions(rows)
    return 0


def _print_decisions(rows: list[dict[str, Any]]) -> None:
    """Print decisions candidate by candidate: P(stay), value and probability of each, the shown one marked."""
    def num(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for d in rows:
        print(
            f"{d['request_id']}  {d['product_id']} {d['user_locale']}  policy={d['policy']} "
            f"model={d['model_version']}  shown={d['message_id']} (p={num(d['propensity'], '.4f')}, {d['kind']})  "
            f"{num(d['latency_ms'], '.2f')} ms"
        )
        scores, values, probs = d["scores"] or [], d["values"] or [], d["probabilities"] or []
        for j, m in enumerate(d["candidates"] or []):
            score = f"{scores[j]:.3f}" if j < len(scores) and scores[j] is not None else "-"
            value = f"{values[j]:8.2f}" if j < len(values) and values[j] is not None else "       -"
            prob = f"{probs[j]:.4f}" if j < len(probs) else "-"
            mark = "*" if m == d["message_id"] else " "
            print(f"   {mark} {m}  P(stay)={score}  value={value}  prob={prob}")


def _export_database(args: argparse.Namespace, url: str) -> int:
    """``retention decisions export --database-url URL``: stream the fleet's decisions (and outcomes) to files."""
    from serving import pg_log
    from serving.database import check_url, safe_url

    check_url(url)
    n = pg_log.export_decisions(url, args.out, shown_only=args.answered_only)
    print(f"exported {n} decisions from {safe_url(url)} to {args.out}")
    if args.outcomes_out:
        m = pg_log.export_outcomes(url, args.outcomes_out)
        print(f"exported {m} outcomes to {args.outcomes_out}")
    return 0

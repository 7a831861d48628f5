"""``retention sign``: mint signed test requests with a local test CA (demo, load tests).

The first run with a new ``--ca DIR`` mints an Apple-shaped test CA into DIR (never overwriting a file);
later runs reuse it. Each signed request body, ``{"signedPayload": "..."}``, is printed on its own line.
Configure ``DIR/root.pem`` as a root (``RETENTION_ROOT_CERTS``) for the server to trust these requests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from serving.schemas import Environment

_PROGRESS_FROM = 2000  # below this, signing takes well under a second: no bar


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retention sign",
        description=(
            "Print signed Get Retention Message request bodies, one JSON per line, signed by a local test CA. "
            "If DIR holds no CA yet, a new one is minted there (root.pem, root.der, chain and private keys "
            "with mode 0600); an existing CA is reused and never overwritten. Trust it by configuring "
            "DIR/root.pem as a root certificate (RETENTION_ROOT_CERTS)."
        ),
    )
    p.add_argument("--ca", required=True, metavar="DIR", help="folder of the test CA (minted there when absent)")
    p.add_argument("--count", type=int, default=1, metavar="N", help="number of signed request bodies to print (default 1)")
    p.add_argument("--app-apple-id", type=int, default=1234567890, help="appAppleId of the requests (default 1234567890)")
    p.add_argument(
        "--environment",
        default="Sandbox",
        help="environment of the requests: Sandbox or Production (default Sandbox)",
    )
    p.add_argument(
        "--product-id", default="com.example.premium.monthly", help="productId of the requests (default com.example.premium.monthly)"
    )
    p.add_argument("--locale", default="en-US", help="userLocale of the requests (default en-US)")
    p.add_argument(
        "--original-transaction-id",
        default=None,
        help="originalTransactionId of every request (default: a random one per request)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print `--count` signed request bodies to stdout and return 0; 2 on bad usage."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.count < 0:
        print("retention sign: error: --count must be 0 or more", file=sys.stderr)
        return 2
    if Environment.parse(args.environment) is None:
        print(f"retention sign: error: --environment must be Sandbox or Production, not {args.environment!r}", file=sys.stderr)
        return 2

    from serving.testpki import TestPKI  # imported here so --help and usage errors stay instant

    if TestPKI.exists_in(args.ca):
        pki = TestPKI.load(args.ca)
    else:
        pki = TestPKI.mint()
        root = pki.write(args.ca)
        print(f"retention sign: minted a new test CA in {args.ca}; trust it with RETENTION_ROOT_CERTS={root}", file=sys.stderr)

    rows: Iterable[int] = range(args.count)
    if args.count >= _PROGRESS_FROM:
        from tqdm import tqdm

        rows = tqdm(rows, desc="signing", unit="req", file=sys.stderr)
    out = sys.stdout
    for _ in rows:
        body = pki.signed_request_body(
            app_apple_id=args.app_apple_id,
            environment=args.environment,
            product_id=args.product_id,
            user_locale=args.locale,
            original_transaction_id=args.original_transaction_id,
        )
        out.write(body.decode("ascii"))
        out.write("\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

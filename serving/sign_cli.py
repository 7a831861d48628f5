"""``retention sign``: mint signed test requests and notifications with a local test CA, and test keys.

* ``retention sign [request] --ca DIR``: Get Retention Message request bodies, one per line.
* ``retention sign notification --ca DIR --type TYPE [--subtype S]``: an App Store Server Notification V2
  body with signed transaction and renewal info (offer fields, any type and subtype).
* ``retention sign iap-key --out FILE``: a test In-App Purchase key (.p8) for promotional offers.

The first run with a new ``--ca DIR`` mints an Apple-shaped test CA into DIR (never overwriting a file);
later runs reuse it. Each signed body, ``{"signedPayload": "..."}``, is printed on its own line.
Configure ``DIR/root.pem`` as a root (``RETENTION_ROOT_CERTS``) for the server to trust them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import string
import sys
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from retention import VerbParser
from serving.schemas import Environment

_PROGRESS_FROM = 2000  # below this, signing takes well under a second: no bar


def _parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention sign",
        usage="retention sign [request] --ca DIR [options]\n       retention sign notification --ca DIR --type TYPE "
              "[options]\n       retention sign iap-key --out FILE [--key-id ID]",
        description=(
            "Print signed Get Retention Message request bodies, one JSON per line, signed by a local test CA. "
            "If DIR holds no CA yet, a new one is minted there (root.pem, root.der, chain and private keys "
            "with mode 0600); an existing CA is reused and never overwritten. Trust it by configuring "
            "DIR/root.pem as a root certificate (RETENTION_ROOT_CERTS)."
        ),
    )
    p.add_argument("--ca", required=True, metavar="DIR", help="folder of the test CA (minted there when absent)")
    p.add_argument("--count", type=int, default=1, metavar="N", help="number of signed request bodies to print, 1 or more (default 1)")
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


def _test_ca(folder: str) -> Any:
    """Return the test CA in `folder`, minting one there first when it holds none; ValueError when it cannot."""
    from serving.testpki import TestPKI  # imported here so --help and usage errors stay instant

    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--ca {folder} is a file; give a folder (a new one is created and a test CA minted there)")
    if TestPKI.exists_in(path):
        return TestPKI.load(path)
    pki = TestPKI.mint()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # no such parent, permissions, a read-only file system
        raise ValueError(f"cannot create the test CA folder {folder} (--ca): {exc.strerror or type(exc).__name__}"
                         ) from None
    try:
        root = pki.write(path)
    except FileExistsError:  # the folder holds other files of those names, never overwritten: one line, exit 1
        raise
    except OSError as exc:
        raise ValueError(f"cannot write the test CA into {folder} (--ca): {exc.strerror or type(exc).__name__}"
                         f" ({exc.filename})") from None
    print(f"retention sign: minted a new test CA in {folder}; trust it with RETENTION_ROOT_CERTS={root}", file=sys.stderr)
    return pki


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``retention sign``; return 0, 2 on bad usage (one line on stderr)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    verb = args_list[0] if args_list else ""
    try:
        if verb == "notification":
            return _notification(args_list[1:])
        if verb == "iap-key":
            return _iap_key(args_list[1:])
        return _requests(args_list[1:] if verb == "request" else args_list)
    except ValueError as exc:  # a CA folder or key file that cannot be used: bad input, not usage (exit 1)
        print(f"retention sign: error: {exc}", file=sys.stderr)
        return 1


def _requests(argv: list[str]) -> int:
    """Print `--count` signed request bodies to stdout and return 0; 2 on bad usage."""
    args = _parser().parse_args(argv)
    if args.count < 1:
        print(f"retention sign: error: --count must be 1 or more, not {args.count}", file=sys.stderr)
        return 2
    if not args.locale or args.locale != args.locale.strip():
        print(f"retention sign: error: --locale must be a locale such as en-US, not {args.locale!r}", file=sys.stderr)
        return 2
    if Environment.parse(args.environment) is None:
        print(f"retention sign: error: --environment must be Sandbox or Production, not {args.environment!r}", file=sys.stderr)
        return 2

    pki = _test_ca(args.ca)
    rows: Iterable[int] = range(args.count)
    if args.count >= _PROGRESS_FROM:
        from tqdm import tqdm

        rows = tqdm(rows, desc="signing", unit="req", file=sys.stderr, disable=None)  # None: only on a terminal
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


def _field(text: str) -> tuple[str, Any]:
    """Return (name, value) of ``NAME=VALUE``; VALUE is read as JSON when it parses (numbers, null), else text."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name, json.loads(raw)
    except ValueError:
        return name, raw


def _notification_parser() -> argparse.ArgumentParser:
    p = VerbParser(
        prog="retention sign notification",
        description=(
            "Print one App Store Server Notification V2 body, {\"signedPayload\": ...}, signed by the test CA in DIR "
            "(minted when absent), with a signed transaction (signedTransactionInfo) and renewal info "
            "(signedRenewalInfo). POST it to the server's /apple/notifications. Any notificationType and subtype "
            "is accepted; the server records DID_RENEW, EXPIRED, DID_CHANGE_RENEWAL_STATUS, DID_CHANGE_RENEWAL_PREF, "
            "OFFER_REDEEMED and REFUND as outcomes."
        ),
    )
    p.add_argument("--ca", required=True, metavar="DIR", help="folder of the test CA (minted there when absent)")
    p.add_argument("--type", required=True, dest="notification_type", metavar="TYPE",
                   help="notificationType, e.g. DID_RENEW, EXPIRED, DID_CHANGE_RENEWAL_STATUS, OFFER_REDEEMED, TEST")
    p.add_argument("--subtype", default=None, help="subtype, e.g. AUTO_RENEW_DISABLED, VOLUNTARY, UPGRADE")
    p.add_argument("--app-apple-id", type=int, default=1234567890, help="data.appAppleId (default 1234567890)")
    p.add_argument("--bundle-id", default="com.example.app", help="data.bundleId (default com.example.app)")
    p.add_argument("--environment", default="Sandbox", help="data.environment: Sandbox or Production (default Sandbox)")
    p.add_argument("--product-id", default="com.example.premium.monthly", help="productId of the transaction")
    p.add_argument("--original-transaction-id", default=None,
                   help="originalTransactionId (default: a random one); use the one of a request you sent")
    p.add_argument("--transaction-id", default=None, help="transactionId (default: the original id and a 9)")
    p.add_argument("--notification-uuid", default=None, help="notificationUUID (default: a random uuid4)")
    o = p.add_argument_group("offer fields (on the transaction and the renewal info)")
    o.add_argument("--offer-type", type=int, default=None, help="offerType: 1 introductory, 2 promotional, "
                   "3 offer code, 4 win-back")
    o.add_argument("--offer-identifier", default=None, help="offerIdentifier (a promotional offer's id)")
    o.add_argument("--offer-discount-type", default=None, help="offerDiscountType: FREE_TRIAL, PAY_AS_YOU_GO, "
                   "PAY_UP_FRONT")
    o.add_argument("--transaction-reason", default=None, help="transactionReason of the transaction: PURCHASE or RENEWAL")
    f = p.add_argument_group("any other field")
    f.add_argument("--transaction-field", type=_field, action="append", default=[], metavar="NAME=VALUE",
                   help="set a field of the transaction (VALUE read as JSON when it parses); repeatable")
    f.add_argument("--renewal-field", type=_field, action="append", default=[], metavar="NAME=VALUE",
                   help="set a field of the renewal info; repeatable")
    f.add_argument("--data-field", type=_field, action="append", default=[], metavar="NAME=VALUE",
                   help="set a field of data (status, bundleVersion, ...); repeatable")
    f.add_argument("--no-transaction", action="store_true", help="leave signedTransactionInfo out")
    f.add_argument("--no-renewal", action="store_true", help="leave signedRenewalInfo out")
    return p


def _notification(argv: list[str]) -> int:
    args = _notification_parser().parse_args(argv)
    if Environment.parse(args.environment) is None:
        print(f"retention sign: error: --environment must be Sandbox or Production, not {args.environment!r}",
              file=sys.stderr)
        return 2
    offer = {k: v for k, v in (("offerType", args.offer_type), ("offerIdentifier", args.offer_identifier),
                               ("offerDiscountType", args.offer_discount_type)) if v is not None}
    transaction = dict(offer)
    if args.transaction_reason is not None:
        transaction["transactionReason"] = args.transaction_reason
    transaction.update(args.transaction_field)
    pki = _test_ca(args.ca)
    body = pki.signed_notification_body(
        args.notification_type,
        args.subtype,
        app_apple_id=args.app_apple_id,
        bundle_id=args.bundle_id,
        environment=args.environment,
        product_id=args.product_id,
        original_transaction_id=args.original_transaction_id,
        transaction_id=args.transaction_id,
        notification_uuid=args.notification_uuid,
        transaction=transaction,
        renewal={**offer, **dict(args.renewal_field)},
        data=dict(args.data_field),
        with_transaction=not args.no_transaction,
        with_renewal=not args.no_renewal,
    )
    sys.stdout.write(body.decode("ascii") + "\n")
    sys.stdout.flush()
    return 0


def _iap_key(argv: list[str]) -> int:
    p = VerbParser(
        prog="retention sign iap-key",
        description=(
            "Write a new test In-App Purchase key: a P-256 private key in PKCS#8 PEM, the format of the "
            "SubscriptionKey_<KEYID>.p8 file App Store Connect gives you, with mode 0600, never overwriting a "
            "file; and its public key beside it (FILE.pub.pem) to check the offer signatures the server makes. "
            "Prints the settings that make the server sign promotional offers with it."
        ),
    )
    p.add_argument("--out", default=None, metavar="FILE", help="where to write the key (default SubscriptionKey_<KEYID>.p8)")
    p.add_argument("--key-id", default=None, metavar="ID", help="its key id (default: 10 random letters and digits)")
    p.add_argument("--issuer-id", default=None, help="the issuer id to print in the settings (default: a random uuid4)")
    args = p.parse_args(argv)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_id = args.key_id or "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(10))
    out = Path(args.out or f"SubscriptionKey_{key_id}.p8")
    pub = out.with_name(out.name + ".pub.pem")
    for path in (out, pub):
        if path.exists():
            raise ValueError(f"{path} already exists; a key file is never overwritten")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ValueError(f"cannot write {out}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    where = "these settings:" if getattr(sys.stdout, "isatty", lambda: False)() else "the settings written to stdout"
    print(f"retention sign: wrote the test In-App Purchase key {out} (public key {pub}); serve with {where}",
          file=sys.stderr)
    print(f"RETENTION_OFFER_KEY_FILE={out} RETENTION_OFFER_KEY_ID={key_id} "
          f"RETENTION_OFFER_ISSUER_ID={args.issuer_id or uuid.uuid4()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

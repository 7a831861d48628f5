"""A test PKI shaped like Apple's App Store signing chain, and the signed requests it makes.

Used by the tests, the demo and the load tests; nothing here touches the network. The chain copies the
shape of Apple's real one: a P-384 root and intermediate, a P-256 leaf,
ECDSA-with-SHA-384 certificate signatures, Apple's two marker OIDs, subject and authority key identifiers,
critical BasicConstraints (the intermediate a CA with path length 0, the leaf not a CA) and critical key
usages. A test CA is trusted only when it is configured like any other root.

Typical use::

    pki = TestPKI.mint()
    root_path = pki.write(tmp_dir)              # root.pem, root.der, chain and keys (0600)
    body = pki.signed_request_body(app_apple_id=1234567890, environment="Sandbox")

Variants for negative tests: :meth:`TestPKI.with_leaf` (a new leaf under the same intermediate: expired,
not yet valid, without the OID, a CA, with an unknown critical extension), :meth:`TestPKI.with_intermediate`
(a new intermediate and leaf under the same root) and :meth:`TestPKI.impostor` (a fresh chain that copies
this one's names and key identifiers under a different, untrusted root).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from serving.verify import INTERMEDIATE_OID, LEAF_OID

__all__ = [
    "APPLE_NAMES",
    "TEST_NAMES",
    "ChainNames",
    "CorpusCase",
    "TestPKI",
    "b64url",
    "compact_jws",
    "es256_raw",
    "token_corpus",
    "unknown_critical_extension",
]

_CertHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512
# The DER of an ASN.1 NULL: the value Apple puts in its marker extensions.
_NULL: Final = b"\x05\x00"
#: An extension OID no verifier knows (a private-enterprise arc), for "unknown critical extension" tests.
UNKNOWN_EXTENSION_OID: Final = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1.1")
#: The seven fields of DecodedRealtimeRequestBody, all required.
REQUIRED_FIELDS: Final = (
    "originalTransactionId",
    "appAppleId",
    "productId",
    "userLocale",
    "requestIdentifier",
    "environment",
    "signedDate",
)
_FILES: Final = ("root.pem", "root.der", "intermediate.pem", "leaf.pem", "chain.pem", "root.key", "intermediate.key", "leaf.key")


def _name(ou: str, cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Apple Inc." if cn.startswith(("Apple", "Prod ECC")) else "Retention Test"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class ChainNames:
    """The subject names of a root, an intermediate and a leaf."""

    root: x509.Name
    intermediate: x509.Name
    leaf: x509.Name


#: Names that say plainly this is a test CA (the default).
TEST_NAMES: Final = ChainNames(
    root=_name("Test Certification Authority", "Retention Test Root CA - G3"),
    intermediate=_name("G6", "Retention Test Developer Relations CA"),
    leaf=_name("Test Developer Relations", "Retention Test App Store Signing"),
)
#: Apple's real names, for impostor chains that copy them.
APPLE_NAMES: Final = ChainNames(
    root=_name("Apple Certification Authority", "Apple Root CA - G3"),
    intermediate=_name("G6", "Apple Worldwide Developer Relations Certification Authority"),
    leaf=_name("Apple Worldwide Developer Relations", "Prod ECC Mac App Store and iTunes Store Receipt Signing"),
)


def b64url(data: bytes) -> str:
    """Return unpadded base64url text of `data` (a JWS segment)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def es256_raw(key: ec.EllipticCurvePrivateKey, data: bytes, hash_alg: hashes.HashAlgorithm | None = None) -> bytes:
    """Return an ECDSA signature of `data` in the raw r||s form JWS uses (32 bytes each for P-256)."""
    der = key.sign(data, ec.ECDSA(hash_alg or hashes.SHA256()))
    r, s = decode_dss_signature(der)
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def compact_jws(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, sign: Any) -> str:
    """Return ``header.payload.signature`` where `sign` maps the signing input to signature bytes (or is bytes)."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    signing_input = f"{b64url(h)}.{b64url(p)}".encode("ascii")
    sig = sign if isinstance(sign, bytes) else sign(signing_input)
    return f"{signing_input.decode('ascii')}.{b64url(sig)}"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _ski(key: ec.EllipticCurvePrivateKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest


def _certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    ca: bool | None,
    path_length: int | None = None,
    ski: bytes | None = None,
    aki: bytes | None = None,
    apple_oid: x509.ObjectIdentifier | None = None,
    key_usage: str | None = None,
    extra: Iterable[tuple[x509.ExtensionType, bool]] = (),
    hash_alg: _CertHash | None = None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    if ski is not None:
        b = b.add_extension(x509.SubjectKeyIdentifier(ski), critical=False)
    if aki is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier(aki, None, None), critical=False)
    if key_usage is not None:
        cert_sign = key_usage == "ca"
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=key_usage in ("leaf", "leaf+ca"),
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign or key_usage == "leaf+ca",
                crl_sign=cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if apple_oid is not None:
        b = b.add_extension(x509.UnrecognizedExtension(apple_oid, _NULL), critical=False)
    for ext, critical in extra:
        b = b.add_extension(ext, critical=critical)
    return b.sign(issuer_key, hash_alg or hashes.SHA384())


def unknown_critical_extension() -> tuple[x509.ExtensionType, bool]:
    """Return an (extension, critical=True) pair no verifier understands."""
    return x509.UnrecognizedExtension(UNKNOWN_EXTENSION_OID, _NULL), True


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class TestPKI:
    """A root, an intermediate and a leaf with their private keys; signs Apple-shaped JWS requests."""

    __test__ = False  # not a pytest test class, even when imported into a test module

    root_cert: x509.Certificate
    intermediate_cert: x509.Certificate
    leaf_cert: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate_key: ec.EllipticCurvePrivateKey
    leaf_key: ec.EllipticCurvePrivateKey
    _header_cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    # ---- minting ----------------------------------------------------------------------------------------
    @classmethod
    def mint(
        cls,
        *,
        names: ChainNames = TEST_NAMES,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        leaf_not_before: datetime | None = None,
        leaf_not_after: datetime | None = None,
        root_key: ec.EllipticCurvePrivateKey | None = None,
        root_ski: bytes | None = None,
        intermediate_ski: bytes | None = None,
        **leaf_options: Any,
    ) -> TestPKI:
        """Return a fresh chain: P-384 root and intermediate, P-256 leaf, SHA-384 signatures, Apple's OIDs.

        Dates default to: CAs from a day ago for ten years, the leaf from a day ago for two years.
        `root_ski`/`intermediate_ski` override the key identifiers (impostor chains copy the real ones).
        `leaf_options` go to :meth:`with_leaf` (for example ``leaf_oid=False``).
        """
        nb = not_before or _now() - timedelta(days=1)
        na = not_after or nb + timedelta(days=3650)
        rk = root_key or ec.generate_private_key(ec.SECP384R1())
        ik = ec.generate_private_key(ec.SECP384R1())
        r_ski = root_ski or _ski(rk)
        i_ski = intermediate_ski or _ski(ik)
        root = _certificate(
            subject=names.root, issuer=names.root, key=rk, issuer_key=rk, not_before=nb, not_after=na,
            ca=True, ski=r_ski, key_usage="ca",
        )  # fmt: skip
        inter = _certificate(
            subject=names.intermediate, issuer=names.root, key=ik, issuer_key=rk, not_before=nb, not_after=na,
            ca=True, path_length=0, ski=i_ski, aki=r_ski, apple_oid=INTERMEDIATE_OID, key_usage="ca",
        )  # fmt: skip
        placeholder = ec.generate_private_key(ec.SECP256R1())
        pki = cls(root, inter, inter, rk, ik, placeholder)
        return pki.with_leaf(
            not_before=leaf_not_before or nb,
            not_after=leaf_not_after or min(na, nb + timedelta(days=730)),
            subject=names.leaf,
            **leaf_options,
        )

    def with_leaf(
        self,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        subject: x509.Name | None = None,
        leaf_oid: bool = True,
        is_ca: bool | None = False,
        key_usage: str | None = "leaf",
        extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
        curve: ec.EllipticCurve | None = None,
        hash_alg: _CertHash | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> TestPKI:
        """Return this PKI with a new leaf under the same intermediate, shaped by the arguments.

        `is_ca=None` leaves BasicConstraints out; `is_ca=True` makes the leaf a CA (a stricter-than-Apple
        refusal); `key_usage` is "leaf", "leaf+ca", "ca" or None.
        """
        nb = not_before or self.leaf_cert.not_valid_before_utc
        na = not_after or self.leaf_cert.not_valid_after_utc
        lk = key or ec.generate_private_key(curve or ec.SECP256R1())
        leaf = _certificate(
            subject=subject or self.leaf_cert.subject,
            issuer=self.intermediate_cert.subject,
            key=lk,
            issuer_key=self.intermediate_key,
            not_before=nb,
            not_after=na,
            ca=is_ca,
            ski=_ski(lk),
            aki=_ski_of(self.intermediate_cert),
            apple_oid=LEAF_OID if leaf_oid else None,
            key_usage="leaf+ca" if is_ca and key_usage == "leaf" else key_usage,
            extra=extra_extensions,
            hash_alg=hash_alg,
        )
        return replace(self, leaf_cert=leaf, leaf_key=lk, _header_cache={})

    def with_intermediate(
        self,
        *,
        intermediate_oid: bool = True,
        is_ca: bool | None = True,
        extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
        curve: ec.EllipticCurve | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> TestPKI:
        """Return this PKI with a new intermediate (shaped by the arguments) and a new leaf under the same root."""
        ik = ec.generate_private_key(curve or ec.SECP384R1())
        inter = _certificate(
            subject=self.intermediate_cert.subject,
            issuer=self.root_cert.subject,
            key=ik,
            issuer_key=self.root_key,
            not_before=not_before or self.intermediate_cert.not_valid_before_utc,
            not_after=not_after or self.intermediate_cert.not_valid_after_utc,
            ca=is_ca,
            path_length=0,
            ski=_ski(ik),
            aki=_ski_of(self.root_cert),
            apple_oid=INTERMEDIATE_OID if intermediate_oid else None,
            key_usage="ca" if is_ca else "leaf",
            extra=extra_extensions,
        )
        return replace(self, intermediate_cert=inter, intermediate_key=ik).with_leaf()

    def impostor(self) -> TestPKI:
        """Return a chain with this one's names and key identifiers under a different, untrusted root."""
        return TestPKI.mint(
            names=ChainNames(self.root_cert.subject, self.intermediate_cert.subject, self.leaf_cert.subject),
            not_before=self.root_cert.not_valid_before_utc,
            root_ski=_ski_of(self.root_cert),
            intermediate_ski=_ski_of(self.intermediate_cert),
        )

    # ---- files --------------------------------------------------------------------------------------------
    def write(self, folder: str | Path) -> Path:
        """Return the path of root.pem after writing the CA into `folder`; never overwrites a file.

        Writes root.pem and root.der (configure either as a root), intermediate.pem, leaf.pem, chain.pem
        (leaf, intermediate, root) and the three private keys (root.key, intermediate.key, leaf.key; PKCS#8
        PEM, mode 0600). Raises FileExistsError when `folder` already holds one of these files.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        clash = [n for n in _FILES if (out / n).exists()]
        if clash:
            raise FileExistsError(f"{out} already holds {', '.join(clash)}; a test CA is never overwritten")
        chain = _pem(self.leaf_cert) + _pem(self.intermediate_cert) + _pem(self.root_cert)
        files: list[tuple[str, bytes, int]] = [
            ("root.pem", _pem(self.root_cert), 0o644),
            ("root.der", _der(self.root_cert), 0o644),
            ("intermediate.pem", _pem(self.intermediate_cert), 0o644),
            ("leaf.pem", _pem(self.leaf_cert), 0o644),
            ("chain.pem", chain, 0o644),
        ]
        for name, key in (("root.key", self.root_key), ("intermediate.key", self.intermediate_key), ("leaf.key", self.leaf_key)):
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            files.append((name, pem, 0o600))
        for name, data, mode in files:
            # O_EXCL: a file that appeared since the check above is still never overwritten.
            fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        return out / "root.pem"

    @staticmethod
    def exists_in(folder: str | Path) -> bool:
        """Return True when `folder` holds a written test CA (its root.pem)."""
        return (Path(folder) / "root.pem").is_file()

    @classmethod
    def load(cls, folder: str | Path) -> TestPKI:
        """Return the test CA that :meth:`write` put in `folder`; ValueError naming the file when one is bad."""
        base = Path(folder)

        def read(name: str) -> bytes:
            try:
                return (base / name).read_bytes()
            except OSError as exc:
                raise ValueError(f"test CA file {base / name} cannot be read: {exc.strerror or exc}") from None

        def cert(name: str) -> x509.Certificate:
            try:
                return x509.load_pem_x509_certificate(read(name))
            except ValueError:
                raise ValueError(f"test CA file {base / name} is not a PEM certificate") from None

        def key(name: str) -> ec.EllipticCurvePrivateKey:
            try:
                k = serialization.load_pem_private_key(read(name), password=None)
            except (ValueError, TypeError):
                raise ValueError(f"test CA file {base / name} is not an unencrypted PEM private key") from None
            if not isinstance(k, ec.EllipticCurvePrivateKey):
                raise ValueError(f"test CA file {base / name} is not an EC private key")
            return k

        return cls(
            cert("root.pem"), cert("intermediate.pem"), cert("leaf.pem"),
            key("root.key"), key("intermediate.key"), key("leaf.key"),
        )  # fmt: skip

    # ---- signing ------------------------------------------------------------------------------------------
    @property
    def x5c(self) -> list[str]:
        """Return the header's x5c: standard base64 DER of leaf, intermediate and root."""
        return [base64.b64encode(_der(c)).decode("ascii") for c in (self.leaf_cert, self.intermediate_cert, self.root_cert)]

    def x5c_with_forged_leaf(self, variant: int = 0) -> list[str]:
        """Return :attr:`x5c` with the leaf's signature changed: one byte for `variant` < 10,200, two beyond
        (each `variant` below 52 million gives another certificate).

        The certificate still parses and names the right issuer; only its signature no longer holds, so a
        verifier finds out by checking it (the attack of a never-seen forged chain).
        """
        der = bytearray(_der(self.leaf_cert))
        der[len(der) - 2 - variant % 40] ^= 1 + (variant // 40) % 255  # a byte of the signature's s
        more = variant // 10_200
        if more:
            der[len(der) - 60 - more % 20] ^= 1 + (more // 20) % 255  # and one of its r
        return [base64.b64encode(bytes(der)).decode("ascii"), *self.x5c[1:]]

    def sign(
        self,
        payload: dict[str, Any] | bytes,
        *,
        header: dict[str, Any] | None = None,
        x5c: list[str] | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        der_signature: bool = False,
    ) -> str:
        """Return a compact ES256 JWS of `payload` with this chain in x5c, signed by the leaf key.

        `header` entries are added to (or, with value None, removed from) ``{"alg": "ES256", "x5c": ...}``;
        `x5c` replaces the chain; `key` signs instead of the leaf key; `der_signature` puts the DER form
        where JWS wants raw r||s.
        """
        if header is None and x5c is None:
            cached = self._header_cache.get("default")
            if cached is None:
                cached = b64url(json.dumps({"alg": "ES256", "x5c": self.x5c}, separators=(",", ":")).encode())
                self._header_cache["default"] = cached
            h_seg = cached
        else:
            hdr: dict[str, Any] = {"alg": "ES256", "x5c": self.x5c if x5c is None else x5c}
            for k, v in (header or {}).items():
                if v is None:
                    hdr.pop(k, None)
                else:
                    hdr[k] = v
            h_seg = b64url(json.dumps(hdr, separators=(",", ":")).encode())
        p = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        signing_input = f"{h_seg}.{b64url(p)}".encode("ascii")
        signer = key or self.leaf_key
        if der_signature:
            sig = signer.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        else:
            sig = es256_raw(signer, signing_input)
        return f"{signing_input.decode('ascii')}.{b64url(sig)}"

    @staticmethod
    def request_payload(
        *,
        app_apple_id: int = 1234567890,
        environment: str = "Sandbox",
        product_id: str = "com.example.premium.monthly",
        user_locale: str = "en-US",
        original_transaction_id: str | None = None,
        request_identifier: str | None = None,
        signed_date_ms: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Return a valid DecodedRealtimeRequestBody dict signed now, with a fresh uuid4 requestIdentifier.

        `extra` adds fields (unknown ones are tolerated by the verifier).
        """
        payload: dict[str, Any] = {
            "originalTransactionId": original_transaction_id or f"2000000{secrets.randbelow(10**9):09d}",
            "appAppleId": app_apple_id,
            "productId": product_id,
            "userLocale": user_locale,
            "requestIdentifier": request_identifier or str(uuid.uuid4()),
            "environment": environment,
            "signedDate": int(time.time() * 1000) if signed_date_ms is None else signed_date_ms,
        }
        payload.update(extra)
        return payload

    def signed_request(self, **kwargs: Any) -> str:
        """Return a signed payload (compact JWS) of :meth:`request_payload` built from `kwargs`."""
        return self.sign(self.request_payload(**kwargs))

    def signed_request_body(self, **kwargs: Any) -> bytes:
        """Return the POST body ``{"signedPayload": "..."}`` of :meth:`signed_request`."""
        return json.dumps({"signedPayload": self.signed_request(**kwargs)}).encode()


    def notification_payload(
        self,
        notification_type: str,
        subtype: str | None = None,
        *,
        app_apple_id: int | None = 1234567890,
        bundle_id: str = "com.example.app",
        environment: str = "Sandbox",
        product_id: str = "com.example.premium.monthly",
        original_transaction_id: str | None = None,
        transaction_id: str | None = None,
        notification_uuid: str | None = None,
        signed_date_ms: int | None = None,
        transaction: dict[str, Any] | None = None,
        renewal: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        with_transaction: bool = True,
        with_renewal: bool = True,
    ) -> dict[str, Any]:
        """Return a decoded App Store Server Notification V2 payload whose nested JWS this CA signs.

        ``data.signedTransactionInfo`` (a JWSTransactionDecodedPayload of an auto-renewable subscription
        bought 30 days ago, expiring in one) and ``data.signedRenewalInfo`` (JWSRenewalInfoDecodedPayload;
        ``autoRenewStatus`` 0 for the subtype AUTO_RENEW_DISABLED, else 1) are signed compact JWS;
        `transaction`, `renewal` and `data` add or replace fields of each (offerType, offerIdentifier,
        offerDiscountType, transactionReason, ...). Any notificationType and subtype is taken as is.
        https://developer.apple.com/documentation/appstoreservernotifications/responsebodyv2decodedpayload
        """
        signed = int(time.time() * 1000) if signed_date_ms is None else signed_date_ms
        otid = original_transaction_id or f"2000000{secrets.randbelow(10**9):09d}"
        day = 86_400_000
        body: dict[str, Any] = {"environment": environment, "bundleId": bundle_id, "bundleVersion": "1", "status": 1}
        if app_apple_id is not None:
            body["appAppleId"] = app_apple_id
        if with_transaction:
            tx: dict[str, Any] = {
                "originalTransactionId": otid, "transactionId": transaction_id or f"{otid}9", "productId": product_id,
                "bundleId": bundle_id, "purchaseDate": signed - 30 * day, "originalPurchaseDate": signed - 30 * day,
                "expiresDate": signed + day, "type": "Auto-Renewable Subscription", "inAppOwnershipType": "PURCHASED",
                "environment": environment, "signedDate": signed,
            }
            body["signedTransactionInfo"] = self.sign({**tx, **(transaction or {})})
        if with_renewal:
            rn: dict[str, Any] = {
                "originalTransactionId": otid, "autoRenewProductId": product_id, "productId": product_id,
                "autoRenewStatus": 0 if subtype == "AUTO_RENEW_DISABLED" else 1, "environment": environment,
                "recentSubscriptionStartDate": signed - 30 * day, "renewalDate": signed + day, "signedDate": signed,
            }
            body["signedRenewalInfo"] = self.sign({**rn, **(renewal or {})})
        body.update(data or {})
        payload: dict[str, Any] = {
            "notificationType": notification_type,
            "notificationUUID": notification_uuid or str(uuid.uuid4()),
            "data": body,
            "version": "2.0",
            "signedDate": signed,
        }
        if subtype:
            payload["subtype"] = subtype
        return payload

    def signed_notification_body(self, notification_type: str, subtype: str | None = None, **kwargs: Any) -> bytes:
        """Return the POST body ``{"signedPayload": "..."}`` of :meth:`notification_payload`."""
        return json.dumps({"signedPayload": self.sign(self.notification_payload(notification_type, subtype, **kwargs))}).encode()


def _ski_of(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


# ---------------------------------------------------------------------------------------------------------
# A corpus of valid and invalid tokens (unit tests, the differential test against Apple's library)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusCase:
    """One token and the verdict our verifier gives it (`code` None: accepted)."""

    name: str
    token: str
    code: str | None
    environment: str = "Sandbox"  # the verifier's environment for this case
    twice: bool = False  # verify the token twice; the verdict is the second one's (replay)


def token_corpus(pki: TestPKI, *, app_apple_id: int = 1234567890) -> list[CorpusCase]:
    """Return valid and invalid tokens on `pki` (the trusted chain), each with our verifier's expected code.

    Tokens are signed now; verify them within a minute. Cases whose ``environment`` is "Production" are
    meant for a verifier configured for Production, the rest for Sandbox, both with `app_apple_id`.
    """
    now_ms = int(time.time() * 1000)
    day = timedelta(days=1)
    now = datetime.now(UTC)

    def payload(**kw: Any) -> dict[str, Any]:
        return TestPKI.request_payload(**{"app_apple_id": app_apple_id, "signed_date_ms": now_ms, **kw})

    def without(field_name: str) -> dict[str, Any]:
        p = payload()
        del p[field_name]
        return p

    def with_alg(alg: str | None, sign: Any) -> str:
        hdr: dict[str, Any] = {"x5c": pki.x5c} if alg is None else {"alg": alg, "x5c": pki.x5c}
        return compact_jws(hdr, payload(), sign)

    good = pki.sign(payload())
    h, p, s = good.split(".")
    other = pki.sign(payload(appAppleId=app_apple_id + 1))
    leaf_pub_pem = pki.leaf_cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cases: list[CorpusCase] = [
        CorpusCase("valid", good, None),
        CorpusCase("valid_extra_fields", pki.sign(payload(futureField=1, nested={"a": [1, 2]})), None),
        CorpusCase("valid_uppercase_uuid", pki.sign(payload(request_identifier=str(uuid.uuid4()).upper())), None),
        CorpusCase("valid_p256_intermediate", _sign_on(pki.with_intermediate(curve=ec.SECP256R1()), payload()), None),
        CorpusCase("valid_x5c2_ignored", pki.sign(payload(), x5c=[*pki.x5c[:2], pki.impostor().x5c[2]]), None),
        CorpusCase(
            "valid_production",
            pki.sign(payload(environment="Production")),
            None,
            environment="Production",
        ),
        # ---- framing ----
        CorpusCase("two_segments", f"{h}.{p}", "malformed_jws"),
        CorpusCase("four_segments", f"{good}.{s}", "malformed_jws"),
        CorpusCase("bad_base64_header", f"{h[:10]}*{h[11:]}.{p}.{s}", "malformed_jws"),
        # ---- header ----
        CorpusCase("alg_none", with_alg("none", b""), "unsupported_alg"),
        CorpusCase("alg_missing", with_alg(None, lambda si: es256_raw(pki.leaf_key, si)), "unsupported_alg"),
        CorpusCase("alg_es384", with_alg("ES384", lambda si: es256_raw(pki.leaf_key, si, hashes.SHA384())), "unsupported_alg"),
        CorpusCase(
            "alg_hs256_with_leaf_public_key",
            with_alg("HS256", lambda si: hmac.new(leaf_pub_pem, si, "sha256").digest()),
            "unsupported_alg",
        ),
        CorpusCase("crit_header", pki.sign(payload(), header={"crit": ["exp"], "exp": 1}), "unknown_critical_header"),
        CorpusCase("x5c_missing", pki.sign(payload(), header={"x5c": None}), "bad_chain_length"),
        CorpusCase("x5c_one_cert", pki.sign(payload(), x5c=pki.x5c[:1]), "bad_chain_length"),
        CorpusCase("x5c_two_certs", pki.sign(payload(), x5c=pki.x5c[:2]), "bad_chain_length"),
        CorpusCase("x5c_four_certs", pki.sign(payload(), x5c=[*pki.x5c, pki.x5c[2]]), "bad_chain_length"),
        # ---- chain ----
        CorpusCase("untrusted_root_apple_names", _sign_on(TestPKI.mint(names=APPLE_NAMES), payload()), "untrusted_chain"),
        CorpusCase("impostor_same_names_and_key_ids", _sign_on(pki.impostor(), payload()), "untrusted_chain"),
        CorpusCase(
            "leaf_intermediate_swapped",
            pki.sign(payload(), x5c=[pki.x5c[1], pki.x5c[0], pki.x5c[2]]),
            "untrusted_chain",
        ),
        CorpusCase("leaf_missing_oid", _sign_on(pki.with_leaf(leaf_oid=False), payload()), "missing_apple_oid"),
        CorpusCase(
            "intermediate_missing_oid", _sign_on(pki.with_intermediate(intermediate_oid=False), payload()), "missing_apple_oid"
        ),
        CorpusCase(
            "leaf_expired",
            _sign_on(pki.with_leaf(not_before=now - 30 * day, not_after=now - day), payload()),
            "certificate_expired",
        ),
        CorpusCase(
            "leaf_not_yet_valid",
            _sign_on(pki.with_leaf(not_before=now + day, not_after=now + 30 * day), payload()),
            "certificate_expired",
        ),
        CorpusCase(
            "leaf_unknown_critical_extension",
            _sign_on(pki.with_leaf(extra_extensions=[unknown_critical_extension()]), payload()),
            "untrusted_chain",
        ),
        CorpusCase(
            "intermediate_unknown_critical_extension",
            _sign_on(pki.with_intermediate(extra_extensions=[unknown_critical_extension()]), payload()),
            "untrusted_chain",
        ),
        CorpusCase("intermediate_not_ca", _sign_on(pki.with_intermediate(is_ca=False), payload()), "untrusted_chain"),
        CorpusCase("leaf_is_ca", _sign_on(pki.with_leaf(is_ca=True), payload()), "untrusted_chain"),
        # ---- signature ----
        CorpusCase("signed_by_other_key", pki.sign(payload(), key=ec.generate_private_key(ec.SECP256R1())), "bad_signature"),
        CorpusCase("der_signature", pki.sign(payload(), der_signature=True), "bad_signature"),
        CorpusCase("payload_changed_after_signing", f"{h}.{other.split('.')[1]}.{s}", "bad_signature"),
        CorpusCase("signature_truncated", f"{h}.{p}.{b64url(b64url_decode_str(s)[:63])}", "bad_signature"),
        CorpusCase("signature_zero", f"{h}.{p}.{b64url(bytes(64))}", "bad_signature"),
        # ---- payload ----
        *(CorpusCase(f"missing_{f}", pki.sign(without(f)), "invalid_payload") for f in REQUIRED_FIELDS),
        CorpusCase("request_identifier_not_uuid", pki.sign(payload(request_identifier="not-a-uuid")), "invalid_payload"),
        CorpusCase("payload_not_json", pki.sign(b"not json"), "invalid_payload"),
        CorpusCase("wrong_environment", pki.sign(payload(environment="Production")), "wrong_environment"),
        CorpusCase("unknown_environment", pki.sign(payload(environment="Staging")), "wrong_environment"),
        CorpusCase(
            "wrong_app_production",
            pki.sign(payload(environment="Production", app_apple_id=app_apple_id + 1)),
            "wrong_app",
            environment="Production",
        ),
        # ---- deliberately stricter than Apple's library ----
        CorpusCase("wrong_app_sandbox", pki.sign(payload(app_apple_id=app_apple_id + 1)), "wrong_app"),
        CorpusCase(
            "stale_signed_date",
            pki.sign(TestPKI.request_payload(app_apple_id=app_apple_id, signed_date_ms=now_ms - 600_000)),
            "stale_request",
        ),
        CorpusCase(
            "future_signed_date",
            pki.sign(TestPKI.request_payload(app_apple_id=app_apple_id, signed_date_ms=now_ms + 300_000)),
            "stale_request",
        ),
        CorpusCase("replayed_request", pki.sign(payload()), "replayed_request", twice=True),
        CorpusCase("app_apple_id_as_string", pki.sign(payload(appAppleId=str(app_apple_id))), "invalid_payload"),
    ]
    return cases


def _sign_on(pki: TestPKI, payload: dict[str, Any]) -> str:
    return pki.sign(payload)


def b64url_decode_str(segment: str) -> bytes:
    """Return the bytes of an unpadded base64url string (test helper; lenient)."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))

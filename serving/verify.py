"""Verification of Apple's signed requests: a compact JWS (ES256) whose x5c chain must lead to a configured root.

Apple signs the Get Retention Message request (and App Store Server Notifications V2) as a JWS whose
header carries the signing certificate chain in ``x5c`` (leaf, intermediate, root). This module checks it
with our own few lines over ``cryptography`` and ``msgspec``, stricter than Apple's library
(https://developer.apple.com/documentation/retentionmessaging/signedpayload) and 20 to 50 times faster
(BENCHMARKS.md, "Verification"):

* header: ``alg`` is ``ES256``; a ``crit`` header is refused; ``x5c`` holds exactly three certificates;
* trust comes only from the configured roots: ``x5c[2]`` is ignored (never parsed, never trusted), the
  intermediate must be signed by a configured root and the leaf by the intermediate;
* keys are ECDSA P-256/P-384 (the leaf P-256, as ES256 requires), certificate signatures ECDSA with
  SHA-256/SHA-384; the intermediate is a CA, the leaf is not; any certificate (the root included) with a
  critical extension this code does not enforce is refused; Apple's two OIDs must be present;
* the chain must be valid at the payload's ``signedDate``;
* the ES256 signature is 64 raw bytes r||s (a DER signature is refused) over ``header.payload``;
* the payload has all seven fields with the right types and a UUID ``requestIdentifier``; ``appAppleId``
  and ``environment`` equal ours; ``signedDate`` is fresh; a ``requestIdentifier`` is answered once (the
  replay memory of ``serving.replay``).

Verified chains are cached (bounded LRU) by the header bytes and by the x5c certificates, so a request on a
known chain costs one P-256 signature check, one payload decode and a date comparison (~0.15 ms), all on
the event loop. A never-seen chain is checked cheapest first, its CA signatures last, off the event loop and
a bounded number at a time (:class:`RequestVerifier`; docs/security.md, "Replay protection and certificate
chains").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from models.data_files import unstorable
from serving.errors import VerificationError
from serving.replay import InProcessReplayMemory, LayeredReplayMemory, ReplayMemory
from serving.schemas import DecodedRealtimeRequestBody

if TYPE_CHECKING:
    from serving.settings import Settings

__all__ = [
    "APPLE_ROOT_G3_SHA256",
    "INTERMEDIATE_OID",
    "LEAF_OID",
    "RequestVerifier",
    "VerifiedChain",
    "b64url_decode",
    "fingerprint_sha256",
    "has_apple_root_g3",
    "load_roots",
    "validate_chain",
    "verify_es256",
]

#: SHA-256 of the DER of Apple Root CA - G3 (Apple's certificate authority page; spec section 4).
APPLE_ROOT_G3_SHA256: Final = "63343abfb89a6a03ebb57e9b3f5fa7be7c4f5c756f3017b3a8c488c3653e9179"
#: Apple's marker extension on the App Store signing leaf certificate.
LEAF_OID: Final = x509.ObjectIdentifier("1.2.840.113635.100.6.11.1")
#: Apple's marker extension on the Worldwide Developer Relations intermediate CA.
INTERMEDIATE_OID: Final = x509.ObjectIdentifier("1.2.840.113635.100.6.2.1")

ENVIRONMENTS: Final = ("Sandbox", "Production", "Xcode", "LocalTesting")

_ES256: Final = ec.ECDSA(hashes.SHA256())
_CERT_SIG_ALGS: Final = frozenset({SignatureAlgorithmOID.ECDSA_WITH_SHA256, SignatureAlgorithmOID.ECDSA_WITH_SHA384})
_CA_CURVES: Final = (ec.SECP256R1, ec.SECP384R1)
# Critical extensions this module enforces (or that carry no constraint). Anything else marked critical is
# refused, as OpenSSL does: a critical extension is one the issuer says must not be ignored.
_UNDERSTOOD_CRITICAL: Final = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# base64url -> standard alphabet, so binascii's strict decoder (C) does the rest.
_URL_TO_STD: Final = bytes.maketrans(b"-_", b"+/")
_CACHE_SIZE: Final = 256

_decode_request = msgspec.json.Decoder(DecodedRealtimeRequestBody).decode
_decode_any = msgspec.json.Decoder().decode


#: ``await offload(fn, *args)`` runs ``fn(*args)`` off the event loop and returns its result (the server's
#: ``loop.run_in_executor`` on its one worker thread, ``RetentionService.off_loop``).
Offload = Callable[..., Awaitable[Any]]


class _UnforeseenAsMalformed:
    """Turn a parser we rely on failing in a way we did not foresee into a 4xx (``malformed_jws``).

    A plain class, used through one shared instance: it holds no state, so the request path allocates
    nothing for it (a ``@contextmanager`` builds a generator and a wrapper on every use).
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None or not issubclass(exc_type, Exception) or issubclass(exc_type, VerificationError):
            return  # nothing raised, or raised as it is
        raise _fail("malformed_jws", f"the signed payload could not be parsed ({exc_type.__name__}).") from None


_unforeseen_as_malformed = _UnforeseenAsMalformed()


def _bad_signature() -> VerificationError:
    return _fail("bad_signature", "the JWS signature does not verify with the leaf certificate's key.")


def _fail(code: str, detail: str) -> VerificationError:
    return VerificationError(code, detail)


# ---------------------------------------------------------------------------------------------------------
# Roots
# ---------------------------------------------------------------------------------------------------------
def load_roots(paths: Sequence[str]) -> list[x509.Certificate]:
    """Return the certificates in `paths` (DER files, or PEM files holding one or more certificates).

    Raises ValueError with one sentence naming the file when a file cannot be read or holds no certificate.
    """
    roots: list[x509.Certificate] = []
    for raw_path in paths:
        path = Path(raw_path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read root certificate file {path}: {exc.strerror or exc}") from None
        try:
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise ValueError(f"root certificate file {path} holds no valid DER or PEM X.509 certificate") from None
        roots.extend(certs)
    return roots


def has_apple_root_g3(roots: Sequence[x509.Certificate]) -> bool:
    """Return True when one of `roots` is Apple Root CA - G3 (by the SHA-256 of its DER)."""
    return any(fingerprint_sha256(r) == APPLE_ROOT_G3_SHA256 for r in roots)


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------
def b64url_decode(segment: bytes) -> bytes:
    """Return the bytes of one unpadded base64url JWS segment; raises ValueError on any other alphabet."""
    # '+', '/' and '=' would pass the standard decoder below; JWS (RFC 7515 section 2) allows none of them.
    if b"+" in segment or b"/" in segment or b"=" in segment:
        raise ValueError("not base64url")
    pad = -len(segment) % 4
    if pad == 3:
        raise ValueError("bad base64url length")
    return binascii.a2b_base64(segment.translate(_URL_TO_STD) + b"=" * pad, strict_mode=True)


def verify_es256(public_key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes) -> bool:
    """Return True when `signature` (JWS form: 64 raw bytes r||s) is a valid ES256 signature of `signing_input`.

    The raw form is converted to DER for OpenSSL; any other length (a DER signature, a truncated one) is
    refused, so one signature has exactly one accepted encoding.
    """
    if len(signature) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, signing_input, _ES256)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """A leaf and intermediate that chain to a configured root, with the window in which all three are valid."""

    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate
    leaf_key: ec.EllipticCurvePublicKey
    not_before: float  # epoch seconds: the latest notBefore of the three
    not_after: float  # epoch seconds: the earliest notAfter of the three

    def check_valid_at(self, when: float) -> None:
        """Return None when every certificate is valid at `when` (epoch seconds); else raise certificate_expired."""
        if when < self.not_before:
            raise _fail(
                "certificate_expired",
                f"a certificate of the chain is not yet valid at signedDate {_iso(when)} (valid from {_iso(self.not_before)}).",
            )
        if when > self.not_after:
            raise _fail(
                "certificate_expired",
                f"a certificate of the chain has expired at signedDate {_iso(when)} (valid until {_iso(self.not_after)}).",
            )


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> Any:
    try:
        return cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None


def _check_cert_shape(cert: x509.Certificate, role: str, *, ca: bool) -> None:
    """Raise untrusted_chain unless `cert` has an allowed key and signature and the CA flags of its `role`."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _fail("untrusted_chain", f"the {role} certificate's key is not an ECDSA key.")
    if ca:
        if not isinstance(key.curve, _CA_CURVES):
            raise _fail("untrusted_chain", f"the {role} certificate's key is on {key.curve.name}, not P-256 or P-384.")
    elif not isinstance(key.curve, ec.SECP256R1):
        raise _fail("untrusted_chain", f"the {role} certificate's key is on {key.curve.name}, not P-256 as ES256 requires.")
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            raise _fail(
                "untrusted_chain",
                f"the {role} certificate has a critical extension {ext.oid.dotted_string} this verifier does not understand.",
            )
    bc = _ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    ku = _ext(cert, ExtensionOID.KEY_USAGE)
    if ca:
        if bc is None or not bc.ca:
            raise _fail("untrusted_chain", f"the {role} certificate is not a CA (BasicConstraints ca=True is missing).")
        if ku is not None and not ku.key_cert_sign:
            raise _fail("untrusted_chain", f"the {role} certificate's key usage does not allow signing certificates.")
    else:
        if bc is not None and bc.ca:
            raise _fail("untrusted_chain", f"the {role} certificate is a CA, which an App Store signing leaf never is.")
        if ku is not None and not ku.digital_signature:
            raise _fail("untrusted_chain", f"the {role} certificate's key usage does not allow digital signatures.")


def _names_match(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Return True when `child` names `parent` as its issuer (name, and key identifiers when both have one)."""
    if child.issuer != parent.subject:
        return False
    aki = _ext(child, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    ski = _ext(parent, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    return aki is None or aki.key_identifier is None or ski is None or aki.key_identifier == ski.digest


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Return True when `parent`'s key signed `child` (the costly step: an ECDSA check, P-384 for Apple's CAs).

    The ECDSA check runs first through the key object, which releases the GIL while OpenSSL works (the
    event loop keeps running when this is called on the server's worker thread); only a signature that holds is
    then checked again by ``verify_directly_issued_by``, which also compares the inner and outer signature
    algorithms. A forged certificate therefore costs one check that holds no lock.
    """
    key = parent.public_key()
    hash_alg = child.signature_hash_algorithm
    if not isinstance(key, ec.EllipticCurvePublicKey) or hash_alg is None:
        return False
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(hash_alg))
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _window(certs: Sequence[x509.Certificate]) -> tuple[float, float]:
    return (
        max(c.not_valid_before_utc.timestamp() for c in certs),
        min(c.not_valid_after_utc.timestamp() for c in certs),
    )


def _cert_der(b64: object, index: int) -> bytes:
    if not isinstance(b64, str):
        raise _fail("malformed_jws", f"x5c[{index}] is not a string.")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _fail("malformed_jws", f"x5c[{index}] is not standard base64.") from None


def _load_cert(der: bytes, index: int) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise _fail("malformed_jws", f"x5c[{index}] is not a DER X.509 certificate.") from None


@dataclass(frozen=True, slots=True)
class _PendingChain:
    """A chain whose every check but the certificate signatures passed: what is left to do off the event loop.

    ``root`` is set when the intermediate is already known good (then only the leaf's signature is left);
    otherwise ``candidates`` are the configured roots whose name and key identifier the intermediate names.
    """

    key: tuple[str, str]  # (x5c[0], x5c[1]) as sent
    leaf: x509.Certificate
    intermediate: x509.Certificate
    intermediate_sha256: bytes
    root: x509.Certificate | None
    candidates: tuple[x509.Certificate, ...]


#: (code, detail) of a chain refused for good (it is cached: a chain's verdict does not depend on the time).
_Refusal = tuple[str, str]


def _precheck(
    leaf: x509.Certificate, intermediate: x509.Certificate, root: x509.Certificate | None, roots: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """Run every check of the chain that needs no signature; return the candidate roots (none when `root` is known).

    Raises VerificationError (untrusted_chain, missing_apple_oid). Order: signature algorithms, issuer names
    and key identifiers, the roots' and intermediate's CA shape, the leaf's shape, Apple's two OIDs.
    """
    candidates: tuple[x509.Certificate, ...] = ()
    if root is None and intermediate.signature_algorithm_oid not in _CERT_SIG_ALGS:
        raise _fail("untrusted_chain", "the intermediate certificate is not signed with ECDSA and SHA-256 or SHA-384.")
    if leaf.signature_algorithm_oid not in _CERT_SIG_ALGS:
        raise _fail("untrusted_chain", "the leaf certificate is not signed with ECDSA and SHA-256 or SHA-384.")
    if root is None:
        candidates = tuple(r for r in roots if _names_match(intermediate, r))
        if not candidates:
            raise _fail("untrusted_chain", "the intermediate certificate is not issued by any configured root certificate.")
    if not _names_match(leaf, intermediate):
        raise _fail("untrusted_chain", "the leaf certificate is not issued by the intermediate certificate.")
    if root is None:
        for r in candidates:
            _check_cert_shape(r, "root", ca=True)
            root_bc = _ext(r, ExtensionOID.BASIC_CONSTRAINTS)
            if root_bc.path_length is not None and root_bc.path_length < 1:
                raise _fail("untrusted_chain", "the root certificate's path length forbids an intermediate CA.")
        _check_cert_shape(intermediate, "intermediate", ca=True)
    _check_cert_shape(leaf, "leaf", ca=False)
    if _ext(leaf, LEAF_OID) is None:
        raise _fail("missing_apple_oid", f"the leaf certificate lacks Apple's extension {LEAF_OID.dotted_string}.")
    if root is None and _ext(intermediate, INTERMEDIATE_OID) is None:
        raise _fail(
            "missing_apple_oid", f"the intermediate certificate lacks Apple's extension {INTERMEDIATE_OID.dotted_string}."
        )
    return candidates


def _check_signatures(pending: _PendingChain) -> tuple[VerifiedChain | _Refusal, x509.Certificate | None]:
    """Check the certificate signatures of `pending`: (the chain or a refusal, the intermediate's root when
    it was learnt here). Pure and thread-safe: the server runs it off the event loop, on its worker thread."""
    root, learnt = pending.root, None
    try:
        if root is None:
            root = learnt = next((r for r in pending.candidates if _signed_by(pending.intermediate, r)), None)
            if root is None:
                return ("untrusted_chain", "the intermediate certificate is not issued by any configured root certificate."), None
        if not _signed_by(pending.leaf, pending.intermediate):
            return ("untrusted_chain", "the leaf certificate is not issued by the intermediate certificate."), learnt
        key = pending.leaf.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)  # _precheck made sure
        nb, na = _window((pending.leaf, pending.intermediate, root))
        return VerifiedChain(pending.leaf, pending.intermediate, root, key, nb, na), learnt
    except Exception as exc:  # a malformed field surfaces only when read
        return ("untrusted_chain", f"the certificate chain could not be read ({type(exc).__name__})."), None


def _build_chain(leaf: x509.Certificate, intermediate: x509.Certificate, roots: Sequence[x509.Certificate]) -> VerifiedChain:
    """Return the chain of `leaf` and `intermediate` to one of `roots`, dates aside; raise VerificationError."""
    candidates = _precheck(leaf, intermediate, None, roots)
    der = intermediate.public_bytes(Encoding.DER)
    result, _ = _check_signatures(_PendingChain(("", ""), leaf, intermediate, hashlib.sha256(der).digest(), None, candidates))
    if isinstance(result, VerifiedChain):
        return result
    raise _fail(*result)


def validate_chain(
    leaf_der: bytes, intermediate_der: bytes, roots: Sequence[x509.Certificate], at: datetime | None = None
) -> VerifiedChain:
    """Return the verified chain of a DER leaf and intermediate to one of `roots`, valid at `at` when given.

    Raises VerificationError (untrusted_chain, missing_apple_oid, certificate_expired, malformed_jws).
    """
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        intermediate = x509.load_der_x509_certificate(intermediate_der)
    except ValueError:
        raise _fail("malformed_jws", "a certificate of the chain is not DER X.509.") from None
    try:
        chain = _build_chain(leaf, intermediate, roots)
    except VerificationError:
        raise
    except Exception as exc:  # a malformed extension surfaces only when read
        raise _fail("untrusted_chain", f"the certificate chain could not be read ({type(exc).__name__}).") from None
    if at is not None:
        chain.check_valid_at(at.timestamp())
    return chain


# ---------------------------------------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------------------------------------
class _LRU:
    """A small bounded mapping; the least recently used entry goes first."""

    __slots__ = ("_data", "_max")

    def __init__(self, max_size: int) -> None:
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._max = max_size

    def get(self, key: Any) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class RequestVerifier:
    """Verifies Apple's signed requests against the configured roots, app and environment.

    One instance per worker process: its chain caches live in that process; the replay memory is the
    `replay` given (``serving.replay``; by default one private to the process).

    Certificate chains are checked cheapest first (docs/security.md, "Replay protection and certificate
    chains"): the header and the x5c entries' shape; a chain known good (by its x5c strings) or known bad is
    answered from memory; an intermediate known good (by the SHA-256 of its DER) is not checked again; then
    every check that needs no signature (names, key identifiers, CA flags, keys, Apple's OIDs); last, the
    certificate signatures (P-384 for Apple's CAs). In :meth:`verify_async` that last step runs through the
    given offload (off the event loop, on the server's worker thread), at most `chain_checks` at a time: one
    more is refused at once with ``chain_check_busy`` (503). Known-good chains, known-bad chains and known-good intermediates are kept in
    three separate bounded caches, so a flood of never-seen forged chains evicts no good one.
    """

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        *,
        app_apple_id: int,
        environment: str,
        relax_app_id_in_sandbox: bool = False,
        max_age_s: float = 300.0,
        max_skew_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        check_replay: bool = True,
        cache_size: int = _CACHE_SIZE,
        replay: ReplayMemory | None = None,
        chain_checks: int = 2,
    ) -> None:
        if not roots:
            raise ValueError("no root certificate is configured, so no request could ever be trusted")
        if environment not in ENVIRONMENTS:
            raise ValueError(f"environment must be Sandbox or Production, not {environment!r}")
        if isinstance(app_apple_id, bool) or not isinstance(app_apple_id, int):
            raise ValueError(f"app_apple_id must be an integer, not {app_apple_id!r}")
        if max_age_s <= 0 or max_skew_s < 0:
            raise ValueError("max_age_s must be > 0 and max_skew_s >= 0")
        if chain_checks < 1:
            raise ValueError("chain_checks must be >= 1")
        self.roots: tuple[x509.Certificate, ...] = tuple(roots)
        self.app_apple_id = app_apple_id
        self.environment = environment
        self.relax_app_id_in_sandbox = relax_app_id_in_sandbox
        self.max_age_s = float(max_age_s)
        self.max_skew_s = float(max_skew_s)
        self.clock = clock
        self.check_replay = check_replay
        # header segment bytes -> VerifiedChain, and (x5c[0], x5c[1]) -> VerifiedChain: the good chains.
        self._by_header = _LRU(cache_size)
        self._by_x5c = _LRU(cache_size)
        # the same keys -> (code, detail): refused chains (a verdict that does not depend on the time), kept
        # apart so that never-seen bad chains, however many, never push a good chain out.
        self._bad_headers = _LRU(cache_size)
        self._bad_x5c = _LRU(cache_size)
        # SHA-256 of an intermediate's DER -> (intermediate, root): intermediates whose checks all passed.
        self._intermediates = _LRU(max(8, cache_size // 8))
        self._last_header: tuple[bytes, VerifiedChain] | None = None  # the last good header, checked first
        self.replay: ReplayMemory = replay if replay is not None else InProcessReplayMemory()
        self.chain_checks = chain_checks
        self._chain_checks_running = 0  # touched on the event loop's thread only, as is the next one
        self._in_flight: dict[tuple[str, str], asyncio.Future[VerifiedChain | _Refusal]] = {}  # chains being checked
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: Callable[[], float] = time.time, replay: ReplayMemory | None = None
    ) -> RequestVerifier:
        """Return a verifier configured from `settings` (and `replay`, default: in-process); ValueError when no
        root or no app_apple_id is set."""
        if not settings.root_certs:
            raise ValueError("no root certificate is configured: set RETENTION_ROOT_CERTS (or --root-certs)")
        if settings.app_apple_id is None:
            raise ValueError("no app id is configured: set RETENTION_APP_APPLE_ID (or --app-apple-id)")
        return cls(
            load_roots(settings.root_certs),
            app_apple_id=settings.app_apple_id,
            environment=settings.environment,
            relax_app_id_in_sandbox=settings.relax_app_id_in_sandbox,
            max_age_s=settings.max_age_s,
            max_skew_s=settings.max_skew_s,
            clock=clock,
            chain_checks=settings.chain_checks,
            replay=replay,
        )

    def clear_caches(self) -> None:
        """Forget every cached chain (benchmarks use it to measure the uncached cost)."""
        with self._lock:
            self._last_header = None
            for cache in (self._by_header, self._by_x5c, self._bad_headers, self._bad_x5c, self._intermediates):
                cache.clear()

    @property
    def replay_entries(self) -> int:
        """Return how many request identifiers the replay memory holds now."""
        return len(self.replay)

    # ---- public entry points ------------------------------------------------------------------------
    def verify(self, signed_payload: str | bytes) -> DecodedRealtimeRequestBody:
        """Return the verified payload of a Get Retention Message request; raise VerificationError otherwise.

        https://developer.apple.com/documentation/retentionmessaging/signedpayload
        """
        with _unforeseen_as_malformed:
            return self._verify_request(signed_payload)

    async def verify_async(self, signed_payload: str | bytes, offload: Offload | None = None) -> DecodedRealtimeRequestBody:
        """:meth:`verify` for the event loop: a never-seen chain's certificate signatures are awaited from
        `offload` (off the loop; None runs them inline), at most ``chain_checks`` at a time (beyond:
        ``chain_check_busy``), and so is the shared replay store's write (``LayeredReplayMemory.remember_async``).

        Everything else, the P-256 check of the request's signature included (about 0.1 ms of OpenSSL), runs
        on the caller's thread, so the replay memory sees requests in the order they are verified.
        """
        with _unforeseen_as_malformed:
            payload_seg, found, signing_input, signature = self._parse(signed_payload, bounded=True)
        if isinstance(found, _PendingChain):
            chain = await self._check_pending(found, offload)
        else:
            chain = found
        if not verify_es256(chain.leaf_key, signing_input, signature):
            raise _bad_signature()
        with _unforeseen_as_malformed:
            body, now = self._check_payload(payload_seg, chain)
        if self.check_replay:
            await self._remember_async(body.requestIdentifier.lower(), now, offload)
        return body

    def verify_signed_data(self, token: str | bytes) -> dict[str, Any]:
        """Return the verified payload of any App Store JWS (notifications, transactions) as a dict.

        Checks the header, the chain (cached), the signature and the chain's validity at the payload's
        ``signedDate`` (or ``receiptCreationDate``); no freshness, replay, app or environment checks.
        """
        try:
            payload_seg, chain = self._authenticate(token)
            try:
                payload = _decode_any(b64url_decode(payload_seg))
            except (ValueError, msgspec.DecodeError):
                raise _fail("invalid_payload", "the JWS payload is not base64url JSON.") from None
            if not isinstance(payload, dict):
                raise _fail("invalid_payload", "the JWS payload is not a JSON object.")
            signed = payload.get("signedDate", payload.get("receiptCreationDate"))
            if isinstance(signed, bool) or not isinstance(signed, int):
                raise _fail("invalid_payload", "the JWS payload has no integer signedDate.")
            chain.check_valid_at(signed / 1000.0)
            return payload
        except VerificationError:
            raise
        except Exception as exc:
            raise _fail("malformed_jws", f"the signed data could not be parsed ({type(exc).__name__}).") from None

    # ---- steps ----------------------------------------------------------------------------------------
    def _authenticate(self, token: str | bytes) -> tuple[bytes, VerifiedChain]:
        """Return (payload segment, chain) of a token whose header, chain and signature hold."""
        payload_seg, found, signing_input, signature = self._parse(token)
        chain = self._settle(found, _check_signatures(found)) if isinstance(found, _PendingChain) else found
        if not verify_es256(chain.leaf_key, signing_input, signature):
            raise _bad_signature()
        return payload_seg, chain

    def _parse(self, token: str | bytes, *, bounded: bool = False) -> tuple[bytes, VerifiedChain | _PendingChain, bytes, bytes]:
        """Return (payload segment, chain, signing input, raw signature): every check but the signatures'.

        The chain is a :class:`_PendingChain` when it was never seen: its certificate signatures are left
        to check (:meth:`_check_pending`, or :func:`_check_signatures` then :meth:`_settle`). `bounded`:
        a never-seen chain while ``chain_checks`` are running is refused (``chain_check_busy``) before its
        certificates are even parsed.
        """
        if isinstance(token, str):
            try:
                token = token.encode("ascii")
            except UnicodeEncodeError:
                raise _fail("malformed_jws", "the JWS contains characters outside ASCII.") from None
        elif not isinstance(token, bytes | bytearray | memoryview):
            raise _fail("malformed_jws", "the JWS is not a string.")
        else:
            token = bytes(token)
        parts = token.split(b".")
        if len(parts) != 3:
            raise _fail("malformed_jws", f"the JWS has {len(parts)} dot-separated parts instead of 3.")
        header_seg, payload_seg, sig_seg = parts
        chain = self._chain_for_header(header_seg, bounded)
        try:
            signature = b64url_decode(sig_seg)
        except (ValueError, binascii.Error):
            raise _fail("malformed_jws", "the JWS signature is not base64url.") from None
        if len(signature) != 64:
            raise _fail("bad_signature", f"the JWS signature is {len(signature)} bytes, not the 64-byte r||s form ES256 uses.")
        return payload_seg, chain, token[: len(header_seg) + 1 + len(payload_seg)], signature

    def _chain_for_header(self, header_seg: bytes, bounded: bool = False) -> VerifiedChain | _PendingChain:
        # Apple signs with few leaf certificates at a time: most requests carry the previous request's header.
        # Comparing ~3 kB of bytes costs less than hashing them for the LRU under its lock.
        last = self._last_header
        if last is not None and last[0] == header_seg:
            return last[1]
        with self._lock:
            good = self._by_header.get(header_seg)
            bad = None if good is not None else self._bad_headers.get(header_seg)
        if good is not None:
            self._last_header = (header_seg, good)
            return good
        if bad is not None:
            raise _fail(*bad)
        try:
            found = self._check_header(header_seg, bounded)
        except VerificationError as exc:
            if exc.code != "chain_check_busy":  # a verdict on the chain, not on the load
                with self._lock:
                    self._bad_headers.put(header_seg, (exc.code, exc.detail))
            raise
        if isinstance(found, VerifiedChain):
            with self._lock:
                self._by_header.put(header_seg, found)
            self._last_header = (header_seg, found)
        return found

    def _check_header(self, header_seg: bytes, bounded: bool = False) -> VerifiedChain | _PendingChain:
        try:
            header = _decode_any(b64url_decode(header_seg))
        except (ValueError, binascii.Error, msgspec.DecodeError):
            raise _fail("malformed_jws", "the JWS header is not base64url JSON.") from None
        if not isinstance(header, dict):
            raise _fail("malformed_jws", "the JWS header is not a JSON object.")
        alg = header.get("alg")
        if alg != "ES256":
            shown = repr(alg)[:40] if alg is not None else "missing"
            raise _fail("unsupported_alg", f"the JWS alg is {shown}, and only ES256 is accepted.")
        if "crit" in header:
            raise _fail("unknown_critical_header", "the JWS has a crit header, and this verifier understands no extension.")
        x5c = header.get("x5c")
        if x5c is None:
            raise _fail("bad_chain_length", "the JWS header has no x5c certificate chain.")
        if not isinstance(x5c, list):
            raise _fail("malformed_jws", "the JWS x5c header is not a list.")
        if len(x5c) != 3:
            raise _fail("bad_chain_length", f"the x5c chain has {len(x5c)} certificates instead of 3.")
        if not isinstance(x5c[2], str):
            raise _fail("malformed_jws", "x5c[2] is not a string.")
        key = (x5c[0], x5c[1])
        if not isinstance(key[0], str) or not isinstance(key[1], str):
            raise _fail("malformed_jws", "an x5c entry is not a string.")
        with self._lock:
            good = self._by_x5c.get(key)
            bad = None if good is not None else self._bad_x5c.get(key)
        if good is not None:
            return good
        if bad is not None:
            raise _fail(*bad)
        if bounded and self._chain_checks_running >= self.chain_checks and key not in self._in_flight:
            raise self._busy()
        try:
            return self._prepare(key)
        except VerificationError as exc:
            with self._lock:
                self._bad_x5c.put(key, (exc.code, exc.detail))
            raise

    def _prepare(self, key: tuple[str, str]) -> _PendingChain:
        """Parse a never-seen (leaf, intermediate) and run every check that needs no signature (cheap first)."""
        leaf_der, intermediate_der = _cert_der(key[0], 0), _cert_der(key[1], 1)
        fingerprint = hashlib.sha256(intermediate_der).digest()
        with self._lock:
            known = self._intermediates.get(fingerprint)
        intermediate, root = known if known is not None else (_load_cert(intermediate_der, 1), None)
        leaf = _load_cert(leaf_der, 0)
        try:
            candidates = _precheck(leaf, intermediate, root, self.roots)
        except VerificationError:
            raise
        except Exception as exc:  # a malformed extension surfaces only when read
            raise _fail("untrusted_chain", f"the certificate chain could not be read ({type(exc).__name__}).") from None
        return _PendingChain(key, leaf, intermediate, fingerprint, root, candidates)

    async def _check_pending(self, pending: _PendingChain, offload: Offload | None) -> VerifiedChain:
        """Check a never-seen chain's certificate signatures through `offload`, at most ``chain_checks`` at once.

        Requests on a chain whose check is under way wait for that check (Apple's first requests after a
        start all carry the same new chain): they neither count against the bound nor repeat the work.
        """
        under_way = self._in_flight.get(pending.key)
        if under_way is not None:
            verdict = await asyncio.shield(under_way)
            if isinstance(verdict, VerifiedChain):
                return verdict
            raise _fail(*verdict)
        if self._chain_checks_running >= self.chain_checks:
            raise self._busy()
        self._chain_checks_running += 1
        done: asyncio.Future[VerifiedChain | _Refusal] = asyncio.get_running_loop().create_future()
        self._in_flight[pending.key] = done
        try:
            if offload is None:
                result = _check_signatures(pending)
            else:
                result = await offload(_check_signatures, pending)
        except BaseException:
            done.cancel()  # cancelled (shutdown): the waiting requests are too
            raise
        finally:
            self._chain_checks_running -= 1
            del self._in_flight[pending.key]
        done.set_result(result[0])
        return self._settle(pending, result)

    def _busy(self) -> VerificationError:
        return _fail(
            "chain_check_busy",
            f"{self._chain_checks_running} never-seen certificate chains are being checked already; retry later.",
        )

    def _settle(self, pending: _PendingChain, result: tuple[VerifiedChain | _Refusal, x509.Certificate | None]) -> VerifiedChain:
        """Remember the verdict of :func:`_check_signatures` on `pending`; return the chain or raise its refusal."""
        chain, learnt_root = result
        with self._lock:
            if learnt_root is not None:
                self._intermediates.put(pending.intermediate_sha256, (pending.intermediate, learnt_root))
            if isinstance(chain, VerifiedChain):
                self._by_x5c.put(pending.key, chain)
            else:
                self._bad_x5c.put(pending.key, chain)
        if isinstance(chain, VerifiedChain):
            return chain
        raise _fail(*chain)

    def _verify_request(self, signed_payload: str | bytes) -> DecodedRealtimeRequestBody:
        payload_seg, chain = self._authenticate(signed_payload)
        return self._check_request(payload_seg, chain)

    def _check_request(self, payload_seg: bytes, chain: VerifiedChain) -> DecodedRealtimeRequestBody:
        """Decode and check an authenticated payload: fields, chain validity, app, environment, freshness, replay."""
        body, now = self._check_payload(payload_seg, chain)
        if self.check_replay:
            self._remember(body.requestIdentifier.lower(), now)
        return body

    def _check_payload(self, payload_seg: bytes, chain: VerifiedChain) -> tuple[DecodedRealtimeRequestBody, float]:
        """Decode and check an authenticated payload, replay aside; return it and the time it was checked at."""
        try:
            raw = b64url_decode(payload_seg)
        except (ValueError, binascii.Error):
            raise _fail("malformed_jws", "the JWS payload is not base64url.") from None
        try:
            body = _decode_request(raw)
        except msgspec.ValidationError as exc:
            raise _fail("invalid_payload", f"the payload is not a valid DecodedRealtimeRequestBody: {exc}.") from None
        except msgspec.DecodeError:
            raise _fail("invalid_payload", "the payload is not a JSON object.") from None
        if _UUID_RE.fullmatch(body.requestIdentifier) is None:
            raise _fail("invalid_payload", "the payload's requestIdentifier is not a UUID.")
        problem = unstorable({"appAppleId": body.appAppleId, "signedDate": body.signedDate,
                              "originalTransactionId": body.originalTransactionId, "productId": body.productId,
                              "userLocale": body.userLocale})
        if problem is not None:  # logged with the decision: refused now rather than answered and dropped
            raise _fail("invalid_payload", f"the payload cannot be stored: {problem}.")
        signed_s = body.signedDate / 1000.0
        chain.check_valid_at(signed_s)
        if body.appAppleId != self.app_apple_id and not (self.relax_app_id_in_sandbox and self.environment == "Sandbox"):
            raise _fail("wrong_app", f"the request is for appAppleId {body.appAppleId}, not this app's.")
        if body.rawEnvironment != self.environment:
            raise _fail(
                "wrong_environment", f"the request is from environment {body.rawEnvironment[:40]!r}, not {self.environment}."
            )
        now = self.clock()
        if signed_s < now - self.max_age_s:
            raise _fail("stale_request", f"the request was signed {now - signed_s:.0f} s ago, more than {self.max_age_s:g} s.")
        if signed_s > now + self.max_skew_s:
            raise _fail(
                "stale_request", f"the request is signed {signed_s - now:.0f} s in the future, more than {self.max_skew_s:g} s."
            )
        return body, now

    def _remember(self, request_id: str, now: float) -> None:
        """Record `request_id` in the replay memory, or raise replayed_request when it holds it already.

        A request signed at t passes the freshness check until t + max_age_s, and t <= now + max_skew_s,
        so after now + max_age_s + max_skew_s a replay is refused as stale anyway: the id is forgotten then.
        """
        if not self.replay.remember(request_id, now + self.max_age_s + self.max_skew_s, now):
            raise _fail("replayed_request", "this requestIdentifier was already answered.")

    async def _remember_async(self, request_id: str, now: float, offload: Offload | None) -> None:
        """:meth:`_remember`; with a shared store behind an in-process front, the front answers on the event
        loop and the store's write goes through `offload` (``LayeredReplayMemory.remember_async``)."""
        replay = self.replay
        if offload is None or not isinstance(replay, LayeredReplayMemory):
            self._remember(request_id, now)
            return
        if not await replay.remember_async(request_id, now + self.max_age_s + self.max_skew_s, now, offload):
            raise _fail("replayed_request", "this requestIdentifier was already answered.")


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Return the hex SHA-256 of a certificate's DER (for logs and the start-up warning)."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()

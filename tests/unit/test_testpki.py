"""The test PKI has Apple's shape, round-trips through a folder, never overwrites; `retention sign` works."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from serving import sign_cli
from serving.testpki import APPLE_NAMES, TestPKI
from serving.verify import INTERMEDIATE_OID, LEAF_OID, RequestVerifier, load_roots

ROOT = Path(__file__).resolve().parents[2]


def test_minted_chain_has_apples_shape() -> None:
    pki = TestPKI.mint()
    curves = [c.public_key().curve.name for c in (pki.root_cert, pki.intermediate_cert, pki.leaf_cert)]  # type: ignore[union-attr]
    assert curves == ["secp384r1", "secp384r1", "secp256r1"]
    for c in (pki.root_cert, pki.intermediate_cert, pki.leaf_cert):
        assert c.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384
        assert c.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert pki.intermediate_cert.extensions.get_extension_for_oid(INTERMEDIATE_OID)
    assert pki.leaf_cert.extensions.get_extension_for_oid(LEAF_OID)
    assert pki.intermediate_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not pki.leaf_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = pki.leaf_cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == pki.intermediate_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert "Test" in pki.root_cert.subject.rfc4514_string()  # never mistaken for Apple's by default
    assert "Apple Root CA - G3" in TestPKI.mint(names=APPLE_NAMES).root_cert.subject.rfc4514_string()


def test_write_load_roundtrip_with_private_keys_0600(tmp_path: Path) -> None:
    pki = TestPKI.mint()
    root = pki.write(tmp_path / "ca")
    assert root == tmp_path / "ca" / "root.pem"
    for key in ("root.key", "intermediate.key", "leaf.key"):
        assert stat.S_IMODE((tmp_path / "ca" / key).stat().st_mode) == 0o600
    again = TestPKI.load(tmp_path / "ca")
    assert again.root_cert == pki.root_cert and again.leaf_cert == pki.leaf_cert
    v = RequestVerifier(load_roots([str(root)]), app_apple_id=1234567890, environment="Sandbox")
    body = json.loads(again.signed_request_body())
    assert v.verify(body["signedPayload"]).appAppleId == 1234567890


def test_write_never_overwrites(tmp_path: Path) -> None:
    TestPKI.mint().write(tmp_path)
    before = (tmp_path / "root.pem").read_bytes()
    with pytest.raises(FileExistsError):
        TestPKI.mint().write(tmp_path)
    assert (tmp_path / "root.pem").read_bytes() == before


def test_load_names_the_bad_file(tmp_path: Path) -> None:
    TestPKI.mint().write(tmp_path)
    (tmp_path / "leaf.key").write_text("nope")
    with pytest.raises(ValueError, match=r"leaf\.key"):
        TestPKI.load(tmp_path)


def test_request_payload_defaults_are_fresh_and_valid() -> None:
    a, b = TestPKI.request_payload(), TestPKI.request_payload(environment="Production", futureField=1)
    assert a["requestIdentifier"] != b["requestIdentifier"]
    assert abs(a["signedDate"] - time.time() * 1000) < 5000
    assert b["environment"] == "Production" and b["futureField"] == 1
    assert set(a) == {"originalTransactionId", "appAppleId", "productId", "userLocale", "requestIdentifier", "environment", "signedDate"}


def test_sign_cli_mints_once_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert sign_cli.main(["--ca", str(ca), "--count", "3", "--app-apple-id", "42", "--environment", "Production",
                          "--product-id", "p.x", "--locale", "fr-FR"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 3 and "minted a new test CA" in err
    root_before = (ca / "root.pem").read_bytes()
    v = RequestVerifier(load_roots([str(ca / "root.pem")]), app_apple_id=42, environment="Production")
    bodies = [v.verify(json.loads(line)["signedPayload"]) for line in lines]
    assert {(b.productId, b.userLocale, b.rawEnvironment) for b in bodies} == {("p.x", "fr-FR", "Production")}
    assert len({b.requestIdentifier for b in bodies}) == 3
    assert sign_cli.main(["--ca", str(ca)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and err == ""
    assert (ca / "root.pem").read_bytes() == root_before
    sandbox = RequestVerifier(load_roots([str(ca / "root.der")]), app_apple_id=1234567890, environment="Sandbox")
    assert sandbox.verify(json.loads(out)["signedPayload"]).productId == "com.example.premium.monthly"


def test_sign_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sign_cli.main(["--ca", str(tmp_path), "--count", "-1"]) == 2
    assert sign_cli.main(["--ca", str(tmp_path), "--environment", "Staging"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--environment" in err


def test_retention_sign_via_the_dispatcher(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "retention.py"), "sign", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)

    help_ = run("--help")
    assert help_.returncode == 0 and "--ca DIR" in help_.stdout and "never overwritten" in help_.stdout
    (tmp_path / "leaf.key").write_text("someone else's")
    bad = run("--ca", str(tmp_path))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert (tmp_path / "leaf.key").read_text() == "someone else's"


def test_impostor_copies_names_not_keys() -> None:
    pki = TestPKI.mint()
    imp = pki.impostor()
    assert imp.root_cert.subject == pki.root_cert.subject and imp.leaf_cert.subject == pki.leaf_cert.subject
    assert isinstance(imp.root_key, ec.EllipticCurvePrivateKey)
    assert imp.root_cert.public_key() != pki.root_cert.public_key()

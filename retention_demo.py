"""``retention demo``: train a model, serve it, send signed requests, show the decisions, stop.

Everything runs on embedded defaults: the demo catalog, a model trained on a simulated
world into the checkout's registry (once; later runs reuse it), a test CA and a test
In-App Purchase key minted at run time into a temporary folder (no private key is ever
committed), and a real ``retention serve`` subprocess on 127.0.0.1.

A top-level module beside ``retention.py``, not inside ``serving``: it drives both sides (the
simulator and trainer of ``training``, the server of ``serving``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from models.catalog import DEMO_CATALOG
from retention import VerbParser, int_in
from serving import children
from serving.settings import DEFAULT_REGISTRY

APP_ID = 1234567890
DESCRIPTION = """Train a model on a simulated world if the registry has none (later runs reuse it), start
retention serve on 127.0.0.1 with a test CA and a test In-App Purchase key made for this run (in a
temporary folder, deleted at the end), send signed requests and one forged request, then show the
server's warnings and the decisions it logged, and stop the server."""
MAX_REQUESTS = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/ready", timeout=1) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return dict(json.loads(e.read()))
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready in time")


def ensure_model(registry: Path, n_decisions: int) -> str:
    """Return the registry's current version, training the demo model first when there is none."""
    from models.registry import Registry

    reg = Registry(registry)
    current = reg.current() if registry.exists() else None
    if current:
        print(f"model: using {current} from {registry}")
        return current
    print(f"model: none in {registry}; simulating {n_decisions:,} decisions and training (a minute or so on 2 cores)...")
    from training.train import train_demo_model

    t0 = time.perf_counter()
    version = train_demo_model(registry, n_decisions=n_decisions, seed=0)
    print(f"model: trained {version} in {time.perf_counter() - t0:.1f} s")
    return version


def main(argv: list[str]) -> int:
    """Entry point of ``retention demo``."""
    p = VerbParser(prog="retention demo", description=DESCRIPTION)
    p.add_argument("--registry", default=str(DEFAULT_REGISTRY), help="model registry folder (trained into when empty)")
    p.add_argument("--requests", type=int_in(1, MAX_REQUESTS), default=8,
                   help=f"signed requests to send, one per simulated subscriber (1 to {MAX_REQUESTS:,}; default 8)")
    p.add_argument("--decisions", type=int_in(1000), default=20000,
                   help="simulated decisions to train the demo model on (1,000 or more; default 20,000)")
    p.add_argument("--retrain", action="store_true", help="train a new model version even if one exists")
    args = p.parse_args(argv)

    from serving.testpki import TestPKI

    registry = Path(args.registry)
    from models.registry import Registry

    Registry(registry).require_creatable()  # a file or a broken link: one line now, not after the training
    if args.retrain and registry.exists():
        from training.train import train_demo_model

        print("model:", train_demo_model(registry, n_decisions=args.decisions, seed=0), "(retrained)")
    else:
        ensure_model(registry, args.decisions)

    with tempfile.TemporaryDirectory(prefix="retention-demo-") as tmp:
        tmpd = Path(tmp)
        pki = TestPKI.mint()
        root_path = pki.write(tmpd / "ca")
        # a test In-App Purchase key, so promotional offers can be signed
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        p8 = tmpd / "SubscriptionKey_DEMO.p8"
        p8.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        os.chmod(p8, 0o600)
        data_dir = tmpd / "data"
        # the simulated subscribers' profiles, so the model personalizes the demo's answers
        from training.simulate import simulate

        world = simulate(max(400, 2 * args.requests), seed=7)  # about 88% of its decisions are distinct subscribers
        prof_file = tmpd / "profiles.parquet"
        world.profiles.to_parquet(prof_file)
        from serving.profiles import import_profiles

        import_profiles(prof_file, data_dir / "profiles.sqlite")

        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env.update(
            {
                "RETENTION_ROOT_CERTS": str(root_path),
                "RETENTION_APP_APPLE_ID": str(APP_ID),
                "RETENTION_ENVIRONMENT": "Sandbox",
                "RETENTION_CATALOG": str(DEMO_CATALOG),
                "RETENTION_MODEL": str(registry),
                "RETENTION_DATA_DIR": str(data_dir),
                "RETENTION_PORT": str(port),
                "RETENTION_OFFER_KEY_FILE": str(p8),
                "RETENTION_OFFER_KEY_ID": "DEMOKEY123",
                "RETENTION_OFFER_ISSUER_ID": "57246542-96fe-1a63-e053-0824d011072a",
                "RETENTION_BUNDLE_ID": "com.example.app",
                "RETENTION_LOG_LEVEL": "warning",
                "RETENTION_SEED": "1",
            }
        )
        print(f"server: retention serve on {base} (Sandbox; a test CA made for this run, at {root_path})")
        # the server's own log goes to a file, shown after the requests: not interleaved with their lines
        server_log = tmpd / "server.log"
        with server_log.open("wb") as log_out:
            proc = subprocess.Popen(children.command("retention", "serve"), env=children.environment(env),
                                    stdout=log_out, stderr=subprocess.STDOUT)
        try:
            ready = _wait_ready(base, proc)
            print(f"server: ready={ready.get('ready')} model={ready.get('model_version')}")
            subs = world.decisions.drop_duplicates("original_transaction_id").head(args.requests)
            for row in subs.itertuples():
                body = pki.signed_request_body(
                    app_apple_id=APP_ID,
                    environment="Sandbox",
                    product_id=row.product_id,
                    user_locale=row.user_locale,
                    original_transaction_id=row.original_transaction_id,
                )
                status, answer = _post(base + "/retention/message", body)
                print(f"  {row.product_id:<30} {row.user_locale:<6} -> {status} {_short(answer)}")
            # a forged request: signed by a CA nobody configured
            status, answer = _post(base + "/retention/message", TestPKI.mint().signed_request_body(app_apple_id=APP_ID))
            print(f"  {'forged request (untrusted CA)':<37} -> {status} {json.dumps(answer)}")
        finally:
            proc.send_signal(signal.SIGTERM)  # graceful: the decision log is flushed
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            lines = server_log.read_text(errors="replace").splitlines()
            cut = f"; the last 40 of {len(lines):,} lines" if len(lines) > 40 else ""
            print(f"\nserver log (warnings and errors{cut}):" if lines else "\nserver log: empty (warnings and errors only)")
            for line in lines[-40:]:
                print(f"  {line}")
        _show_decisions(data_dir)
    print("demo: done; the server stopped cleanly")
    return 0


def _short(answer: dict[str, object]) -> str:
    for key, val in answer.items():
        if isinstance(val, dict):
            extra = ""
            if "productId" in val:
                extra = f" productId={val['productId']}"
            if "promotionalOfferSignatureV2" in val:
                from models.catalog import Catalog

                msg = Catalog.load(DEMO_CATALOG).messages.get(str(val.get("messageIdentifier")))
                offer = f" offer={msg.offerIdentifier}" if msg is not None and msg.offerIdentifier else ""
                extra = f"{offer} signatureV2={str(val['promotionalOfferSignatureV2'])[:24]}..."
            return f"{key} {val.get('messageIdentifier')}{extra}"
    return json.dumps(answer)


def _show_decisions(data_dir: Path) -> None:
    from models.catalog import Catalog

    catalog = Catalog.load(DEMO_CATALOG)
    print("\ndecisions logged (P(stay), expected value, probability; * = shown):")
    from serving.log_reader import log_files, read_decisions

    for r in read_decisions(log_files(data_dir)):
        print(f"- {r['request_id'][:8]} {r['product_id']} {r['user_locale']} policy={r['policy']} "
              f"model={r['model_version']} latency={r['latency_ms']:.2f} ms")
        scores, values, probs = r["scores"] or [], r["values"] or [], r["probabilities"] or []
        for i, mid in enumerate(r["candidates"]):
            m = catalog.messages.get(mid)
            name = f"{m.kind}:{m.offerIdentifier or m.alternateProductId or mid[:8]}" if m else mid
            s = f"{scores[i]:.3f}" if i < len(scores) else "  -  "
            v = f"{values[i]:7.2f}" if i < len(values) else "    -  "
            mark = "*" if mid == r["message_id"] else " "
            print(f"    {mark} {name:<44} P(stay)={s} value={v} p={probs[i]:.3f}")

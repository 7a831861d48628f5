"""The Litestar application: ``create_app(settings)`` builds everything; nothing is global.

Request path of ``POST /retention/message`` (all in memory, no network, no synchronous disk write):
verify Apple's JWS (on the event loop; only a never-seen certificate chain's CA signatures and the shared
replay store's write go to the worker thread) → eligible candidates → featurize → score with the other
requests ready in the same loop turn (one ONNX Runtime run, timed against the budget, behind a circuit
breaker) → expected value → exact exploration probabilities → sample → answer → enqueue the decision for
the log (written by a thread of this process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
from litestar import Litestar, MediaType, Request, Response, asgi, get, post
from litestar.exceptions import HTTPException

from models.catalog import Catalog, CatalogMessage
from models.data_files import APPLE_FALLBACK_POLICY
from serving.database import FleetSync, PostgresReplayMemory
from serving.errors import ERROR_STATUS, ApiError, VerificationError
from serving.log_schema import DecisionRecord
from serving.log_writer import DecisionLog, log_file_name
from serving.metrics import Metrics
from serving.notifications import configured_bundle_id, receive_notification
from serving.offers import OfferSigner
from serving.pg_log import PostgresDecisionLog
from serving.policy import (
    Choice,
    ExplorationParams,
    candidates_for,
    experiment_choice,
    fallback_choice,
    ml_choice,
    rule_choice,
    shadow_pick,
)
from serving.profiles import ProfileStore
from serving.replay import REPLAY_FILE, LayeredReplayMemory, SQLiteReplayMemory
from serving.schemas import (
    AlternateProduct,
    DecodedRealtimeRequestBody,
    Message,
    PromotionalOffer,
    RealtimeRequestBody,
    RealtimeResponseBody,
)
from serving.settings import Settings
from serving.snapshot import Runtime, Snapshot
from serving.stderr_log import refusals
from serving.verify import RequestVerifier

log = logging.getLogger("retention.app")
T = TypeVar("T")

_decode_body = msgspec.json.Decoder(RealtimeRequestBody).decode
_encode = msgspec.json.Encoder().encode


def _error_response(code: str, detail: str) -> Response[bytes]:
    status, body = _error(code, detail)
    return Response(content=body, status_code=status, media_type=MediaType.JSON)


def _error(code: str, detail: str) -> tuple[int, bytes]:
    return ERROR_STATUS[code], _encode({"error": code, "detail": detail})


#: What scoring gives back: features, P(stay), the shadow's P(stay), the raw profile values used (None: no
#: profile), the experiment challenger's (features, P(stay)).
_Scored = tuple[
    np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any] | None, tuple[np.ndarray, np.ndarray] | None
]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_INTERNAL_DETAIL = "The server could not handle this request now; it was logged. Send it again later."
_NO_ELIGIBLE = _error(
    "no_eligible_message", "No approved message is eligible and the catalog has no default for this product and locale."
)


async def _read_body(scope: Any, receive: Any, limit: int) -> bytes | None:
    """Return the request body, or None when it is over `limit` (refused from Content-Length first)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return None
            except ValueError:
                pass
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            raise ConnectionAbortedError("client disconnected")
        chunk = event.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        if not event.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class CircuitBreaker:
    """Opens after `threshold` consecutive model failures; while open, requests skip the model.

    After `cooldown_s` one request is let through to probe; its success closes the circuit.
    """

    def __init__(self, threshold: int = 3, cooldown_s: float = 5.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.open_until = 0.0

    def allow(self, now: float) -> bool:
        """Return True when the model may be called now."""
        if self.failures < self.threshold:
            return True
        if now >= self.open_until:
            self.open_until = now + self.cooldown_s  # let exactly one probe through per cool-down
            return True
        return False

    def success(self) -> None:
        """Record a model call that answered in time."""
        self.failures = 0

    def failure(self, now: float, *, trip: bool = False) -> None:
        """Record a model call that failed or ran late; `trip` opens the circuit at once."""
        self.failures = max(self.failures + 1, self.threshold if trip else 0)
        if self.failures >= self.threshold:
            self.open_until = now + self.cooldown_s


class RetentionService:
    """The request-path logic, separate from HTTP so tests and benchmarks can drive it directly."""

    def __init__(self, settings: Settings, *, verifier: RequestVerifier | None = None, clock: Any = time.time) -> None:
        self.settings = settings
        configured_bundle_id(settings)  # notifications are served: refuse to start without the app's bundle id
        self.metrics = Metrics()
        data_dir = Path(settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # the replay memory every worker of the host shares (docs/security.md); None: each verifier's own
        self.replay: LayeredReplayMemory | None = None
        if verifier is None and settings.database_url is not None:  # the fleet's (docs/deployment-postgresql.md)
            url, budget_ms = settings.database_url, settings.database_budget_ms

            def replay_miss(_: BaseException) -> None:
                self.metrics.replay_store_error()
                self.metrics.database_miss("replay")

            self.replay = LayeredReplayMemory(lambda: PostgresReplayMemory(url, budget_ms=budget_ms), on_error=replay_miss)
        elif verifier is None and settings.replay_store == "sqlite":
            self.replay = LayeredReplayMemory(
                lambda: SQLiteReplayMemory(data_dir / REPLAY_FILE), on_error=lambda _: self.metrics.replay_store_error()
            )
        self.verifier = verifier or RequestVerifier.from_settings(settings, clock=clock, replay=self.replay)
        self.runtime = Runtime(
            catalog_path=settings.catalog,
            environment=settings.environment,
            registry_spec=settings.model,
            shadow_version=settings.shadow_model,
            challenger=settings.challenger,
            challenger_share=settings.challenger_share,
            experiment_id=settings.experiment_id,
            on_reload_failure=lambda what, why: self.metrics.reload_failure(what),
            on_model_version=self.metrics.set_model_version,
        )
        self.runtime.load()
        self.fleet: FleetSync | None = None
        self.decision_log: DecisionLog | PostgresDecisionLog
        if settings.database_url is not None:  # a fleet sharing PostgreSQL (docs/deployment-postgresql.md)
            self.decision_log = PostgresDecisionLog(
                settings.database_url, data_dir, batch_ms=settings.log_batch_ms, method=settings.database_write,
                spill_max_bytes=settings.spill_max_bytes, on_drop=self.metrics.decision_log_dropped,
                on_fault=self.metrics.decision_log_fault, on_state=self.metrics.database_state,
            )
            self.fleet = FleetSync(settings.database_url, data_dir / "profiles.sqlite")
        else:
            self.decision_log = DecisionLog(
                data_dir / log_file_name(), batch_ms=settings.log_batch_ms, on_drop=self.metrics.decision_log_dropped,
                on_fault=self.metrics.decision_log_fault,
            )
        self.profiles = ProfileStore(data_dir / "profiles.sqlite")
        self.offer_signer = OfferSigner.from_settings(settings)
        self.params = ExplorationParams(settings.epsilon, settings.exploration, settings.temperature, settings.holdout)
        self._params_logged = self.params.as_dict()  # one dict shared by every record (never mutated)
        self.rng = np.random.default_rng(settings.seed)
        self.budget_s = settings.budget_ms / 1000.0
        self.breaker = CircuitBreaker()
        # the one thread for the blocking work kept off the event loop (off_loop): a never-seen certificate
        # chain's CA signatures (OpenSSL releases the GIL meanwhile), bounded by --chain-checks, and the shared
        # replay store's batched writes (SQLite or PostgreSQL)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="retention-worker")
        self.kill_switch_file = data_dir / "kill-switch"
        self.killed = settings.kill_switch
        self._kill_checked_at = 0.0
        self._kill_file_present = False
        self._names_shas: dict[str, str] = {}
        self._experiment_params: dict[tuple[str, str, float, str], dict[str, Any]] = {}  # experiment and arm -> params
        self._batch: list[tuple[Any, np.ndarray, asyncio.Future[Any]]] = []  # requests waiting for the next ONNX run

    # ---- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Start the background log writer and the reload thread."""
        self.decision_log.start()
        if self.fleet is not None:
            self.fleet.start()
        self.runtime.start(self.settings.reload_interval_s)

    def stop(self) -> None:
        """Flush the decision log and stop the background threads."""
        self.runtime.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.decision_log.close()
        if self.replay is not None:
            self.replay.close()
        if self.fleet is not None:
            self.fleet.stop()
        self.metrics.close()

    def ready(self) -> tuple[bool, str]:
        """Return (ready, reason): ready when the catalog and a model are loaded and decisions can be written."""
        snap = self.runtime.snapshot
        if snap is None:
            return False, "catalog not loaded"
        if snap.model is None:
            return False, f"no model: {snap.model_error}"
        # SQLite: 503 while decisions cannot be written; PostgreSQL: ready while they reach it or fit in the spill file
        return self.decision_log.health()

    def kill_switch_on(self) -> bool:
        """Return True when every request goes to the rule policy (setting, or the kill-switch file).

        The file is looked at no more than once a second, so the request path makes no syscall for it.
        """
        if self.killed or (self.fleet is not None and self.fleet.kill_switch):
            return True
        now = time.monotonic()
        if now >= self._kill_checked_at:
            self._kill_checked_at = now + 1.0
            present = self.kill_switch_file.exists()
            if present != self._kill_file_present:
                if present:
                    log.warning("kill switch on (%s exists): every request gets the rule policy", self.kill_switch_file)
                else:
                    log.warning("kill switch off (%s removed): the model serves again", self.kill_switch_file)
            self._kill_file_present = present
        return self._kill_file_present

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Return ``fn(*args)``, run on the worker thread (``loop.run_in_executor``) while the loop serves others."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- the request path ---------------------------------------------------------
    async def answer(self, body: bytes) -> tuple[int, bytes]:
        """Return (HTTP status, JSON body) for one Get Retention Message body (never raises for bad input)."""
        t0 = time.perf_counter()
        try:
            outer = _decode_body(body)
        except Exception:  # whatever the bytes make the decoder raise (UnicodeDecodeError too) is the sender's fault
            return self._refuse("malformed_body", "The body must be a JSON object with a string signedPayload.")
        try:
            request = await self.verifier.verify_async(outer.signedPayload, self.off_loop)
        except VerificationError as exc:
            return self._refuse(exc.code, exc.detail)
        snap = self.runtime.snapshot
        assert snap is not None
        choice = await self._choose(snap, request)
        response_body: RealtimeResponseBody | None = None
        if choice.message is not None:
            try:
                response_body = self._response_for(snap.catalog, choice.message, request)
            except Exception as exc:  # an offer that cannot be signed must not cost the message
                log.error("answer for %s failed (%s); answering the default", choice.message.messageIdentifier, exc)
                choice = fallback_choice(choice.candidates, self._default_index(snap, request, choice), "offer_signature")
                response_body = self._response_for(snap.catalog, choice.message, request) if choice.message else None
        if response_body is None:
            resp = _NO_ELIGIBLE
            status = 404
            kind = "none"
        else:
            resp = (200, _encode(response_body))
            status = 200
            assert choice.message is not None
            kind = choice.message.kind
        latency = time.perf_counter() - t0
        self._log(snap, request, choice, status, latency)
        self.metrics.observe_request(latency, kind, choice.message.messageIdentifier if choice.message else None)
        if choice.fallback_reason:
            self.metrics.fallback(choice.fallback_reason)
        return resp

    def _refuse(self, code: str, detail: str) -> tuple[int, bytes]:
        self.metrics.verification_failure(code)
        refusals.note(code, detail)
        return _error(code, detail)

    @staticmethod
    def _default_index(snap: Snapshot, request: DecodedRealtimeRequestBody, choice: Choice) -> int | None:
        d = snap.catalog.default_for(request.productId, request.userLocale)
        for i, m in enumerate(choice.candidates):
            if m is d:
                return i
        return None

    async def _choose(self, snap: Snapshot, request: DecodedRealtimeRequestBody) -> Choice:
        candidates, default_index = candidates_for(snap.catalog, request, offers_enabled=self.offer_signer is not None)
        if not candidates:
            return rule_choice(candidates, None, policy="rules")
        if self.kill_switch_on():
            return fallback_choice(candidates, default_index, "kill_switch")
        model = snap.model
        if model is None:
            return fallback_choice(candidates, default_index, "no_model")
        params = self.params
        # holdout and exploration draws come from one seedable generator, drawn before scoring so a
        # fallback does not shift the random stream of later requests
        u = float(self.rng.random())
        now = time.monotonic()
        if not self.breaker.allow(now):
            c = fallback_choice(candidates, default_index, "circuit_open")
            c.model_version = model.version
            return c
        outcome = await self._score_batched(snap, request, candidates)
        if isinstance(outcome, str):
            c = fallback_choice(candidates, default_index, outcome)
            c.model_version = model.version
            return c
        X, p, shadow_p, profile, challenger_scored = outcome
        self.breaker.success()
        choice = ml_choice(snap.catalog, candidates, default_index, request.productId, p, params, u, model.version)
        choice.features = X
        choice.profile, choice.profile_read = profile, True
        if snap.experiment is not None and snap.challenger is not None:
            choice = self._experiment_choice(snap, request, candidates, default_index, choice, challenger_scored, u)
        if snap.shadow is not None:
            choice.shadow_model_version = snap.shadow.version
            if shadow_p is not None:
                choice.shadow_message_id = shadow_pick(snap.catalog, candidates, request.productId, shadow_p)
        return choice

    def _experiment_choice(
        self, snap: Snapshot, request: DecodedRealtimeRequestBody, candidates: tuple[CatalogMessage, ...],
        default_index: int | None, current: Choice, challenger_scored: tuple[np.ndarray, np.ndarray] | None, u: float,
    ) -> Choice:
        """Return the subscriber's arm's choice, logged with the experiment's exact mixture probabilities."""
        experiment, bundle = snap.experiment, snap.challenger
        assert experiment is not None and bundle is not None
        arm = experiment.arm_of(request.originalTransactionId)
        if challenger_scored is None:
            other = fallback_choice(candidates, default_index, "challenger_error")
            other.model_version = bundle.version
        else:
            X_ch, p_ch = challenger_scored
            other = ml_choice(snap.catalog, candidates, default_index, request.productId, p_ch, self.params, u,
                              bundle.version)
            other.features = X_ch
        other.profile, other.profile_read = current.profile, current.profile_read
        choice = experiment_choice(current, other, arm, experiment.share)
        key = (experiment.experiment_id, experiment.challenger, experiment.share, arm)
        logged = self._experiment_params.get(key)
        if logged is None:
            logged = self._experiment_params[key] = {
                **self._params_logged, "experiment_id": experiment.experiment_id, "arm": arm,
                "challenger_share": experiment.share, "challenger_version": experiment.challenger,
            }
        choice.policy_params = logged
        return choice

    async def _score_batched(
        self, snap: Snapshot, request: DecodedRealtimeRequestBody, candidates: tuple[CatalogMessage, ...]
    ) -> _Scored | str:
        """Featurize now; score on the event loop in one ONNX Runtime call with the other requests ready now.

        Every request that reaches this point in the same turn of the event loop joins one batch, scored
        by one ``run`` when the loop gets to it (``call_soon``): one call's fixed cost and one pass over
        the trees' memory for the whole batch instead of per request (measured: BENCHMARKS.md). Alone, a
        request is a batch of one. An overrun answers the fallback for the whole batch and opens the
        circuit at once; a model that suddenly became slow holds that batch (and the loop) for that one
        call, and the circuit then sends later requests straight to the fallback until a probe succeeds.
        """
        model = snap.model
        assert model is not None
        try:
            profile = self.profiles.get(request.originalTransactionId)
            X = model.featurize(request, profile, candidates)
        except Exception as exc:
            self.breaker.failure(time.monotonic())
            log.warning("featurizing for model %s failed: %s", model.version, exc)
            return "model_error"
        fut: asyncio.Future[np.ndarray | str] = asyncio.get_running_loop().create_future()
        self._batch.append((model, X, fut))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._run_batch)
        p = await fut
        if isinstance(p, str):
            return p
        return (X, p, self._shadow_scores(snap, request, profile, candidates), profile,
                self._challenger_scores(snap, request, profile, candidates))

    @staticmethod
    def _shadow_scores(
        snap: Snapshot, request: DecodedRealtimeRequestBody, profile: Any, candidates: tuple[CatalogMessage, ...]
    ) -> np.ndarray | None:
        """Return the shadow model's P(stay) for the candidates, or None (no shadow, or it failed)."""
        if snap.shadow is None:
            return None
        try:
            return snap.shadow.score(request, profile, candidates)[1]
        except Exception as exc:  # the shadow never affects the answer
            log.warning("shadow model %s failed: %s", snap.shadow.version, exc)
            return None

    @staticmethod
    def _challenger_scores(
        snap: Snapshot, request: DecodedRealtimeRequestBody, profile: Any, candidates: tuple[CatalogMessage, ...]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Return the experiment's challenger (features, P(stay)), or None (no experiment, or it failed)."""
        if snap.challenger is None or snap.experiment is None:
            return None
        try:
            return snap.challenger.score(request, profile, candidates)
        except Exception as exc:  # the challenger arm then gets the rule policy's answer
            log.warning("challenger model %s failed: %s", snap.challenger.version, exc)
            return None

    def _run_batch(self) -> None:
        batch, self._batch = self._batch, []
        while batch:  # normally one model; after a reload, one run per model version in the batch
            model = batch[0][0]
            mine = [b for b in batch if b[0] is model]
            batch = [b for b in batch if b[0] is not model]
            t0 = time.perf_counter()
            try:
                X = mine[0][1] if len(mine) == 1 else np.concatenate([b[1] for b in mine])
                P = np.asarray(model.scorer.p_stay(X), dtype=np.float64)
                if P.shape != (len(X),):
                    raise ValueError(f"the model returned {P.shape} scores for {len(X)} rows")
            except Exception as exc:
                self.breaker.failure(time.monotonic())
                log.warning("model %s failed: %s", model.version, exc)
                for b in mine:
                    if not b[2].done():
                        b[2].set_result("model_error")
                continue
            if time.perf_counter() - t0 > self.budget_s:
                self.breaker.failure(time.monotonic(), trip=True)
                for b in mine:
                    if not b[2].done():
                        b[2].set_result("deadline")
                continue
            start = 0
            for _, x, fut in mine:
                n = len(x)
                if not fut.done():
                    fut.set_result(P[start : start + n])
                start += n

    def _response_for(self, catalog: Catalog, m: CatalogMessage, request: DecodedRealtimeRequestBody) -> RealtimeResponseBody:
        """Return the answer for `m`; an offer's signature is made here, by OpenSSL.

        The answer names Apple's identifier of `m` in the request's locale (models.catalog.Catalog.apple_id).
        """
        mid = m.messageIdentifier if m.content is None else catalog.apple_id(m, request.userLocale)
        if mid is None:
            raise ValueError(f"message {m.messageIdentifier} has no approved text for {request.userLocale}")
        if m.kind == "message":
            return RealtimeResponseBody(message=Message(mid))
        if m.kind == "alternateProduct":
            assert m.alternateProductId is not None
            return RealtimeResponseBody(alternateProduct=AlternateProduct(mid, m.alternateProductId, m.billingPlanType))
        if m.kind == "promotionalOffer":
            if self.offer_signer is None or m.offerIdentifier is None:
                raise ValueError("no In-App Purchase key configured for promotional offers")
            sig = self.offer_signer.sign(
                product_id=request.productId, offer_identifier=m.offerIdentifier, transaction_id=request.originalTransactionId,
            )
            return RealtimeResponseBody(promotionalOffer=PromotionalOffer(mid, promotionalOfferSignatureV2=sig))
        raise ValueError(f"message kind {m.kind!r} cannot be answered")

    def _names_sha(self, snap: Snapshot, version: str | None) -> str | None:
        """Return the log's hash of the feature names of the model `version` that chose (registered once per version)."""
        model = snap.challenger if snap.challenger is not None and version == snap.challenger.version else snap.model
        if model is None:
            return None
        sha = self._names_shas.get(model.version)
        if sha is None:
            sha = self._names_shas[model.version] = self.decision_log.register_feature_names(model.featurizer.schema.names)
        return sha

    def _log(
        self, snap: Snapshot, request: DecodedRealtimeRequestBody, choice: Choice, status: int, latency_s: float
    ) -> None:
        X = choice.features
        policy, fallback_reason = choice.policy, choice.fallback_reason
        latency_ms = latency_s * 1000.0
        # Apple did not use this answer: it showed its App Store Connect retention message (offers it chose,
        # offerType 5) or the API default, so the outcome belongs to Apple's choice, not to what we logged
        if status == 404 or latency_ms > self.settings.apple_wait_ms:
            fallback_reason = (
                f"{fallback_reason}; " if fallback_reason else ""
            ) + ("no_eligible_message" if status == 404 else "answer_too_late")
            policy = APPLE_FALLBACK_POLICY
        profile, profile_read = choice.profile, choice.profile_read
        if not profile_read and choice.candidates:  # a fallback that never asked: the profile it would have used
            profile, profile_read = self.profiles.get(request.originalTransactionId), True
        self.decision_log.log(
            DecisionRecord(
                request_id=request.requestIdentifier,
                original_transaction_id=request.originalTransactionId,
                product_id=request.productId,
                user_locale=request.userLocale,
                environment=request.rawEnvironment,
                signed_date=request.signedDate,
                app_apple_id=request.appAppleId,
                candidates=[m.messageIdentifier for m in choice.candidates],
                scores=choice.scores,
                values=choice.values,
                probabilities=choice.probabilities,
                message_id=choice.message.messageIdentifier if choice.message else None,
                kind=choice.message.kind if choice.message else None,
                propensity=choice.propensity,
                policy=policy,
                policy_params=choice.policy_params or self._params_logged,
                model_version=choice.model_version,
                shadow_model_version=choice.shadow_model_version,
                shadow_message_id=choice.shadow_message_id,
                catalog_sha256=snap.catalog.sha256,
                fallback_reason=fallback_reason,
                features=X,
                feature_names_sha=self._names_sha(snap, choice.model_version) if X is not None else None,
                latency_ms=latency_ms,
                answered_at=int(time.time() * 1000),
                status=status,
                profile=profile,
                profile_read=profile_read,
            )
        )


def create_app(settings: Settings, *, service: RetentionService | None = None) -> Litestar:
    """Return the Litestar app for `settings` (tests pass their own settings or a prepared service)."""
    svc = service or RetentionService(settings)

    too_large = f"The body is larger than {settings.max_body_bytes} bytes."

    # A raw ASGI route: the hot path skips Litestar's per-request signature parsing and response
    # building (measured: BENCHMARKS.md, "Endpoint"); errors and limits are handled here in full.
    @asgi(settings.message_path, copy_scope=False)
    async def retention_message(scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            status, payload = 405, _encode({"error": "method_not_allowed", "detail": "Use POST."})
        else:
            try:
                body = await _read_body(scope, receive, settings.max_body_bytes)
            except ConnectionAbortedError:
                return  # nobody is left to answer
            if body is None:
                status, payload = svc._refuse("payload_too_large", too_large)
            else:
                status, payload = await svc.answer(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    @post(settings.notifications_path, status_code=200)
    async def notifications(request: Request[Any, Any, Any]) -> Response[bytes]:
        try:
            body = await request.body()
        except HTTPException as exc:  # too large, a bad Content-Length, or the client left mid-body
            if exc.status_code == 413:
                status, payload = svc._refuse("payload_too_large", too_large)
            else:
                status, payload = svc._refuse("malformed_body", "The body could not be read in full.")
            return Response(content=payload, status_code=status, media_type=MediaType.JSON)
        return await receive_notification(svc, body)

    @get("/health", sync_to_thread=False)
    def health() -> dict[str, str]:
        return {"status": "alive"}

    @get("/ready", sync_to_thread=False)
    def ready() -> Response[bytes]:
        ok, why = svc.ready()
        snap = svc.runtime.snapshot
        body = {
            "ready": ok,
            "detail": why,
            "model_version": snap.model.version if snap and snap.model else None,
            "catalog_sha256": snap.catalog.sha256 if snap else None,
            # the shared replay store's state; its failures do not make the worker unready (docs/security.md)
            "replay_store": svc.replay.status() if svc.replay is not None else {"shared": False},
        }
        if svc.fleet is not None:
            st = svc.decision_log.stats()
            body["database"] = {
                "decisions": "written" if st["database_up"] else "spilled",
                "spilled_records": st["spilled"],
                "dropped": st["dropped"],
                "rejected": st["rejected"],  # refused by PostgreSQL for their values, kept in pg-rejected-*.bin
                "fleet_state": "ok" if svc.fleet.ok else f"stale: {svc.fleet.last_error}",
                "kill_switch": svc.fleet.kill_switch,
            }
        return Response(content=_encode(body), status_code=200 if ok else 503, media_type=MediaType.JSON)

    @get("/metrics", sync_to_thread=False)
    def metrics() -> Response[bytes]:
        content, ctype = svc.metrics.render()
        return Response(content=content, status_code=200, media_type=ctype)

    def on_api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
        refusals.note(exc.code, exc.detail)
        return _error_response(exc.code, exc.detail)

    def on_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        if exc.status_code == 413:
            return _error_response("payload_too_large", too_large)
        if exc.status_code in (404, 405):
            code = "not_found" if exc.status_code == 404 else "method_not_allowed"
            return _error_response(code, str(exc.detail))
        if exc.status_code >= 500:  # the framework's own 5xx: the same stable answer as any unforeseen fault
            log.error("HTTP %d raised by the framework: %s", exc.status_code, exc.detail)
            return _error_response("internal_error", _INTERNAL_DETAIL)
        return Response(
            content=_encode({"error": "http_error", "detail": str(exc.detail)}),
            status_code=exc.status_code,
            media_type=MediaType.JSON,
        )

    def on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        # A fault nobody foresaw: its traceback is what the operator needs. The caller gets a 503 with a
        # stable code (Apple shows its default message, or retries a notification later), never a 500.
        log.exception("unexpected error", exc_info=exc)
        return _error_response("internal_error", _INTERNAL_DETAIL)

    routes = {settings.message_path, settings.notifications_path, "/health", "/ready", "/metrics"}

    async def count_5xx(message: Any, scope: Any) -> None:
        # every answer the app sends passes here, whoever built it (our routes, the handlers above, the framework)
        if message["type"] == "http.response.start" and message["status"] >= 500:
            path = scope.get("path")
            svc.metrics.http_5xx(path if path in routes else "other", message["status"])

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        svc.start()
        # everything loaded so far lives as long as the process: keep it out of the cyclic GC's scans
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            svc.stop()

    app = Litestar(
        route_handlers=[retention_message, notifications, health, ready, metrics],
        request_max_body_size=settings.max_body_bytes,
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected},
        before_send=[count_5xx],
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,  # Litestar's lines go through the server's one format (serving/stderr_log.py)
        debug=False,
    )
    app.state.service = svc
    return app

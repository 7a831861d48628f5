"""The replay memory: in-process, the SQLite store the host's workers share, and the layer that fails open."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from serving.app import create_app
from serving.replay import REPLAY_FILE, InProcessReplayMemory, LayeredReplayMemory, SQLiteReplayMemory
from serving.testpki import TestPKI
from tests.conftest import APP_ID

RID = "6f1c6c3e-2b7a-4d3e-9a51-0c1d2e3f4a5b"


def test_two_processes_opening_one_file_answer_an_id_once_and_keep_it_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / REPLAY_FILE
    worker_a, worker_b = SQLiteReplayMemory(path), SQLiteReplayMemory(path)  # two workers' connections
    now = time.time()
    assert worker_a.remember(RID, now + 360, now) is True
    assert worker_b.remember(RID, now + 360, now + 1) is False
    assert worker_a.remember(RID, now + 360, now + 2) is False
    worker_a.close()
    worker_b.close()
    restarted = SQLiteReplayMemory(path)
    assert restarted.remember(RID, now + 363, now + 3) is False
    assert restarted.remember(RID.replace("6f", "70"), now + 363, now + 3) is True
    restarted.close()


def test_the_store_forgets_an_id_after_its_expiry_and_deletes_expired_rows(tmp_path: Path) -> None:
    store = SQLiteReplayMemory(tmp_path / REPLAY_FILE)
    now = 1_800_000_000.0
    for i in range(100):
        assert store.remember(f"{i:08x}-0000-4000-8000-000000000000", now + 360, now)
    assert len(store) == 100
    assert store.remember(RID, now + 370, now + 10)
    # 360 s on, the first 100 ids are past their expiry: accepted again, and the others swept away
    later = now + 361
    assert store.remember("00000000-0000-4000-8000-000000000000", later + 360, later) is True
    assert store.remember(RID, later + 360, later) is False  # still within its own window
    assert len(store) == 2  # bounded by the freshness window
    store.close()


def test_the_layer_answers_on_the_in_process_memory_when_the_store_fails_and_says_so() -> None:
    class BrokenStore(InProcessReplayMemory):
        def remember(self, request_id: str, expires_at: float, now: float) -> bool:
            raise sqlite3.OperationalError("disk I/O error")

    errors: list[BaseException] = []
    layer = LayeredReplayMemory(BrokenStore, on_error=errors.append)
    now = time.time()
    assert layer.remember(RID, now + 360, now) is True  # answered (the documented policy), counted
    assert layer.remember(RID, now + 360, now + 1) is False  # this worker still refuses the replay
    assert len(errors) == 1
    status = layer.status()
    assert status["ok"] is False and status["errors"] == 1 and "disk I/O error" in str(status["last_error"])


def test_ids_answered_while_the_store_failed_are_written_to_it_when_it_answers_again(tmp_path: Path) -> None:
    """Another worker (or replica) must refuse them for the rest of their window, not answer them again."""
    path = tmp_path / REPLAY_FILE

    class FlakyStore(SQLiteReplayMemory):
        down = False

        def remember_many(self, items: Any) -> list[bool]:
            if FlakyStore.down:
                raise OSError("the shared store does not answer")
            return super().remember_many(items)

        def remember(self, request_id: str, expires_at: float, now: float) -> bool:
            if FlakyStore.down:
                raise OSError("the shared store does not answer")
            return super().remember(request_id, expires_at, now)

    worker_a = LayeredReplayMemory(lambda: FlakyStore(path))
    worker_b = LayeredReplayMemory(lambda: SQLiteReplayMemory(path))
    now = time.time()
    FlakyStore.down = True
    outage = [f"{i:08x}-0000-4000-8000-00000000000a" for i in range(5)]
    assert all(worker_a.remember_shared_many([(rid, now + 360, now)]) == [True] for rid in outage)
    assert worker_a.status()["ok"] is False
    FlakyStore.down = False
    assert worker_a.remember_shared(RID, now + 360, now + 1) is True  # the store answers again: write-back
    assert worker_a.status()["ok"] is True
    for rid in outage:  # the other worker now refuses what worker A answered during the outage
        assert worker_b.remember(rid, now + 360, now + 2) is False
    worker_a.close()
    worker_b.close()


def test_the_layer_runs_on_its_own_memory_when_the_store_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / REPLAY_FILE).mkdir()  # a folder where the file should be: SQLite cannot open it
    layer = LayeredReplayMemory(lambda: SQLiteReplayMemory(tmp_path / REPLAY_FILE))
    now = time.time()
    assert layer.remember(RID, now + 360, now) is True and layer.remember(RID, now + 360, now) is False
    assert layer.status()["shared"] is False and layer.status()["ok"] is False and layer.errors == 1


def _client(make_settings: Any, **overrides: Any) -> TestClient[Any]:
    return TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)


def test_two_apps_on_one_data_folder_answer_a_body_once_and_again_after_a_restart(make_settings: Any, pki: Any) -> None:
    body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")
    headers = {"content-type": "application/json"}
    with _client(make_settings) as a, _client(make_settings) as b:  # two workers of one host
        assert a.post("/retention/message", content=body, headers=headers).status_code == 200
        r = b.post("/retention/message", content=body, headers=headers)
        assert r.status_code == 409 and r.json()["error"] == "replayed_request"
        assert a.get("/ready").json()["replay_store"] == {"shared": True, "ok": True, "errors": 0, "last_error": None}
    with _client(make_settings) as restarted:
        r = restarted.post("/retention/message", content=body, headers=headers)
        assert r.status_code == 409 and r.json()["error"] == "replayed_request"


def test_a_replay_store_that_cannot_write_is_answered_counted_and_shown_on_ready(make_settings: Any, pki: TestPKI) -> None:
    settings = make_settings()
    headers = {"content-type": "application/json"}
    body = pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox")
    with _client(make_settings) as c:
        # another process holds the store's write lock past the worker's wait (100 ms): its write fails
        holder = sqlite3.connect(Path(settings.data_dir) / REPLAY_FILE, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            r = c.post("/retention/message", content=body, headers=headers)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert r.status_code == 200  # answered: the documented policy
        ready = c.get("/ready").json()
        assert ready["ready"] is True
        assert ready["replay_store"]["ok"] is False and ready["replay_store"]["errors"] == 1
        assert "locked" in ready["replay_store"]["last_error"]
        assert "retention_replay_store_errors_total 1.0" in c.get("/metrics").text
        r = c.post("/retention/message", content=body, headers=headers)
        assert r.status_code == 409  # this worker's own memory still refuses the replay
        c.post("/retention/message", content=pki.signed_request_body(app_apple_id=APP_ID, environment="Sandbox"),
               headers=headers)
        assert c.get("/ready").json()["replay_store"]["ok"] is True  # the store answers again


def test_a_batch_is_one_transaction_that_answers_each_id(tmp_path: Path) -> None:
    store = SQLiteReplayMemory(tmp_path / REPLAY_FILE)
    now = time.time()
    assert store.remember(RID, now + 360, now)
    other = RID.replace("6f", "71")
    assert store.remember_many([(other, now + 360, now), (RID, now + 360, now), (other.upper(), now + 360, now)]) == [
        True, False, True]
    assert SQLiteReplayMemory(tmp_path / REPLAY_FILE).remember_many([(other, now + 361, now + 1)]) == [False]
    store.close()


def test_requests_verified_in_one_loop_turn_share_one_write_and_each_gets_its_own_answer(tmp_path: Path) -> None:
    import asyncio

    from serving.verify import RequestVerifier
    from tests.conftest import off_loop

    pki = TestPKI.mint()
    batches: list[int] = []

    class CountingStore(SQLiteReplayMemory):
        def remember_many(self, items: Any) -> list[bool]:
            batches.append(len(items))
            return super().remember_many(items)

    def verifier() -> RequestVerifier:
        layer = LayeredReplayMemory(lambda: CountingStore(tmp_path / REPLAY_FILE))
        return RequestVerifier([pki.root_cert], app_apple_id=APP_ID, environment="Sandbox", replay=layer)

    tokens = [pki.signed_request(app_apple_id=APP_ID, environment="Sandbox") for _ in range(12)]
    worker_a, worker_b = verifier(), verifier()

    async def main(off: Any) -> tuple[list[str], list[str]]:
        async def send(v: RequestVerifier, token: str) -> str:
            try:
                await v.verify_async(token, off)
            except Exception as exc:
                return getattr(exc, "code", repr(exc))
            return "ok"

        first = await asyncio.gather(*(send(worker_a, t) for t in tokens))
        again = await asyncio.gather(*(send(worker_b, t) for t in tokens))  # the other worker, same bodies
        return list(first), list(again)

    with off_loop() as off:
        first, again = asyncio.run(main(off))
    assert first == ["ok"] * 12 and again == ["replayed_request"] * 12
    assert sum(batches) == 24 and max(batches) > 1  # fewer transactions than requests

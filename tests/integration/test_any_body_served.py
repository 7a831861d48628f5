"""No body gets a 5xx from a real ``retention serve`` (uvicorn, httptools) either: a smaller run of the
property-based test of ``tests/unit/test_any_body.py`` over HTTP, then the server is alive and sent no 5xx."""

from __future__ import annotations

import re

import httpx
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from serving.testpki import TestPKI
from tests.integration.test_server import Server, server, server_env  # noqa: F401  (fixtures)
from tests.unit.test_any_body import (
    _SUPPRESSED,
    ROUTES,
    _dumps,
    check_answer,
    json_values,
    raw_json_bodies,
    signed_bodies,
    variants,
)


def _bodies(pki: TestPKI) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), json_values.map(_dumps), raw_json_bodies(),
                     signed_bodies(pki, TestPKI.mint()))


def test_generated_bodies_over_http_get_no_5xx(server: Server, pki: TestPKI) -> None:  # noqa: F811
    seen: dict[str, int] = {}
    sent: list[int] = []
    with httpx.Client(base_url=server.base, timeout=10) as http:

        @hsettings(max_examples=200, deadline=None, database=None, print_blob=True, suppress_health_check=_SUPPRESSED)
        @example(body=b'{"signedPayload":"\xff"}', cut=0, at=0, byte=0xFF)  # issue 11's body, every run
        @given(body=_bodies(pki), cut=st.integers(0, 2**20), at=st.integers(0, 2**20), byte=st.integers(0, 255))
        def each(body: bytes, cut: int, at: int, byte: int) -> None:
            for b in variants(body, cut, at, byte):
                for route in ROUTES:
                    r = http.post(route, content=b, headers={"content-type": "application/json"})
                    code = check_answer(route, r.status_code, r.content)
                    seen[code] = seen.get(code, 0) + 1
                sent.append(1)

        each()
        assert len(sent) >= 600 and seen.get("malformed_body", 0) > 0
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
        assert not re.search(r"^retention_http_5xx_total\{.*\} [1-9]", metrics, re.M), metrics
    assert server.proc.poll() is None  # still serving

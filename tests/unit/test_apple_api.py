"""serving.apple_api: Apple's client reaches the URL RETENTION_APPLE_API_URL names, and a 429 carries Apple's wait."""

from __future__ import annotations

import uuid

import pytest
from appstoreserverlibrary.api_client import APIError, APIException
from appstoreserverlibrary.models.PerformanceTestRequest import PerformanceTestRequest
from appstoreserverlibrary.models.RealtimeUrlRequest import RealtimeUrlRequest

from serving.apple_api import AppleSetupError, RateLimited, make_client, retry_after_seconds, set_base_url
from tests.conftest import AppleFixture


def test_the_override_takes_effect_with_the_pinned_library(apple):
    # built from the environment only, as every verb builds it: the call must land on the loopback server
    client = make_client(apple.key_file, apple.KEY_ID, apple.ISSUER_ID, apple.BUNDLE_ID, "Sandbox")
    assert client.get_message_list().messageIdentifiers == []
    assert apple.server.log == [("GET", "/inApps/v1/messaging/message/list", 200)]


def test_without_the_setting_the_client_talks_to_apple(apple, monkeypatch):
    monkeypatch.delenv("RETENTION_APPLE_API_URL")
    assert make_client(apple.key_file, "K", "i", "b", "Production")._get_full_url("/x") == "https://api.storekit.apple.com/x"
    assert make_client(apple.key_file, "K", "i", "b", "Sandbox")._get_full_url("/x") == "https://api.storekit-sandbox.apple.com/x"


def test_a_bad_url_or_environment_is_one_sentence(apple):
    with pytest.raises(AppleSetupError, match="RETENTION_APPLE_API_URL must be an http"):
        make_client(apple.key_file, "K", "i", "b", "Sandbox", base_url="api.example.com")
    with pytest.raises(AppleSetupError, match="Sandbox or Production"):
        make_client(apple.key_file, "K", "i", "b", "Xcode")


def test_the_server_checks_the_token_as_apple_does(apple, tmp_path):
    (tmp_path / "other").mkdir()
    other = AppleFixture(tmp_path / "other")  # another key: Apple answers 401
    try:
        wrong_key = make_client(other.key_file, apple.KEY_ID, apple.ISSUER_ID, apple.BUNDLE_ID, "Sandbox")
        wrong_bid = make_client(apple.key_file, apple.KEY_ID, apple.ISSUER_ID, "com.example.other", "Sandbox")
        wrong_kid = make_client(apple.key_file, "OTHERKEY", apple.ISSUER_ID, apple.BUNDLE_ID, "Sandbox")
        for client in (wrong_key, wrong_bid, wrong_kid):
            with pytest.raises(APIException) as info:
                client.get_image_list()
            assert info.value.http_status_code == 401
        assert apple.client().get_image_list().imageIdentifiers == []
    finally:
        other.server.stop()


def test_a_429_carries_the_wait_apple_asked_for(apple):
    apple.server.throttle(1, retry_after_ms=30_000)
    with pytest.raises(RateLimited) as info:
        apple.client().get_message_list()
    assert info.value.api_error == APIError.RATE_LIMIT_EXCEEDED
    assert 25 <= (info.value.retry_after_s or 0) <= 30


def test_retry_after_forms():
    assert retry_after_seconds("1700000030000", now=1_700_000_000.0) == pytest.approx(30.0)
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds("Tue, 14 Nov 2023 22:13:50 GMT", now=1_700_000_000.0) == pytest.approx(30.0)
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_apples_documented_refusals_reach_the_caller_as_apples_codes(apple):
    client = apple.client()
    with pytest.raises(APIException) as info:
        client.configure_realtime_url(RealtimeUrlRequest(realtimeURL="http://insecure.example.com/x"))
    assert info.value.api_error == APIError.BAD_REQUEST_REALTIME_URL
    with pytest.raises(APIException) as info:
        client.delete_message(uuid.uuid4())
    assert info.value.api_error == APIError.MESSAGE_NOT_FOUND
    with pytest.raises(APIException) as info:
        client.initiate_performance_test(PerformanceTestRequest(originalTransactionId="1000000000000001"))
    assert info.value.api_error == APIError.REALTIME_URL_NOT_FOUND


def test_set_base_url_strips_the_slash(apple):
    client = apple.client()
    set_base_url(client, apple.server.base_url + "/")
    assert client._get_full_url("/inApps") == apple.server.base_url + "/inApps"

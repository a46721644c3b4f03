"""Every endpoint but the health checks needs a valid key; every error has the one envelope."""

import pytest

from tests.api.conftest import api_settings, in_process, make_record

ENDPOINTS = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/metrics"),
    ("GET", "/v1/jobs/{id}/checkpoints"),
    ("GET", "/v1/jobs/{id}/logs"),
    ("GET", "/v1/jobs/{id}/trajectories"),
    ("GET", "/v1/jobs/{id}/checkpoints/ckpt-0123456789abcdef01234567-2/content"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/file-0123456789abcdef01234567"),
    ("GET", "/v1/files/file-0123456789abcdef01234567/content"),
    ("DELETE", "/v1/files/file-0123456789abcdef01234567"),
    ("GET", "/v1/models"),
    ("GET", "/v1/reward_functions"),
    ("GET", "/v1/environments"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]


def assert_envelope(r, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "code", "message", "param"}
    assert err["message"]
    if code:
        assert err["code"] == code
    assert r.headers["x-request-id"]
    return err


@pytest.mark.parametrize("method,path", ENDPOINTS)
@pytest.mark.parametrize("key", [None, "rlhf-wrong-key"])
def test_no_or_wrong_key_is_401(api, redis_url, method, path, key):
    job_id = make_record(redis_url, "nobody")  # a tenant of its own: these records stay queued a while
    with api.client(key) as c:
        r = c.request(method, path.format(id=job_id), json={} if method == "POST" else None)
    err = assert_envelope(r, 401, "missing_api_key" if key is None else "invalid_api_key")
    assert err["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_key(redis_url, keys, operator, ray_head):
    # /readyz asks Ray too: an API in this process on the session's Ray head.
    with in_process(api_settings(redis_url, keys["path"], operator, ray=ray_head)) as api, api.client(None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"redis": "ok", "ray": "ok"}


def test_request_id_on_every_response(alpha):
    r = alpha.get("/v1/jobs", headers={"X-Request-ID": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    r = alpha.get("/no/such/route")
    assert_envelope(r, 404)
    assert r.headers["x-request-id"].startswith("req_")


def test_prometheus_metrics(alpha):
    alpha.get("/v1/jobs")
    text = alpha.get("/metrics").text
    assert 'rlhf_api_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert "rlhf_api_request_seconds_bucket" in text
    assert 'rlhf_jobs{status="queued"}' in text

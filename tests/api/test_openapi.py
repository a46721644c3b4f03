"""/openapi.json documents every endpoint with examples, and a schemathesis run against the live
API finds no 5xx and no response that breaks the schema."""

import subprocess

import pytest

from tests.api.conftest import ApiServer, api_env, free_port

OPERATIONS = {
    ("/v1/jobs", "post"), ("/v1/jobs", "get"), ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}/cancel", "post"),
    ("/v1/jobs/{job_id}/events", "get"), ("/v1/jobs/{job_id}/metrics", "get"), ("/v1/jobs/{job_id}/checkpoints", "get"),
    ("/v1/jobs/{job_id}/logs", "get"), ("/v1/jobs/{job_id}/trajectories", "get"), ("/v1/jobs/{job_id}/checkpoints/{checkpoint}/content", "get"),
    ("/v1/files", "post"), ("/v1/files", "get"), ("/v1/files/{file_id}", "get"), ("/v1/files/{file_id}", "delete"),
    ("/v1/files/{file_id}/content", "get"), ("/v1/models", "get"), ("/v1/reward_functions", "get"), ("/v1/environments", "get"),
    ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"),
}


def _has_example(node, schemas, seen=()) -> bool:
    if isinstance(node, dict):
        if "example" in node or "examples" in node:
            return True
        ref = node.get("$ref")
        if ref and ref not in seen:
            return _has_example(schemas[ref.rsplit("/", 1)[-1]], schemas, (*seen, ref))
        return any(_has_example(v, schemas, seen) for v in node.values())
    if isinstance(node, list):
        return any(_has_example(v, schemas, seen) for v in node)
    return False


def test_openapi_documents_every_endpoint(alpha):
    doc = alpha.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    found = {(path, m) for path, ops in doc["paths"].items() for m in ops}
    assert found == OPERATIONS
    for path, method in OPERATIONS:
        op = doc["paths"][path][method]
        assert op.get("summary"), (path, method)
        ok = op["responses"].get("200") or op["responses"].get("201")
        assert _has_example(ok, schemas), f"{method.upper()} {path}: no response example"
        if path not in ("/healthz", "/readyz"):
            assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
            assert op.get("security"), f"{method.upper()} {path} is not marked as needing a key"
    assert _has_example(doc["paths"]["/v1/jobs"]["post"]["requestBody"], schemas)
    assert "multipart/form-data" in doc["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert "text/event-stream" in doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_or_schema_break(redis_url, ray_head, keys, workdir, operator):
    # A separate API whose tenant may run one job at a time: fuzzed specs that happen to validate
    # start at most one (cheap, failing) Ray job at once.
    port = free_port()
    server = ApiServer(api_env(redis_url, ray_head, keys["path"], port, operator, RLHF_API_MAX_ACTIVE_JOBS_PER_TENANT="1",
                                      RLHF_API_REQUESTS_PER_MINUTE="100000"), port, workdir / "api-fuzz.log")
    server.start()
    try:
        with server.client(keys["pager"]) as c:
            schema = workdir / "openapi.json"
            schema.write_text(c.get("/openapi.json").text)
        # A fixed budget: 10 fuzzed examples per operation (no --max-time: under it the fuzzing phase
        # draws new cases until the time is spent, however many that is on this machine).
        cmd = [
            "schemathesis", "run", str(schema), "--url", server.url, "-H", f"Authorization: Bearer {keys['pager']}",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
            "--phases", "examples,coverage,fuzzing", "--max-examples", "10", "--seed", "7", "--workers", "1",
            "--request-timeout", "20", "--warnings", "off",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        (workdir / "schemathesis.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    finally:
        server.stop()

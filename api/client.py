"""A small synchronous client of the REST API (what `rlhf jobs ...` uses)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import httpx


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status, self.code = status, err.get("code", "http_error")
        param = f" (param: {err['param']})" if err.get("param") else ""
        super().__init__(f"HTTP {status} {self.code}: {err.get('message', body)}{param}")


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0):
        self.base_url = (base_url or os.environ.get("RLHF_API_URL") or "http://127.0.0.1:8000").rstrip("/")
        key = api_key or os.environ.get("RLHF_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _json(self, r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise ApiError(r.status_code, body)
        return body

    def submit(self, spec: dict, metadata: dict | None = None, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/jobs", json={**spec, **({"metadata": metadata} if metadata else {})}, headers=headers))

    def upload(self, path: str | Path, purpose: str) -> dict:
        with open(path, "rb") as f:
            return self._json(self.http.post("/v1/files", files={"file": (Path(path).name, f)}, data={"purpose": purpose}, timeout=600))

    def list(self, limit: int = 20, after: str | None = None, status: str | None = None) -> dict:
        params = {k: v for k, v in {"limit": limit, "after": after, "status": status}.items() if v is not None}
        return self._json(self.http.get("/v1/jobs", params=params))

    def get(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def stream(self, job_id: str, kind: str, deadline_s: float = 7 * 24 * 3600, reconnects: int = 30) -> Iterator[dict]:
        """Follow `/events` or `/metrics` over SSE until the job ends, reconnecting with
        Last-Event-ID when the connection drops (an API restart loses nothing)."""
        last: str | None = None
        deadline = time.monotonic() + deadline_s
        tries = 0
        while time.monotonic() < deadline:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/{kind}", headers=headers, timeout=httpx.Timeout(30.0, read=60.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._json(r)
                    tries = 0
                    for item in parse_sse(r.iter_lines()):
                        if item.get("event") == "end":
                            return
                        if item.get("id"):
                            last = item["id"]
                        yield json.loads(item["data"])
            except (httpx.TransportError, httpx.RemoteProtocolError):
                tries += 1
                if tries > reconnects:
                    raise
                time.sleep(min(5.0, 0.5 * tries))
        raise TimeoutError(f"job {job_id} did not end within {deadline_s:.0f} s")


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events as {event, id, data} dicts (comments and pings skipped)."""
    item: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in item:
                yield item
            item = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            item["data"] = item["data"] + "\n" + value if "data" in item else value
        elif field in ("event", "id"):
            item[field] = value


# The upload purpose of each kind of data an algorithm reads (orchestrator/core/algorithms.py).
_PURPOSE = {"prompts": "train", "sft": "sft", "preference": "preference"}


def rest_spec(spec: dict, client: Client, model: str | None = None, say=lambda msg: None) -> dict:
    """A spec written for `rlhf train` made fit for REST: local data files uploaded and named by id,
    `model.path` set to a registry model (or checkpoint id) when given, and the locations the server
    chooses (`output_dir`, `checkpoint.dir`) left out. What is already an id or a name is kept."""
    from orchestrator.core.algorithms import ALGORITHMS

    spec = json.loads(json.dumps(spec))
    for key, where in (("output_dir", spec), ("dir", spec.get("checkpoint") or {})):
        if where.pop(key, None) is not None:
            say(f"{'output_dir' if key == 'output_dir' else 'checkpoint.dir'}: the server chooses where a job writes; left out")
    if model:
        spec.setdefault("model", {})["path"] = model
    uploaded: dict[tuple[str, str], str] = {}
    algorithm = (spec.get("algorithm") or {}).get("name", "grpo")

    def upload_data(data: dict | None, algo_name: str, where: str) -> None:
        algo = ALGORITHMS.get(algo_name)
        for field, kind in (("train_file", algo.data if algo else "prompts"), ("eval_file", algo.eval_data if algo else "prompts")):
            value = (data or {}).get(field)
            if not isinstance(value, str) or value.startswith("file-") or not Path(value).is_file():
                continue
            purpose = "eval" if field == "eval_file" and kind == "prompts" else _PURPOSE[kind]
            if (value, purpose) not in uploaded:
                uploaded[value, purpose] = client.upload(value, purpose)["id"]
                say(f"{where}.{field}: uploaded {value} as {uploaded[value, purpose]}")
            data[field] = uploaded[value, purpose]

    upload_data(spec.get("data"), algorithm, "data")
    for i, stage in enumerate(spec.get("stages") or []):
        upload_data(stage.get("data"), (stage.get("algorithm") or {}).get("name", algorithm), f"stages.{i}.data")
        if (stage.get("checkpoint") or {}).pop("dir", None) is not None:
            say(f"stages.{i}.checkpoint.dir: the server chooses where a job writes; left out")
    return spec

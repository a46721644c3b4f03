"""GET /v1/jobs/{id}/trajectories: a multi-turn job's sample episodes from its run directory, the newest
last, without token ids, with server paths redacted, only for the job's own tenant."""

from __future__ import annotations

import json
from pathlib import Path

from api.storage import ArtifactStore
from tests.api.conftest import make_record
from tests.api.test_auth import assert_envelope


def episode(step: int, sample: int, answer: str) -> dict:
    return {"step": step, "sample": sample, "ids": list(range(300)), "mask": [1] * 300, "logprobs": [-0.5] * 300, "prompt_len": 40,
            "turns": 2, "reward": float(answer == "10542"), "rewards": [0.0, float(answer == "10542")], "tool_calls": 1,
            "invalid_calls": 0, "tool_errors": 0, "truncated": False, "final": answer,
            "messages": [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "753*14"},
                         {"role": "assistant", "content": "<tool_call>{\"name\": \"calculator\"}</tool_call>"},
                         {"role": "tool", "name": "calculator", "content": "10542"}, {"role": "assistant", "content": answer}]}


def test_a_jobs_newest_episodes_for_its_tenant_only(alpha, beta, redis_url, operator):
    job = make_record(redis_url, "alpha", name="agent")
    store = ArtifactStore(operator["RLHF_API_STORAGE_ROOT"])
    run = store.run_path("alpha", job)
    assert alpha.get(f"/v1/jobs/{job}/trajectories").json()["data"] == []  # before the first step: nothing yet

    records = [episode(step, sample, answer) for step in (1, 2, 3) for sample, answer in ((0, "10542"), (1, "99"))]
    records[-1]["messages"][-1]["content"] = f"see {run}/checkpoints/step_000003"  # a server path in a model's text
    Path(run).mkdir(parents=True, exist_ok=True)
    Path(run, "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "sam')  # (one being written)

    got = alpha.get(f"/v1/jobs/{job}/trajectories", params={"limit": 3}).json()["data"]
    assert [(t["step"], t["sample"]) for t in got] == [(2, 1), (3, 0), (3, 1)]  # the newest, oldest first
    assert got[1]["reward"] == 1.0 and got[1]["rewards"] == [0.0, 1.0] and got[1]["turns"] == 2 and got[1]["tool_calls"] == 1
    assert [m["role"] for m in got[1]["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert got[1]["messages"][3] == {"role": "tool", "content": "10542", "name": "calculator"}
    assert not any(k in t for t in got for k in ("ids", "mask", "logprobs"))
    assert got[2]["messages"][-1]["content"] == f"see runs/{job}/checkpoints/step_000003"  # where the store is, is not shown
    assert len(alpha.get(f"/v1/jobs/{job}/trajectories").json()["data"]) == 6

    assert_envelope(beta.get(f"/v1/jobs/{job}/trajectories"), 404, "job_not_found")
    assert_envelope(alpha.get(f"/v1/jobs/{job}/trajectories", params={"limit": 0}), 422)

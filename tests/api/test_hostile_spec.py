"""What a hostile tenant's spec can make the service do, against the real API, Redis and Ray head.

1. Every model a job loads carries its own trust decision, from the registry entry of that model
   alone: naming a policy whose entry allows remote code does not let a reward model (or critic,
   rm, a stage's reward model, a checkpoint) run its repository's code. The model here that would
   run code has a `config.json` whose `auto_map` names `evil.py`, which creates a marker file when
   it is imported: the marker shows whether its code ever ran.
2. A spec cannot make the API work for long: list lengths are bounded before any validation, and
   validation runs off the event loop, so another tenant's requests are answered meanwhile.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import redis
import yaml

from api.auth import add_key
from orchestrator.core.records import control_key, job_key
from tests.api.conftest import (
    ARITHMETIC,
    ApiServer,
    api_env,
    free_port,
    make_record,
    upload,
    wait_until,
)

EVIL_CODE = """import pathlib
pathlib.Path({marker!r}).touch()  # what a model repository's code could do, as the reward actor's user
from transformers import Qwen2Config as EvilConfig, Qwen2ForSequenceClassification as EvilModel  # noqa: F401
"""


def evil_model(tiny_model, where, marker):
    """The tiny model with repository code of its own: loaded with trust_remote_code, it creates `marker`;
    without, transformers' own Qwen2 classes load it (model_type qwen2) and nothing of it runs."""
    shutil.copytree(tiny_model, where)
    config = json.loads((where / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}
    (where / "config.json").write_text(json.dumps(config))
    (where / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return where


@pytest.fixture(scope="module")
def marker(workdir):
    path = workdir / "remote-code-ran"
    assert not path.exists()
    return path


@pytest.fixture(scope="module")
def evil(workdir, tiny_model, marker):
    return evil_model(tiny_model, workdir / "evil-model", marker)


@pytest.fixture(scope="module")
def hostile_keys(workdir):
    """Tenants of this module's servers: mallory (hostile; its jobs are never admitted), carol (another
    tenant) and runner (runs one real job)."""
    path = workdir / "keys-hostile.yaml"
    return {"path": path, **{t: add_key(path, t) for t in ("mallory", "carol", "runner")}}


def hostile_server(redis_url, ray_head, hostile_keys, workdir, operator, registry: dict, name: str, **extra: str) -> ApiServer:
    path = workdir / f"registry-{name}.yaml"
    path.write_text(yaml.safe_dump(registry))
    port = free_port()
    env = api_env(redis_url, ray_head, hostile_keys["path"], port, {**operator, "RLHF_API_REGISTRY_FILE": str(path)},
                  RLHF_API_QUOTAS=json.dumps({"mallory": {"cpus": 0.01}}), **extra)  # mallory's jobs stay queued
    return ApiServer(env, port, workdir / f"api-{name}.log")


@pytest.fixture(scope="module")
def trust_api(redis_url, ray_head, hostile_keys, workdir, operator, tiny_model, evil):
    """The default limits, and a registry with two models: `trusting` may run its code, `evil` may not."""
    registry = {"models": {"trusting": {"path": str(tiny_model), "trust_remote_code": True}, "evil": {"path": str(evil)}}}
    server = hostile_server(redis_url, ray_head, hostile_keys, workdir, operator, registry, "trust")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def files(trust_api, hostile_keys):
    out = {}
    for tenant in ("mallory", "runner"):
        with trust_api.client(hostile_keys[tenant]) as c:
            r = upload(c, ARITHMETIC)
            assert r.status_code == 201, r.text
            out[tenant] = r.json()["id"]
    return out


def trusting_body(train_file: str, name: str = "trust", **extra) -> dict:
    """A tiny GRPO job on the policy whose entry allows remote code, asking for it, scored by the `evil` model."""
    return {
        "name": name,
        "model": {"path": "trusting", "trust_remote_code": True},
        "data": {"train_file": train_file, "max_prompt_length": 16},
        "rollout": {"n": 2, "max_new_tokens": 4},
        "rewards": [{"model": "evil"}],
        "optim": {"steps": 1, "prompts_per_step": 2},
        "resources": {"torch_threads": 1},
        **extra,
    }


def reward_checkpoint(redis_url, workdir, tenant: str) -> str:
    """A job record of the tenant's with a checkpoint that holds a reward model, in its storage area; its id."""
    job_id = make_record(redis_url, tenant, "rm")
    path = workdir / "artifacts" / "tenants" / tenant / "runs" / job_id / "checkpoints" / "step_000002"
    (path / "reward_model").mkdir(parents=True, exist_ok=True)
    entry = {"step": 2, "path": str(path), "created_at": 1.0, "bytes": 2}
    redis.Redis.from_url(redis_url).hset(job_key(job_id), "checkpoints", json.dumps([entry]))
    return f"ckpt-{job_id.removeprefix('job-')}-2"


def test_a_trusted_policy_lends_its_trust_to_no_other_model(trust_api, hostile_keys, files, marker, redis_url, workdir):
    own_rm = reward_checkpoint(redis_url, workdir, "mallory")

    def reward(**source):
        return {"rewards": [source]}

    cases = [
        # (case, change to the body, the field the refusal names, what its message must name)
        ("reward model, policy's flag", {}, "model.trust_remote_code", "rewards.0.model"),
        ("reward model, its own flag", reward(model="evil", trust_remote_code=True), "rewards.0.trust_remote_code", "'evil'"),
        ("own checkpoint as reward model", reward(model=own_rm), "model.trust_remote_code", "rewards.0.model"),
        ("own checkpoint, its own flag", reward(model=own_rm, trust_remote_code=True), "rewards.0.trust_remote_code", own_rm),
        ("a stage's reward model", {"rewards": [{"function": "accuracy"}], "stages": [{"name": "a", "rewards": [{"model": "evil"}]}]},
         "model.trust_remote_code",
         "stages.0.rewards.0.model"),
        ("critic", {"algorithm": {"name": "ppo"}, "rewards": [{"function": "accuracy"}]}, None, None),
        ("critic_path", {"algorithm": {"name": "ppo"}, "rewards": [{"function": "accuracy"}], "model": {
            "path": "trusting", "trust_remote_code": True, "critic_path": "evil"}}, "model.trust_remote_code", "model.critic_path"),
        ("critic_path, its own flag", {"algorithm": {"name": "ppo"}, "rewards": [{"function": "accuracy"}], "model": {
            "path": "trusting", "trust_remote_code": True, "critic_path": "evil", "critic_trust_remote_code": True}},
         "model.critic_trust_remote_code", "'evil'"),
        ("rm_path", {"algorithm": {"name": "rm"}, "rewards": [], "model": {"path": "trusting", "trust_remote_code": True,
                                                                           "rm_path": "evil"}}, "model.trust_remote_code", "model.rm_path"),
    ]
    with trust_api.client(hostile_keys["mallory"]) as c:
        for case, change, param, named in cases:
            r = c.post("/v1/jobs", json={**trusting_body(files["mallory"]), **change})
            if param is None:  # (the critic is the policy's model: its trust is the policy's)
                assert r.status_code == 201, f"{case}: {r.text}"
                c.post(f"/v1/jobs/{r.json()['id']}/cancel")
                continue
            assert r.status_code == 422, f"{case}: {r.status_code} {r.text[:400]}"
            err = r.json()["error"]
            assert err["param"] == param, f"{case}: {err}"
            assert named in err["message"], f"{case}: {err['message']}"
    assert not marker.exists()


def test_the_launch_spec_carries_each_models_own_trust(trust_api, hostile_keys, files, redis_url):
    body = trusting_body(files["mallory"], rewards=[{"model": "evil", "trust_remote_code": False}, {"function": "accuracy"}],
                         stages=[{"name": "a"}, {"name": "b", "rewards": [{"model": "evil", "trust_remote_code": False}]}])
    with trust_api.client(hostile_keys["mallory"]) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        launch = json.loads(redis.Redis.from_url(redis_url).hget(control_key(job_id), "launch_spec"))
        c.post(f"/v1/jobs/{job_id}/cancel")
    assert launch["model"]["trust_remote_code"] is True
    assert [s.get("trust_remote_code") for s in launch["rewards"]] == [False, None]
    assert launch["stages"][1]["rewards"][0]["trust_remote_code"] is False


@pytest.mark.slow
def test_the_reward_model_never_runs_its_code(trust_api, hostile_keys, files, marker):
    """A real job: the policy with remote code allowed, the `evil` model as reward model without."""
    body = trusting_body(files["runner"], name="evil-rm", rewards=[{"model": "evil", "trust_remote_code": False}])
    with trust_api.client(hostile_keys["runner"]) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        rec = wait_until(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed", "cancelled") and j,
                         600, f"job {job_id} to end")
        assert rec["status"] == "succeeded", rec["error"]
        metrics = c.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert any("rewards/evil/mean" in m["values"] for m in metrics), metrics[:1]  # the reward model did score
    assert not marker.exists()


def test_a_reward_worker_loads_each_model_with_its_own_flag(tmp_path, tiny_model):
    """The worker: its own flag (the tokenizer's, the policy's) reaches no reward model."""
    from orchestrator.core.spec import RewardSource
    from workers.reward import RewardWorker

    ran = tmp_path / "ran"
    model = str(evil_model(tiny_model, tmp_path / "evil", ran))
    RewardWorker([RewardSource(model=model)], str(tiny_model), trust_remote_code=True)
    assert not ran.exists()
    RewardWorker([RewardSource(model=model, trust_remote_code=False)], str(tiny_model), trust_remote_code=True)
    assert not ran.exists()
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    try:
        RewardWorker([RewardSource(model=model, trust_remote_code=True)], str(tiny_model))
        assert ran.exists()  # (the marker works: the same model, trusted by its own flag, runs its code)
    finally:
        # evil.py's classes are transformers' own: loading them as remote code marked them as such for
        # the whole process, and every later save_pretrained of a Qwen2 here would look for their code.
        Qwen2Config._auto_class = Qwen2ForSequenceClassification._auto_class = None


# ---------------------------------------------------------------- 2. work bounded, off the event loop

def stages_body(train_file: str, stages: list[dict], algorithm: str = "sft") -> dict:
    return {"name": "many", "algorithm": {"name": algorithm}, "model": {"path": "trusting"}, "data": {"train_file": train_file},
            "rewards": [{"function": "accuracy"}] if algorithm == "grpo" else [], "optim": {"steps": 1, "prompts_per_step": 2},
            "stages": stages}


def test_long_lists_are_refused_before_any_work(trust_api, hostile_keys, files):
    few = [{"name": f"s{i}"} for i in range(2)]
    cases = [
        ("stages", [{"name": f"s{i}"} for i in range(3000)], None, "max_job_stages"),  # ~58 KB: under the body limit
        ("rewards", few, [{"function": "accuracy"}] * 2000, "max_job_rewards"),
        ("stages.1.rewards", [few[0], {"name": "s1", "rewards": [{"function": "accuracy"}] * 17}], None, "max_job_rewards"),
    ]
    with trust_api.client(hostile_keys["mallory"]) as c:
        for param, stages, rewards, setting in cases:
            body = stages_body(files["mallory"], stages, "grpo")  # (a valid spec but for its length)
            if rewards:
                body["rewards"] = rewards
            content = json.dumps(body)
            assert len(content) < 64 << 10
            r = c.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, f"{param}: {r.status_code} {r.text[:300]}"
            err = r.json()["error"]
            assert err["param"] == param, err
            assert setting in err["message"] and "RLHF_API_" + setting.upper() in err["message"], err["message"]
        assert all(j["name"] != "many" for j in c.get("/v1/jobs", params={"limit": 100}).json()["data"])  # nothing recorded


def test_deep_nesting_is_refused_not_a_crash(trust_api, hostile_keys, files):
    """JSON nested as deep as the parser takes, where the spec takes any JSON (reward kwargs): a 4xx
    naming the field, not a 500 from measuring it."""
    body = {**stages_body(files["mallory"], [{"name": "a"}], "grpo"), "rewards": [{"function": "accuracy", "kwargs": {"x": "DEEP"}}]}
    body = json.dumps(body).replace('"DEEP"', "[" * 950 + "]" * 950)
    with trust_api.client(hostile_keys["mallory"]) as c:
        r = c.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["param"] == "rewards.0.kwargs"


@pytest.fixture(scope="module")
def lenient_api(redis_url, ray_head, hostile_keys, workdir, operator, tiny_model):
    """An operator who allows huge specs: their validation takes seconds, and must not stop the API."""
    registry = {"models": {"trusting": {"path": str(tiny_model)}}}
    server = hostile_server(redis_url, ray_head, hostile_keys, workdir, operator, registry, "lenient",
                            RLHF_API_MAX_JOB_STAGES="1000000", RLHF_API_MAX_BODY_BYTES=str(16 << 20))
    server.start()
    yield server
    server.stop()


def test_a_heavy_spec_does_not_hold_up_other_tenants(lenient_api, hostile_keys):
    # 10,000 stages, the last one invalid (a grpo stage without rewards): found only once every stage
    # spec before it is built and checked.
    stages = [{"name": f"s{i}"} for i in range(10000)] + [{"name": "last", "algorithm": {"name": "grpo"}}]
    content = json.dumps(stages_body("file-" + "0" * 24, stages))
    answers: dict = {}
    hostile_answered = threading.Event()

    def hostile():
        with lenient_api.client(hostile_keys["mallory"]) as c:
            start = time.monotonic()
            answers["hostile"] = c.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"}, timeout=600)
            answers["hostile_s"] = time.monotonic() - start
            hostile_answered.set()

    with lenient_api.client(hostile_keys["carol"]) as carol:
        assert carol.get("/v1/models").status_code == 200  # (connected and authenticated before)
        thread = threading.Thread(target=hostile)
        thread.start()
        time.sleep(1.0)  # pacing only: the API has the hostile spec and works on it
        start = time.monotonic()
        r = carol.get("/v1/models")
        other_s = time.monotonic() - start
        answered_first = not hostile_answered.is_set()
        thread.join(600)
    print(f"other tenant's GET /v1/models: {other_s:.3f} s; hostile spec ({len(content)} bytes): {answers.get('hostile_s', 0):.2f} s")
    assert r.status_code == 200
    assert answers["hostile"].status_code == 422, answers["hostile"].text[:300]
    assert answered_first, "the other tenant's request waited for the hostile spec's validation"

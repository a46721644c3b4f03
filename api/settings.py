"""Settings of the control plane, read from the environment (prefix `RLHF_API_`) once at startup."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class QuotaSettings(BaseModel):
    """What one tenant's admitted jobs may hold at once (api/admission.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float | None = Field(None, ge=0, description="CPUs (null: no limit).")
    gpus: float | None = Field(None, ge=0, description="GPUs (null: no limit).")
    max_priority: int = Field(0, ge=-100, le=100, description="The highest `priority` its jobs may ask for.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLHF_API_", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding job records, events and metrics.")
    redis_max_connections: int = Field(
        512, ge=2, description="Connections the API process opens to Redis at most. Past them a request waits for one (up to "
        "`redis_pool_timeout_s`) instead of failing. Each live SSE stream holds one while it waits for news, so keep it above "
        "`max_streams`."
    )
    redis_pool_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a request waits for a free Redis connection (all `redis_max_connections` in use) before "
        "it is answered 503 `redis_unavailable`."
    )
    driver_redis_url: str | None = Field(
        None, description="Redis URL as the job drivers on the Ray cluster reach it (default: `redis_url`)."
    )
    ray_address: str = Field("http://127.0.0.1:8265", description="Ray dashboard / Job Submission API address.")
    ray_dashboard_url: str | None = Field(
        None, description="Dashboard URL shown to users in a job's `dashboard_url` (default: `ray_address`)."
    )
    ray_working_dir: str | None = Field(
        None, description="Optional runtime_env working_dir uploaded with every job (default: the cluster's installed package)."
    )
    api_keys_file: Path = Field(Path("api_keys.yaml"), description="YAML/JSON file of hashed API keys and their tenants.")
    host: str = Field("127.0.0.1", description="Bind address of `rlhf serve`.")
    port: int = Field(8000, description="Port of `rlhf serve`.")
    reconcile_interval_s: float = Field(2.0, gt=0, description="Seconds between reconciliations of active jobs with Ray.")
    reconcile: bool = Field(
        True, description="Run the reconciler in this process (admission, following jobs in Ray, restarts). Off: the process only "
        "answers requests, and another API process on the same Redis must reconcile, or submitted jobs stay queued."
    )
    max_active_jobs_per_tenant: int = Field(32, ge=1, description="Jobs a tenant may have queued or running at once (then 429).")
    mlflow_tracking_uris: list[str] = Field(
        default_factory=list,
        description="MLflow tracking URIs a tenant's spec may name over REST (`trackers.mlflow.tracking_uri`); "
        "any other is refused, since the driver would write to it from the cluster.",
    )
    wandb_online: bool = Field(
        False, description="Whether a tenant's spec may ask for `trackers.wandb.mode: online` over REST. Off: refused (422), "
        "since an online run streams the job's config and metrics to the entity the tenant names, with whatever W&B key "
        "the operator gave the cluster; `offline` (written under the run directory) is always allowed.",
    )
    storage_root: str = Field(
        "artifacts", description="Root of the artifact store: tenants' uploads, run directories and checkpoints, one area per "
        "tenant. A local directory (every Ray node must see it at the same path) or an fsspec URL such as `s3://bucket/rlhf`."
    )
    storage_options: dict = Field(default_factory=dict, description="fsspec options of the store (e.g. `{\"endpoint_url\": ...}` for s3).")
    registry_file: Path | None = Field(
        None, description="YAML of the models and reward functions tenants may name over REST (see api/registry.py); unset: none."
    )
    upload_tmp_dir: str | None = Field(None, description="Local directory where uploads are staged while checked (default: the system's).")
    max_upload_bytes: int = Field(1 << 30, ge=1, description="Largest file `POST /v1/files` takes (then 413).")
    max_files_per_tenant: int = Field(1000, ge=1, description="Uploaded files a tenant may keep at once (then 429 until it "
                                      "deletes one).")
    max_storage_bytes_per_tenant: int = Field(
        20 << 30, ge=1, description="Bytes of uploaded files a tenant may keep at once (then 413 until it deletes some). Run "
        "directories and checkpoints are not counted: a job's are bounded by its steps and `checkpoint.keep_last`.")
    max_body_bytes: int = Field(64 << 10, ge=1024, description="Largest JSON request body, e.g. a job spec (then 413).")
    max_job_stages: int = Field(16, ge=1, description="Most `stages` a job spec may have (then 422, before the spec is validated: "
                                "each stage is a whole spec to build and check).")
    max_job_rewards: int = Field(16, ge=1, description="Most reward sources in a job spec's `rewards`, and in each stage's (then 422, "
                                 "before the spec is validated).")
    requests_per_minute: int = Field(600, ge=1, description="Requests a tenant may make per minute, all endpoints (then 429 with Retry-After).")
    max_concurrent_requests_per_tenant: int = Field(
        8, ge=1, description="Requests of one tenant in flight at once in one API process, all endpoints but live SSE streams "
        "(those count in `max_streams_per_tenant`); then 429. One process serves every tenant on one event loop, so a tenant's "
        "share of it follows its requests in flight: past a browser's 6 connections a tenant gains little, and its burst "
        "would slow every other tenant."
    )
    refused_request_delay_s: float = Field(
        1.0, ge=0, description="Seconds a request refused by `requests_per_minute` or `max_concurrent_requests_per_tenant` waits "
        "before its 429 goes out (holding no slot): a client that resends at once, ignoring Retry-After, then costs the API one "
        "refusal per connection per this long instead of the CPU the other tenants' requests need. 0: refuse at once."
    )
    max_streams_per_tenant: int = Field(8, ge=1, description="Live SSE streams a tenant may hold open at once (then 429).")
    max_streams: int = Field(256, ge=1, description="Live SSE streams the API holds open at once, all tenants (then 503).")
    job_credentials: Literal["acl", "shared"] = Field(
        "acl", description="`acl`: each job's processes get a Redis user of their own (ACL SETUSER) that reaches only that job's "
        "records, deleted when the job ends; `shared`: they get `driver_redis_url` as it is (for a Redis without ACL rights)."
    )
    quotas: dict[str, QuotaSettings] = Field(
        default_factory=dict, description='Per tenant: `{"team-a": {"cpus": 8, "gpus": 2, "max_priority": 5}}`: what its admitted jobs may '
        "hold at once, and the highest `priority` its jobs may ask for. Tenants not named get `default_quota`."
    )
    default_quota: QuotaSettings = Field(default_factory=QuotaSettings, description='Quota of tenants not in `quotas` (default: no CPU or GPU limit, max_priority 0).')
    ray_unreachable_deadline_s: float = Field(
        600.0, gt=0, description="A running job whose Ray cluster has not answered for this long is marked failed (`ray_unreachable`).")
    ended_job_grace_s: float = Field(
        120.0, gt=0, description="A job whose own processes reported it ended, while its Ray job still runs this long after, is "
        "stopped; admission counts what it holds until its Ray job ends.")
    allow_volatile_redis: bool = Field(False, description="Start on a Redis with neither AOF nor snapshots (records lost on its restart).")
    public_docs: bool = Field(False, description="Serve /openapi.json and /docs without an API key.")
    sse_ping_s: float = Field(15.0, gt=0, description="Seconds between keep-alive comments on an idle SSE stream.")

    @property
    def jobs_redis_url(self) -> str:
        return self.driver_redis_url or self.redis_url

    @property
    def dashboard_url(self) -> str:
        return (self.ray_dashboard_url or self.ray_address).rstrip("/")

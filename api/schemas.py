"""Request and response bodies (`JobCreate` in, `JobPublic` out, ...), documented with examples."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from orchestrator.core.spec import JobSpec

JobStatus = Literal["queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled"]

SPEC_EXAMPLE: dict[str, Any] = {
    "api_version": "rlhf/v1",
    "name": "grpo-arith",
    "algorithm": {"name": "grpo"},
    "model": {"path": "/models/tiny-model"},
    "data": {"train_file": "/data/arithmetic/train.jsonl", "max_prompt_length": 16},
    "rollout": {"backend": "hf", "n": 4, "max_new_tokens": 4},
    "rewards": [{"function": "accuracy"}],
    "optim": {"lr": 1e-4, "steps": 4, "prompts_per_step": 4},
    "checkpoint": {"every": 2},
    "output_dir": "/runs/grpo-arith",
}

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class JobCreate(JobSpec):
    """A job spec (the same schema as `rlhf train` and `python -m orchestrator.run`) plus `metadata`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{**SPEC_EXAMPLE, "metadata": {"team": "reasoning", "ticket": "ML-42"}}]})

    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=16, description="Up to 16 string key-value pairs, stored with the job and its Ray job."
    )

    def spec_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"metadata"})


class JobErrorInfo(BaseModel):
    code: str = Field(..., description="Machine-readable cause: invalid_spec, invalid_data, model_load_error, reward_error, driver_failed, ...")
    message: str = Field(..., description="What failed, naming the thing at fault.")


class JobPublic(BaseModel):
    id: str = Field(..., description="Job id; also the Ray job's submission id.")
    object: Literal["job"] = "job"
    name: str = Field(..., description="The spec's `name`.")
    status: JobStatus = Field(..., description="queued → starting → running → succeeded | failed | cancelled (cancelling between).")
    created_at: float = Field(..., description="Unix time (s) the job was submitted.")
    started_at: float | None = Field(None, description="Unix time (s) its driver started.")
    finished_at: float | None = Field(None, description="Unix time (s) it reached a terminal status.")
    updated_at: float | None = Field(None, description="Unix time (s) of the last change.")
    step: int = Field(0, description="Last finished training step.")
    total_steps: int | None = Field(None, description="Steps of the whole job, known once it runs.")
    metrics: dict[str, float | None] | None = Field(None, description="Metrics of the last finished step (`reward/mean`, `kl`, ...).")
    error: JobErrorInfo | None = Field(None, description="Why the job failed (only when `status` is failed).")
    metadata: dict[str, str] = Field(default_factory=dict, description="The metadata given at submission.")
    spec: dict[str, Any] = Field(..., description="The validated job spec, defaults filled in.")
    ray_submission_id: str = Field(..., description="Submission id of the Ray job (`ray job status <id>`).")
    dashboard_url: str = Field(..., description="The job's page in the Ray dashboard.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job-4f1c2b9a0d3e4b5c6d7e8f90",
                    "object": "job",
                    "name": "grpo-arith",
                    "status": "running",
                    "created_at": 1764190000.0,
                    "started_at": 1764190002.5,
                    "finished_at": None,
                    "updated_at": 1764190030.1,
                    "step": 2,
                    "total_steps": 4,
                    "metrics": {"reward/mean": 0.12, "kl": 0.0, "response_length/mean": 4.0},
                    "error": None,
                    "metadata": {"team": "reasoning"},
                    "spec": SPEC_EXAMPLE,
                    "ray_submission_id": "job-4f1c2b9a0d3e4b5c6d7e8f90",
                    "dashboard_url": "http://ray-head:8265/#/jobs/job-4f1c2b9a0d3e4b5c6d7e8f90",
                }
            ]
        }
    )


class JobList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}]})

    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool = Field(..., description="More jobs follow; pass `after=<last_id>` for the next page.")
    first_id: str | None = None
    last_id: str | None = None


class EventPublic(BaseModel):
    id: str = Field(..., description="Event id (a Redis stream id); pass it as `after` or `Last-Event-ID` to resume.")
    object: Literal["job.event"] = "job.event"
    type: str = Field(..., description="status, placement, actors_ready, checkpoint, warning, error, resumed, ...")
    message: str = ""
    created_at: float = Field(..., description="Unix time (s).")
    data: dict[str, Any] = Field(default_factory=dict, description="The event's fields (`status`, `error`, `step`, `path`, ...).")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "1764190030100-0", "object": "job.event", "type": "checkpoint", "message": "saved step 2 to /runs/x/checkpoints/step_000002",
                 "created_at": 1764190030.1, "data": {"step": 2, "path": "/runs/x/checkpoints/step_000002"}}
            ]
        }
    )


class EventList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}]})

    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class MetricPublic(BaseModel):
    id: str = Field(..., description="Entry id (a Redis stream id); pass it as `after` or `Last-Event-ID` to resume.")
    object: Literal["job.metrics"] = "job.metrics"
    step: int
    created_at: float
    values: dict[str, float | None] = Field(..., description="Metrics of the step; null where not finite.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "1764190030000-0", "object": "job.metrics", "step": 2, "created_at": 1764190030.0,
                 "values": {"reward/mean": 0.12, "reward/std": 0.3, "kl": 0.0, "timing/step": 0.41}}
            ]
        }
    )


class MetricList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}]})

    object: Literal["list"] = "list"
    data: list[MetricPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class CheckpointPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "job.checkpoint", "step": 2, "path": "/runs/x/checkpoints/step_000002", "created_at": 1764190030.0, "bytes": 5561035}]})

    object: Literal["job.checkpoint"] = "job.checkpoint"
    step: int
    path: str = Field(..., description="Directory on the cluster's storage; `policy/` inside is a Hugging Face model.")
    created_at: float
    bytes: int


class CheckpointList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [{"object": "job.checkpoint", "step": 2, "path": "/runs/x/checkpoints/step_000002", "created_at": 1764190030.0, "bytes": 5561035}], "has_more": False}]})

    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool = False


class JobLogs(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "job.logs", "job_id": "job-4f1c2b9a0d3e4b5c6d7e8f90", "logs": "Running entrypoint for job ...\n"}]})

    object: Literal["job.logs"] = "job.logs"
    job_id: str
    logs: str = Field(..., description="The driver's log, as Ray keeps it (the last `tail` lines when given).")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready", "checks": {"redis": "ok", "ray": "ok"}}]})

    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(..., description="Each dependency and its state (`ok`).")


class ErrorBody(BaseModel):
    type: str = Field(..., description="invalid_request_error, authentication_error, rate_limit_error or api_error.")
    code: str = Field(..., description="Machine-readable code, e.g. invalid_spec, job_not_found, job_terminal.")
    message: str = Field(..., description="What is wrong, naming the thing at fault.")
    param: str | None = Field(None, description="Path of the field or parameter at fault (`optim.lr`), if any.")


class ErrorResponse(BaseModel):
    error: ErrorBody

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": {"type": "invalid_request_error", "code": "invalid_spec", "message": "invalid job spec: optim.lr: Input should be greater than 0", "param": "optim.lr"}}]
        }
    )

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
    "model": {"path": "tiny-model"},
    "data": {"train_file": "file-9b2e4c1d0a7f4e3b8c6d5a41", "max_prompt_length": 16},
    "rollout": {"backend": "hf", "n": 4, "max_new_tokens": 4},
    "rewards": [{"function": "accuracy"}],
    "optim": {"lr": 1e-4, "steps": 4, "prompts_per_step": 4},
    "checkpoint": {"every": 2},
}

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class JobCreate(JobSpec):
    """A job spec (the same schema as `rlhf train` and `python -m orchestrator.entrypoints.run`) plus `metadata`.

    Over REST, the spec names its data by file id (`file-...`, POST /v1/files), its model by a name in
    the operator's registry (GET /v1/models) or a checkpoint id of the tenant's (`ckpt-...`), rewards
    by built-in or registered name (GET /v1/reward_functions); `output_dir` and `checkpoint.dir` are
    the server's to choose."""

    model_config = ConfigDict(json_schema_extra={"examples": [{**SPEC_EXAMPLE, "metadata": {"team": "reasoning", "ticket": "ML-42"}}]})

    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=16, description="Up to 16 string key-value pairs, stored with the job and its Ray job."
    )
    priority: int = Field(
        0, ge=-100, le=100, description="Admission order: higher first (then the tenant using least, then submit time); at most "
        "the tenant's `max_priority`."
    )

    def spec_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"metadata", "priority"})


class JobErrorInfo(BaseModel):
    code: str = Field(..., description="Machine-readable cause: invalid_spec, invalid_data, model_load_error, reward_error, driver_failed, ...")
    message: str = Field(..., description="What failed, naming the thing at fault.")


class QueueInfo(BaseModel):
    position: int = Field(..., description="1 = next to be admitted.")
    reason: str = Field(..., description="What it waits for (`waiting for 2 more CPUs ...`, `tenant quota: ...`).")


class JobPublic(BaseModel):
    id: str = Field(..., description="Job id; also the Ray job's submission id (of its first attempt).")
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
    priority: int = Field(0, description="Its admission priority.")
    queue: QueueInfo | None = Field(None, description="While it waits for admission: its place in the queue and why it waits.")
    spec: dict[str, Any] = Field(..., description="The validated job spec, defaults filled in.")
    restarts: int = Field(0, description="Restarts so far (`fault_tolerance.max_restarts`): an actor, node or driver lost and "
                          "the job resumed from its last checkpoint; each is a `restart` event naming what died.")
    ray_submission_id: str = Field(..., description="Submission id of the Ray job's current attempt (`ray job status <id>`): the "
                                   "job id, then `<job id>-attempt2`, ... after a driver was lost and resubmitted.")
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
    data: dict[str, Any] = Field(default_factory=dict, description="The event's fields (`status`, `error`, `step`, `path`, ...). "
                                 "Paths are relative to the tenant's area (`runs/<job id>/...`); a model or file is named as the "
                                 "spec named it (`tiny`, `file-...`, `ckpt-...`).")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "1764190030100-0", "object": "job.event", "type": "checkpoint", "message": "saved step 2 to runs/job-4f1c2b9a0d3e4b5c6d7e8f90/checkpoints/step_000002",
                 "created_at": 1764190030.1, "data": {"step": 2, "path": "runs/job-4f1c2b9a0d3e4b5c6d7e8f90/checkpoints/step_000002"}}
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
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "ckpt-4f1c2b9a0d3e4b5c6d7e8f90-2", "object": "job.checkpoint", "step": 2, "created_at": 1764190030.0, "bytes": 5561035}]})

    id: str = Field(..., description="Checkpoint id: name it as `model.path` (or a reward `model`) of a new job, or download it.")
    object: Literal["job.checkpoint"] = "job.checkpoint"
    step: int
    created_at: float
    bytes: int


class CheckpointList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [{"id": "ckpt-4f1c2b9a0d3e4b5c6d7e8f90-2", "object": "job.checkpoint", "step": 2, "created_at": 1764190030.0, "bytes": 5561035}], "has_more": False}]})

    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool = False


class TrajectoryMessage(BaseModel):
    role: str
    content: str = Field(..., description="The message's text (its first 4,000 characters).")
    name: str | None = Field(None, description="A tool message's tool.")


class TrajectoryPublic(BaseModel):
    object: Literal["job.trajectory"] = "job.trajectory"
    step: int | None = Field(None, description="The training step that sampled it.")
    sample: int | None = Field(None, description="Which of the prompt's `rollout.n` episodes.")
    turns: int | None = None
    reward: float | None = Field(None, description="The episode's return: the sum of its turns' rewards.")
    rewards: list[float] | None = Field(None, description="Each turn's reward.")
    tool_calls: int | None = None
    invalid_calls: int | None = None
    tool_errors: int | None = None
    truncated: bool | None = Field(None, description="Ended by `rollout.agent.max_tokens` or `max_turns`.")
    messages: list[TrajectoryMessage]


class TrajectoryList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [{
        "object": "job.trajectory", "step": 3, "sample": 0, "turns": 2, "reward": 1.0, "rewards": [0.0, 1.0], "tool_calls": 1,
        "invalid_calls": 0, "tool_errors": 0, "truncated": False, "messages": [
            {"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "753*14"},
            {"role": "assistant", "content": "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"753*14\"}}</tool_call>"},
            {"role": "tool", "content": "10542", "name": "calculator"}, {"role": "assistant", "content": "10542"}]}], "has_more": False}]})

    object: Literal["list"] = "list"
    data: list[TrajectoryPublic]
    has_more: bool = False


class FilePublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "file-9b2e4c1d0a7f4e3b8c6d5a41", "object": "file", "bytes": 1043, "created_at": 1764190000.0,
                                                              "filename": "train.jsonl", "purpose": "train", "rows": 16, "status": "processed"}]})

    id: str = Field(..., description="File id: name it as `data.train_file` or `data.eval_file` of a job.")
    object: Literal["file"] = "file"
    bytes: int
    created_at: float
    filename: str = Field(..., description="The uploaded file's name (without any directory).")
    purpose: Literal["train", "eval", "sft", "preference"]
    rows: int = Field(..., description="Rows found when the upload was checked.")
    status: Literal["processed"] = "processed"


class FileList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}]})

    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "file-9b2e4c1d0a7f4e3b8c6d5a41", "object": "file", "deleted": True}]})

    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ModelPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "qwen-0.5b", "object": "model", "description": "", "trust_remote_code": False}]})

    id: str = Field(..., description="The name to give as `model.path` (or a reward `model`).")
    object: Literal["model"] = "model"
    description: str = ""
    trust_remote_code: bool = Field(..., description="Whether a spec naming it may set `model.trust_remote_code`.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class EnvironmentList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": ["calculator", "python_calculator", "sql-agent"]}]})

    object: Literal["list"] = "list"
    data: list[str] = Field(..., description="Names a spec's `rollout.agent.environment` may give: the built-ins and the operator's.")


class RewardFunctionList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": ["accuracy", "regex_match", "length_penalty", "math-verify"]}]})

    object: Literal["list"] = "list"
    data: list[str] = Field(..., description="Names a spec's `rewards[].function` may give: the built-ins and the operator's.")


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

"""/v1/jobs: submit, list, get, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api import redact
from api.deps import CurrentTenant, LauncherDep, SettingsDep, StorageDep, StoreDep
from api.errors import APIError, not_found
from api.launcher import RayJobMissing, RayUnavailable
from api.reconciler import JOB_ID
from api.routers import error_responses
from api.schemas import JobCreate, JobList, JobPublic, JobStatus
from api.settings import Settings
from api.storage import ArtifactStore
from api.admission import Quota, never_fits
from api.tenant_spec import TenantSpec
from api.trackers_policy import check_wandb_mode
from orchestrator.core.layout import demand
from orchestrator.core.storage import is_url
from orchestrator.core.records import TERMINAL

MAX_SPEC_ENV_BYTES = 100_000

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(description="Job id (`job-...`).", max_length=128)]


class DocumentedAs:
    """A body documented (OpenAPI) as `model`, which FastAPI only parses to a dict on the event loop."""

    def __init__(self, model: type):
        self.model = model

    def __get_pydantic_json_schema__(self, core_schema, handler):
        return handler(self.model.__pydantic_core_schema__)


# The spec is bounded, then validated and placed in a worker thread (`validated`): a spec that takes
# long to check (each stage is a whole spec) holds up no other request.
JobBody = Annotated[dict[str, Any], DocumentedAs(JobCreate),
                    Body(openapi_examples={"grpo": {"summary": "Tiny GRPO job", "value": JobCreate.model_config["json_schema_extra"]["examples"][0]}})]


def job_public(rec: dict[str, Any], settings: Settings, storage: ArtifactStore | None = None) -> dict[str, Any]:
    """The record as its tenant sees it: the spec as submitted (ids and names), and no server path."""
    if storage is not None and rec.get("error"):
        rec = {**rec, "error": redact.for_job(rec, storage)(rec["error"])}
    return {
        "id": rec["id"],
        "object": "job",
        "name": rec.get("name") or "",
        "status": rec["status"],
        "created_at": rec["created_at"],
        "started_at": rec["started_at"],
        "finished_at": rec["finished_at"],
        "updated_at": rec["updated_at"],
        "step": rec["step"] or 0,
        "total_steps": rec["total_steps"],
        "metrics": rec["metrics"],
        "error": rec["error"] if rec["status"] == "failed" else None,
        "metadata": rec["metadata"] or {},
        "priority": rec.get("priority") or 0,
        "queue": rec.get("queue") if rec["status"] == "queued" and not rec.get("admitted_at") else None,
        "spec": rec["spec"] or {},
        "restarts": rec.get("restarts") or 0,
        "ray_submission_id": rec.get("ray_submission_id") or rec["id"],
        "dashboard_url": f"{settings.dashboard_url}/#/jobs/{rec.get('ray_submission_id') or rec['id']}",
    }


async def owned_job(store, job_id: str, tenant: str) -> dict[str, Any]:
    """The tenant's job, or 404 (another tenant's job is indistinguishable from none)."""
    # Only an id of the shape this service gives reaches Redis: `job-x:events` would name the job's
    # event stream, whose read fails (a 500 that told apart another tenant's job from none).
    rec = await store.get(job_id, tenant) if JOB_ID.fullmatch(job_id) else None
    if rec is None:
        raise not_found(job_id)
    return rec


def _body_hash(raw: bytes) -> str:
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except ValueError:
        canonical = raw.decode("utf-8", "replace")
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    summary="Submit a job",
    responses=error_responses(400, 401, 409, 413, 422, 429, 503),
)
async def create_job(
    raw: JobBody,
    request: Request,
    response: Response,
    tenant: CurrentTenant,
    store: StoreDep,
    launcher: LauncherDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", min_length=1, max_length=255, description="Same key and body: the same job again; same key, another body: 409."),
    ] = None,
) -> dict[str, Any]:
    """Validate the spec in full, resolve what it names (file ids, registry models, checkpoint ids,
    reward names) to what the job runs on and record the job (`queued`). The admission queue submits
    it to Ray (a Ray job whose submission id is the job id) once its resources are free; a job that
    could never fit the cluster is a 422 now. Nothing runs in the API's process."""
    body, bundles = await run_in_threadpool(validated, raw, settings, request.app.state.registry.environments)
    spec, name = body.spec_dict(), body.name
    job_id = "job-" + uuid.uuid4().hex[:24]
    resolver = TenantSpec(tenant, request.app.state.registry, request.app.state.storage, store, settings.mlflow_tracking_uris)
    check_wandb_mode(spec, settings.wandb_online)
    launch = await resolver.launch_spec(spec, job_id)
    check_carriable(launch)
    for role in (r for r in body.sharded_roles if r != "reference"):  # (the reference saves nothing)
        if is_url(settings.storage_root):
            raise APIError(422, "invalid_spec", f"resources.{role}.strategy: fsdp writes each replica's shards to one shared filesystem, "
                           "and this service keeps runs in an object store; use ddp", f"resources.{role}.strategy")
    quota = admission_quota(settings, tenant)
    if body.priority > quota.max_priority:
        raise APIError(422, "invalid_spec", f"priority: {body.priority} is above your tenant's max_priority ({quota.max_priority})", "priority")
    capacity = await request.app.state.reconciler.capacity()
    why = never_fits(bundles, capacity) if capacity else None
    if why:
        raise APIError(422, "never_fits", f"resources: {why}; it could never be placed (bundles: {bundles})", "resources")
    if idempotency_key:
        body_hash = _body_hash(await request.body())
        earlier = await store.claim_idempotency_key(tenant, idempotency_key, body_hash, job_id)
        if earlier is not None:
            return await _replay(store, settings, request.app.state.storage, tenant, idempotency_key, body_hash, earlier, response)
    try:
        rec = await store.create(job_id, tenant, name, spec, body.metadata, idempotency_key, max_active=settings.max_active_jobs_per_tenant,
                                 launch_spec=launch, demand=bundles, priority=body.priority)
        if rec is None:
            raise APIError(429, "too_many_active_jobs", f"Tenant has {settings.max_active_jobs_per_tenant} active jobs, the limit; wait for one to end or cancel one.")
    except BaseException:
        await _release(store, tenant, idempotency_key)
        raise
    request.app.state.reconciler.wake()  # admission at once, not at the next round
    return job_public(rec, settings, request.app.state.storage)


def validated(raw: dict[str, Any], settings: Settings, environments: dict[str, str] | None = None) -> tuple[JobCreate, list[dict[str, float]]]:
    """The spec and what it holds at once (its bundles), its lists bounded before any of it is validated.
    `environments`: the operator's registered ones, which a spec may name too. Validation errors are
    FastAPI's own (422 naming each field)."""
    check_lengths(raw, settings)
    try:
        body = JobCreate.model_validate(raw, context={"environments": environments or {}})
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]) from None
    return body, demand(body)


def check_lengths(raw: dict[str, Any], settings: Settings) -> None:
    """The work a spec causes grows with its lists (each stage is a whole spec, each reward source is
    copied into every stage's): refuse long ones before doing any of it."""
    stages = raw.get("stages")
    lists = [("stages", stages, "max_job_stages"), ("rewards", raw.get("rewards"), "max_job_rewards")]
    if isinstance(stages, list) and len(stages) <= settings.max_job_stages:
        lists += [(f"stages.{i}.rewards", s.get("rewards"), "max_job_rewards") for i, s in enumerate(stages) if isinstance(s, dict)]
    for param, items, setting in lists:
        limit = getattr(settings, setting)
        if isinstance(items, list) and len(items) > limit:
            raise APIError(422, "invalid_spec", f"{param}: {len(items)} items, more than this service takes ({limit}: setting "
                           f"{setting}, RLHF_API_{setting.upper()})", param)


def admission_quota(settings: Settings, tenant: str) -> Quota:
    return Quota(**settings.quotas.get(tenant, settings.default_quota).model_dump())


def check_carriable(launch: dict[str, Any]) -> None:
    """The spec travels to the driver in an environment variable, which Linux caps at 128 KiB: refuse
    here what the driver's exec would refuse later."""
    size = len(json.dumps(launch))
    if size > MAX_SPEC_ENV_BYTES:
        raise APIError(413, "spec_too_large", f"The job spec is {size} bytes once resolved; at most {MAX_SPEC_ENV_BYTES} can be carried to the job.")


async def _release(store, tenant: str, key: str | None) -> None:
    if key:
        await store.release_idempotency_key(tenant, key)


async def _replay(store, settings, storage, tenant, key, body_hash, earlier, response) -> dict[str, Any]:
    if earlier["body_hash"] != body_hash:
        raise APIError(409, "idempotency_key_reused", f"Idempotency-Key {key!r} was used with another request body.", "Idempotency-Key")
    # The first request may still be creating its job: wait briefly for the record.
    for _ in range(100):
        rec = await store.get(earlier["job_id"], tenant)
        if rec is not None:
            response.headers["Idempotent-Replayed"] = "true"
            return job_public(rec, settings, storage)
        await asyncio.sleep(0.05)
    raise APIError(409, "idempotency_key_in_use", f"A request with Idempotency-Key {key!r} is still in progress; retry shortly.", "Idempotency-Key")


@router.get("", response_model=JobList, summary="List jobs", responses=error_responses(400, 401, 422))
async def list_jobs(
    tenant: CurrentTenant,
    store: StoreDep,
    settings: SettingsDep,
    storage: StorageDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
    after: Annotated[str | None, Query(max_length=128, description="Id of the last job of the previous page.")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
) -> JSONResponse:
    """The tenant's jobs, newest first."""
    page = await store.list(tenant, limit, after, status)
    if page is None:
        raise APIError(400, "invalid_cursor", f"`after` is not one of your jobs: {after!r}.", "after")
    records, has_more = page
    data = [job_public(r, settings, storage) for r in records]
    # Built to JobList's schema already: skip re-validating it (the read paths are the hot ones;
    # the schemathesis test checks these responses against the schema).
    return JSONResponse({"object": "list", "data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job", responses=error_responses(401, 404))
async def get_job(job_id: JobId, tenant: CurrentTenant, store: StoreDep, settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    return JSONResponse(job_public(await owned_job(store, job_id, tenant), settings, storage))


@router.post("/{job_id}/cancel", response_model=JobPublic, summary="Cancel a job", responses=error_responses(401, 404, 409, 503))
async def cancel_job(job_id: JobId, tenant: CurrentTenant, store: StoreDep, launcher: LauncherDep, settings: SettingsDep,
                     storage: StorageDep) -> dict[str, Any]:
    """Stop the Ray job. The job is `cancelling` until Ray confirms, then `cancelled`. A job that has
    already ended is a 409: a terminal status never changes."""
    rec = await owned_job(store, job_id, tenant)
    if rec["status"] == "queued" and not rec.get("admitted_at"):
        # Still in the admission queue: Ray has never seen it.
        await store.transition(job_id, "cancelled", "cancelled before it was admitted")
        rec = await owned_job(store, job_id, tenant)
        if rec["status"] == "cancelled":
            return job_public(rec, settings, storage)
    if rec["status"] not in TERMINAL:
        await store.transition(job_id, "cancelling", "cancelling: requested through the API")
    rec = await owned_job(store, job_id, tenant)
    if rec["status"] in TERMINAL:
        raise APIError(409, "job_terminal", f"Job {job_id} already ended ({rec['status']}); a terminal status never changes.", "job_id")
    try:
        await launcher.stop(rec.get("ray_submission_id") or job_id)
    except RayJobMissing:
        await store.transition(job_id, "cancelled", "cancelled: Ray had no running job")
    except RayUnavailable:
        pass  # the reconciler stops it once Ray answers again
    return job_public(await owned_job(store, job_id, tenant), settings, storage)

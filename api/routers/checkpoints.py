"""/v1/jobs/{id}/checkpoints: finished checkpoints by id, as the driver last listed them after a save;
each downloadable as a tar archive by the job's owner."""

from __future__ import annotations

import asyncio
import io
import tarfile
import threading
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Path, Request
from fastapi.responses import StreamingResponse

from api import redact
from api.deps import CurrentTenant, StoreDep
from api.errors import APIError
from api.routers import error_responses
from api.routers.jobs import JobId, owned_job
from api.schemas import CheckpointList
from api.tenant_spec import checkpoint_id

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])

CheckpointId = Annotated[str, Path(description="Checkpoint id (`ckpt-...`).", max_length=64)]


def checkpoints_public(rec: dict[str, Any]) -> list[dict[str, Any]]:
    found = sorted(rec["checkpoints"] or [], key=lambda c: c["step"])
    return [{"id": checkpoint_id(rec["id"], c["step"]), "object": "job.checkpoint", "step": c["step"], "created_at": c["created_at"],
             "bytes": c["bytes"]} for c in found]


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, summary="List a job's checkpoints", responses=error_responses(401, 404))
async def job_checkpoints(job_id: JobId, tenant: CurrentTenant, store: StoreDep) -> dict[str, Any]:
    """Oldest first. Pruned checkpoints (`checkpoint.keep_last`) are gone from the list. Start a new job
    from one by giving its id as `model.path`."""
    rec = await owned_job(store, job_id, tenant)
    return {"object": "list", "data": checkpoints_public(rec), "has_more": False}


@router.get(
    "/{job_id}/checkpoints/{checkpoint}/content", summary="Download a checkpoint (tar)",
    responses={200: {"content": {"application/x-tar": {"example": "<tar: ckpt-.../state.json, ckpt-.../policy/config.json, ...>"}},
                     "description": "The checkpoint directory as a tar archive."}, **error_responses(401, 404)},
)
async def checkpoint_content(job_id: JobId, checkpoint: CheckpointId, tenant: CurrentTenant, store: StoreDep, request: Request) -> StreamingResponse:
    """The checkpoint's directory as an uncompressed tar, streamed: `policy/` (or `reward_model/`) is a
    Hugging Face model with its tokenizer; `state.json` says which step and spec it comes from."""
    rec = await owned_job(store, job_id, tenant)
    found = [c for c in rec["checkpoints"] or [] if checkpoint_id(job_id, c["step"]) == checkpoint]
    if not found:
        raise APIError(404, "checkpoint_not_found", f"Job {job_id} has no checkpoint {checkpoint!r}.", "checkpoint")
    storage = request.app.state.storage
    root = storage.strip(found[-1]["path"])
    if not root.startswith(storage.tenant_root(tenant) + "/") or not await asyncio.to_thread(storage.isdir, root):
        raise APIError(404, "checkpoint_not_found", f"Checkpoint {checkpoint!r} is no longer in storage.", "checkpoint")
    name = checkpoint.replace('"', "")
    hide = redact.for_job(rec, storage, request.app.state.registry)
    return StreamingResponse(tar_stream(storage, root, name, hide), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar"'})


class _Pipe:
    """A file object tarfile writes into from a thread, read as chunks by the response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def write(self, data: bytes) -> int:
        asyncio.run_coroutine_threadsafe(self.queue.put(bytes(data)), self.loop).result()
        return len(data)


async def tar_stream(storage, root: str, name: str, hide: redact.Redactor) -> AsyncIterator[bytes]:
    """The regular files under `root` as a tar (links are left out, never followed); the JSON files
    (state.json holds the launch spec, a model's config.json its origin) pass through `hide`."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=8)  # bounded: the archive is never whole in memory
    loop, stop = asyncio.get_running_loop(), threading.Event()

    def write() -> None:
        try:
            with tarfile.open(fileobj=_Pipe(loop, queue), mode="w|", bufsize=1 << 20) as tar:
                for full, rel, _ in storage.walk_files(root):
                    if stop.is_set():
                        return
                    _add(tar, storage, root, full, f"{name}/{rel}", hide)
        finally:
            asyncio.run_coroutine_threadsafe(queue.put(None), loop)

    task = asyncio.create_task(asyncio.to_thread(write))
    try:
        while (chunk := await queue.get()) is not None:
            yield chunk
    finally:
        stop.set()
        while not task.done():  # let the writer finish its current put and see `stop`
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                await asyncio.sleep(0.01)


def _add(tar: tarfile.TarFile, storage, root: str, full: str, arcname: str, hide: redact.Redactor) -> None:
    try:
        f = storage.open_inside(full, root)
    except OSError:
        return  # gone since the listing, or a link swapped in for it: not the tenant's to read
    with f:
        info = tarfile.TarInfo(arcname)
        info.size = storage.size_of(f)
        if full.endswith(".json") and info.size <= redact.JSON_MAX_BYTES:
            data = hide.json_bytes(f.read())
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        else:
            tar.addfile(info, f)

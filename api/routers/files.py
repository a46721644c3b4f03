"""/v1/files: a tenant's training data, uploaded once and named by id in its job specs.

An upload is streamed to disk (never held whole in memory), read once more by the same row checks
the jobs' loaders make (format, the columns its purpose needs), then moved into the tenant's area
of the artifact store. A bad row is a 422 naming the line; nothing of a refused upload is kept.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from api.deps import CurrentTenant, StoreDep
from api.errors import APIError
from api.file_quota import FileQuota
from api.routers import error_responses
from api.schemas import FileDeleted, FileList, FilePublic
from api.tenant_spec import FILE_ID
from orchestrator.core.rows import DataError, check_upload

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = ("train", "eval", "sft", "preference")
Purpose = Literal["train", "eval", "sft", "preference"]
FileId = Annotated[str, Path(description="File id (`file-...`).", max_length=64)]
FORMATS = {".jsonl": ".jsonl", ".json": ".jsonl", ".parquet": ".parquet"}
CHUNK = 1 << 20


def file_public(rec: dict[str, Any]) -> dict[str, Any]:
    return {"id": rec["id"], "object": "file", "bytes": rec["bytes"], "created_at": rec["created_at"], "filename": rec["filename"],
            "purpose": rec["purpose"], "rows": rec["rows"], "status": "processed"}


def file_not_found(file_id: str) -> APIError:
    return APIError(404, "file_not_found", f"No file with id {file_id!r}.", "file_id")


async def owned_file(store, file_id: str, tenant: str) -> dict[str, Any]:
    rec = await store.get_file(file_id, tenant) if FILE_ID.match(file_id) else None  # (only ids of ours reach Redis)
    if rec is None:
        raise file_not_found(file_id)
    return rec


UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "JSONL (one JSON object per line) or Parquet; the file name's "
                     "extension says which."},
            "purpose": {"type": "string", "enum": list(PURPOSES), "description": "`train` / `eval`: prompts (GRPO, PPO); `sft`: prompt + "
                        "completion or messages; `preference`: chosen + rejected (RM, DPO)."},
        },
    }}},
}


@router.post("", status_code=201, response_model=FilePublic, summary="Upload a file", openapi_extra={"requestBody": UPLOAD_BODY},
             responses=error_responses(400, 401, 413, 415, 422, 429))
async def upload_file(request: Request, tenant: CurrentTenant, store: StoreDep) -> dict[str, Any]:
    """Stream the file in, check every row for its purpose, keep it under the tenant's area. The key,
    and whether the tenant is at its storage quota already, are checked before a byte of the body is
    read; the file is counted against the quota (`max_files_per_tenant`, 429;
    `max_storage_bytes_per_tenant`, 413) once its size is known, and released when it is deleted."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(415, "unsupported_media_type", "Send the file as multipart/form-data with fields `file` and `purpose`.", None)
    await file_quota(request, store).check_room(tenant)
    try:
        form = await request.form(max_files=1, max_fields=1, max_part_size=1024)
    except Exception as err:  # python-multipart and Starlette raise several kinds for a malformed body
        raise APIError(400, "invalid_body", f"Could not read the multipart body: {err}", None) from None
    try:
        file, purpose = form.get("file"), form.get("purpose")
        if not isinstance(file, UploadFile):
            raise APIError(422, "invalid_file", "file: missing (a multipart file field named `file`)", "file")
        if purpose not in PURPOSES:
            raise APIError(422, "invalid_purpose", f"purpose: {purpose!r} is not one of {', '.join(PURPOSES)}", "purpose")
        return file_public(await _store_upload(request, tenant, store, file, purpose))
    finally:
        await form.close()


async def _store_upload(request: Request, tenant: str, store, file: UploadFile, purpose: str) -> dict[str, Any]:
    name = FsPath(file.filename or "").name[:255]
    ext = FORMATS.get(FsPath(name).suffix.lower())
    if ext is None:
        raise APIError(422, "invalid_file", f"file: {name!r} is not .jsonl or .parquet (the upload's file name says which)", "file")
    storage, settings = request.app.state.storage, request.app.state.settings
    file_id = "file-" + uuid.uuid4().hex[:24]
    staging = FsPath(tempfile.mkdtemp(prefix="upload-", dir=settings.upload_tmp_dir))
    try:
        local = staging / f"{file_id}{ext}"
        size = await asyncio.to_thread(_copy, file.file, local)
        try:
            rows = await asyncio.to_thread(check_upload, local, purpose, name)
        except DataError as err:
            raise APIError(422, "invalid_file", f"file: {err}", "file") from None
        quota = file_quota(request, store)
        await quota.reserve(tenant, file_id, size)
        try:
            await asyncio.to_thread(storage.put_file, local, storage.file_path(tenant, file_id, ext))
            return await store.create_file(file_id, tenant, {
                "filename": name, "purpose": purpose, "bytes": size, "rows": rows, "created_at": repr(time.time()),
                "path": storage.file_path(tenant, file_id, ext),
            })
        except BaseException:
            await asyncio.to_thread(storage.remove, storage.file_path(tenant, file_id, ext))
            await quota.release(tenant, file_id)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_quota(request: Request, store) -> FileQuota:
    settings = request.app.state.settings
    return FileQuota(store.redis, settings.max_files_per_tenant, settings.max_storage_bytes_per_tenant)


def _copy(src, dest: FsPath) -> int:
    src.seek(0)
    size = 0
    with dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            size += len(chunk)
    return size


@router.get("", response_model=FileList, summary="List files", responses=error_responses(400, 401, 422))
async def list_files(
    tenant: CurrentTenant,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Files per page.")] = 20,
    after: Annotated[str | None, Query(max_length=64, description="Id of the last file of the previous page.")] = None,
    purpose: Annotated[Purpose | None, Query(description="Only files of this purpose.")] = None,
) -> dict[str, Any]:
    """The tenant's files, newest first."""
    page = await store.list_files(tenant, limit, after, purpose)
    if page is None:
        raise APIError(400, "invalid_cursor", f"`after` is not one of your files: {after!r}.", "after")
    data = [file_public(r) for r in page[0]]
    return {"object": "list", "data": data, "has_more": page[1], "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/{file_id}", response_model=FilePublic, summary="Get a file's record", responses=error_responses(401, 404))
async def get_file(file_id: FileId, tenant: CurrentTenant, store: StoreDep) -> dict[str, Any]:
    return file_public(await owned_file(store, file_id, tenant))


@router.get("/{file_id}/content", summary="Download a file", responses={200: {"content": {"application/octet-stream": {"example": '{"prompt": "1+1=", "answer": 2}\n'}},
                                                               "description": "The file as uploaded."}, **error_responses(401, 404)})
async def file_content(file_id: FileId, tenant: CurrentTenant, store: StoreDep, request: Request) -> StreamingResponse:
    rec = await owned_file(store, file_id, tenant)
    storage = request.app.state.storage
    headers = {"Content-Disposition": attachment(rec["filename"]), "Content-Length": str(rec["bytes"])}
    return StreamingResponse(stream_file(storage, rec["path"]), media_type="application/octet-stream", headers=headers)


def attachment(filename: str) -> str:
    """A Content-Disposition header for any file name: headers are Latin-1, so the name goes as RFC 6266's
    `filename*` (RFC 5987: UTF-8, percent-encoded), with a plain ASCII `filename` for older clients."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in filename)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def stream_file(storage, path: str):
    f = await asyncio.to_thread(storage.open, path)
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


@router.delete("/{file_id}", response_model=FileDeleted, summary="Delete a file", responses=error_responses(401, 404))
async def delete_file(file_id: FileId, tenant: CurrentTenant, store: StoreDep, request: Request) -> dict[str, Any]:
    """Remove the file and its record. A job that has started read its data at the start; a later
    resume of it cannot."""
    rec = await store.delete_file(file_id, tenant) if FILE_ID.match(file_id) else None
    if rec is None:
        raise file_not_found(file_id)
    await asyncio.to_thread(request.app.state.storage.remove, rec["path"])
    await file_quota(request, store).release(tenant, file_id)
    return {"id": file_id, "object": "file", "deleted": True}

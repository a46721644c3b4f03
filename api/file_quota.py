"""A tenant's uploaded files against its storage quota (settings `max_files_per_tenant` and
`max_storage_bytes_per_tenant`).

    tenant:<t>:storage    hash: file id -> bytes, of each file the tenant keeps or is uploading

A reservation is one Lua script that counts and adds, so concurrent uploads cannot pass a limit
together; a release is an HDEL, which counts a file once however many deletes of it race. Run
directories and checkpoints are not counted (a job's are bounded by its steps and keep_last).
"""

from __future__ import annotations

from dataclasses import dataclass

from api.errors import APIError
from api.store import file_key, tenant_files_key
from orchestrator.core.records import PREFIX

# KEYS: the tenant's usage hash; ARGV: file id, bytes, max files, max bytes.
# Returns {1, files, bytes} once reserved, else {0, files, bytes} of what the tenant holds.
RESERVE_LUA = """
local n, total = redis.call('HLEN', KEYS[1]), 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
if n + 1 > tonumber(ARGV[3]) or total + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return {0, n, tostring(total)} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, n + 1, tostring(total + tonumber(ARGV[2]))}
"""


def usage_key(tenant: str) -> str:
    return f"{PREFIX}tenant:{tenant}:storage"


@dataclass
class FileQuota:
    redis: object  # redis.asyncio.Redis
    max_files: int
    max_bytes: int

    def __post_init__(self):
        self._reserve = self.redis.register_script(RESERVE_LUA)

    async def check_room(self, tenant: str) -> None:
        """Refuse an upload before its body is read when the tenant is at a limit already."""
        await self._count_earlier_files(tenant)
        sizes = await self.redis.hvals(usage_key(tenant))
        self._refuse_if_over(len(sizes), sum(int(s) for s in sizes), None)

    async def reserve(self, tenant: str, file_id: str, size: int) -> None:
        """Count a file of `size` bytes against the tenant's limits, or raise the error naming the limit."""
        await self._count_earlier_files(tenant)
        ok, files, total = await self._reserve(keys=[usage_key(tenant)], args=[file_id, size, self.max_files, self.max_bytes])
        if not ok:
            self._refuse_if_over(int(files), int(total), size)

    async def release(self, tenant: str, file_id: str) -> None:
        await self.redis.hdel(usage_key(tenant), file_id)

    def _refuse_if_over(self, files: int, total: int, size: int | None) -> None:
        """The error for a tenant holding `files` files of `total` bytes that adds one of `size` (None: any size)."""
        if files + 1 > self.max_files:
            raise APIError(429, "storage_quota_exceeded", f"file: you keep {files} files, the limit (max_files_per_tenant = "
                           f"{self.max_files}); delete one (DELETE /v1/files/{{id}}) first", "file")
        if size is None and total >= self.max_bytes:
            raise APIError(413, "storage_quota_exceeded", f"file: you keep {total} bytes of files, the limit "
                           f"(max_storage_bytes_per_tenant = {self.max_bytes}); delete files first", "file")
        if size is not None and total + size > self.max_bytes:
            raise APIError(413, "storage_quota_exceeded", f"file: its {size} bytes would make {total + size} bytes of files, "
                           f"over max_storage_bytes_per_tenant ({self.max_bytes}); delete files first", "file")

    async def _count_earlier_files(self, tenant: str) -> None:
        """Files uploaded before the quota existed: counted once, when the tenant has no usage yet."""
        if await self.redis.exists(usage_key(tenant)):
            return
        ids = await self.redis.zrange(tenant_files_key(tenant), 0, -1)
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for file_id in ids:
            pipe.hget(file_key(file_id), "bytes")
        sizes = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for file_id, size in zip(ids, sizes):
            if size is not None:
                pipe.hsetnx(usage_key(tenant), file_id, size)
        await pipe.execute()

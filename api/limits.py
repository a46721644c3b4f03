"""Per-tenant limits that hold under concurrency: request rate (in Redis, so every API replica
counts together) and open live streams (per API process)."""

from __future__ import annotations

import time
from collections import Counter

from api.errors import APIError
from orchestrator.core.records import PREFIX

# A fixed one-minute window per tenant: INCRBY, and the window's expiry on its first hit.
RATE_LUA = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], 120) end
return n
"""


class RateLimiter:
    """Requests per tenant per minute, counted in Redis so that every API replica counts together.

    To spare a Redis round trip on each request, a process adds its requests to the shared count in
    batches of up to 1/50 of the limit (1 for limits under 100: exact), so that all replicas
    together may pass the limit by at most one batch each."""

    def __init__(self, redis, per_minute: int):
        self.per_minute = per_minute
        self.batch = max(1, per_minute // 50)
        self._add = redis.register_script(RATE_LUA)
        self._window: dict[str, tuple[int, int, int]] = {}  # tenant -> (window, shared count seen, not yet added)

    async def hit(self, tenant: str) -> None:
        now = time.time()
        window = int(now // 60)
        seen_window, shared, pending = self._window.get(tenant, (window, 0, 0))
        if seen_window != window:
            shared, pending = 0, 0
        pending += 1
        if pending >= self.batch or shared + pending > self.per_minute:
            shared, pending = await self._add(keys=[f"{PREFIX}rate:{tenant}:{window}"], args=[pending]), 0
        self._window[tenant] = (window, shared, pending)
        if shared + pending > self.per_minute:
            retry = max(1, int((window + 1) * 60 - now) + 1)
            raise APIError(429, "rate_limited", f"More than {self.per_minute} requests this minute; retry in {retry} s.", None,
                           {"Retry-After": str(retry)})


class StreamSlots:
    """Live SSE streams held open: at most `per_tenant` for one tenant and `total` for the process."""

    def __init__(self, per_tenant: int, total: int):
        self.per_tenant, self.total = per_tenant, total
        self.open: Counter[str] = Counter()

    def acquire(self, tenant: str) -> None:
        """Take a slot (or raise 429 / 503); `release` gives it back when the stream ends."""
        if self.open[tenant] >= self.per_tenant:
            raise APIError(429, "too_many_streams", f"You have {self.per_tenant} live streams open, the limit; close one first.",
                           None, {"Retry-After": "5"})
        if sum(self.open.values()) >= self.total:
            raise APIError(503, "streams_full", "The API holds as many live streams as it serves; retry shortly or read the history as pages.",
                           None, {"Retry-After": "5"})
        self.open[tenant] += 1

    def release(self, tenant: str) -> None:
        self.open[tenant] -= 1
        if self.open[tenant] <= 0:
            del self.open[tenant]

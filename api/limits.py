"""Per-tenant limits that hold under concurrency: request rate (in Redis, so every API replica
counts together), requests in flight and open live streams (per API process)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from api.errors import APIError
from orchestrator.core.records import PREFIX

# A fixed one-minute window per tenant: INCRBY, and the window's expiry on its first hit.
RATE_LUA = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], 120) end
return n
"""

# Where `current_tenant` leaves the release of the request's slot for RequestSlotMiddleware (in the
# ASGI scope's state, which Starlette's `request.state` reads and writes).
REQUEST_SLOT = "rlhf_request_slot_release"


def release_request_slot(scope_state: dict) -> None:
    """Give back the request slot held in this ASGI scope's state, if any (once)."""
    scope_state.pop(REQUEST_SLOT, lambda: None)()


@dataclass
class _Minute:
    """One tenant's count in one clock minute, as this process knows it."""

    minute: int
    passed: int = 0  # requests this process let through
    sent: int = 0  # of them, added to the shared count (Redis has answered)
    shared: int = 0  # the shared count, every replica's, as Redis last answered
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one add at a time: answers come back in order

    @property
    def count(self) -> int:
        """The minute's requests as far as this process knows: the shared count and its own not yet sent."""
        return self.shared + self.passed - self.sent


class RateLimiter:
    """Requests per tenant per minute, counted in Redis so that every API replica counts together.

    A request is counted in local state before any await, so concurrent requests see each other and
    one process lets exactly `per_minute` through. Once the count is reached, requests are refused
    from local state, without a Redis call. To spare a Redis round trip on each request, a process
    adds its requests to the shared count in batches of up to 1/50 of the limit (1 for limits under
    100: exact across replicas too), so that all replicas together may pass the limit by at most one
    batch each."""

    def __init__(self, redis, per_minute: int):
        self.per_minute = per_minute
        self.batch = max(1, per_minute // 50)
        self._add = redis.register_script(RATE_LUA)
        self._minutes: dict[str, _Minute] = {}

    async def hit(self, tenant: str) -> None:
        now = time.time()
        m = self._minute(tenant, int(now // 60))
        if m.count >= self.per_minute:
            self._refuse(now, m.minute)
        m.passed += 1
        ticket = m.passed
        if ticket % self.batch:
            return  # added with a later request's batch
        async with m.lock:
            if ticket > m.sent:
                shared = await self._add(keys=[f"{PREFIX}rate:{tenant}:{m.minute}"], args=[ticket - m.sent])
                m.shared, m.sent = max(m.shared, shared), ticket
        if m.shared > self.per_minute:
            self._refuse(now, m.minute)  # other replicas took the rest of the minute

    def _minute(self, tenant: str, minute: int) -> _Minute:
        m = self._minutes.get(tenant)
        if m is None or m.minute != minute:
            m = self._minutes[tenant] = _Minute(minute)
        return m

    def _refuse(self, now: float, minute: int) -> None:
        retry = max(1, int((minute + 1) * 60 - now) + 1)
        raise APIError(429, "rate_limited", f"More than {self.per_minute} requests this minute (requests_per_minute); "
                       f"retry in {retry} s.", None, {"Retry-After": str(retry)})


class _TenantCounts:
    """Slots held per tenant in this process."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()

    def release(self, tenant: str) -> None:
        self.open[tenant] -= 1
        if self.open[tenant] <= 0:
            del self.open[tenant]


class RequestSlots(_TenantCounts):
    """Requests of one tenant in flight at once: at most `per_tenant`, so that one tenant's burst
    cannot hold every Redis connection of the process while the others wait."""

    def __init__(self, per_tenant: int):
        super().__init__()
        self.per_tenant = per_tenant

    def acquire(self, tenant: str) -> Callable[[], None]:
        """Take a slot (or raise 429); the returned function gives it back, once however often called."""
        if self.open[tenant] >= self.per_tenant:
            raise APIError(429, "too_many_requests_in_flight", f"You have {self.per_tenant} requests in flight, the limit "
                           "(max_concurrent_requests_per_tenant); send the next when one has finished.", None, {"Retry-After": "1"})
        self.open[tenant] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.release(tenant)

        return release


class StreamSlots(_TenantCounts):
    """Live SSE streams held open: at most `per_tenant` for one tenant and `total` for the process."""

    def __init__(self, per_tenant: int, total: int):
        super().__init__()
        self.per_tenant, self.total = per_tenant, total

    def acquire(self, tenant: str) -> None:
        """Take a slot (or raise 429 / 503); `release` gives it back when the stream ends."""
        if self.open[tenant] >= self.per_tenant:
            raise APIError(429, "too_many_streams", f"You have {self.per_tenant} live streams open, the limit "
                           "(max_streams_per_tenant); close one first.", None, {"Retry-After": "5"})
        if sum(self.open.values()) >= self.total:
            raise APIError(503, "streams_full", f"The API holds {self.total} live streams, as many as it serves (max_streams); "
                           "retry shortly or read the history as pages.", None, {"Retry-After": "5"})
        self.open[tenant] += 1

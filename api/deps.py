"""Dependencies of the routers: settings, the store, the launcher and the current tenant."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth import KeyRing
from api.errors import APIError
from api.launcher import RayLauncher
from api.limits import REQUEST_SLOT, release_request_slot
from api.settings import Settings
from api.storage import ArtifactStore
from api.store import JobStore

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_launcher(request: Request) -> RayLauncher:
    return request.app.state.launcher


async def get_storage(request: Request) -> ArtifactStore:
    return request.app.state.storage


async def current_tenant(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None:
        raise APIError(401, "missing_api_key", "No API key: send `Authorization: Bearer <key>`.", None, challenge)
    keyring: KeyRing = request.app.state.keyring
    tenant = keyring.tenant_for(creds.credentials)
    if tenant is None:
        raise APIError(401, "invalid_api_key", "The API key in the Authorization header is not valid.", None, challenge)
    try:
        hold_request_slot(request, tenant)
        await request.app.state.rate.hit(tenant)
    except APIError:  # 429 from either limit
        # A client resending at once would spend the process's CPU on refusals: answer it later.
        release_request_slot(request.scope["state"])
        await asyncio.sleep(request.app.state.settings.refused_request_delay_s)
        raise
    return tenant


def hold_request_slot(request: Request, tenant: str) -> None:
    """Count the request in its tenant's requests in flight (429 past the cap), before the rate
    limiter's await, so that a burst waiting on Redis holds at most the cap. RequestSlotMiddleware
    gives the slot back when the response ends."""
    state = request.scope.setdefault("state", {})
    if REQUEST_SLOT not in state:
        state[REQUEST_SLOT] = request.app.state.request_slots.acquire(tenant)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
LauncherDep = Annotated[RayLauncher, Depends(get_launcher)]
StorageDep = Annotated[ArtifactStore, Depends(get_storage)]
CurrentTenant = Annotated[str, Depends(current_tenant)]

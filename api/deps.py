"""Dependencies of the routers: settings, the store, the launcher and the current tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth import KeyRing
from api.errors import APIError
from api.launcher import RayLauncher
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
    await request.app.state.rate.hit(tenant)
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
LauncherDep = Annotated[RayLauncher, Depends(get_launcher)]
StorageDep = Annotated[ArtifactStore, Depends(get_storage)]
CurrentTenant = Annotated[str, Depends(current_tenant)]

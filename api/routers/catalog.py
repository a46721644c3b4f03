"""/v1/models, /v1/reward_functions and /v1/environments: what a tenant's spec may name, from the operator's registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.deps import CurrentTenant
from api.routers import error_responses
from api.schemas import EnvironmentList, ModelList, RewardFunctionList
from orchestrator.core.algorithms import BUILTIN_REWARDS
from orchestrator.core.environments import ENVIRONMENTS

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/models", response_model=ModelList, summary="Models you may train", responses=error_responses(401))
async def list_models(request: Request, tenant: CurrentTenant) -> dict[str, Any]:
    """The operator's registered base models open to this tenant; your own checkpoints are listed per job."""
    models = request.app.state.registry.visible_models(tenant)
    return {"object": "list", "data": [{"id": n, "object": "model", "description": m.description, "trust_remote_code": m.trust_remote_code}
                                       for n, m in sorted(models.items())]}


@router.get("/reward_functions", response_model=RewardFunctionList, summary="Reward functions you may name", responses=error_responses(401))
async def list_reward_functions(request: Request, tenant: CurrentTenant) -> dict[str, Any]:
    return {"object": "list", "data": [*BUILTIN_REWARDS, *sorted(request.app.state.registry.reward_functions)]}


@router.get("/environments", response_model=EnvironmentList, summary="Environments you may name", responses=error_responses(401))
async def list_environments(request: Request, tenant: CurrentTenant) -> dict[str, Any]:
    """Names a spec's `rollout.agent.environment` may give: the built-ins (docs/agents.md), then the operator's."""
    return {"object": "list", "data": [*ENVIRONMENTS, *sorted(request.app.state.registry.environments)]}

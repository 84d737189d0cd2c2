"""``/v1/agents``: the agents, their steps, input schema and an example."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from fleet.surfaces.gateway.auth import require_key
from fleet.surfaces.gateway.deps import Services
from fleet.surfaces.gateway.errors import ERRORS
from fleet.surfaces.views import AgentList, agent_infos

router = APIRouter(prefix="/v1/agents", tags=["agents"], dependencies=[Depends(require_key)])


@router.get("", response_model=AgentList, responses=ERRORS)
def list_agents(services: Services) -> AgentList:
    """Agents with their steps, input schema and an example input."""
    return AgentList(agents=agent_infos(services.client.agents))

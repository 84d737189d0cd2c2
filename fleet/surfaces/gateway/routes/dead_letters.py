"""``/v1/dead-letters``: the dead-letter store (list, show, replay)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from fleet.surfaces.gateway.auth import require_key
from fleet.surfaces.gateway.deps import Scoped
from fleet.surfaces.gateway.errors import ERRORS, NOT_FOUND
from fleet.surfaces.gateway.models import DeadLetterList, DeadLetterView, EntryId, ReplayRequest, ReplayResponse

router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"], dependencies=[Depends(require_key)])


@router.get("", response_model=DeadLetterList, responses=ERRORS)
def list_dead_letters(scoped: Scoped, agent: str | None = None, step: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DeadLetterList:
    """The tenant's dead-lettered steps (an operator's key: every tenant's), newest first."""
    return DeadLetterList(entries=scoped.client.dlq_list(agent=agent, step=step, limit=limit))


@router.get("/{entry_id}", response_model=DeadLetterView, responses={**ERRORS, **NOT_FOUND})
def get_dead_letter(entry_id: EntryId, scoped: Scoped) -> DeadLetterView:
    """One dead-lettered step: the state it received, its error and traceback, its replays."""
    entry, replays = scoped.client.dlq_get(entry_id)
    return DeadLetterView(entry=entry, replays=replays)


@router.post("/{entry_id}/replay", response_model=ReplayResponse, responses={**ERRORS, **NOT_FOUND})
def replay_dead_letter(entry_id: EntryId, scoped: Scoped, body: ReplayRequest | None = None) -> ReplayResponse:
    """Re-run the entry's run from its failed step with the stored state; `patch` merges
    into the input (`{"input": {...}}`) or replaces earlier steps' outputs (`{"steps": {...}}`)."""
    run_id = scoped.client.dlq_replay(entry_id, body.patch if body is not None else None)
    return ReplayResponse(run_id=run_id)

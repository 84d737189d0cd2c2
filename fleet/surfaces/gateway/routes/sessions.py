"""``/v1/sessions``: a tenant's sessions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from fleet.surfaces.gateway.auth import require_key
from fleet.surfaces.gateway.deps import Scoped
from fleet.surfaces.gateway.errors import ERRORS, NOT_FOUND
from fleet.surfaces.gateway.models import SessionView

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_key)])


@router.get("/{session_id}", response_model=SessionView, responses={**ERRORS, **NOT_FOUND})
def get_session(session_id: Annotated[str, Path(min_length=1, max_length=256)], scoped: Scoped) -> SessionView:
    """The turns of one of the tenant's sessions (input and result of each run), oldest first."""
    return SessionView(session_id=session_id, turns=scoped.client.session(session_id))

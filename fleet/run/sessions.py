"""Sessions: conversation state carried across the runs of one session id.

Sessions belong to a tenant: the same session id of two tenants names two sessions.
Each finished turn (the run's input and result) is appended to a capped Redis list with a
TTL, once per run (a worker that dies between the turn and the run's end writes it again). A run snapshots the session's turns when it is admitted, so every step of the run sees
the same history; its templates read it as ``{session.transcript}``.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from fleet.core import lua
from fleet.run.template import as_text
from fleet.settings import Settings

_APPEND = lua.load(__file__, "append_turn-1.lua")


class Sessions:
    """Session history of one fleet namespace."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client

    def key(self, tenant: str, session_id: str) -> str:
        return self.settings.keys.session(tenant, session_id)

    def turns(self, tenant: str, session_id: str) -> list[dict[str, Any]]:
        """The turns of a tenant's session, oldest first (at most ``session_max_turns``)."""
        return [json.loads(t) for t in self.redis.lrange(self.key(tenant, session_id), 0, -1)]

    def append(self, tenant: str, session_id: str, run_id: str, input: dict[str, Any], result: Any) -> None:
        """Record a finished turn (unless this run's is there already) and extend the session's life."""
        _APPEND(self.redis, keys=[self.key(tenant, session_id)],
                args=[run_id, json.dumps({"run_id": run_id, "input": input, "result": result}),
                      self.settings.session_max_turns, self.settings.session_ttl_s])


def transcript(turns: list[dict[str, Any]]) -> str:
    """Turns as prompt text: ``User: ...`` / ``Agent: ...`` lines."""
    lines: list[str] = []
    for turn in turns:
        said = turn["input"].get("message") if isinstance(turn["input"], dict) else None
        lines.append(f"User: {as_text(said if said is not None else turn['input'])}")
        lines.append(f"Agent: {as_text(turn['result'])}")
    return "\n".join(lines)

"""The gateway's routes, one router per resource: runs, sessions, dead letters, tenants, batches,
agents and the health probes. Every ``/v1`` route needs a key when the fleet has keys
(:func:`fleet.surfaces.gateway.auth.require_key`)."""

from __future__ import annotations

from fastapi import APIRouter

from fleet.surfaces.gateway.routes import agents, batches, dead_letters, health, runs, sessions, tenants

ROUTERS: tuple[APIRouter, ...] = (runs.router, sessions.router, dead_letters.router, tenants.router,
                                  batches.router, agents.router, health.router)

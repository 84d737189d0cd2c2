"""Primitives the rest of the fleet is built on, knowing nothing of runs or agents.

Owns: Lua scripts in ``.lua`` files and the one registry that calls them by SHA (``lua``),
background loops and fleet-wide leadership (``loops``), the per-process pub/sub listener
(``listener``), OpenTelemetry tracing primitives (``tracing``), what to do when Redis is full
(``redis_full``), writes that wait for a replica (``replication``) and checks of
untrusted payloads (``payload``).

May import: the fleet's root modules (settings, keys, errors, connections) only.
"""

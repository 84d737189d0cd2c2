"""The message broker's side of the fleet: Celery and its queues.

Owns: the Celery app with every delivery setting written out and the metadata each step
message carries (``app``), the worker's consumer that reconnects at the pace of a failover
(``consumer``), the queues with their exchanges and routing keys (``queues``), and
the chains of step signatures a run travels as (``chains``).

May import: the root modules, ``fleet.core`` and ``fleet.run``.
"""

"""Operating the fleet: what operators watch and what starts its servers.

Owns: the workers' Prometheus series (``metrics``), fleet-wide gauges read from Redis
(``gauges``), Sentry (``sentry``), the ``fleet status`` snapshot (``status``) and starting
Redis, Triton, workers and Flower as child processes (``launch``).

May import: every layer below it (root, core, run, broker, inference, scheduling).
"""

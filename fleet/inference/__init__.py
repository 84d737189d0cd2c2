"""The inference pool: the Triton replicas llm steps run on, and how a model call uses them.

Owns: the pool (``pool``: preemption, failover), slots on the replicas (``slots`` and its Lua
scripts), the replicas' state and probes (``replicas``), the Triton gRPC client speaking the
vLLM backend's contract (``triton``) and the pool monitor (``monitor``).

May import: the root modules, ``fleet.core``, ``fleet.run`` and ``fleet.broker``.
"""

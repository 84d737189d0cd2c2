"""Who runs when: admission, tenancy and the batch backlog.

Owns: the door and its gates (``admission``, ``submission``, ``reservation``,
``idempotency``), the load-shedding forecast and the ledger of admitted runs (``forecast``,
``admitted``), tenants' quotas (``quotas``), the batch backlog and its fair-share dispatcher
(``backlog``, ``dispatch``), worker capacity and step times (``capacity``), the reconciler
that re-sends lost runs (``reconcile``) and replays of dead letters (``replay``).

May import: the root modules, ``fleet.core``, ``fleet.run``, ``fleet.broker`` and
``fleet.inference``.
"""

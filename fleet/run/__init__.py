"""The run model: what a run is, how it is kept, and what it does next.

Owns: run and step records (``records``), how a run is kept in Redis (``codec``, ``state``,
``store`` and its Lua scripts), agent definitions and their tools (``agent``, ``agents/``,
``tools``), the next-step rule (``plan``), prompt templates and what they see (``template``,
``view``), budgets and prices (``budget``, ``cost``), sessions, dead letters, cancellation,
following a run's events (``follow``), batch jobs (``jobs``) and usage totals (``usage``).

May import: the root modules and ``fleet.core``.
"""

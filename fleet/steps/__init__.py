"""The worker: what happens to a step message, from delivery to commit.

Owns: the Celery entry point of workers and Flower (``worker``: ``celery -A
fleet.steps.worker:app``), the step tasks (``tasks``), one step's life (``pipeline``), what a
step in progress is (``context``), the hooks around it (``hooks/``), the step bodies
(``bodies``), the retry policy (``retries``) and the assembly of a worker's runtime
(``runtime``).

May import: every layer below it (root, core, run, broker, inference, scheduling, ops).
"""

"""The Celery app that workers load: ``celery -A fleet.worker worker -Q llm.interactive,llm.batch``.

Settings come from ``FLEET_*`` variables of the worker's environment.
"""

from celery.signals import worker_ready

from fleet.celery_app import create_app
from fleet.logs import setup_logging
from fleet.settings import Settings

settings = Settings()
setup_logging(settings.log_level)
app = create_app(settings)


@worker_ready.connect
def _on_ready(sender, **_: object) -> None:  # noqa: ANN001
    """Announce this worker's capacity, and sweep for stalled runs (one worker at a time)."""
    from fleet.capacity import Presence
    from fleet.reconcile import Reconciler
    from fleet.tasks import Runtime

    rt = Runtime(settings)
    queues = [q.name for q in sender.task_consumer.queues]
    Presence(rt.capacity, sender.hostname, queues, sender.controller.concurrency).start()
    Reconciler(settings, app, rt.agents, rt.store).start()

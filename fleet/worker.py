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
def _start_reconciler(sender, **_: object) -> None:  # noqa: ANN001
    """Every worker may sweep for stalled runs; a Redis lock lets one sweep at a time."""
    from fleet.reconcile import Reconciler
    from fleet.tasks import Runtime

    rt = Runtime(settings)
    Reconciler(settings, app, rt.agents, rt.store).start()

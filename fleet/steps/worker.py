"""The Celery app that workers load: ``celery -A fleet.steps.worker worker -Q llm.interactive,llm.batch``.

Settings come from ``FLEET_*`` variables of the worker's environment. Flower and ``celery
inspect`` load this module too; what only a worker needs starts from the worker's signals.
"""

import logging

from celery.signals import worker_init, worker_ready

from fleet.broker.app import create_app
from fleet.logs import setup_logging
from fleet.settings import Settings
from fleet.steps.tasks import register_tasks

settings = Settings()
setup_logging(settings.log_level, settings.log_format)
app = create_app(settings)
register_tasks(app, settings)
log = logging.getLogger(__name__)


@worker_init.connect
def _on_init(sender, **_: object) -> None:  # noqa: ANN001, ARG001
    """Before the pool starts: metrics that pool children share, Sentry and tracing.

    All must come before the children are forked and before task tracers are built (and
    tracing before the step hooks are chosen).
    """
    from fleet.core import tracing
    from fleet.ops import metrics
    from fleet.ops.sentry import init_sentry

    if settings.metrics_port is not None:
        metrics.use_multiprocess_dir()
    init_sentry(settings, "worker")
    tracing.configure(settings, "worker")


@worker_ready.connect
def _on_ready(sender, **_: object) -> None:  # noqa: ANN001
    """Announce this worker's capacity, serve its metrics, sweep for stalled runs, take its
    turn dispatching the batch backlog, and (an inference worker) take its turn watching the
    inference pool's replicas."""
    from fleet.broker.queues import drop_stale_bindings, worker_queues
    from fleet.inference.monitor import PoolMonitor
    from fleet.ops import metrics
    from fleet.scheduling.capacity import Presence
    from fleet.scheduling.dispatch import Dispatcher
    from fleet.scheduling.reconcile import Reconciler
    from fleet.steps.runtime import runtime_for

    rt = runtime_for(settings)
    dropped = drop_stale_bindings(settings, rt.store.redis)
    if dropped:
        log.warning("dropped %d binding(s) of the fleet's exchanges to other queues (left by an older "
                    "declaration: a publish by exchange would have copied messages into every queue)", dropped)
    queues = [q.name for q in sender.task_consumer.queues]
    Presence(rt.capacity, sender.hostname, queues, sender.controller.concurrency).start()
    Reconciler(settings, app, rt.agents, rt.store).loop().start()
    if settings.scheduling == "fleet":
        # Its own app, so its own broker connections: the dispatcher publishes from its own
        # thread, away from the connections of the worker's consumer and its tasks.
        Dispatcher(settings, create_app(settings), rt.agents, rt.store).loop().start()
    if settings.scheduling == "fleet" and set(queues) & set(worker_queues(settings, "llm")):
        for name, pool in rt.models.pools.items():  # one monitor per model's pool
            PoolMonitor(settings.for_model(name), rt.store.redis, pool.client).loop().start()
    if settings.scheduling == "fleet" and settings.inference_borrow and \
            queues == worker_queues(settings, "llm", ("interactive",)):
        _lend_threads(sender, rt, queues[0])
    try:
        metrics.serve(settings)
    except OSError as exc:
        # The worker still serves steps; Prometheus sees the target down and alerts.
        log.error("metrics: cannot listen on port %s: %s", settings.metrics_port, exc)


def _lend_threads(consumer, rt, interactive: str) -> None:  # noqa: ANN001
    """The interactive-only inference worker also takes batch steps while its threads are idle, and
    takes a thread back when interactive work waits (:mod:`fleet.inference.lending`)."""
    from fleet.broker.queues import queue_name
    from fleet.inference.lending import Lender

    rt.pool.borrowing = True
    consumer.add_task_queue(queue_name(settings, "llm", "batch"))  # after the interactive queue: taken second
    Lender(rt.store.redis, rt.pool, interactive).loop().start()
    log.info("lending idle threads to batch steps; taken back when an interactive step waits in %s", interactive)

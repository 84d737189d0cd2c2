"""The Celery app that workers load: ``celery -A fleet.worker worker -Q llm.interactive,llm.batch``.

Settings come from ``FLEET_*`` variables of the worker's environment.
"""

from fleet.celery_app import create_app
from fleet.logs import setup_logging
from fleet.settings import Settings

settings = Settings()
setup_logging(settings.log_level)
app = create_app(settings)

# Celery's Django layout: the Celery app is loaded whenever Django starts.
from proj.celery import app as celery_app

__all__ = ["celery_app"]

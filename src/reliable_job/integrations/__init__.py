"""Adapters at the edge: job systems (Celery) and database layers (SQLAlchemy)."""

"""``make bench-peers``: reliable-job side by side with django-celery-outbox and plain Celery.

Three equal Django projects (one model, one no-op task, the same settings but for the outbox) are
written to a temporary directory (:mod:`bench.peers.projects`); each runs a measuring server in a
process of its own (:mod:`bench.peers.server`), driven in alternating blocks by the coordinator
(:mod:`bench.peers.__main__`). Everything runs in ``.venv-peers`` (``scripts/run-bench-peers.sh``).
"""

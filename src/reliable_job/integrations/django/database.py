"""The outbox in Django's databases.

Staging writes through Django's ORM on ``connections[alias]``, so a staged job joins the caller's
``transaction.atomic()`` (a savepoint in a nested block) and commits at once in autocommit. The
relay, completion and the commands use the SQLAlchemy store
(:class:`~reliable_job.integrations.sqlalchemy.SQLAlchemyDatabase`) on an engine built from the
same ``DATABASES`` entry: one implementation of the claim, for every integration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any

from reliable_job.errors import ConfigurationError, StagingError
from reliable_job.integrations.django.conf import DjangoOptions
from reliable_job.ports import OutboxStatus, OutboxWriter, StagedJob
from reliable_job.schema import notify_channel
from reliable_job.settings import Settings
from reliable_job.staging import Stager

logger = logging.getLogger(__name__)

DATABASE_OPTION = "reliable_job_database"
"""Task option: the alias of the database this task's jobs are staged in."""

_DJANGO_ONLY_OPTIONS = frozenset(
    {
        "pool",
        "server_side_binding",
        "isolation_level",
        "assume_role",
        "cursor_factory",
        "context",
        "init_command",
        "transaction_mode",
        "timeout",
        "check_same_thread",
    }
)
"""``DATABASES[...]["OPTIONS"]`` keys that are Django's own, not libpq connection parameters."""


def engine_url(alias: str) -> Any:
    """A SQLAlchemy URL for ``DATABASES[alias]`` (never log it: it holds the password)."""
    from django.db import connections
    from sqlalchemy.engine import URL

    try:
        connection = connections[alias]
    except Exception as exc:
        raise ConfigurationError(f"unknown database alias {alias!r} (see DATABASES)") from exc
    entry = connection.settings_dict
    if connection.vendor == "postgresql":
        query: dict[str, str] = {}
        for key, value in (entry.get("OPTIONS") or {}).items():
            if key in _DJANGO_ONLY_OPTIONS or isinstance(value, bool):
                continue
            if isinstance(value, (str, int)):
                query[key] = str(value)
        host = entry.get("HOST") or None
        if host and host.startswith("/"):  # a Unix socket directory
            query["host"], host = host, None
        port = entry.get("PORT")
        return URL.create(
            "postgresql+psycopg",
            username=entry.get("USER") or None,
            password=entry.get("PASSWORD") or None,
            host=host,
            port=int(port) if port else None,
            database=entry.get("NAME") or None,
            query=query,
        )
    if connection.vendor == "sqlite":
        if connection.is_in_memory_db():
            raise ConfigurationError(
                f"database {alias!r} is an in-memory SQLite database: the relay and the workers "
                "cannot reach its outbox; use a file"
            )
        return URL.create("sqlite", database=str(entry["NAME"]))
    raise ConfigurationError(
        f"database {alias!r} uses {connection.vendor}: reliable-job supports PostgreSQL and SQLite"
    )


def _utc(value: datetime | None) -> datetime | None:
    """Aware UTC for ``USE_TZ = True``; naive UTC otherwise (what SQLAlchemy's store writes)."""
    from django.conf import settings

    if value is None:
        return None
    value = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value if settings.USE_TZ else value.replace(tzinfo=None)


class DjangoWriter:
    """Inserts staged jobs on ``connections[alias]``: in its current atomic block if there is one,
    else committed at once. With ``alias=None`` each job goes to its task's alias."""

    def __init__(self, outbox: DjangoOutbox, alias: str | None) -> None:
        self._outbox = outbox
        self._alias = alias

    def write(self, jobs: Sequence[StagedJob]) -> None:
        from django.db import DatabaseError, connections

        from reliable_job.integrations.django.models import OutboxJob

        groups: dict[str, list[StagedJob]] = {}
        for job in jobs:
            alias = self._alias or self._outbox.alias_for(job.task_name)
            groups.setdefault(alias, []).append(job)
        now = _utc(datetime.now(timezone.utc))
        for alias, group in groups.items():
            rows = [
                OutboxJob(
                    job_id=j.job_id,
                    task_name=j.task_name,
                    queue=j.queue,
                    message=j.message,
                    eta=_utc(j.eta),
                    created_at=now,
                    updated_at=now,
                )
                for j in group
            ]
            try:
                # ON CONFLICT DO NOTHING, parameters bound, on this alias's connection.
                OutboxJob.objects.using(alias).bulk_create(rows, ignore_conflicts=True)
                connection = connections[alias]
                if connection.vendor == "postgresql" and self._outbox.stager.notify_due():
                    # Wakes the relays when this transaction commits (see Stager.notify_due).
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_notify(%s, '')", [notify_channel(OutboxJob._meta.db_table)])
            except DatabaseError as exc:
                raise StagingError(
                    f"cannot write to the outbox table {OutboxJob._meta.db_table!r} of database "
                    f"{alias!r}: {' '.join(str(exc).split())} (did you run `manage.py migrate`?)"
                ) from exc


class DjangoOutbox:
    """The outbox of one Celery app in the project's databases.

    ``stager`` writes through Django; the store methods (completion, status, retry-dead) cover
    every alias that holds an outbox; :meth:`store` is the SQLAlchemy store of one alias.
    """

    def __init__(self, app: Any, settings: Settings, options: DjangoOptions) -> None:
        self.app = app
        self.settings = settings
        self.options = options
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._discovered = False
        self.stager = Stager(
            settings,
            adapt=self._adapt,
            own_transaction=lambda: DjangoWriter(self, None),
        )

    # -- staging -------------------------------------------------------------------------------

    def alias_for(self, task_name: str) -> str:
        task = self.app.tasks.get(task_name)
        alias = getattr(task, DATABASE_OPTION, None) if task is not None else None
        return alias or self.options.database

    def _adapt(self, target: Any, explicit: bool) -> OutboxWriter | None:
        """``reliable_job_session=`` / ``reliable_job.bind()`` with a Django database alias or
        connection: stage in that alias's current transaction."""
        if isinstance(target, str):
            return DjangoWriter(self, target)
        alias = getattr(target, "alias", None)
        if isinstance(alias, str) and hasattr(target, "settings_dict"):
            return DjangoWriter(self, alias)
        raise ConfigurationError(
            f"cannot stage in {type(target).__name__}: pass a Django database alias or connection"
        )

    # -- the stores ------------------------------------------------------------------------------

    def aliases(self) -> list[str]:
        """Every alias holding an outbox: the configured ones, then those tasks name (the project's
        task modules are imported first, as ``celery worker`` does)."""
        if not self._discovered:
            self._discovered = True
            if not getattr(self.app.loader, "worker_initialized", False):  # the worker did it
                self.app.loader.import_default_modules()
        found = [self.options.database, *self.options.databases]
        for task in list(self.app.tasks.values()):
            alias = getattr(task, DATABASE_OPTION, None)
            if isinstance(alias, str):
                found.append(alias)
        return list(dict.fromkeys(found))

    def store(self, alias: str | None = None) -> Any:
        """The SQLAlchemy store of ``alias`` (default: the configured database), made once."""
        from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase, create_outbox_engine

        alias = alias or self.options.database
        with self._lock:
            store = self._stores.get(alias)
            if store is None:
                url = engine_url(alias).render_as_string(hide_password=False)
                engine = create_outbox_engine(url)
                store = SQLAlchemyDatabase(self.settings.replace(engine=engine, session=None))
                self._stores[alias] = store
            return store

    # STUB (settings-whole): minimal relay_stores() until the sqla-seam branch lands; resolve
    # any conflict in favour of sqla-seam's version.
    def relay_stores(self) -> list[Any]:
        """The stores relays drain: one per alias holding an outbox."""
        return [self.store(alias) for alias in self.aliases()]

    def _each(self, alias: str | None) -> Iterator[Any]:
        for name in [alias] if alias else self.aliases():
            yield self.store(name)

    def claim(self, limit: int) -> AbstractContextManager[Any]:
        return self.store().claim(limit)  # type: ignore[no-any-return]

    def complete(self, job_id: str) -> int:
        for store in self._each(None):
            count = int(store.complete(job_id))
            if count:
                return count
        return 0

    def complete_many(self, job_ids: Sequence[str]) -> int:
        # A row lives in one alias, which the id does not tell: every alias, until all are found.
        count = 0
        for store in self._each(None):
            if count >= len(job_ids):
                break
            count += int(store.complete_many(job_ids))
        return count

    def bury(self, job_id: str, error: str) -> int:
        for store in self._each(None):
            count = int(store.bury(job_id, error))
            if count:
                return count
        return 0

    def status(self, alias: str | None = None) -> OutboxStatus:
        statuses = [store.status() for store in self._each(alias)]
        ages = [s.oldest_pending_seconds for s in statuses if s.oldest_pending_seconds is not None]
        return OutboxStatus(
            pending=sum(s.pending for s in statuses),
            sent=sum(s.sent for s in statuses),
            dead=sum(s.dead for s in statuses),
            oldest_pending_seconds=max(ages) if ages else None,
        )

    def retry_dead(self, alias: str | None = None) -> int:
        return sum(int(store.retry_dead()) for store in self._each(alias))

    def requeue_unfinished(self, older_than: float, max_deliveries: int) -> tuple[int, int]:
        requeued = dead = 0
        for store in self._each(None):
            r, d = store.requeue_unfinished(older_than, max_deliveries)
            requeued, dead = requeued + r, dead + d
        return requeued, dead

    def dispose(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()  # the connection completion keeps is not the pool's to close
            store.engine.dispose()

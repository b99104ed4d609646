"""The outbox in Django's databases.

Staging writes on ``connections[alias]`` (``writer.py``), so a staged job joins the caller's
``transaction.atomic()`` (a savepoint in a nested block) and commits at once in autocommit. The
relay, completion and the commands use the SQLAlchemy store
(:class:`~reliable_job.integrations.sqlalchemy.SQLAlchemyDatabase`) on an engine built from the
same ``DATABASES`` entry: one implementation of the claim, for every integration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from reliable_job.errors import ConfigurationError
from reliable_job.integrations.django.conf import DjangoOptions
from reliable_job.integrations.django.writer import DjangoWriter
from reliable_job.ports import OutboxStatus, OutboxWriter, StagedJob
from reliable_job.settings import Settings
from reliable_job.staging import Stager

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase
    from reliable_job.integrations.sqlalchemy.claims import ClaimBySelect, ClaimByUpdate
    from reliable_job.integrations.sqlalchemy.listen import PostgresListener
    from reliable_job.ports import JobFilter, JobRow, OutboxAdmin, OutboxDatabase

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


def engine_url(alias: str) -> URL:
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


class DjangoOutbox:
    """The outbox of one Celery app in the project's databases (an
    :class:`~reliable_job.ports.OutboxDatabase`).

    ``stager`` writes through Django; each alias holding an outbox has its SQLAlchemy store
    (:meth:`store`), which its relay drains (:meth:`relay_stores`). The store methods here
    (completion, status, retry-dead) cover every alias; ``claim`` and ``listener`` are the
    configured database's.
    """

    def __init__(self, app: Any, settings: Settings, options: DjangoOptions) -> None:
        self.app = app
        self.settings = settings
        self.options = options
        self._stores: dict[str, SQLAlchemyDatabase] = {}
        self._lock = threading.Lock()
        self._discovered = False
        self.stager = Stager(settings, adapt=self._adapt, own_transaction=self._own_transaction)

    # -- staging -------------------------------------------------------------------------------

    def alias_for(self, task_name: str) -> str:
        task = self.app.tasks.get(task_name)
        alias = getattr(task, DATABASE_OPTION, None) if task is not None else None
        return alias or self.options.database

    def _adapt(self, target: object, explicit: bool) -> OutboxWriter | None:
        """``reliable_job_session=`` / ``reliable_job.bind()`` with a Django database alias or
        connection: stage in that alias's current transaction."""
        if isinstance(target, str):
            return self._writer(target)
        alias = getattr(target, "alias", None)
        if isinstance(alias, str) and hasattr(target, "settings_dict"):
            return self._writer(alias)
        raise ConfigurationError(
            f"cannot stage in {type(target).__name__}: pass a Django database alias or connection"
        )

    def _own_transaction(self) -> OutboxWriter:
        return self._writer(None)

    def _writer(self, alias: str | None) -> DjangoWriter:
        return DjangoWriter(alias, self.alias_for, self.stager.notify_due)

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

    def store(self, alias: str | None = None) -> SQLAlchemyDatabase:
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

    def relay_stores(self) -> list[SQLAlchemyDatabase]:
        """The store of every alias holding an outbox: one relay each."""
        return list(self._each())

    def _each(self, alias: str | None = None) -> Iterator[SQLAlchemyDatabase]:
        """The store of every alias holding an outbox (of ``alias`` only, when given), each made
        when reached."""
        for name in [alias] if alias else self.aliases():
            yield self.store(name)

    def _total(self, work: Callable[[SQLAlchemyDatabase], int], until: int | None = None) -> int:
        """``work`` on every alias's store, summed; the aliases left are skipped once the sum
        reaches ``until`` (a job's row lives in one alias, which its id does not tell)."""
        total = 0
        for store in self._each():
            if until is not None and total >= until:
                break
            total += work(store)
        return total

    def claim(self, limit: int) -> AbstractContextManager[ClaimBySelect | ClaimByUpdate]:
        return self.store().claim(limit)

    def listener(self) -> PostgresListener | None:
        return self.store().listener()

    def complete_many(self, job_ids: Sequence[str]) -> int:
        return self._total(lambda store: store.complete_many(job_ids), until=len(job_ids))

    def hand_off(
        self,
        job_id: str,
        jobs: Sequence[StagedJob],
        *,
        error: str | None = None,
        task_name: str | None = None,
    ) -> None:
        """On the finished job's alias (its task's ``reliable_job_database``, else the configured
        database): one transaction there holds the job's row and its continuations."""
        alias = self.alias_for(task_name) if task_name else self.options.database
        self.store(alias).hand_off(job_id, jobs, error=error, task_name=task_name)

    def bury(self, job_id: str, error: str) -> int:
        return self._total(lambda store: store.bury(job_id, error), until=1)

    def status(self, alias: str | None = None) -> OutboxStatus:
        statuses = [store.status() for store in self._each(alias)]
        ages = [s.oldest_pending_seconds for s in statuses if s.oldest_pending_seconds is not None]
        sent_ages = [s.oldest_sent_seconds for s in statuses if s.oldest_sent_seconds is not None]
        return OutboxStatus(
            pending=sum(s.pending for s in statuses),
            sent=sum(s.sent for s in statuses),
            dead=sum(s.dead for s in statuses),
            oldest_pending_seconds=max(ages) if ages else None,
            oldest_sent_seconds=max(sent_ages) if sent_ages else None,
            relays=tuple(relay for s in statuses for relay in s.relays),
            estimated=any(s.estimated for s in statuses),
        )

    def postpone(self, job_id: str, due: datetime) -> int:
        return self._total(lambda store: store.postpone(job_id, due), until=1)

    def retry_dead(self, alias: str | None = None) -> int:
        return sum(store.retry_dead() for store in self._each(alias))

    def requeue_unfinished(self, older_than: float, max_deliveries: int) -> tuple[int, int]:
        counts = [store.requeue_unfinished(older_than, max_deliveries) for store in self._each()]
        return sum(requeued for requeued, _ in counts), sum(dead for _, dead in counts)

    def close(self) -> None:
        """Release every alias's store: the connection completion keeps (not the pool's to
        close), then the engine made for it. Stores are made again when next needed."""
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()
            store.engine.dispose()

    def dispose(self) -> None:
        """:meth:`close` (its former name)."""
        self.close()

    # -- job tools (reliable_job.ports.OutboxAdmin), on every alias or on ``alias`` ------------
    # Row ids are per database: each row found says which alias it is in (JobRow.database).

    def find_jobs(
        self, where: JobFilter, *, limit: int | None = None, alias: str | None = None
    ) -> list[JobRow]:
        found: list[JobRow] = []
        for name in [alias] if alias else self.aliases():
            left = None if limit is None else limit - len(found)
            if left is not None and left <= 0:
                break
            found += [replace(row, database=name) for row in self.store(name).find_jobs(where, limit=left)]
        return found

    def count_jobs(self, where: JobFilter, *, alias: str | None = None) -> int:
        return sum(store.count_jobs(where) for store in self._each(alias))

    def get_jobs(self, key: str, *, alias: str | None = None) -> list[JobRow]:
        return [
            replace(row, database=name)
            for name in ([alias] if alias else self.aliases())
            for row in self.store(name).get_jobs(key)
        ]

    def change_jobs(
        self,
        action: str,
        where: JobFilter,
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
        alias: str | None = None,
    ) -> int:
        total = 0
        for store in self._each(alias):
            done = total

            def report(count: int, done: int = done) -> None:
                if progress is not None:
                    progress(done + count)

            total += store.change_jobs(action, where, batch_size=batch_size, progress=report)
        return total


if TYPE_CHECKING:

    def _conforms(outbox: DjangoOutbox) -> OutboxDatabase:
        return outbox

    def _administers(outbox: DjangoOutbox) -> OutboxAdmin:
        return outbox

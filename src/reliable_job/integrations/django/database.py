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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from reliable_job.errors import ConfigurationError, DuplicateJobError, StagingError
from reliable_job.integrations.django.conf import DjangoOptions
from reliable_job.ports import OutboxStatus, OutboxWriter, StagedJob, as_utc
from reliable_job.schema import notify_channel, validate_table_name
from reliable_job.settings import Settings
from reliable_job.staging import Stager

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from reliable_job.integrations.sqlalchemy import SQLAlchemyDatabase
    from reliable_job.integrations.sqlalchemy.claims import ClaimBySelect, ClaimByUpdate
    from reliable_job.integrations.sqlalchemy.listen import PostgresListener
    from reliable_job.ports import OutboxDatabase

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


def _utc(value: datetime | None, connection: Any) -> datetime | None:
    """``value`` (naive: UTC) as Django must be handed it for ``connection``'s column to hold the
    UTC instant, whatever ``USE_TZ`` and ``TIME_ZONE`` (the SQLAlchemy store compares UTC):

    - PostgreSQL (``timestamptz``): aware UTC. psycopg sends the offset, so neither the session's
      time zone (``TIME_ZONE`` when ``USE_TZ = False``) nor ``USE_TZ`` moves it;
    - SQLite (no offset stored; read back as UTC): the UTC wall time. With ``USE_TZ = False``
      naive; with ``USE_TZ = True`` Django stores an aware value's wall time in the connection's
      zone (``DATABASES[alias]["TIME_ZONE"]``, UTC by default), so it gets the UTC wall time
      labelled with that zone.
    """
    from django.conf import settings

    utc = as_utc(value)
    if utc is None or connection.vendor == "postgresql":
        return utc
    wall = utc.replace(tzinfo=None)
    return wall.replace(tzinfo=connection.timezone) if settings.USE_TZ else wall


class DjangoWriter:
    """Inserts staged jobs on ``connections[alias]``: in its current atomic block if there is one,
    else committed at once. With ``alias=None`` each job goes to its task's alias (``alias_for``);
    ``notify_due`` is the stager's ``NOTIFY`` throttle."""

    def __init__(
        self, alias: str | None, alias_for: Callable[[str], str], notify_due: Callable[[], bool]
    ) -> None:
        self._alias = alias
        self._alias_for = alias_for
        self._notify_due = notify_due

    def write(self, jobs: Sequence[StagedJob]) -> None:
        from django.db import DatabaseError, connections

        from reliable_job.integrations.django.models import OutboxJob

        groups: dict[str, list[StagedJob]] = {}
        for job in jobs:
            alias = self._alias or self._alias_for(job.task_name)
            groups.setdefault(alias, []).append(job)
        conflicts: list[str] = []
        for alias, group in groups.items():
            connection = connections[alias]
            try:
                conflicts += _insert(connection, group)
                if connection.vendor == "postgresql" and self._notify_due():
                    # Wakes the relays when this transaction commits (see Stager.notify_due).
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_notify(%s, '')", [notify_channel(OutboxJob._meta.db_table)])
            except DatabaseError as exc:
                raise StagingError(
                    f"cannot write to the outbox table {OutboxJob._meta.db_table!r} of database "
                    f"{alias!r}: {' '.join(str(exc).split())} (did you run `manage.py migrate`?)"
                ) from exc
        if conflicts:
            raise DuplicateJobError(conflicts)


def _insert(connection: Any, jobs: Sequence[StagedJob]) -> list[str]:
    """``INSERT ... ON CONFLICT (job_id) DO NOTHING RETURNING job_id`` of ``jobs`` on ``connection``
    (in its current atomic block, if any), one statement; return the ids that were already in the
    outbox. A conflict is no database error: the caller's transaction stays usable (``bulk_create
    (ignore_conflicts=True)`` would not tell which rows it skipped).

    Values are prepared by the model's fields (time zones, each backend's adaptation) and bound;
    the table and column names come from the model (the table name is validated by ``conf``).
    """
    from reliable_job.integrations.django.models import OutboxJob

    now = _utc(datetime.now(timezone.utc), connection)
    fields = [f for f in OutboxJob._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    params: list[Any] = []
    for j in jobs:
        obj = OutboxJob(
            job_id=j.job_id,
            task_name=j.task_name,
            queue=j.queue,
            message=j.message,
            eta=_utc(j.eta, connection),
            created_at=now,
            updated_at=now,
        )
        params += [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    table = validate_table_name(OutboxJob._meta.db_table)
    columns = ", ".join(quote(f.column) for f in fields)
    # Identifiers only: the validated table name and the model's own columns; values are bound.
    sql = (
        f"INSERT INTO {quote(table)} ({columns}) "  # noqa: S608
        f"VALUES {', '.join([row] * len(jobs))} "
        f"ON CONFLICT ({quote('job_id')}) DO NOTHING RETURNING {quote('job_id')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        inserted = Counter(r[0] for r in cursor.fetchall())
    conflicts = []
    for j in jobs:
        if inserted[j.job_id] > 0:
            inserted[j.job_id] -= 1
        else:
            conflicts.append(j.job_id)
    return conflicts


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
        return OutboxStatus(
            pending=sum(s.pending for s in statuses),
            sent=sum(s.sent for s in statuses),
            dead=sum(s.dead for s in statuses),
            oldest_pending_seconds=max(ages) if ages else None,
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


if TYPE_CHECKING:

    def _conforms(outbox: DjangoOutbox) -> OutboxDatabase:
        return outbox

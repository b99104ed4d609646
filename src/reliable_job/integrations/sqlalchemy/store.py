"""The outbox in one SQLAlchemy database: the stager applications stage through, and the store the
relay, completion and the CLI use (:class:`~reliable_job.ports.OutboxDatabase`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Engine, MetaData, Table

from reliable_job.heartbeat import RelayBeat
from reliable_job.integrations.sqlalchemy import claims
from reliable_job.integrations.sqlalchemy.claims import ClaimBySelect, ClaimByUpdate
from reliable_job.integrations.sqlalchemy.engine import (
    KeptConnection,
    claim_engine,
    create_outbox_engine,
    outbox_engine_for,
    sqlite_file_url,
    unavailable_as_error,
)
from reliable_job.integrations.sqlalchemy.listen import PostgresListener, postgres_listener
from reliable_job.integrations.sqlalchemy.relays import RelayHeartbeats
from reliable_job.integrations.sqlalchemy.statements import (
    BOOKKEEPING_COMMIT,
    CLAIM_PLAN,
    OutboxStatements,
    utcnow,
)
from reliable_job.integrations.sqlalchemy.table import outbox_table
from reliable_job.integrations.sqlalchemy.writers import sqlalchemy_stager
from reliable_job.ports import OutboxStatus, SentRow, StagedJob, as_utc
from reliable_job.settings import Settings

if TYPE_CHECKING:
    from reliable_job.integrations.sqlalchemy.admin_queries import OutboxAdminQueries
    from reliable_job.ports import JobFilter, JobRow, OutboxAdmin, OutboxDatabase

logger = logging.getLogger(__name__)


class SQLAlchemyDatabase:
    """The outbox table in one SQLAlchemy database."""

    def __init__(self, settings: Settings, *, metadata: MetaData | None = None) -> None:
        self.settings = settings
        # The engine of the relay, completion, the CLI and staging outside a session. On SQLite it
        # always has create_outbox_engine's set-up: a plain engine the application handed over is
        # replaced by one of the store's own on the same file (its sessions are still joined).
        if settings.engine is not None:
            self.engine: Engine = outbox_engine_for(settings.engine)
        else:
            self.engine = create_outbox_engine(settings.database_url)
        if self.engine.dialect.name == "sqlite":
            sqlite_file_url(self.engine.url)  # refuses an in-memory database
        self.table: Table = (
            metadata.tables.get(settings.table_name) if metadata is not None else None
        ) or outbox_table(MetaData(), settings.table_name)
        self.statements = OutboxStatements(self.table)
        self.notify_channel = self.statements.notify_channel
        self.stager = sqlalchemy_stager(settings, self.engine, self.statements)
        # Claims open with BEGIN IMMEDIATE on SQLite (one writer); the option is ignored elsewhere.
        self._claim_engine = claim_engine(self.engine)
        self._completion = KeptConnection(
            self.engine, BOOKKEEPING_COMMIT if self.engine.dialect.name == "postgresql" else None
        )

    def relay_stores(self) -> Sequence[SQLAlchemyDatabase]:
        """One database, one store: this one."""
        return [self]

    # -- the relay ----------------------------------------------------------------------------

    @contextmanager
    def claim(self, limit: int) -> Iterator[ClaimBySelect | ClaimByUpdate]:
        """Lock up to ``limit`` publishable rows (see :mod:`~reliable_job.integrations.sqlalchemy.claims`),
        committed when the block ends."""
        with unavailable_as_error(), claims.claim(self._claim_engine, self.statements, limit) as taken:
            yield taken

    def listener(self) -> PostgresListener | None:
        """A relay's :class:`~reliable_job.ports.Wakeup`: ``LISTEN`` on PostgreSQL (psycopg 3);
        ``None`` on SQLite (it polls). Raises when listening fails."""
        if not self.settings.listen_notify or self.engine.dialect.name != "postgresql":
            return None
        return postgres_listener(self.engine, self.notify_channel)

    def explain_claim(self, limit: int = 500) -> list[str]:
        """PostgreSQL's plan for a claim of ``limit`` rows, as the relay runs it (same statement,
        same planner settings), without running it."""
        compiled = self.statements.claim_by_update.compile(dialect=self.engine.dialect)
        params = dict(compiled.params, now=utcnow(), limit=limit)
        with unavailable_as_error(), self.engine.connect() as conn:
            conn.exec_driver_sql(CLAIM_PLAN)
            plan = conn.exec_driver_sql(f"EXPLAIN {compiled.string}", params).scalars().all()
            conn.rollback()
        return [str(line) for line in plan]

    def requeue_unfinished(self, older_than: float, max_deliveries: int) -> tuple[int, int]:
        now = utcnow()
        params = {"now": now, "cutoff": now - timedelta(seconds=older_than)}
        note = f"not completed {older_than:.0f}s after publishing"
        with unavailable_as_error(), self.engine.begin() as conn:
            dead = conn.execute(
                self.statements.requeue_dead,
                {**params, "max_deliveries": max_deliveries, "error": f"{note}, {max_deliveries} times"},
            ).rowcount
            requeued = conn.execute(self.statements.requeue, {**params, "error": note}).rowcount
        return requeued, dead

    # -- lost messages (reliable_job.recovery) -----------------------------------------------

    def sent_rows(self, older_than: float, after_id: int, limit: int, *, due_only: bool) -> list[SentRow]:
        statement = self.statements.sent_due_page if due_only else self.statements.sent_page
        params = {"cutoff": utcnow() - timedelta(seconds=older_than), "after_id": after_id, "limit": limit}
        with unavailable_as_error(), self.engine.connect() as conn:
            return [SentRow(*row) for row in conn.execute(statement, params)]

    def requeue_sent(self, rows: Sequence[SentRow], max_deliveries: int, error: str) -> tuple[int, int]:
        requeued = dead = 0
        if not rows:
            return 0, 0
        now = utcnow()
        with unavailable_as_error(), self.engine.begin() as conn:
            for row in rows:
                params = {"row_id": row.id, "seen": row.attempts, "now": now}
                if row.attempts >= max_deliveries:
                    params["error"] = f"{error}, {max_deliveries} times"
                    dead += conn.execute(self.statements.bury_checked, params).rowcount
                else:
                    requeued += conn.execute(
                        self.statements.requeue_checked, {**params, "error": error}
                    ).rowcount
        return requeued, dead

    # -- completion ---------------------------------------------------------------------------

    def complete_many(self, job_ids: Sequence[str]) -> int:
        """Delete the rows of ``job_ids`` in one statement (completion's batched deletes)."""
        ids = list(job_ids)
        if not ids:
            return 0
        if self.engine.dialect.name != "postgresql":
            with unavailable_as_error(), self.engine.begin() as conn:
                return conn.execute(self.statements.delete_jobs, {"job_ids": ids}).rowcount
        # The worker deletes the rows of finished tasks: one autocommit DELETE on a connection
        # the process keeps (no pool checkout, ping, BEGIN or COMMIT round trips).
        delete = self.statements.delete_any_job
        return self._completion.run(lambda conn: conn.execute(delete, {"job_ids": ids}).rowcount)

    def hand_off(
        self,
        job_id: str,
        jobs: Sequence[StagedJob],
        *,
        error: str | None = None,
        task_name: str | None = None,
    ) -> None:
        """One transaction on the outbox database: the finished job's row goes (deleted, or dead
        with ``error``), then its continuations are inserted (``ON CONFLICT DO NOTHING``: an id
        already there is a rerun's, kept; the job's own id, freed first, takes the row's place)."""
        dialect = self.engine.dialect.name
        notify = dialect == "postgresql" and bool(jobs) and self.stager.notify_due()
        with unavailable_as_error(), self.engine.begin() as conn:
            if error is None:
                conn.execute(self.statements.delete_jobs, {"job_ids": [job_id]})
            else:
                params = {"target_job_id": job_id, "error": error, "now": utcnow()}
                conn.execute(self.statements.bury, params)
            if jobs:
                conn.execute(self.statements.insert(dialect, notify), self.statements.rows(jobs, notify))

    def bury(self, job_id: str, error: str) -> int:
        with unavailable_as_error(), self.engine.begin() as conn:
            params = {"target_job_id": job_id, "error": error, "now": utcnow()}
            return conn.execute(self.statements.bury, params).rowcount

    def postpone(self, job_id: str, due: datetime) -> int:
        """A retry due at ``due``: the row's ``eta`` and ``sent_at`` move (one autocommit
        ``UPDATE``; on PostgreSQL on the connection completion keeps)."""
        postpone = self.statements.postpone
        params = {"target_job_id": job_id, "due": as_utc(due), "now": utcnow()}
        if self.engine.dialect.name != "postgresql":
            with unavailable_as_error(), self.engine.begin() as conn:
                return conn.execute(postpone, params).rowcount
        return self._completion.run(lambda conn: conn.execute(postpone, params).rowcount)

    def close(self) -> None:
        """Release the connection completion keeps (PostgreSQL)."""
        self._completion.close()

    # -- the CLI ------------------------------------------------------------------------------

    def status(self) -> OutboxStatus:
        """Counts, oldest pending and sent ages, the relays' heartbeats: index walks only, the
        counts estimated above a threshold on PostgreSQL (``integrations/sqlalchemy/health.py``)."""
        from reliable_job.integrations.sqlalchemy.health import classified_errors, read_status

        with classified_errors(self.table):  # a refused login is not an outage
            return read_status(self.engine, self.table, self.relays())

    def retry_dead(self) -> int:
        with unavailable_as_error(), self.engine.begin() as conn:
            return conn.execute(self.statements.retry_dead, {"now": utcnow()}).rowcount

    def create_table(self) -> None:
        with unavailable_as_error():
            self.table.metadata.create_all(self.engine, tables=[self.table])
        self.heartbeats.create()

    # -- the relays' heartbeats (reliable_job.heartbeat) -------------------------------------------

    @functools.cached_property
    def heartbeats(self) -> RelayHeartbeats:
        """The ``<table>_relays`` rows of this database."""
        return RelayHeartbeats(self.engine, self.table.name)

    def record_relay(self, beat: RelayBeat, prune_before: datetime | None) -> None:
        self.heartbeats.record_relay(beat, prune_before)

    def forget_relay(self, relay_id: str) -> None:
        self.heartbeats.forget_relay(relay_id)

    def relays(self) -> list[RelayBeat]:
        return self.heartbeats.relays()

    def probe(self) -> None:
        """Read the outbox once: :class:`~reliable_job.errors.DatabaseMisconfigured` when the
        configuration is wrong for good, ``DatabaseUnavailable`` when the database is unreachable."""
        from reliable_job.integrations.sqlalchemy.health import probe

        probe(self.engine, self.table)

    # -- job tools (reliable_job.ports.OutboxAdmin: the queries in admin_queries.py) ----------

    @property
    def admin(self) -> OutboxAdminQueries:
        """The job tools' queries on this table (made on first use)."""
        queries: OutboxAdminQueries | None = self.__dict__.get("_admin")
        if queries is None:
            from reliable_job.integrations.sqlalchemy.admin_queries import OutboxAdminQueries

            queries = self.__dict__["_admin"] = OutboxAdminQueries(self.engine, self.table)
        return queries

    def find_jobs(self, where: JobFilter, *, limit: int | None = None) -> list[JobRow]:
        return self.admin.find_jobs(where, limit=limit)

    def count_jobs(self, where: JobFilter) -> int:
        return self.admin.count_jobs(where)

    def get_jobs(self, key: str) -> list[JobRow]:
        return self.admin.get_jobs(key)

    def change_jobs(
        self,
        action: str,
        where: JobFilter,
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        return self.admin.change_jobs(action, where, batch_size=batch_size, progress=progress)


if TYPE_CHECKING:

    def _conforms(settings: Settings) -> OutboxDatabase:
        return SQLAlchemyDatabase(settings)

    def _administers(settings: Settings) -> OutboxAdmin:
        return SQLAlchemyDatabase(settings)

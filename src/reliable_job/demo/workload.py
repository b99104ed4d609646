"""The demo's workload: jobs staged in transactions, some of them rolled back."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

ROLLBACK_RATE = 0.2
MAX_JOBS_PER_TRANSACTION = 10


def transactions(jobs: int, seed: int = 42) -> Iterator[tuple[range, bool]]:
    """Order numbers 1..``jobs`` cut into transactions of 1-10 jobs, each with whether it rolls
    back (about 20% do); the same every run."""
    rng = random.Random(seed)
    first = 1
    while first <= jobs:
        size = min(rng.randint(1, MAX_JOBS_PER_TRANSACTION), jobs - first + 1)
        yield range(first, first + size), rng.random() < ROLLBACK_RATE
        first += size


def stage_transaction(engine: Engine, task: Any, orders: range, rollback: bool) -> list[str]:
    """Enqueue one job per order in one transaction, then commit it or roll it back.

    Needs no broker: the jobs are written to the outbox in the session's transaction.
    """
    with Session(engine) as session:
        ids = [str(task.apply_async((order,), reliable_job_session=session).id) for order in orders]
        if rollback:
            session.rollback()
        else:
            session.commit()
    return ids


@dataclass
class Ledger:
    """The task ids the demo committed and rolled back."""

    committed: set[str] = field(default_factory=set)
    rolled_back: set[str] = field(default_factory=set)
    transactions_committed: int = 0
    transactions_rolled_back: int = 0

    @property
    def staged(self) -> int:
        return len(self.committed) + len(self.rolled_back)

    def record(self, ids: list[str], rolled_back: bool) -> None:
        if rolled_back:
            self.rolled_back.update(ids)
            self.transactions_rolled_back += 1
        else:
            self.committed.update(ids)
            self.transactions_committed += 1

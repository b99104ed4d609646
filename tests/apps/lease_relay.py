"""A relay that dies between its claim's two transactions (tests/e2e/test_e2e_sqlite.py).

It runs one pass of the test app's relay (``tests.apps.celery_app``, configured from the
environment) with the claim lease shortened to ``RJ_TEST_LEASE_SECONDS``: it claims a batch,
publishes it, prints ``published N`` and then hangs before the claim's second transaction, until
the test SIGKILLs it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

from reliable_job.integrations.sqlalchemy import claims
from reliable_job.ports import ClaimedRow
from tests.apps.celery_app import runtime

claims.LEASE_SECONDS = float(os.environ["RJ_TEST_LEASE_SECONDS"])

relay = runtime.relay()
publish = relay.broker.publish  # type: ignore[union-attr]


def publish_then_hang(rows: Sequence[ClaimedRow]) -> Mapping[int, Exception]:
    failures = publish(rows)
    print(f"published {len(rows) - len(failures)}", flush=True)
    time.sleep(3600)
    return failures


relay.broker.publish = publish_then_hang  # type: ignore[union-attr,method-assign]
relay.run_once()  # type: ignore[union-attr]

"""``manage.py reliable_job check`` / ``status --check``: the thresholds of ``reliable-job check``
over every outbox database, one line per failed check; the relays' table from ``0002_relays``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from io import StringIO

import pytest
from django.core.management import call_command

from tests.django.conftest import ALL_DATABASES

pytestmark = [pytest.mark.django_db(transaction=True, databases=ALL_DATABASES), pytest.mark.e2e]


def check(*args: str) -> tuple[int, list[str]]:
    out = StringIO()
    try:
        call_command("reliable_job", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, out.getvalue().splitlines()


def test_check_over_every_database():
    from reliable_job.integrations.django.models import OutboxJob, RelayHeartbeat
    from tests.django.testapp.tasks import record, record_other

    record.delay("a")
    record_other.delay("b")
    code, lines = check("check", "--max-dead", "0", "--max-pending-age", "600")
    assert (code, len(lines)) == (0, 1) and lines[0].startswith("ok pending=2 sent=0 dead=0"), lines
    assert check("status", "--check", "--max-dead", "0")[0] == 0

    OutboxJob.objects.using("other").update(state="dead")
    old = datetime.now(timezone.utc) - timedelta(hours=1)
    OutboxJob.objects.using("default").update(created_at=old)
    code, lines = check("check", "--max-dead", "0", "--max-pending-age", "60")
    assert code == 1 and len(lines) == 2, lines
    assert "pending too long" in lines[0] and "too many dead jobs: 1" in lines[1], lines

    # the relays' table exists (0002_relays) and status reads it
    RelayHeartbeat.objects.create(
        relay_id="h:1:x", started_at=old, last_pass_at=old, beat_at=old, published=3
    )
    code, lines = check("check", "--max-relay-silence", "60", "--database", "default")
    assert code == 1 and any("relays silent" in line for line in lines), lines

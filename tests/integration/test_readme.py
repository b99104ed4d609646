"""The README's quickstart runs as written (with its URLs pointed at the test servers)."""

from __future__ import annotations

import json
import re

import redis as redis_lib
from sqlalchemy import create_engine, text

from tests.conftest import ROOT

README = ROOT / "README.md"


def quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return blocks[0]


def test_quickstart_is_short():
    """The quickstart stays under 15 lines of code."""
    lines = [line for line in quickstart().splitlines() if line.strip()]
    assert len(lines) < 15


def test_quickstart_stages_then_relays_the_job(tmp_path, redis_url, monkeypatch):
    """Running the quickstart stages one job in the committed transaction; a relay pass publishes it."""
    monkeypatch.chdir(tmp_path)
    code = quickstart().replace("redis://localhost:6379/0", redis_url)
    namespace: dict[str, object] = {"__name__": "shop"}
    exec(compile(code, "README.md", "exec"), namespace)

    app = namespace["app"]
    runtime = app.reliable_job  # type: ignore[attr-defined]
    assert runtime.database.status().pending == 1
    with create_engine(f"sqlite:///{tmp_path / 'shop.db'}").connect() as conn:
        assert conn.execute(text("SELECT id FROM orders")).scalars().all() == [42]

    relay = runtime.relay()
    assert relay.run_once() == 1
    relay.broker.close()
    client = redis_lib.Redis.from_url(redis_url)
    message = json.loads(client.lpop("celery"))
    assert message["headers"]["task"] == "shop.send_receipt"
    assert runtime.database.status().as_dict() | {"oldest_pending_seconds": None} == {
        "pending": 0,
        "sent": 1,
        "dead": 0,
        "oldest_pending_seconds": None,
    }
    namespace["Session"].remove()  # type: ignore[attr-defined]
    client.close()

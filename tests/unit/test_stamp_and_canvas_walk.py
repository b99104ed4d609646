"""The stamp (a message header) and the walk that finds a reliable task inside a message."""

from __future__ import annotations

from celery import Celery, chain, chord, group

from reliable_job.integrations.celery.canvas import carries_reliable, signature_carries_reliable
from reliable_job.integrations.celery.stamp import HEADER, VALUE, is_stamped, stamp

app = Celery("walk", set_as_current=False)


@app.task(name="t.reliable", shared=False)
def reliable(*args):
    return args


@app.task(name="t.plain", shared=False)
def plain(*args):
    return args


def is_reliable(name: str) -> bool:
    return name == "t.reliable"


def test_stamp_copies_the_callers_headers_and_is_read_back_from_any_request_form():
    shared = {"tenant": "t1"}
    options = {"headers": shared}
    stamp(options)
    assert options["headers"] == {"tenant": "t1", HEADER: VALUE}
    assert shared == {"tenant": "t1"}
    assert is_stamped(options["headers"])
    assert not is_stamped({"tenant": "t1"}) and not is_stamped(None)

    class Context:  # a task's request: headers become attributes and request.headers
        headers = {HEADER: VALUE}

    class WorkerRequest:
        request_dict = {HEADER: VALUE}

    assert is_stamped(Context()) and is_stamped(WorkerRequest())


def test_a_plain_call_is_not_walked_and_carries_nothing():
    assert not carries_reliable(is_reliable, "t.plain", (), {}, {})


def test_links_chains_chords_and_canvas_tasks_are_walked():
    assert carries_reliable(is_reliable, "t.plain", (), {}, {"link": [reliable.si()]})
    assert carries_reliable(is_reliable, "t.plain", (), {}, {"link_error": [dict(reliable.si())]})
    assert carries_reliable(is_reliable, "t.plain", (), {}, {"chain": [plain.si(), reliable.si()]})
    assert carries_reliable(is_reliable, "t.plain", (), {}, {"chord": reliable.si()})
    nested = plain.si().set(link=[plain.si().set(link=[reliable.si()])])
    assert carries_reliable(is_reliable, "t.plain", (), {}, {"chain": [nested]})
    assert not carries_reliable(is_reliable, "t.plain", (), {}, {"link": [plain.si()], "chain": []})
    assert carries_reliable(is_reliable, "celery.map", (), {"task": reliable.s(), "it": [1]}, {})
    assert carries_reliable(is_reliable, "celery.starmap", (reliable.s(), [(1,)]), {}, {})
    assert carries_reliable(is_reliable, "celery.chord_unlock", ("gid", dict(reliable.s())), {}, {})
    assert not carries_reliable(is_reliable, "celery.map", (), {"task": plain.s(), "it": [1]}, {})


def test_groups_and_chords_are_walked_whole():
    assert signature_carries_reliable(is_reliable, group(plain.si(), reliable.si()), {})
    assert not signature_carries_reliable(is_reliable, group(plain.si(), plain.si()), {})
    assert signature_carries_reliable(is_reliable, chord([plain.si()], reliable.si()), {})
    assert signature_carries_reliable(is_reliable, chord([plain.si(), reliable.si()], plain.si()), {})
    assert signature_carries_reliable(is_reliable, group(chain(plain.si(), group(reliable.si()))), {})
    assert signature_carries_reliable(is_reliable, group(plain.si()), {"chord": reliable.si()})

"""Which messages carry a reliable task: canvas signatures inside a message, and groups.

A message is staged when its own task is reliable or when any signature it carries is: Celery
puts the rest of a chain (``chain``), callbacks (``link``, ``link_error``) and a chord's body
(``chord``) in the message's options, and its canvas tasks (``celery.map``, ``celery.starmap``,
``celery.chunks``, ``celery.chord_unlock``, ``celery.chord``) carry the user's signatures in their
arguments. If such a message were published directly, a rolled-back transaction would still run
its first step, and the steps it carries after it.

A group has no message of its own: Celery publishes its members one by one. While a group or a
chord that carries a reliable task is being applied, :func:`reliable_scope` says so, and every
message the app publishes meanwhile (the members, ``chord_unlock``) is staged: the canvas is
staged whole, so a rollback runs none of it.

Signatures are plain dicts (``task``, ``args``, ``kwargs``, ``options``, ``subtask_type``), walked
to a bounded depth; nothing is deserialized or unpickled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

IsReliable = Callable[[str], bool]

CARRYING_OPTIONS = ("link", "link_error", "chain", "chord")
"""Message (and signature) options that hold signatures Celery publishes after the task."""

CANVAS_TASKS: dict[str, tuple[tuple[str, int], ...]] = {
    # name: where its signatures are, as (keyword, position)
    "celery.map": (("task", 0),),
    "celery.starmap": (("task", 0),),
    "celery.chunks": (("task", 0),),
    "celery.chord_unlock": (("callback", 1),),
    "celery.chord": (("header", 0), ("body", 1)),
    "celery.group": (("tasks", 0),),
    "celery.chain": (("tasks", 0),),
}
"""Celery's canvas tasks and signature types, and which of their arguments are signatures."""

MAX_DEPTH = 32
"""Deeper nesting is taken as carrying a reliable task (staging what need not be is harmless)."""


def carries_reliable(
    is_reliable: IsReliable, name: str, args: Any, kwargs: Any, options: Mapping[str, Any]
) -> bool:
    """Whether a message for task ``name`` carries a reliable task in its options or arguments.

    Cheap for a plain call: no option that holds signatures and not a canvas task, no walk.
    """
    carrying = [options[key] for key in CARRYING_OPTIONS if options.get(key)]
    if not carrying and name not in CANVAS_TASKS:
        return False
    return any(_any_reliable(is_reliable, value, 1) for value in carrying) or _arguments_reliable(
        is_reliable, name, args, kwargs, 1
    )


def signature_carries_reliable(is_reliable: IsReliable, signature: Any, options: Mapping[str, Any]) -> bool:
    """Whether a canvas ``signature`` (a group, a chord) or the call ``options`` it is applied
    with hold a reliable task anywhere."""
    if _any_reliable(is_reliable, signature, 1):
        return True
    return any(_any_reliable(is_reliable, options.get(key), 1) for key in CARRYING_OPTIONS)


def _any_reliable(is_reliable: IsReliable, value: Any, depth: int) -> bool:
    if not value:
        return False
    if isinstance(value, Mapping):
        name = value.get("task")
        if not isinstance(name, str):
            return False
        if depth > MAX_DEPTH or is_reliable(name):
            return True
        options = value.get("options")
        if isinstance(options, Mapping) and any(
            _any_reliable(is_reliable, options.get(key), depth + 1) for key in CARRYING_OPTIONS
        ):
            return True
        return _arguments_reliable(is_reliable, name, value.get("args"), value.get("kwargs"), depth + 1)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        # a list of signatures (links, chain steps, group members); a tuple (name, args) is not one
        return any(_any_reliable(is_reliable, item, depth + 1) for item in value if isinstance(item, Mapping))
    return False


def _arguments_reliable(is_reliable: IsReliable, name: str, args: Any, kwargs: Any, depth: int) -> bool:
    places = CANVAS_TASKS.get(name)
    if not places:
        return False
    for keyword, position in places:
        value = None
        if isinstance(kwargs, Mapping):
            value = kwargs.get(keyword)
        if value is None and isinstance(args, Sequence) and len(args) > position:
            value = args[position]
        if _any_reliable(is_reliable, value, depth):
            return True
    return False


# -- groups and chords: staged whole ---------------------------------------------------------------

_scope: ContextVar[Any] = ContextVar("reliable_job_canvas_scope", default=None)


def reliable_scope(app: Any) -> bool:
    """True while ``app`` applies a group or chord that carries a reliable task."""
    return _scope.get() is app


def wrap_canvas() -> None:
    """Make ``group.apply_async`` and ``chord.apply_async`` open :func:`reliable_scope` when the
    canvas carries a reliable task of an app with reliable-job installed (once per process;
    other apps are untouched)."""
    from celery import canvas

    for cls in (canvas.group, canvas._chord):
        original = cls.apply_async
        if getattr(original, "_reliable_job_scope", False):
            continue
        cls.apply_async = _scoped(original)


def _scoped(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def apply_async(self: Any, *args: Any, **options: Any) -> Any:
        app = self.app
        runtime = getattr(app, "reliable_job", None)
        if (
            runtime is None
            or _scope.get() is app
            or not signature_carries_reliable(runtime.is_reliable, self, options)
        ):
            return original(self, *args, **options)
        token = _scope.set(app)
        try:
            return original(self, *args, **options)
        finally:
            _scope.reset(token)

    apply_async._reliable_job_scope = True  # type: ignore[attr-defined]
    return apply_async

"""What a broker error means for the relay: an outage of the whole batch, or one row's refusal.

Only a lost connection or a timeout is an outage (:func:`is_outage`: ``BrokerUnavailable``, the
relay keeps the whole batch pending). Anything the broker refuses for one row or one Redis key is
that row's failure, and every other row of the batch is published; a message routed to no queue
at all is :func:`unroutable`. On Redis both publish paths run their commands as one pipeline,
executed once without ``raise_on_error`` (:func:`execute`): every command reports its own result,
and an outage answer is the batch's only when Redis accepted none of them
(:func:`raise_if_nothing_accepted`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kombu.exceptions import InconsistencyError, OperationalError

from reliable_job.errors import BrokerUnavailable, MessageUnroutable
from reliable_job.integrations.celery.decoding import publish_arguments


def execute(pipe: Any) -> list[object]:
    """Run a pipeline once (never retried: the fast path is only taken where Redis will not retry
    it), each command's error in its place. An exception from ``execute`` itself (connection lost,
    timeout, the connection's health check refused) means the pipeline could not run as a whole:
    the batch's outage, nothing reported published."""
    try:
        return list(pipe.execute(raise_on_error=False))
    except Exception as exc:
        raise BrokerUnavailable(f"broker unavailable: {type(exc).__name__}: {exc}") from exc


def raise_if_nothing_accepted(results: Sequence[object], is_outage: Callable[[BaseException], bool]) -> None:
    """An outage answer (``READONLY``: a replica after failover) is the batch's outage only
    when Redis accepted none of its commands; otherwise the accepted rows are reported
    published and the others fail alone (never pushed twice by the same pass)."""
    if results and not any(accepted(r) for r in results):
        first = results[0]
        if isinstance(first, Exception) and is_outage(first):
            raise first


def accepted(result: object) -> bool:
    """Whether a command's result in a pipeline's results is an answer rather than an error."""
    return not isinstance(result, Exception)


def unroutable(text: str) -> MessageUnroutable:
    """The failure of a stored message that kombu routes to no queue (it would drop it)."""
    try:
        _, kwargs = publish_arguments(text)
        where = f"exchange {kwargs['exchange']!r} with routing key {kwargs['routing_key']!r}"
    except Exception:
        where = "its exchange and routing key"
    return MessageUnroutable(f"no queue is bound to {where}: the broker would drop the message")


def from_redis(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes is an error redis-py raised."""
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is installed with the celery extra
        return False
    cause: BaseException | None = exc
    for _ in range(10):
        if cause is None:
            return False
        if isinstance(cause, RedisError):
            return True
        cause = cause.__cause__
    return False


def _error_classes() -> tuple[
    tuple[type[BaseException], ...], tuple[type[BaseException], ...], tuple[type[BaseException], ...]
]:
    """(always an outage, refusals, outages unless a refusal) exception classes."""
    outage: tuple[type[BaseException], ...] = ()
    refusal: tuple[type[BaseException], ...] = (KeyError, InconsistencyError)
    unreachable: tuple[type[BaseException], ...] = (OperationalError, OSError)
    try:
        from redis import exceptions as redis_errors
    except ImportError:  # pragma: no cover - redis is installed with the celery extra
        return outage, refusal, unreachable
    outage = (redis_errors.ReadOnlyError,)
    refusal = (*refusal, redis_errors.ResponseError, redis_errors.DataError)
    unreachable = (*unreachable, redis_errors.ConnectionError, redis_errors.TimeoutError)
    return outage, refusal, unreachable


def is_outage(exc: BaseException, connection_errors: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``exc`` means the broker cannot be reached now (an outage: the relay keeps the whole
    batch pending and backs off) rather than a refusal of one row or one key (that row fails alone).

    Outage: a lost or refused connection or a timeout (redis-py's ``ConnectionError`` and
    ``TimeoutError`` with their subclasses: authentication, ``LOADING``; ``OSError``; kombu's
    ``OperationalError``; the transport's other ``connection_errors``), and ``READONLY`` (a
    replica after a failover: every write would fail).

    Refusal: a command error the server answered (redis ``ResponseError``: ``WRONGTYPE``,
    ``OOM``, ``MISCONF``, ``NOSCRIPT``...), a ``KeyError`` (Celery's ``QueueNotFound``, a routing
    lookup), kombu's ``InconsistencyError`` (no route), and anything else. kombu's Redis transport
    lists ``KeyError`` and ``InconsistencyError`` among its connection errors (for its consumer's
    poller) and ``ResponseError`` among its channel errors, so its two tuples cannot tell them
    apart: the classes are checked here, on the original error first (the deepest ``__cause__``:
    kombu raises ``BatchPublishError`` from the redis error that failed its batch).
    """
    outage, refusal, unreachable = _error_classes()
    unreachable = (*unreachable, *(t for t in connection_errors if not issubclass(t, refusal)))
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__
    for error in reversed(chain):
        if isinstance(error, outage):
            return True
        if isinstance(error, refusal):
            return False
        if isinstance(error, unreachable):
            return True
    return False

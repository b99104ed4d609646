"""The exceptions reliable-job raises. Every one derives from :class:`ReliableJobError`."""

from __future__ import annotations


class ReliableJobError(Exception):
    """Base class of every error raised by reliable-job."""


class ConfigurationError(ReliableJobError, ValueError):
    """A setting is missing or has a value reliable-job cannot use."""


class NotSerializableError(ReliableJobError, TypeError):
    """The job's arguments cannot be encoded by the task's serializer.

    Raised at the call site, before anything is staged; the caller's transaction is left usable.
    """


class StagingError(ReliableJobError):
    """The job could not be written to the outbox."""


class BrokerUnavailable(ReliableJobError):
    """The broker cannot be reached; the relay keeps the rows pending and retries."""


class DatabaseUnavailable(ReliableJobError):
    """The outbox database cannot be reached; the relay retries."""


class UnknownMessageFormat(ReliableJobError):
    """A stored message is in a format version newer than this relay reads.

    A newer release of reliable-job wrote it (producers upgraded before relays). The relay leaves
    the row pending, untouched but for a later retry time, so a relay that reads the version (after
    the upgrade) publishes it; it is neither published nor set dead.
    """

    def __init__(self, version: int) -> None:
        super().__init__(f"stored message format version {version} is newer than this relay reads")
        self.version = version


class MessageUnroutable(ReliableJobError):
    """The broker would drop the message: no queue is bound to its exchange and routing key.

    kombu's Redis transport silently discards such a message (as it would for Celery's own
    publish); the relay reports it as the row's failure instead of marking it sent, so it is
    retried with backoff and then set dead with this error, never lost unseen.
    """


class DuplicateJobError(StagingError):
    """A job with this id is already in the outbox (pending, sent, dead, or not yet deleted after
    it completed): staging it again would silently never run it.

    Raised at the call site; nothing was written for the ids in ``job_ids`` and the caller's
    transaction stays usable (the other jobs of the same call, if any, were staged in it). Celery's
    retries of a running job and the hand-off of a finished job's continuations (``Task.replace``)
    reuse an id legitimately and never raise it.
    """

    def __init__(self, job_ids: list[str]) -> None:
        self.job_ids = job_ids
        shown = ", ".join(job_ids[:5]) + (f" and {len(job_ids) - 5} more" if len(job_ids) > 5 else "")
        super().__init__(
            f"a job with id {shown} is already in the outbox: not staged again (choose another "
            "task_id, or wait until that job has completed)"
        )


class DatabaseMisconfigured(ConfigurationError):
    """The outbox database refuses this configuration for good: authentication refused, an
    unknown database, a missing outbox table. A relay started so exits with one line saying which
    (an unreachable database, by contrast, is waited out)."""

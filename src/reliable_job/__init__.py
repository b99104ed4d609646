"""reliable-job: transactional, durable background jobs (a transactional outbox for Celery)."""

from reliable_job.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DatabaseUnavailable,
    DuplicateJobError,
    NotSerializableError,
    ReliableJobError,
    StagingError,
)
from reliable_job.settings import Settings
from reliable_job.staging import bind

__version__ = "0.1.0"
"""The one place the version is written: pyproject.toml reads it (``[tool.hatch.version]``)."""

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "DatabaseUnavailable",
    "DuplicateJobError",
    "NotSerializableError",
    "ReliableJobError",
    "Settings",
    "StagingError",
    "__version__",
    "bind",
]

"""The producer side: `from producer import Client`."""

from producer.client import Client, JobCancelled, JobFailed, JobNotFound
from tasks.requests import InvalidRequest

__all__ = ["Client", "InvalidRequest", "JobCancelled", "JobFailed", "JobNotFound"]

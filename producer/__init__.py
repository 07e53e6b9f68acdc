"""The producer side: `from producer import Client`."""

from varco.producer.client import Client, JobCancelled, JobFailed, JobNotFound
from varco.tasks.connections import BrokerUnavailable
from varco.tasks.fair_queue import QueueFull
from varco.tasks.requests import InvalidRequest

__all__ = ["BrokerUnavailable", "Client", "InvalidRequest", "JobCancelled", "JobFailed", "JobNotFound", "QueueFull"]

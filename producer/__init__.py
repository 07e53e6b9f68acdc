"""The producer side: `from producer import Client`."""

from varco.producer.batches import BatchNotFound
from varco.producer.client import Client, JobCancelled, JobFailed, JobNotFound, StreamNotRequested
from varco.tasks.connections import BrokerUnavailable
from varco.tasks.fair_queue import QueueFull
from varco.tasks.requests import IdempotencyKeyReused, InvalidRequest

__all__ = [
    "BatchNotFound",
    "BrokerUnavailable",
    "Client",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "QueueFull",
    "StreamNotRequested",
]

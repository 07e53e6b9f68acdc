"""Following a streamed job's text in the gateway: the asyncio reader of tasks/delta_stream.py.

Yields each `Delta` as the worker publishes it and ends with one `StreamEnd`: the run's own, or, when the
job ended without its run writing one (cancelled in the queue, failed at its claim), one made from the
job's record once the stream has nothing more. As `Client.stream` does, the sync twin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from varco.tasks.async_status import AsyncStatusStore
from varco.tasks.delta_stream import START, AsyncDeltaStream, Entry, StreamEnd

BLOCK_MS = 1000  # with no new text for this long, the record is read: did the job end elsewhere?
LOST = "lost"  # the StreamEnd state of a job whose record expired before it ended


async def follow(
    deltas: AsyncDeltaStream, statuses: AsyncStatusStore, job_id: str, after: str = START
) -> AsyncIterator[Entry]:
    """Entries after `after` until, and with, the stream's end."""
    while True:
        entries = await deltas.read(job_id, after, block_ms=BLOCK_MS)
        if not entries:
            status = await statuses.get(job_id)
            if status is None or status.state.finished:
                state = status.state.value if status is not None else LOST
                entries = await deltas.read(job_id, after) or [StreamEnd(after, state)]
        for entry in entries:
            yield entry
            if isinstance(entry, StreamEnd):
                return
            after = entry.id

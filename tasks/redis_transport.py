"""kombu's Redis transport with one Redis command per delivery and one per ack (issue 24 §1).

Stock kombu keeps an unacknowledged message twice: its tag in the `unacked_index` sorted set (scored by
delivery time, what the restore sweep reads) and its payload in the `unacked` hash, written and removed in
MULTI/EXEC blocks: 4 commands at delivery, 4 at ack. Here the payload IS the member of one sorted set,
`keys.UNACKED_MESSAGES`: member = the JSON `[raw message, exchange, routing_key]` kombu keeps in its hash,
score = delivery time. Delivery is one ZADD, ack (or a reject without requeue) one ZREM of the member the
QoS remembers for the tag. One command is atomic, so nothing is lost by dropping MULTI/EXEC.

Restores (the sweep of entries older than the visibility timeout, under kombu's mutex as before; a requeue;
a channel's unacked messages at shutdown) remove the member and push the message back in one WATCH/MULTI
transaction, and push only when the member was still there: a message is restored at most once, and never
after its ack.

The set has its own name, not `unacked_index`: a stock worker's sweep reads `unacked_index` and drops a
member it finds no payload for in the hash, so a new-layout entry there would be lost to an old worker
during a rolling upgrade (or a rollback). Apart, each sweep only sees what it understands, and this one
also restores the stock entries (`unacked_index` + `unacked`) the stock way: nothing is lost either way.

`Connection` makes the Redis URL schemes resolve to these classes: Celery builds its connections through
`celery_app`'s AMQP class, which names it. `broker_transport` alone would not do: kombu re-resolves the
transport from the URL scheme when it switches to the next URL of a failover list.
"""

from __future__ import annotations

from time import time
from typing import Any

import kombu
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from varco.tasks import keys

# Delivery tag -> the member this process wrote for it: acks, requeues and the lease keeper's re-scoring
# need the exact bytes. Tags are uuid4s (kombu sets them at publish), so one map serves every channel of
# the process; a worker runs its tasks in threads, so the lease keeper shares it.
_MEMBERS: dict[str, str] = {}


def unacked_member(delivery_tag: str) -> str | None:
    """The sorted-set member of a message this process holds unacknowledged (None: not one of ours)."""
    return _MEMBERS.get(delivery_tag)


class QoS(kombu_redis.QoS):
    messages_key = keys.UNACKED_MESSAGES

    def append(self, message: Any, delivery_tag: str) -> None:
        """One ZADD in place of MULTI, ZADD, HSET, EXEC."""
        delivery = message.delivery_info
        member = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            client.zadd(self.messages_key, {member: time()})
        _MEMBERS[delivery_tag] = member
        kombu_redis.virtual.QoS.append(self, message, delivery_tag)  # the in-memory bookkeeping only

    def ack(self, delivery_tag: str) -> None:
        """One ZREM in place of MULTI, ZREM, HDEL, EXEC."""
        self._forget(delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._forget(delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def _forget(self, delivery_tag: str) -> None:
        member = _MEMBERS.get(delivery_tag)
        if member is None:  # not written by this QoS (cannot happen on one channel): the stock layout
            self._remove_from_indices(delivery_tag).execute()
            return
        with self.channel.conn_or_acquire() as client:
            client.zrem(self.messages_key, member)
        # Only now: an ack that failed leaves the tag held, and `restore_unacked` restores it at shutdown
        # (as in kombu, whose ack raises before its in-memory bookkeeping too).
        _MEMBERS.pop(delivery_tag, None)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """A message this process holds (requeue, shutdown: `restore_unacked` calls this for each), or a
        stock entry the sweep found."""
        member = _MEMBERS.pop(bytes_to_str(tag), None)
        if member is None:
            super().restore_by_tag(tag, client=client, leftmost=leftmost)
        else:
            self.restore_member(member, client, leftmost)

    def restore_member(self, member: str, client: Any = None, leftmost: bool = False) -> None:
        """ZREM and re-push in one transaction, the push only if the member was still there (not acked,
        not restored by another worker's sweep)."""
        # ZSCORE is not among the commands kombu's global_keyprefix client prefixes: spell the key in full.
        full_key = f"{getattr(self.channel, 'global_keyprefix', '') or ''}{self.messages_key}"

        def restore_transaction(pipe: Any) -> None:
            present = pipe.zscore(full_key, member) is not None
            pipe.multi()
            if present:
                pipe.zrem(self.messages_key, member)
                payload, exchange, routing_key = loads(member)
                self.channel._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.messages_key)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's sweep (same throttle, same mutex, same batch size) over both layouts."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = time() - self.visibility_timeout
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    for key, restore in (
                        (self.messages_key, self.restore_member),
                        (self.unacked_index_key, super().restore_by_tag),  # stock entries, the stock way
                    ):
                        visible = client.zrange(key, ceil, 0, desc=True, byscore=True, offset=num and start, num=num)
                        for entry in visible or []:
                            restore(bytes_to_str(entry), client)
            except kombu_redis.MutexHeld:
                pass


class Channel(kombu_redis.Channel):
    QoS = QoS


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


# kombu's names for the Redis URL schemes -> the transports above.
TRANSPORTS: dict[str, type] = {"redis": Transport, "rediss": Transport, "sentinel": SentinelTransport}


class Connection(kombu.Connection):
    """A kombu Connection whose Redis URLs (redis://, rediss://, sentinel://, failover lists of them) use
    the transports above; every other transport (amqp://) resolves as in kombu."""

    def get_transport_cls(self) -> Any:
        # Resolved here, not in `transport_cls`: kombu keeps the scheme there (`rediss` turns on TLS
        # defaults, `info()` and `as_uri()` print it) and resets it on a failover switch.
        if isinstance(self.transport_cls, str) and self.transport_cls in TRANSPORTS:
            return TRANSPORTS[self.transport_cls]
        return super().get_transport_cls()

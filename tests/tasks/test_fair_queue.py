"""The fair queue on a real redis-server: stride shares, work conservation, newcomers, priorities, tickets
bound once, deadlines, exact admission under racing submitters, revokes."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import redis

from varco.tasks.fair_queue import FairQueue, QueuedJob, QueueFull, job_body, ticket_kwargs, ticket_queue
from varco.tasks.tenants import InvalidTenant, check_tenant, metric_label, parse_weights

Q = "varco"


@pytest.fixture
def client(flushed_redis: redis.Redis) -> redis.Redis:
    return flushed_redis


def job(job_id: str, tenant: str, priority: int = 4, deadline_s: float | None = None, queue: str = Q) -> QueuedJob:
    body = job_body(job_id, {"image_uri": "file:///x.png", "task": "caption"}, "2026-01-01T00:00:00+00:00")
    return QueuedJob(job_id, queue, tenant, priority, body, deadline_s)


def fill(fq: FairQueue, tenant: str, n: int, **kw: object) -> None:
    fq.insert([job(f"{tenant}-{i}", tenant, **kw) for i in range(n)])  # type: ignore[arg-type]


def picks(fq: FairQueue, n: int, queue: str = Q) -> list[str]:
    out = []
    for i in range(n):
        picked = fq.pick(queue, f"ticket-{time.monotonic_ns()}-{i}")
        if picked is None:
            break
        out.append(picked.tenant)
    return out


def test_weights_share_the_picks_three_to_one_while_both_are_backlogged(client: redis.Redis) -> None:
    fq = FairQueue(client, {"A": 3, "B": 1})
    fill(fq, "A", 400)
    fill(fq, "B", 400)
    counts = Counter(picks(fq, 400))
    assert abs(counts["A"] - 300) <= 1 and counts["A"] + counts["B"] == 400
    # Every window of 8 picks holds A's share within one pick: no long runs of one tenant.
    order = picks(fq, 80)
    assert all(5 <= order[i : i + 8].count("A") <= 7 for i in range(0, 72))


def test_one_tenant_alone_gets_every_pick_and_an_empty_queue_gives_none(client: redis.Redis) -> None:
    fq = FairQueue(client, {"A": 1, "B": 100})
    fill(fq, "A", 5)
    assert picks(fq, 10) == ["A"] * 5
    assert fq.pick(Q, "one-more") is None


def test_a_new_tenant_gets_its_share_at_once_and_no_burst(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fill(fq, "A", 300)
    assert picks(fq, 100) == ["A"] * 100  # A alone: its pass is far ahead of zero now
    fill(fq, "C", 50)
    following = picks(fq, 20)
    assert following[:2].count("C") == 1  # its first job within two picks
    assert following.count("C") == 10  # half, as weights 1:1 say: no catch-up for the time it was away
    # A tenant returning from idle starts at the lowest waiting pass too, not at its old low one.
    assert picks(fq, 80).count("C") == 40
    fill(fq, "C", 10)
    assert picks(fq, 10).count("C") == 5


def test_priority_orders_jobs_within_a_tenant_then_submission_order(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fq.insert([job("low", "A", 0), job("mid-1", "A", 4), job("high", "A", 9), job("mid-2", "A", 4)])
    order = [fq.pick(Q, f"t{i}").job_id for i in range(4)]  # type: ignore[union-attr]
    assert order == ["high", "mid-1", "mid-2", "low"]


def test_a_pick_says_whether_other_tenants_still_wait_counted_up_to_two(client: redis.Redis) -> None:
    fq = FairQueue(client)
    for tenant in "ABCD":
        fill(fq, tenant, 1)
    fill(fq, "E", 2)
    waiting = []
    while (picked := fq.pick(Q, f"t-{len(waiting)}")) is not None:
        waiting.append(picked.waiting)
    # Five tenants, each pick but E's first empties one: 4, 3, 2, 1 left (shown as 2 at most), then E's last.
    assert waiting == [2, 2, 2, 1, 1, 0]


def test_priority_does_not_cross_tenants(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fill(fq, "A", 10, priority=9)
    fill(fq, "B", 10, priority=0)
    assert Counter(picks(fq, 10)) == {"A": 5, "B": 5}


def test_a_ticket_delivered_again_gets_the_same_job_until_released(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fill(fq, "A", 3)
    first = fq.pick(Q, "t1")
    again = fq.pick(Q, "t1")  # a redelivery or a Celery retry: the same job
    assert first is not None and again is not None and (again.job_id, again.body) == (first.job_id, first.body)
    assert (first.waiting, again.waiting) == (1, -1)  # a new pick says how many tenants still wait
    assert first.task_args == (("A-0", {"image_uri": "file:///x.png", "task": "caption"}),
                               {"enqueued_at": "2026-01-01T00:00:00+00:00"})  # fmt: skip
    assert fq.depth("A") == 2
    assert fq.release(Q, "t1", first.job_id) and not fq.release(Q, "t1", first.job_id)
    after = fq.pick(Q, "t1")  # a ticket whose job ended (acked late) takes the next job: nothing runs twice
    assert after is not None and after.job_id == "A-1"
    assert not client.exists("varco:fair:job:A-0")


def test_queues_are_apart(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fq.insert([job("ocr-1", "A", queue="varco.ocr"), job("cap-1", "A")])
    assert fq.pick("varco.ocr", "t1").job_id == "ocr-1"  # type: ignore[union-attr]
    assert fq.pick("varco.ocr", "t2") is None
    assert fq.pick(Q, "t3").job_id == "cap-1"  # type: ignore[union-attr]


def test_a_job_past_its_deadline_is_picked_as_expired_and_costs_no_share(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fq.insert([job("late", "A", deadline_s=0.001), job("on-time", "A", deadline_s=3600), job("b", "B")])
    time.sleep(0.01)
    late = fq.pick(Q, "t1")
    assert late is not None and (late.job_id, late.expired) == ("late", True)
    # A's pass did not move for the expired job: A still goes before B (tie: by name).
    nxt = fq.pick(Q, "t2")
    assert nxt is not None and (nxt.job_id, nxt.expired) == ("on-time", False)
    assert fq.pick(Q, "t1").expired  # type: ignore[union-attr]  # the same binding, still expired


def test_limits_refuse_whole_batches_with_the_limit_and_depth(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fill(fq, "A", 3)
    with pytest.raises(QueueFull) as exc:
        fq.insert([job("x1", "A"), job("x2", "A")], max_per_tenant=4)
    assert (exc.value.limit, exc.value.depth, exc.value.tenant) == (4, 3, "A")
    assert fq.depth("A") == 3 and not client.exists("varco:fair:job:x1")  # nothing of the batch went in
    fq.insert([job("b1", "B"), job("b2", "B")], max_per_tenant=4, max_queued=5)
    with pytest.raises(QueueFull) as total:
        fq.insert([job("c1", "C")], max_per_tenant=4, max_queued=5)
    assert (total.value.limit, total.value.depth, total.value.tenant) == (5, 5, None)
    assert "VARCO_MAX_QUEUED" in str(total.value)
    picks(fq, 1)
    fq.insert([job("c1", "C")], max_per_tenant=4, max_queued=5)  # a pick makes room
    assert fq.depths() == {"A": 2, "B": 2, "C": 1} and fq.depth() == 5
    assert fq.shed() == {"A": 2, "C": 1}  # refused jobs, counted per tenant for /metrics


def test_sixteen_racing_submitters_never_overshoot_the_limit(client: redis.Redis) -> None:
    fq = FairQueue(client)
    admitted, refused = Counter(), Counter()
    barrier = threading.Barrier(16)

    def submit(n: int) -> None:
        barrier.wait()
        for i in range(10):
            try:
                fq.insert([job(f"r{n}-{i}", "A")], max_per_tenant=50)
                admitted[n] += 1
            except QueueFull:
                refused[n] += 1

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted.values()) == 50 and sum(refused.values()) == 110
    assert fq.depth("A") == 50 == client.zcard("varco:fair:varco:t:A")


def test_revoke_takes_a_queued_job_off_but_not_a_picked_one(client: redis.Redis) -> None:
    fq = FairQueue(client)
    fill(fq, "A", 2)
    assert fq.revoke("A-1") and fq.depth("A") == 1 and fq.depth() == 1
    assert fq.pick(Q, "t1").job_id == "A-0"  # type: ignore[union-attr]
    assert not fq.revoke("A-0")  # a worker has it: the status record's cancel reaches it
    assert fq.revoke("never-there")
    assert fq.pick(Q, "t2") is None and fq.depths() == {}


def test_tickets_are_told_apart_from_job_messages() -> None:
    assert ticket_queue((), ticket_kwargs("varco.ocr")) == "varco.ocr"
    assert ticket_queue(("job", {}), {"enqueued_at": "x"}) is None
    assert ticket_queue((), {"fair_ticket": "a:b"}) is None and ticket_queue((), {"fair_ticket": 3}) is None
    assert ticket_queue((), {"fair_ticket": "varco", "x": 1}) is None
    assert json.loads(job_body("j", {"task": "ocr"}, "t")) == {
        "args": ["j", {"task": "ocr"}],
        "kwargs": {"enqueued_at": "t"},
    }


def test_tenant_names_and_weights() -> None:
    assert parse_weights("teamA=3, teamB=1.5,,") == {"teamA": 3.0, "teamB": 1.5}
    for bad in ("teamA", "teamA=0", "teamA=-1", "teamA=x", "a:b=1", "teamA=inf"):
        with pytest.raises(ValueError):
            parse_weights(bad)
    assert check_tenant("key-0123abcd") == "key-0123abcd"
    for bad in ("", "a:b", "../x", "-x", "x" * 65, 3):
        with pytest.raises(InvalidTenant):
            check_tenant(bad)
    assert metric_label("teamA", {"teamA": 2}) == "teamA" and metric_label("default", {}) == "default"
    assert metric_label("someone", {"teamA": 2}) == "other"

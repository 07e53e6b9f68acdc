"""The node's job metrics: phases that add up, and the submit-to-result time apart from them."""

from __future__ import annotations

from prometheus_client import REGISTRY

from varco.workers import metrics


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_total_is_not_a_phase() -> None:
    before = {p: count("varco_job_duration_seconds_count", task="vqa", phase=p) for p in (*metrics.PHASES, "total")}
    total_before = count("varco_job_total_seconds_count", task="vqa")
    phases = {"queue": 1.0, "fetch": 0.5, "inference": 2.0, "store": 0.25, "total": 3.75}
    metrics.observe_job("vqa", "succeeded", phases)
    after = {p: count("varco_job_duration_seconds_count", task="vqa", phase=p) - before[p] for p in before}
    # `sum by (task)` over the phases counts each second once: the total is not among them.
    assert after == {"queue": 1, "fetch": 1, "inference": 1, "store": 1, "total": 0}
    assert count("varco_job_total_seconds_count", task="vqa") - total_before == 1
    assert count("varco_job_total_seconds_sum", task="vqa") >= 3.75

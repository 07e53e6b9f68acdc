"""How `make test` shares the suite between its pytest-xdist processes (`-n 2 --dist loadfile`).

Each test file runs whole in one process, so its module fixtures (a worker node, a Redis) start once. The
files of a group below run one after the other in one process: what they share starts once and never
twice at the same time. Session fixtures are built once per process, each in its own basetemp, and every
server they start listens on a free port.

Groups are named here, by path, rather than with `pytest.mark.xdist_group`: on pytest 9.2, xdist 3.8's
loadgroup no longer sees the mark (pytest-dev/pytest-xdist#1386), and the controller that schedules knows
the test ids only.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

GROUPS = {
    # The in-process vLLM engine (a session fixture: over a minute and gigabytes to load) and a vLLM node.
    "tests/workers/engines/test_engines.py": "vllm",
    "tests/workers/engines/test_tag_constraint_engines.py": "vllm",
    "tests/integration/test_vllm_worker.py": "vllm",
    "tests/integration/test_constrained_worker.py": "vllm",  # a vLLM node among its workers
    # RabbitMQ nodes: Erlang, CPU-hungry while they start, a cluster of three in one of them.
    "tests/integration/test_rabbitmq.py": "rabbitmq",
    "tests/integration/test_rabbitmq_cluster.py": "rabbitmq",
}


def _rank(scope: str) -> int:
    """Longest units first, so the short ones fill the end: a group, an integration file, any other file."""
    if not scope.endswith(".py"):
        return 0
    return 1 if scope.startswith("tests/integration/") else 2


class FileOrGroupScheduling(LoadFileScheduling):
    """xdist's loadfile, with the files of a group in one unit, and the longest units handed out first."""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return GROUPS.get(path, path)

    def _assign_work_unit(self, node: object) -> None:
        self.workqueue.move_to_end(min(self.workqueue, key=_rank), last=False)  # min: the first of the best rank
        super()._assign_work_unit(node)

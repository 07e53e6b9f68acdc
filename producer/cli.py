"""The `varco` command line: submit, status, result, wait, cancel, worker, demo, make-tiny-model."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
err = Console(stderr=True)


def _worker_module(name: str) -> ModuleType:
    """Import a workers/ module lazily: the producer side must run without torch installed."""
    try:
        return importlib.import_module(f"varco.workers.{name}")
    except ImportError as exc:
        raise SystemExit(f"this command needs the worker extra: pip install 'varco-queue[worker]' ({exc})") from None


def _client():
    from varco.producer.client import Client

    return Client()


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, ensure_ascii=False, default=str))
    else:
        console.print_json(json.dumps(data, ensure_ascii=False, default=str))


def _region(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--region takes x1,y1,x2,y2 in 0..1, not {text!r}") from None


def _requests_from_file(path: str, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """One image URI per line, or one JSON object per line (submit's keyword names)."""
    lines = sys.stdin.read().splitlines() if path == "-" else Path(path).read_text(encoding="utf-8").splitlines()
    requests = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"{path}:{number}: not JSON: {exc}") from None
            requests.append({**defaults, **item})
        else:
            requests.append({**defaults, "image_uri": line})
    return requests


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    )  # fmt: skip


def wait_with_progress(client: Any, job_ids: list[str], timeout: float | None) -> list[Any]:
    statuses = []
    with _progress() as progress:
        bar = progress.add_task("waiting", total=len(job_ids))
        for status in client.wait(job_ids, timeout=timeout):
            statuses.append(status)
            progress.advance(bar)
    return statuses


def cmd_submit(args: argparse.Namespace) -> int:
    from varco.tasks.requests import InvalidRequest

    client = _client()
    defaults = {k: v for k, v in {
        "task": args.task, "prompt": args.prompt, "region": _region(args.region), "label": args.label,
        "callback_url": args.callback_url, "priority": args.priority, "max_new_tokens": args.max_new_tokens,
    }.items() if v is not None}  # fmt: skip
    if args.from_file:
        requests = _requests_from_file(args.from_file, defaults)
    elif args.image_uri:
        requests = [{**defaults, "image_uri": args.image_uri, "idempotency_key": args.idempotency_key}]
    else:
        raise SystemExit("give an IMAGE_URI or --from FILE")
    if args.metadata:
        for r in requests:
            r.setdefault("metadata", json.loads(args.metadata))
    try:
        job_ids = client.submit_many([{k: v for k, v in r.items() if v is not None} for r in requests])
    except InvalidRequest as exc:
        err.print(f"[red]{exc}[/]")
        return 2
    if not args.wait:
        _print(job_ids if len(job_ids) > 1 or args.from_file else job_ids[0], args.json)
        return 0
    statuses = wait_with_progress(client, job_ids, args.timeout)
    _print([s.model_dump(mode="json") for s in statuses], args.json)
    return 0 if all(s.state.value == "succeeded" for s in statuses) else 1


def cmd_status(args: argparse.Namespace) -> int:
    from varco.producer.client import JobNotFound

    try:
        _print(_client().status(args.job_id).model_dump(mode="json"), args.json)
    except JobNotFound:
        err.print(f"[red]no such job: {args.job_id}[/]")
        return 2
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    from varco.producer.client import JobCancelled, JobFailed, JobNotFound

    try:
        _print(_client().result(args.job_id, timeout=args.timeout).model_dump(mode="json"), args.json)
    except JobFailed as exc:
        err.print(f"[red]{exc}[/]")
        return 1
    except (JobCancelled, JobNotFound, TimeoutError) as exc:
        err.print(f"[red]{exc!s}[/]")
        return 2
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    statuses = wait_with_progress(_client(), args.job_ids, args.timeout)
    _print([s.model_dump(mode="json") for s in statuses], args.json)
    return 0 if all(s.state.value == "succeeded" for s in statuses) else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from varco.producer.client import JobNotFound

    try:
        cancelled = _client().cancel(args.job_id)
    except JobNotFound:
        err.print(f"[red]no such job: {args.job_id}[/]")
        return 2
    _print({"job_id": args.job_id, "cancelled": cancelled}, args.json)
    return 0 if cancelled else 1


def cmd_worker(args: argparse.Namespace) -> int:
    return _worker_module("supervisor").run(args.gpus, args.queues, not args.no_callbacks, args.concurrency)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    out = _worker_module("devtools.tiny_model").make_tiny_model(args.directory)
    console.print(f"tiny model saved to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return _worker_module("devtools.demo").run_demo(console, jobs_per_task=args.repeat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varco", description="VARCO-VISION inference queue")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_json(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help="print compact JSON (for scripts)")
        return p

    p = with_json(sub.add_parser("submit", help="enqueue one image, or many with --from FILE"))
    p.add_argument("image_uri", nargs="?")
    p.add_argument("--task", default="caption", help="caption | grounding | referring | ocr | vqa")
    p.add_argument("--prompt")
    p.add_argument("--region", help="x1,y1,x2,y2 in 0..1 (referring)")
    p.add_argument("--label", help="what the region is called (referring)")
    p.add_argument("--callback-url")
    p.add_argument("--priority", type=int, help="0..9, higher runs sooner")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--idempotency-key")
    p.add_argument("--metadata", help="JSON object stored with the result")
    p.add_argument("--from", dest="from_file", help="file with one URI or JSON object per line ('-' = stdin)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs, with a progress bar")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_submit)

    p = with_json(sub.add_parser("status", help="a job's status"))
    p.add_argument("job_id")
    p.set_defaults(func=cmd_status)

    p = with_json(sub.add_parser("result", help="wait for a job and print its result JSON"))
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_result)

    p = with_json(sub.add_parser("wait", help="wait for jobs to finish"))
    p.add_argument("job_ids", nargs="+")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_wait)

    p = with_json(sub.add_parser("cancel", help="cancel a queued or running job"))
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("worker", help="run inference workers: one process per GPU")
    p.add_argument("--gpus", default="cpu", help="0,1,… | all | cpu (default cpu)")
    p.add_argument("--queues", default="varco", help="comma-separated inference queues to consume")
    p.add_argument("--concurrency", type=int, help="task threads per GPU process (default 2x batch size)")
    p.add_argument("--no-callbacks", action="store_true", help="do not start the webhook delivery process")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("make-tiny-model", help="build the tiny offline test model into DIR")
    p.add_argument("directory")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("demo", help="the whole pipeline on drawn sample images (starts what it needs)")
    p.add_argument("--repeat", type=int, default=1, help="jobs per sample and task")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `varco` command line: submit, status, result, wait, cancel, overlay, worker, demo, make-tiny-model."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()
err = Console(stderr=True)


class UsageError(Exception):
    """A bad argument: reported in one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Input:
    """One request to submit and where it came from (a --from file's line, or the command line)."""

    request: dict[str, Any]
    line: int | None = None


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
        raise UsageError(f"--region takes x1,y1,x2,y2 in 0..1, not {text!r}") from None


def _metadata(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--metadata is not JSON: {exc}") from None


def _requests_from_file(path: str, defaults: dict[str, Any]) -> list[Input]:
    """One image URI per line, or one JSON object per line (submit's keyword names)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    inputs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(item, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object")
            inputs.append(Input({**defaults, **item}, number))
        else:
            inputs.append(Input({**defaults, "image_uri": line}, number))
    if not inputs:
        raise UsageError(f"--from {path}: no requests in it")
    return inputs


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    )  # fmt: skip


def wait_with_progress(client: Any, job_ids: list[str], timeout: float | None) -> dict[str, Any]:
    """Statuses by job id as jobs finish, with a bar that counts failures too."""
    statuses: dict[str, Any] = {}
    failed = 0
    with _progress() as progress:
        bar = progress.add_task("waiting", total=len(job_ids))
        for status in client.wait(job_ids, timeout=timeout):
            statuses[status.job_id] = status
            failed += status.state.value != "succeeded"
            progress.update(bar, advance=1, description=f"waiting ({failed} not succeeded)" if failed else "waiting")
    return statuses


def cmd_submit(args: argparse.Namespace) -> int:
    from varco.tasks.requests import InvalidRequest

    defaults = {k: v for k, v in {
        "task": args.task, "prompt": args.prompt, "region": _region(args.region), "label": args.label,
        "callback_url": args.callback_url, "priority": args.priority, "max_new_tokens": args.max_new_tokens,
        "metadata": _metadata(args.metadata), "tenant": args.tenant, "deadline_s": args.deadline_s,
    }.items() if v is not None}  # fmt: skip
    if args.from_file and args.image_uri:
        raise UsageError("give an IMAGE_URI or --from FILE, not both")
    if args.from_file:
        inputs = _requests_from_file(args.from_file, defaults)
    elif args.image_uri:
        inputs = [Input({**defaults, "image_uri": args.image_uri, "idempotency_key": args.idempotency_key})]
    else:
        raise UsageError("give an IMAGE_URI or --from FILE")
    client = _client()
    try:
        job_ids = client.submit_many([{k: v for k, v in i.request.items() if v is not None} for i in inputs])
    except InvalidRequest as exc:
        where = inputs[exc.index].line if exc.index is not None else None
        err.print(f"{args.from_file}:{where}: {exc.reason}" if where is not None else exc.reason, markup=False)
        return 2
    if not args.wait:
        if args.json:
            _print(job_ids if args.from_file else job_ids[0], True)
        else:
            print("\n".join(job_ids))  # plain ids: JOB=$(varco submit …) just works
        return 0
    statuses = wait_with_progress(client, job_ids, args.timeout)
    rows = [
        {"line": i.line, "image_uri": i.request.get("image_uri"), "job_id": job_id,
         "state": statuses[job_id].state.value if job_id in statuses else "unfinished",
         "error": statuses[job_id].error.model_dump() if job_id in statuses and statuses[job_id].error else None}
        for i, job_id in zip(inputs, job_ids, strict=True)
    ]  # fmt: skip
    if args.json:
        _print(rows, True)
    else:
        for row in rows:
            print(
                "\t".join(str(row[k]) if row[k] is not None else "-" for k in ("line", "image_uri", "job_id", "state"))
            )
    bad = sum(row["state"] != "succeeded" for row in rows)
    err.print(f"{len(rows) - bad} succeeded, {bad} did not ({len(rows)} submitted)", markup=False)
    return 0 if bad == 0 else 1


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
    statuses = list(wait_with_progress(_client(), args.job_ids, args.timeout).values())
    _print([s.model_dump(mode="json") for s in statuses], args.json)
    return 0 if len(statuses) == len(set(args.job_ids)) and all(s.state.value == "succeeded" for s in statuses) else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from varco.producer.client import JobNotFound

    try:
        cancelled = _client().cancel(args.job_id)
    except JobNotFound:
        err.print(f"[red]no such job: {args.job_id}[/]")
        return 2
    _print({"job_id": args.job_id, "cancelled": cancelled}, args.json)
    return 0 if cancelled else 1


def cmd_overlay(args: argparse.Namespace) -> int:
    from varco.producer.client import JobCancelled, JobFailed, JobNotFound

    try:
        from varco.gateway.overlay import OverlayUnavailable, overlay_png
    except ImportError as exc:
        raise SystemExit(f"this command needs the gateway extra: pip install 'varco-queue[gateway]' ({exc})") from None
    out = Path(args.output or f"{args.job_id}.png")
    try:
        png = overlay_png(_client(), args.job_id)
    except JobNotFound:
        err.print(f"no such job: {args.job_id}", markup=False)
        return 2
    except JobFailed as exc:
        err.print(f"{exc}: no result to draw", markup=False)
        return 1
    except (JobCancelled, OverlayUnavailable) as exc:
        err.print(f"{exc}: no overlay", markup=False)
        return 2
    out.write_bytes(png)
    print(out)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    return _worker_module("node.supervisor").run(args.gpus, args.queues, not args.no_callbacks, args.concurrency)


def cmd_gateway(args: argparse.Namespace) -> int:
    try:
        server = importlib.import_module("varco.gateway.server")
    except ImportError as exc:
        raise SystemExit(f"varco gateway needs the gateway extra: pip install 'varco-queue[gateway]' ({exc})") from None
    return server.serve(args.host, args.port, no_auth=args.no_auth)


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
    p.add_argument("--tenant", help="whom the jobs belong to (fair share, limits; default: default)")
    p.add_argument("--deadline-s", type=float, help="fail a job not started this many seconds after submission")
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

    p = sub.add_parser("overlay", help="draw a finished job's boxes and labels on its image, as a PNG")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", help="PNG file to write (default JOB_ID.png)")
    p.set_defaults(func=cmd_overlay)

    p = sub.add_parser("worker", help="run inference workers: one process per GPU")
    p.add_argument("--gpus", default="cpu", help="0,1,… | all | cpu (default cpu)")
    p.add_argument("--queues", default="varco", help="comma-separated inference queues to consume")
    p.add_argument("--concurrency", type=int, help="task threads per GPU process (default 2x batch size)")
    p.add_argument("--no-callbacks", action="store_true", help="do not start the webhook delivery process")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("gateway", help="serve the HTTP API (needs the gateway extra)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default VARCO_GATEWAY_PORT, 8000)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (every caller sees every job)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("make-tiny-model", help="build the tiny offline test model into DIR")
    p.add_argument("directory")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("demo", help="the whole pipeline on drawn sample images (starts what it needs)")
    p.add_argument("--repeat", type=int, default=1, help="jobs per sample and task")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from varco.tasks.connections import BrokerUnavailable
    from varco.tasks.fair_queue import QueueFull

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse reports its own errors with exit code 2
    try:
        return args.func(args)
    except UsageError as exc:
        parser.exit(2, f"varco {args.command}: error: {exc}\n")
    except (BrokerUnavailable, QueueFull) as exc:  # one line, no traceback: check Redis, or come back later
        parser.exit(2, f"varco {args.command}: error: {' '.join(str(exc).split())}\n")


if __name__ == "__main__":
    sys.exit(main())

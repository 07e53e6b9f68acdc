"""The `varco` command line: submit, status, result, results, wait, cancel, batch, overlay, worker, demo,
make-tiny-model."""

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

from varco.producer import batch_cli

console = Console()
# soft_wrap: a message stays one line whatever the width (rich wraps at 80 columns when stderr is no terminal).
err = Console(stderr=True, soft_wrap=True)
TASKS = "caption | grounding | referring | ocr | vqa"


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


class BadLines(Exception):
    """Lines of a --from file that cannot be submitted, each as "PATH:LINE: why": all of them, not the first."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _read_lines(path: str) -> list[tuple[int, str]]:
    """The (line number, text) of each line that is neither blank nor a # comment."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def _requests_from_file(
    client: Any, path: str, defaults: dict[str, Any], idempotency_prefix: str | None = None
) -> list[Input]:
    """One image URI per line, or one JSON object per line (submit's keyword names). With
    `idempotency_prefix`, a line without its own key gets "{prefix}:{line number}", so running the same
    file again submits nothing twice. Each request is checked as submit checks it; BadLines names every
    line that is not a good request, in file order."""
    from varco.tasks.requests import InvalidRequest

    inputs, bad = [], []
    for number, line in _read_lines(path):
        item: Any = {"image_uri": line}
        if line.startswith(("{", "[")):  # JSON; no URI starts so
            try:
                item = json.loads(line)
            except ValueError as exc:
                bad.append(f"{path}:{number}: not JSON: {exc}")
                continue
            if not isinstance(item, dict):
                bad.append(f"{path}:{number}: expected a JSON object")
                continue
        request = {**defaults, **item}
        if idempotency_prefix is not None and request.get("idempotency_key") is None:
            request["idempotency_key"] = f"{idempotency_prefix}:{number}"
        if request.get("task") is None:
            bad.append(f'{path}:{number}: no task: give --task ({TASKS}) or a "task" field on the line')
            continue
        fields = {k: v for k, v in request.items() if v is not None}
        try:
            client.validate(fields.pop("image_uri", None), fields.pop("task", None), **fields)
        except InvalidRequest as exc:
            bad.append(f"{path}:{number}: {exc.reason}")
            continue
        inputs.append(Input(request, number))
    if bad:
        raise BadLines(bad)
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
        "constrained": args.constrained,
    }.items() if v is not None}  # fmt: skip
    if args.from_file and args.image_uri:
        raise UsageError("give an IMAGE_URI or --from FILE, not both")
    if args.idempotency_prefix is not None and not args.from_file:
        raise UsageError("--idempotency-prefix goes with --from FILE (give one IMAGE_URI --idempotency-key)")
    client = _client()  # connects lazily: checking a file needs no Redis
    try:
        if args.from_file:
            inputs = _requests_from_file(client, args.from_file, defaults, args.idempotency_prefix)
        elif args.image_uri:
            if args.task is None:
                raise UsageError(f"--task is required: {TASKS}")
            inputs = [Input({**defaults, "image_uri": args.image_uri, "idempotency_key": args.idempotency_key})]
        else:
            raise UsageError("give an IMAGE_URI or --from FILE")
    except BadLines as exc:
        for line in exc.lines:
            err.print(line, markup=False, highlight=False)
        err.print(f"{len(exc.lines)} bad line(s); nothing was submitted", markup=False, highlight=False)
        return 2
    try:
        job_ids = client.submit_many([{k: v for k, v in i.request.items() if v is not None} for i in inputs])
    except InvalidRequest as exc:  # checked above; an idempotency key bound to another request ends here
        where = inputs[exc.index].line if exc.index is not None else None
        message = f"{args.from_file}:{where}: {exc.reason}" if args.from_file and where else exc.reason
        err.print(message, markup=False, highlight=False)
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
            print("\t".join(_cell(row[k]) for k in ("line", "image_uri", "job_id", "state", "error")))
    bad = sum(row["state"] != "succeeded" for row in rows)
    err.print(f"{len(rows) - bad} succeeded, {bad} did not ({len(rows)} submitted)", markup=False)
    return 0 if bad == 0 else 1


def _cell(value: Any) -> str:
    """One tab-separated column: "-" for nothing, an error as "Type: message", never a tab or newline."""
    if value is None:
        return "-"
    text = f"{value['type']}: {value['message']}" if isinstance(value, dict) else str(value)
    return " ".join(text.split())


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


def _job_ids_from(path: str) -> list[str]:
    """Job ids from a file: on each line the first word that is a job id (plain ids, or the lines
    `varco submit --from … --wait` prints)."""
    from varco.tasks.job_ids import is_valid_job_id

    ids, bad = [], []
    for number, line in _read_lines(path):
        found = next((word for word in line.split() if is_valid_job_id(word)), None)
        if found is None:
            bad.append(f"{path}:{number}: no job id on this line")
        else:
            ids.append(found)
    if bad:
        raise BadLines(bad)
    return ids


def cmd_results(args: argparse.Namespace) -> int:
    """Write each finished job's result JSON to DIR/JOB_ID.json; one line per job: id, state, file or error."""
    from varco.producer.client import JobNotFound

    try:
        job_ids = list(args.job_ids) + (_job_ids_from(args.from_file) if args.from_file else [])
    except BadLines as exc:
        for line in exc.lines:
            err.print(line, markup=False, highlight=False)
        return 2
    if not job_ids:
        raise UsageError("give JOB_IDs or --from FILE")
    job_ids = list(dict.fromkeys(job_ids))  # each once, in the order given
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"-o {out}: cannot create it: {exc.strerror or exc}") from None
    client = _client()
    try:
        statuses = wait_with_progress(client, job_ids, args.timeout)
    except JobNotFound as exc:
        err.print(f"no such job: {exc.args[0]}", markup=False, highlight=False)
        return 2
    except TimeoutError:
        statuses = {s.job_id: s for s in client.statuses.get_many(job_ids).values() if s is not None}
    rows = []
    for job_id in job_ids:
        status = statuses.get(job_id)
        state = status.state.value if status is not None and status.state.finished else "unfinished"
        row = {"job_id": job_id, "state": state, "file": None, "error": None}
        if state == "succeeded":
            try:
                path = out / f"{job_id}.json"
                path.write_text(client.result(job_id, timeout=0).model_dump_json(indent=2) + "\n", encoding="utf-8")
                row["file"] = str(path)
            except Exception as exc:  # the store is down or the object is gone: said on its row
                row["error"] = {"type": type(exc).__name__, "message": str(exc)}
        elif status is not None and status.error is not None:
            row["error"] = status.error.model_dump()
        rows.append(row)
    if args.json:
        _print(rows, True)
    else:
        for row in rows:
            print("\t".join(_cell(row[k]) for k in ("job_id", "state", "file", "error")))
    written = sum(row["file"] is not None for row in rows)
    err.print(f"{written} of {len(rows)} results written to {out}", markup=False, highlight=False)
    return 0 if written == len(rows) else 1


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


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("varco-queue")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varco", description="VARCO-VISION inference queue")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_json(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help="print compact JSON (for scripts)")
        return p

    p = with_json(sub.add_parser("submit", help="enqueue one image, or many with --from FILE"))
    p.add_argument("image_uri", nargs="?")
    p.add_argument("--task", help=f'required: {TASKS} (with --from, a JSON line\'s own "task" wins)')
    p.add_argument("--prompt")
    p.add_argument("--region", help="x1,y1,x2,y2 in 0..1 (referring)")
    p.add_argument("--label", help="what the region is called (referring)")
    p.add_argument("--callback-url")
    p.add_argument("--priority", type=int, help="0..9, higher runs sooner")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--idempotency-key", help="the same key and request again returns the first job")
    p.add_argument(
        "--idempotency-prefix", metavar="PREFIX",
        help="with --from: each line's key is PREFIX:LINE, so running the same file again submits nothing twice",
    )  # fmt: skip
    p.add_argument("--metadata", help="JSON object stored with the result")
    p.add_argument("--tenant", help="whom the jobs belong to (fair share, limits; default: default)")
    p.add_argument("--deadline-s", type=float, help="fail a job not started this many seconds after submission")
    p.add_argument(
        "--constrained", action=argparse.BooleanOptionalAction, default=None,
        help="tag-constrained decoding on or off for these jobs (default: VARCO_CONSTRAINED_TAGS)",
    )  # fmt: skip
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

    p = with_json(sub.add_parser("results", help="wait for jobs and write each result to DIR/JOB_ID.json"))
    p.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    p.add_argument(
        "--from", dest="from_file", help="file with a job id on each line ('-' = stdin), e.g. submit's output"
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write the results into")
    p.add_argument("--timeout", type=float, help="stop waiting after this many seconds (unfinished jobs are listed)")
    p.set_defaults(func=cmd_results)

    p = with_json(sub.add_parser("wait", help="wait for jobs to finish"))
    p.add_argument("job_ids", nargs="+")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_wait)

    p = with_json(sub.add_parser("cancel", help="cancel a queued or running job"))
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)

    batch_cli.add_parser(sub)

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

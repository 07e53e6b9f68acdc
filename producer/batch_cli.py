"""`varco batch submit|status|results|cancel`: the Batch API from the shell, without the gateway."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _client() -> Any:
    from varco.producer.client import Client

    return Client()


def _print(record: Any, as_json: bool) -> None:
    from varco.producer.cli import _print as print_data

    print_data(record.openai(), as_json)


def cmd_submit(args: argparse.Namespace) -> int:
    from varco.tasks.requests import InvalidRequest

    client = _client()
    metadata = json.loads(args.metadata) if args.metadata else None
    try:
        batch_id = client.submit_batch(args.input, completion_window=args.window, metadata=metadata,
                                       tenant=args.tenant)  # fmt: skip
    except (InvalidRequest, OSError) as exc:
        raise SystemExit(f"varco batch submit: error: {exc}") from None
    if not args.wait:
        print(batch_id)
        return 0
    record = client.wait_batch(batch_id, timeout=args.timeout)
    _print(record, args.json)
    return 0 if record.status.value == "completed" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from varco.producer.batches import BatchNotFound

    try:
        _print(_client().batch(args.batch_id), args.json)
    except BatchNotFound:
        raise SystemExit(f"varco batch status: error: no such batch: {args.batch_id}") from None
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """The output lines then the error lines, into one JSONL file; 2 while the batch has not finished."""
    from varco.producer.batches import BatchNotFound

    client = _client()
    try:
        record = client.wait_batch(args.batch_id, timeout=args.timeout) if args.wait else client.batch(args.batch_id)
    except BatchNotFound:
        raise SystemExit(f"varco batch results: error: no such batch: {args.batch_id}") from None
    if not record.status.finished:
        raise SystemExit(f"varco batch results: error: batch {record.id} is still {record.status.value} "
                         "(--wait waits for it)")  # fmt: skip
    with Path(args.output).open("wb") as out:
        for chunk in client.batches.results(record):
            out.write(chunk)
    print(f"{record.output_lines} output and {record.error_lines} error lines written to {args.output}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    _print(_client().cancel_batch(args.batch_id), args.json)
    return 0


def add_parser(sub: Any) -> None:
    batch = sub.add_parser("batch", help="OpenAI Batch API files: submit, status, results, cancel")
    commands = batch.add_subparsers(dest="batch_command", required=True)

    p = commands.add_parser("submit", help="start a batch on a JSONL file of /v1/chat/completions requests")
    p.add_argument("input", help="a local JSONL file, or an s3:// URI (read in place)")
    p.add_argument("--window", default="24h", help="completion_window: 24h (default), or shorter: 1h, 30m…")
    p.add_argument("--metadata", help="JSON object of string values")
    p.add_argument("--tenant", help="whom the lines' jobs belong to (default: default)")
    p.add_argument("--wait", action="store_true", help="wait until the batch ends, then print it")
    p.add_argument("--timeout", type=float)
    p.add_argument("--json", action="store_true", help="print compact JSON (for scripts)")
    p.set_defaults(func=cmd_submit)

    p = commands.add_parser("status", help="a batch: OpenAI's Batch object")
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true", help="print compact JSON (for scripts)")
    p.set_defaults(func=cmd_status)

    p = commands.add_parser("results", help="write a finished batch's output and error lines to one JSONL file")
    p.add_argument("batch_id")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--wait", action="store_true", help="wait until the batch ends first")
    p.add_argument("--timeout", type=float)
    p.set_defaults(func=cmd_results)

    p = commands.add_parser("cancel", help="cancel a batch: queued lines stop, running ones finish")
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true", help="print compact JSON (for scripts)")
    p.set_defaults(func=cmd_cancel)

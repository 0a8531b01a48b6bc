"""`nexus-bus dlq list|replay|purge` and `nexus-bus jobs show`: registered by `cli.py`.

nexus-bus dlq list [--op OP] [--limit N] [--json]
nexus-bus dlq replay SEQ|JOB_ID | --all [--op OP]
nexus-bus dlq purge [--op OP]
nexus-bus jobs show JOB_ID [--wait SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from nexus_bus import arguments
from nexus_bus.bus.connection import connect_nats
from nexus_bus.bus.metadata import is_ascii_digits
from nexus_bus.config import Settings
from nexus_bus.errors import NotFound
from nexus_bus.jobs.client import get_job, job_store, wait_job
from nexus_bus.jobs.dlq import DeadLetter, DeadLetterQueue, utc
from nexus_bus.jobs.envelope import JOB_ID_PATTERN

T = TypeVar("T")
_JOB_ID = re.compile(JOB_ID_PATTERN)
_A_JOB_ID = "a job id (32 lowercase hex characters)"


# A malformed id is the command line's error (exit 2, said before connecting), not a request
# refused (`error: invalid_request`, exit 1).
def _job_id(text: str) -> str:
    if not _JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: not {_A_JOB_ID}")
    return text


def _entry(text: str) -> str:
    if not (is_ascii_digits(text) or _JOB_ID.fullmatch(text)):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r}: neither a DLQ sequence number (from `dlq list`) nor {_A_JOB_ID}"
        )
    return text


def _with_dlq(settings: Settings, work: Callable[[DeadLetterQueue], Awaitable[T]]) -> T:
    async def run() -> T:
        nc = await connect_nats(settings.nats, name=f"{settings.service}-cli")
        try:
            dlq = DeadLetterQueue(nc.jetstream(), await job_store(nc, settings))
            return await work(dlq)
        finally:
            await nc.drain()

    return asyncio.run(run())


def _describe(entry: DeadLetter) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "job_id": entry.job_id,
        "operation": f"{entry.op}.{entry.action}",
        "attempts": entry.attempts,
        "error": {
            "code": entry.error_code,
            "status": entry.error_status,
            "detail": entry.error_detail,
        },
        "enqueued_at": utc(entry.enqueued_at),
        "failed_at": utc(entry.failed_at),
        "bytes": len(entry.data),
    }


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    """Print dead-lettered jobs, oldest first."""
    entries = _with_dlq(settings, lambda dlq: dlq.entries(op=args.op, limit=args.limit))
    if args.json:
        print(msgspec.json.format(msgspec.json.encode([_describe(e) for e in entries]).decode()))
        return 0
    if not entries:
        print("the dead-letter queue is empty")
        return 0
    print(f"{'SEQ':>6}  {'JOB ID':32}  {'OPERATION':24}  {'TRIES':>5}  {'FAILED AT':29}  ERROR")
    for e in entries:
        error = f"{e.error_code}: {e.error_detail}"[:60]
        op = f"{e.op}.{e.action}"
        print(
            f"{e.seq:>6}  {e.job_id:32}  {op:24}  {e.attempts:>5}  {utc(e.failed_at):29}  {error}"
        )
    return 0


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Run dead-lettered jobs again: one entry (by DLQ sequence or job id) or `--all`."""
    if args.all == bool(args.id):
        print("give either an entry (DLQ sequence or job id) or --all", file=sys.stderr)
        return 2

    token = args.token

    async def replay(dlq: DeadLetterQueue) -> list[str]:
        if args.all:
            return await dlq.replay_all(op=args.op, token=token)
        if is_ascii_digits(args.id):
            return [await dlq.replay(int(args.id), token=token)]
        seqs = [e.seq for e in await _all_entries(dlq, args.op) if e.job_id == args.id]
        if not seqs:
            raise NotFound(f"job {args.id} is not in the dead-letter queue")
        return [await dlq.replay(seq, token=token) for seq in seqs]

    replayed = _with_dlq(settings, replay)
    for job_id in replayed:
        print(f"replayed {job_id}")
    print(f"{len(replayed)} job(s) replayed")
    return 0


async def _all_entries(dlq: DeadLetterQueue, op: str | None) -> list[DeadLetter]:
    found: list[DeadLetter] = []
    after = 0
    while batch := await dlq.entries(op=op, limit=100, after_seq=after):
        found.extend(batch)
        after = batch[-1].seq
    return found


def cmd_dlq_purge(args: argparse.Namespace, settings: Settings) -> int:
    """Delete every dead-lettered job (of one op)."""
    count = _with_dlq(settings, lambda dlq: dlq.purge(op=args.op))
    print(f"purged {count} dead-lettered job(s)")
    return 0


def cmd_jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    """Print a job's status document; `--wait` blocks until it finishes."""

    async def show() -> Any:
        nc = await connect_nats(settings.nats, name=f"{settings.service}-cli")
        try:
            if args.wait:
                return await wait_job(nc, settings, args.id, timeout_s=args.wait)
            return await get_job(nc, settings, args.id)
        finally:
            await nc.drain()

    job = asyncio.run(show())
    print(msgspec.json.format(msgspec.json.encode(job).decode()))
    return 0


def add_commands(sub: Any) -> None:
    """Register `dlq` and `jobs` on the CLI's subparsers."""
    p = sub.add_parser("dlq", help="the dead-letter queue of jobs (NEXUS_DLQ)")
    dlq = p.add_subparsers(dest="dlq_command", required=True)
    p = dlq.add_parser("list", help="list dead-lettered jobs, oldest first")
    p.add_argument("--op", help="only this op")
    p.add_argument("--limit", type=arguments.count, default=100,
                   help="at most this many entries (default: 100)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_dlq_list)
    p = dlq.add_parser("replay", help="run dead-lettered jobs again")
    p.add_argument("id", nargs="?", type=_entry,
                   help="DLQ sequence number (from `dlq list`) or job id")
    p.add_argument("--all", action="store_true", help="replay every entry")
    p.add_argument("--op", help="with --all: only this op")
    p.add_argument("--token", help="run under this bearer token instead of the job's own")
    p.set_defaults(func=cmd_dlq_replay)
    p = dlq.add_parser("purge", help="delete dead-lettered jobs")
    p.add_argument("--op", help="only this op")
    p.set_defaults(func=cmd_dlq_purge)

    p = sub.add_parser("jobs", help="asynchronous jobs")
    jobs = p.add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("show", help="print a job's status")
    p.add_argument("id", type=_job_id, help="job id")
    p.add_argument(
        "--wait", type=arguments.wait_seconds, default=0,
        help="seconds to wait for it to finish (default: 0, not at all)",
    )
    p.set_defaults(func=cmd_jobs_show)

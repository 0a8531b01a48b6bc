"""A linearizability checker for single-key registers over recorded histories.

A history is a list of `Op`s, each with the time its client sent it (`invoke`) and the time
the answer came back (`complete`), all read from one monotonic clock (every client lives in
the test process). Keys are independent registers (linearizability is compositional), each
starting absent. Writes store a unique value, deletes make the key absent, reads observe
a value or its absence. A write or delete whose answer never came (a timeout, a killed
worker) may or may not have taken effect: it gets `complete=None`, an open end. A failed
read says nothing and is left out by the caller.

Three checks, all pure:

- `stale_reads`: the direct ones, with messages a reader can act on. A read must not return
  a value older than a write that completed before the read began (nor an absence older
  than such a write, nor a value written only after the read returned, nor one never
  written). This is a *regular* register, and what the cache promises (docs/cache.md).
- `visibility_inversions`: write visibility is ordered: once a read returned a write's
  value, a read that begins later must not return a value that write had already replaced
  (even while that write is still running). An atomic register needs this too.
- `linearizable`: the complete check, a Wing & Gong search with Lowe's memoization (the
  algorithm of Knossos and Porcupine): is there one total order of the operations of a key
  that respects real time and the register's semantics? Writes of unknown outcome that no
  read observed are left out first (`prune`): they change nothing, and each one open to
  the end of the history multiplies the search. A search past its step budget is reported
  as inconclusive, not as a violation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Action(StrEnum):
    """What an operation did to its register."""

    WRITE = "write"
    DELETE = "delete"
    READ = "read"


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of a history.

    Attributes:
        key: the register.
        action: write, delete or read.
        value: written (write), observed (read; None: absent); None for deletes.
        invoke: when the client sent it.
        complete: when its answer arrived; None when it never did (outcome unknown).
        client: who sent it (for messages only).
        deleted: a delete's answer (whether there was a value), when known.
    """

    key: str
    action: Action
    value: Hashable | None
    invoke: float
    complete: float | None
    client: str = ""
    deleted: bool | None = None

    @property
    def end(self) -> float:
        """`complete`, or infinity when the outcome is unknown."""
        return math.inf if self.complete is None else self.complete

    def __str__(self) -> str:
        end = "?" if self.complete is None else f"{self.complete:.4f}"
        shown = "" if self.action is Action.DELETE else f" {self.value!r}"
        return f"{self.client} {self.action}{shown} [{self.invoke:.4f}, {end}]"


def by_key(ops: Iterable[Op]) -> dict[str, list[Op]]:
    """The history split per register."""
    keys: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        keys[op.key].append(op)
    return dict(keys)


# -- the direct checks ---------------------------------------------------------------------


def _before(a: Op, b: Op) -> bool:
    """`a` completed before `b` began (so `a` precedes `b` in every linearization)."""
    return a.end < b.invoke


def _read_stale(read: Op, updates: Sequence[Op], source: Op | None) -> str | None:
    if source is not None and source.invoke > read.end:
        return f"read returned a value written after it completed: {read} <- {source}"
    for newer in updates:
        if newer is source or not _before(newer, read):
            continue
        if source is None or _before(source, newer):
            what = "absence" if read.value is None else "value"
            return f"stale read, {what} older than a completed write: {read} after {newer}"
    return None


def stale_reads(ops: Sequence[Op]) -> list[str]:
    """Reads that return something older than what completed before they began.

    For a read of a value: its write must not have been replaced by another update that
    completed before the read began. For a read of an absence: some delete (or the initial
    absence) must be a possible source, not replaced by such an update.
    """
    problems: list[str] = []
    for key, history in by_key(ops).items():
        updates = [op for op in history if op.action is not Action.READ]
        writes = {op.value: op for op in updates if op.action is Action.WRITE}
        deletes = [op for op in updates if op.action is Action.DELETE]
        reads = sorted((op for op in history if op.action is Action.READ), key=lambda o: o.invoke)
        sources: dict[int, Op | None] = {}
        for read in reads:
            if read.value is None:
                candidates: list[Op | None] = [None, *deletes]
                found = [s for s in candidates if _read_stale(read, updates, s) is None]
                if not found:
                    problems.append(f"{key}: " + str(_read_stale(read, updates, None)))
                    continue
                sources[id(read)] = found[-1]
                continue
            source = writes.get(read.value)
            if source is None:
                problems.append(f"{key}: read a value nobody wrote: {read}")
                continue
            sources[id(read)] = source
            if (problem := _read_stale(read, updates, source)) is not None:
                problems.append(f"{key}: {problem}")
    return problems


def visibility_inversions(ops: Sequence[Op]) -> list[str]:
    """Reads that went back: when read r1 completed before read r2 began, r2 returned a
    write that precedes r1's in real time."""
    problems: list[str] = []
    for key, history in by_key(ops).items():
        writes = {op.value: op for op in history if op.action is Action.WRITE}
        reads = [op for op in history if op.action is Action.READ]
        problems.extend(_visibility_order(key, reads, writes))
    return problems


def _visibility_order(key: str, reads: Sequence[Op], writes: dict[Hashable, Op]) -> list[str]:
    """Once a read saw write w, no read that begins after it may see a write before w."""
    problems = []
    seen = sorted((r for r in reads if r.value is not None), key=lambda r: r.end)
    latest: Op | None = None  # among reads completed so far, the one whose write began last
    index = 0
    for read in sorted(seen, key=lambda r: r.invoke):
        while index < len(seen) and seen[index].end < read.invoke:
            done = seen[index]
            if latest is None or writes[done.value].invoke > writes[latest.value].invoke:
                latest = done
            index += 1
        if latest is None or read.value not in writes or latest.value not in writes:
            continue
        if _before(writes[read.value], writes[latest.value]):
            problems.append(
                f"{key}: write visibility went back: {read} after {latest} had seen a newer write"
            )
    return problems


# -- the complete check --------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Entry:
    op: int
    call: bool
    time: float
    match: _Entry | None = None
    prev: _Entry | None = field(default=None, repr=False)
    next: _Entry | None = field(default=None, repr=False)


def _step(state: Hashable | None, op: Op) -> tuple[bool, Hashable | None]:
    if op.action is Action.WRITE:
        return True, op.value
    if op.action is Action.DELETE:
        return op.deleted is None or op.deleted == (state is not None), None
    return state == op.value, state


def _entries(history: Sequence[Op]) -> _Entry:
    """The doubly linked list of calls and returns in time order, behind a sentinel head."""
    items: list[_Entry] = []
    for index, op in enumerate(history):
        call, ret = _Entry(index, True, op.invoke), _Entry(index, False, op.end)
        call.match = ret
        items += [call, ret]
    # At equal times calls go first: the two operations count as concurrent (the lenient
    # reading, so that a coarse clock never makes a correct history fail).
    items.sort(key=lambda e: (e.time, not e.call))
    head = _Entry(-1, False, -math.inf)
    previous = head
    for item in items:
        previous.next, item.prev = item, previous
        previous = item
    return head


def _lift(entry: _Entry) -> None:
    assert entry.prev is not None and entry.match is not None
    entry.prev.next = entry.next
    if entry.next is not None:
        entry.next.prev = entry.prev
    ret = entry.match
    assert ret.prev is not None
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(entry: _Entry) -> None:
    ret = entry.match
    assert ret is not None and ret.prev is not None and entry.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    entry.prev.next = entry
    if entry.next is not None:
        entry.next.prev = entry


def linearizable(history: Sequence[Op], *, max_steps: int = 5_000_000) -> bool:
    """Whether the operations of one register have a linearization (Wing & Gong / Lowe).

    Raises:
        RuntimeError: the search took more than `max_steps` (inconclusive).
    """
    head = _entries(history)
    state: Hashable | None = None
    linearized = 0
    seen: set[tuple[int, Hashable | None]] = set()
    calls: list[tuple[_Entry, Hashable | None]] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            raise RuntimeError("linearizability search exceeded its step budget")
        assert entry is not None
        if entry.call:
            ok, after = _step(state, history[entry.op])
            if ok:
                marked = linearized | (1 << entry.op)
                if (marked, after) not in seen:
                    seen.add((marked, after))
                    calls.append((entry, state))
                    state, linearized = after, marked
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not calls:
                return False
            entry, state = calls.pop()
            linearized &= ~(1 << entry.op)
            _unlift(entry)
            entry = entry.next
    return True


def prune(history: Sequence[Op]) -> list[Op]:
    """`history` without the writes of unknown outcome that no read observed.

    Such a write never helps explain a read (its value is unique and unseen, and deletes'
    answers are not checked), and the history with it is linearizable exactly when the
    history without it is: it can always be placed last, its interval being open.
    """
    seen = {op.value for op in history if op.action is Action.READ}
    return [
        op
        for op in history
        if not (op.action is Action.WRITE and op.complete is None and op.value not in seen)
    ]


@dataclass
class Report:
    """What `check` found: violations, and registers whose search ran out of budget."""

    problems: list[str]
    inconclusive: list[str]


def check_regular(ops: Sequence[Op]) -> Report:
    """The regular-register check alone (`stale_reads`): what the cache promises."""
    return Report(stale_reads(ops), [])


def check_history(ops: Sequence[Op], *, max_steps: int = 2_000_000) -> Report:
    """Linearizability: the direct checks, then the complete search per register (after
    `prune`)."""
    report = Report([*stale_reads(ops), *visibility_inversions(ops)], [])
    for key, history in sorted(by_key(ops).items()):
        kept = prune(history)
        try:
            if not linearizable(kept, max_steps=max_steps):
                report.problems.append(f"{key}: no linearization of its {len(kept)} operations")
        except RuntimeError:
            report.inconclusive.append(key)
    return report


def check(ops: Sequence[Op]) -> list[str]:
    """Every problem found: the direct checks' messages, then registers with no linearization
    (a register whose search ran out of budget is not counted; see `check_history`)."""
    return check_history(ops).problems

"""What `$SRV.STATS` reports: per action, the worker's real request and error counts.

Pure: the worker calls `record` once per request it handled, with the time it took and the
error code its reply carried (if any). Counting is a few integer additions; nothing here
allocates per request except the last error's text when a request failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from nexus_bus.constants import H_SERVICE_ERROR, H_SERVICE_ERROR_CODE

_FIRST_ERROR_STATUS: Final = 400


@dataclass(slots=True)
class ActionCounters:
    """Counters of one endpoint (`nexus.<op>.<action>`), as NATS micro reports them."""

    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    last_error: str = ""

    @property
    def average_ns(self) -> int:
        """The mean processing time in nanoseconds (0 before the first request)."""
        return self.processing_ns // self.requests if self.requests else 0


class EndpointStats:
    """Counters for every action of the op groups a worker serves."""

    def __init__(self, groups: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Args: groups: (op, actions) of every served group; other actions are not counted."""
        self._by_op: dict[str, dict[str, ActionCounters]] = {
            op: {action: ActionCounters() for action in actions} for op, actions in groups
        }

    def record(self, op: str, action: str, elapsed_ns: int, error: str | None = None) -> None:
        """Count one handled request of `op.action`; `error` is `code:description` if it failed.

        Requests for actions nobody declared are not endpoints of the service: not counted.
        """
        counters = self._by_op.get(op, {}).get(action)
        if counters is None:
            return
        counters.requests += 1
        counters.processing_ns += elapsed_ns
        if error is not None:
            counters.errors += 1
            counters.last_error = error

    def record_reply(
        self, op: str, action: str, elapsed_ns: int, status: int, headers: Mapping[str, str]
    ) -> None:
        """Count one reply: an error when its status is 400 or more (it then carries the
        NATS micro error headers, whose code and text become the endpoint's last error)."""
        if status < _FIRST_ERROR_STATUS:
            self.record(op, action, elapsed_ns)
            return
        code = headers.get(H_SERVICE_ERROR_CODE, str(status))
        self.record(op, action, elapsed_ns, f"{code}:{headers.get(H_SERVICE_ERROR, '')}")

    def of(self, op: str) -> dict[str, ActionCounters]:
        """The counters of every action of `op` (empty for an op not served)."""
        return self._by_op.get(op, {})

    def totals(self, op: str) -> ActionCounters:
        """All actions of `op` added up (the last error is any action's latest one seen)."""
        total = ActionCounters()
        for counters in self.of(op).values():
            total.requests += counters.requests
            total.errors += counters.errors
            total.processing_ns += counters.processing_ns
            total.last_error = counters.last_error or total.last_error
        return total

    def reset(self) -> None:
        """Zero every counter."""
        for actions in self._by_op.values():
            for name in actions:
                actions[name] = ActionCounters()

"""Metric labels for HTTP requests, kept low-cardinality against hostile paths.

Pure. `op` and `action` come from the URL, so anyone can invent millions of them; a series
per invented name would exhaust Prometheus. A pair becomes a label only once a worker has
answered it as a real operation (for a job: once the registry declares it), and only up to
a fixed number of pairs; everything else is counted under `OTHER`.
"""

from __future__ import annotations

from typing import Final

from nexus_bus.constants import UNKNOWN_LABEL

OTHER: Final = UNKNOWN_LABEL


class OperationLabels:
    """Decides the (op, action) label values of a request."""

    def __init__(self, max_pairs: int = 512) -> None:
        self._max = max_pairs
        self._known: set[tuple[str, str]] = set()

    def of(self, op: str, action: str, *, served: bool) -> tuple[str, str]:
        """The labels for `op.action`.

        Args:
            served: a worker answered as a known operation (any status but
                `unknown_operation`), or the registry declares the pair of a submitted job,
                so the pair is real.
        """
        pair = (op, action)
        if pair in self._known:
            return pair
        if served and len(self._known) < self._max:
            self._known.add(pair)
            return pair
        return OTHER, OTHER

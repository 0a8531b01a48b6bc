"""The worker as a module-level FastStream application.

    faststream run nexus_bus.runtime.app:app

serves what `nexus-bus worker` serves: settings from `NEXUS_*` (and `NEXUS_CONFIG`), the
built-in ops named in `NEXUS_WORKER__OPS` (all of them when empty). `nexus-bus worker` runs
the same `FastStream` object (`Worker.app`), with `--app` for your own operation groups.
"""

from __future__ import annotations

from nexus_bus.runtime.factory import create_worker

app = create_worker().app

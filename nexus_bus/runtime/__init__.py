"""The worker runtime: the FastStream application serving operation groups (`worker.py`) and
its module-level app for `faststream run nexus_bus.runtime.app:app` (`app.py`)."""

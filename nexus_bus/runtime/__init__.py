"""The worker runtime: the FastStream application serving operation groups (`worker.py`), its
module-level app for `faststream run nexus_bus.runtime.app:app` (`app.py`), the JetStream job
consumers (`jobs.py`) and the dispatcher both run requests through (`dispatch.py`)."""

"""Asynchronous jobs on JetStream: submit, retry verdicts and backoff, dead-letter (the
consumers that run them are `nexus_bus.runtime.jobs`)."""

from nexus_bus.jobs.client import get_job, submit_job, wait_job, watch_job

__all__ = ["get_job", "submit_job", "wait_job", "watch_job"]

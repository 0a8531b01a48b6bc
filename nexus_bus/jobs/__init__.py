"""Asynchronous jobs on JetStream: submit, run with retries and backoff, dead-letter."""

from nexus_bus.jobs.client import get_job, submit_job, wait_job, watch_job

__all__ = ["get_job", "submit_job", "wait_job", "watch_job"]

"""The wire contract as msgspec Structs, plus generated JSON Schema / AsyncAPI / OpenAPI files."""

from nexus_bus.schemas import ai, auth, data, stream
from nexus_bus.schemas.jobs import Job, JobAccepted, JobStatus
from nexus_bus.schemas.problem import Problem

__all__ = ["Job", "JobAccepted", "JobStatus", "Problem", "ai", "auth", "data", "stream"]

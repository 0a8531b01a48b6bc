"""The HTTP shim: `POST /v1/{op}/{action}` and friends in front of the bus (docs/http.md)."""

from nexus_bus.http.app import ShimApp
from nexus_bus.http.server import ShimServer, create_server, serve

__all__ = ["ShimApp", "ShimServer", "create_server", "serve"]

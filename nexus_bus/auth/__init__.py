"""Authentication and authorization of every request."""

from nexus_bus.auth.base import Authenticator, NoAuthentication

__all__ = ["Authenticator", "NoAuthentication"]

"""The HTTP API: `create_app` assembles routes, dependencies and problem handlers."""

from .app import create_app

__all__ = ["create_app"]

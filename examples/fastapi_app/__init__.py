"""An example service on tagcache: users and projects over SQLAlchemy 2 async, with every
cache layer (see app.py for the request flow and README.md to run it)."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]

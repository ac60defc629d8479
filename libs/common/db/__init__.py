"""Async SQLAlchemy on SQLite (embedded) and PostgreSQL (distributed) behind one API."""

from libs.common.db.engine import Database

__all__ = ["Database"]

"""Telling failures of the infrastructure apart from failures of one message."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, OperationalError


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when the database or network failed, not the message being handled.

    Such failures are retried without bound (the work waits for the database to come
    back) instead of counting towards a message's dead-letter attempts.
    """
    if isinstance(exc, OperationalError | ConnectionError | OSError | TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated

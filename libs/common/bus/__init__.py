"""The message bus: one contract, an embedded and a Kafka implementation.

See `base.Bus` for the contract. `create_bus(settings)` picks the implementation from
`HUITOU_BUS_URL`.
"""

from libs.common.bus.base import (
    BatchHandler,
    Bus,
    BusConfigurationError,
    BusUnavailable,
    Consumer,
    Message,
    Received,
    is_transient_error,
    replay_dead_letters,
)
from libs.common.settings import Settings


def create_bus(settings: Settings) -> Bus:
    """The embedded bus by default, Kafka when `HUITOU_BUS_URL` is `kafka://…`."""
    if settings.embedded_bus:
        from libs.common.bus.embedded import EmbeddedBus

        return EmbeddedBus(settings)
    from libs.common.bus.kafka import KafkaBus

    return KafkaBus(settings)


__all__ = [
    "BatchHandler",
    "Bus",
    "BusConfigurationError",
    "BusUnavailable",
    "Consumer",
    "Message",
    "Received",
    "create_bus",
    "is_transient_error",
    "replay_dead_letters",
]

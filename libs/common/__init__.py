"""Huitou's shared library: events, settings, bus, database, outbox, timers, metrics, auth."""

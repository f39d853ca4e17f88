"""Weir's schema registry: the Confluent Schema Registry REST API, served from a compacted Kafka topic.

- ``compat``: Avro compatibility under the registry's levels (BACKWARD, FORWARD,
  FULL, their ``_TRANSITIVE`` forms, NONE), on Apache Avro's own rules, with
  messages that name the field and the rule.
- ``store``: ``SchemaStore``, the registry's state (subjects, versions, ids,
  compatibility config), durable in the ``_schemas`` topic: a write is
  acknowledged by Kafka before it is visible or answered; ``start()`` replays it.
- ``server``: ``RegistryServer``, the HTTP API Confluent's ``SchemaRegistryClient``,
  ``AvroSerializer`` and ``AvroDeserializer`` talk to.
- ``check``: ``weir schemas check``, the same rules over the ``schemas/`` folder.

Subjects follow TopicNameStrategy: ``<topic>-value``.
"""

from __future__ import annotations

from streams.registry.server import RegistryServer
from streams.registry.store import DEFAULT_TOPIC, SchemaStore

__all__ = ["RegistryServer", "SchemaStore", "start_registry"]


def start_registry(bootstrap: str, topic: str = DEFAULT_TOPIC, host: str = "127.0.0.1",
                   port: int = 0) -> RegistryServer:
    """Ensure ``topic``, replay it into a store and serve it; blocks until it answers. ``stop()`` it when done."""
    store = SchemaStore(bootstrap, topic).start()
    return RegistryServer(store, host, port).start()

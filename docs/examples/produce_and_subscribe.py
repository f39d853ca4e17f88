"""A user's application talking to a running `weir up` with nothing but confluent-kafka.

It produces one clickstream event and one payment (as the Debezium change event a
CDC connector would write to `cdc.payments`), both serialized with the schemas
registered in Weir's schema registry, then subscribes to `predictions.fraud`
and prints the prediction for that payment.

Run, with `weir up` running in another terminal:
    .venv/bin/python docs/examples/produce_and_subscribe.py
"""

import json
import sys
import time
import uuid
from datetime import UTC, datetime

from confluent_kafka import DeserializingConsumer, SerializingProducer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer

endpoints = json.load(open(sys.argv[1] if len(sys.argv) > 1 else ".weir/endpoints.json"))
registry = SchemaRegistryClient({"url": endpoints["schema_registry_url"]})


def producer_for(topic: str) -> SerializingProducer:
    """A producer serializing values with the topic's latest registered schema."""
    schema = registry.get_latest_version(f"{topic}-value").schema.schema_str
    return SerializingProducer({"bootstrap.servers": endpoints["kafka_bootstrap"],
                                "value.serializer": AvroSerializer(registry, schema)})


now = datetime.now(UTC)
user, payment_id = "user-42", f"pay-{uuid.uuid4().hex[:8]}"

clicks = producer_for("clickstream.events")
clicks.produce("clickstream.events", key=user.encode(), value={
    "event_id": str(uuid.uuid4()), "event_type": "login", "user_id": user, "session_id": "s-1", "ts": now,
    "device_id": "phone-1", "ip": "203.0.113.5", "page": "/login", "query": None, "product_id": None,
    "amount": None, "user_agent": "example/1.0"})
clicks.flush()

payments = producer_for("cdc.payments")
row = {"payment_id": payment_id, "order_id": "order-1", "customer_id": user, "card_id": "card-42",
       "merchant_id": "m-1", "merchant_category": "digital_goods", "amount": 249.0, "currency": "EUR",
       "status": "authorized", "device_id": "phone-1", "created_at": now.isoformat()}
source = {"version": "2.7", "connector": "postgresql", "name": "shop", "ts_ms": int(now.timestamp() * 1000),
          "snapshot": "false", "db": "shop", "sequence": None, "schema": "public", "table": "payments",
          "txId": 1, "lsn": int(time.time_ns() // 1000), "xmin": None}
payments.produce("cdc.payments", key=payment_id.encode(), value={
    "before": None, "after": row, "source": source, "op": "c", "ts_ms": int(now.timestamp() * 1000)})
payments.flush()
print(f"produced a click for {user} and payment {payment_id}; waiting for its prediction…")

consumer = DeserializingConsumer({"bootstrap.servers": endpoints["kafka_bootstrap"],
                                  "group.id": f"example-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest",
                                  "value.deserializer": AvroDeserializer(registry)})
consumer.subscribe(["predictions.fraud"])
deadline = time.time() + 60
while time.time() < deadline:
    msg = consumer.poll(1.0)
    if msg is None or msg.error() is not None or msg.value()["payment_id"] != payment_id:
        continue
    p = msg.value()
    print(f"payment {p['payment_id']}: score {p['score']:.3f} by {p['model_version']}, {p['latency_ms']:.0f} ms")
    break
else:
    print("no prediction within 60 s: is `weir up` running?")
consumer.close()

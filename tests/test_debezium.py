"""Weir reads what Debezium itself writes to ``cdc.payments``.

The writer schema below is the one Debezium's PostgreSQL connector (2.x/3.x)
gets registered through Confluent's AvroConverter for ``public.payments`` with
``decimal.handling.mode=double`` and ``time.precision.mode=adaptive_time_microseconds``:
records ``<topic.prefix>.public.payments.Envelope`` / ``.Value``, the
``io.debezium.connector.postgresql.Source`` block (with ``ts_us``/``ts_ns`` and
the enum-like ``snapshot`` whose non-null default puts ``string`` first in its
union), the optional ``transaction`` block ``event.block``, and the envelope's
``ts_us``/``ts_ns``. The ``connect.*`` attributes are what AvroConverter adds.
Pure unit tests: no broker, no registry service (``streams.schemas.register``
falls back to the local catalog).
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import fastavro
from hypothesis import given
from hypothesis import strategies as st

from examples.fraud_shop.project import project as SHOP
from streams import schemas
from streams.base import Message, Reason
from streams.codec import AvroCodec
from streams.dedup import MemoryDedup
from streams.event_time import EventTimeGuard
from streams.pseudonymize import Pseudonymizer
from streams.stages.ingest import IngestStage

PREFIX = "shop"  # Debezium's topic.prefix; a RegexRouter maps shop.public.payments to cdc.payments
NAMESPACE = f"{PREFIX}.public.payments"
SNAPSHOT_VALUES = "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"
NOW = 1_767_229_200.0  # 2026-01-01T01:00:00Z, the injected wall clock
CDC_PAYMENTS = "cdc.payments"
SILVER_PAYMENTS = "weir.fraud_shop.silver.payments"  # what ingest makes of the shop's payments source


def _optional(avro_type: Any) -> list[Any]:
    return ["null", avro_type]


def _string_column(name: str, optional: bool = False) -> dict[str, Any]:
    if optional:
        return {"name": name, "type": _optional("string"), "default": None}
    return {"name": name, "type": "string"}


ZONED_TIMESTAMP = {"type": "string", "connect.version": 1, "connect.name": "io.debezium.time.ZonedTimestamp"}

VALUE: dict[str, Any] = {
    "type": "record",
    "name": "Value",
    "namespace": NAMESPACE,
    "fields": [
        *(_string_column(c) for c in ("payment_id", "order_id", "customer_id", "card_id", "merchant_id")),
        _string_column("merchant_category"),
        {"name": "amount", "type": "double"},  # numeric(12,2) under decimal.handling.mode=double
        _string_column("currency"),
        _string_column("status"),
        _string_column("device_id", optional=True),
        {"name": "created_at", "type": ZONED_TIMESTAMP},  # timestamptz
    ],
    "connect.name": f"{NAMESPACE}.Value",
}

SOURCE: dict[str, Any] = {
    "type": "record",
    "name": "Source",
    "namespace": "io.debezium.connector.postgresql",
    "fields": [
        {"name": "version", "type": "string"},
        {"name": "connector", "type": "string"},
        {"name": "name", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {
            "name": "snapshot",
            "type": [
                {
                    "type": "string",
                    "connect.version": 1,
                    "connect.parameters": {"allowed": SNAPSHOT_VALUES},
                    "connect.default": "false",
                    "connect.name": "io.debezium.data.Enum",
                },
                "null",
            ],
            "default": "false",
        },
        {"name": "db", "type": "string"},
        {"name": "sequence", "type": _optional("string"), "default": None},
        {"name": "ts_us", "type": _optional("long"), "default": None},
        {"name": "ts_ns", "type": _optional("long"), "default": None},
        {"name": "schema", "type": "string"},
        {"name": "table", "type": "string"},
        {"name": "txId", "type": _optional("long"), "default": None},
        {"name": "lsn", "type": _optional("long"), "default": None},
        {"name": "xmin", "type": _optional("long"), "default": None},
    ],
    "connect.version": 1,
    "connect.name": "io.debezium.connector.postgresql.Source",
}

TRANSACTION_BLOCK: dict[str, Any] = {
    "type": "record",
    "name": "block",
    "namespace": "event",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "total_order", "type": "long"},
        {"name": "data_collection_order", "type": "long"},
    ],
    "connect.version": 1,
    "connect.name": "event.block",
}

DEBEZIUM_ENVELOPE: dict[str, Any] = {
    "type": "record",
    "name": "Envelope",
    "namespace": NAMESPACE,
    "fields": [
        {"name": "before", "type": _optional(VALUE), "default": None},
        {"name": "after", "type": _optional(f"{NAMESPACE}.Value"), "default": None},
        {"name": "source", "type": SOURCE},
        {"name": "transaction", "type": _optional(TRANSACTION_BLOCK), "default": None},
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": _optional("long"), "default": None},
        {"name": "ts_us", "type": _optional("long"), "default": None},
        {"name": "ts_ns", "type": _optional("long"), "default": None},
    ],
    "connect.version": 2,
    "connect.name": f"{NAMESPACE}.Envelope",
}

DEBEZIUM_KEY: dict[str, Any] = {
    "type": "record",
    "name": "Key",
    "namespace": NAMESPACE,
    "fields": [{"name": "payment_id", "type": "string"}],
    "connect.name": f"{NAMESPACE}.Key",
}


def row(pid: str = "p1", amount: float = 12.5, device: str | None = "dev-1") -> dict[str, Any]:
    return {
        "payment_id": pid,
        "order_id": f"o-{pid}",
        "customer_id": "cust-1",
        "card_id": "card-1",
        "merchant_id": "m-1",
        "merchant_category": "grocery",
        "amount": amount,
        "currency": "EUR",
        "status": "approved",
        "device_id": device,
        "created_at": "2026-01-01T00:59:00.123456Z",
    }


def debezium_event(
    op: str = "c",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    *,
    snapshot: str | None = "false",
    lsn: int = 24_023_128,
    tx_id: int = 555,
) -> dict[str, Any]:
    """A change event as Debezium fills it (commit at 00:59:30, processed 10 ms later)."""
    commit_us, processed_us = 1_767_229_170_000_000, 1_767_229_170_010_000
    return {
        "before": before,
        "after": row() if after is None and op in ("c", "r", "u") else after,
        "source": {
            "version": "2.7.3.Final",
            "connector": "postgresql",
            "name": PREFIX,
            "ts_ms": commit_us // 1000,
            "snapshot": snapshot,
            "db": "shop",
            "sequence": f'["{lsn - 200}","{lsn}"]',
            "ts_us": commit_us,
            "ts_ns": commit_us * 1000,
            "schema": "public",
            "table": "payments",
            "txId": tx_id,
            "lsn": lsn,
            "xmin": None,
        },
        "transaction": {"id": f"{tx_id}:{lsn}", "total_order": 1, "data_collection_order": 1},
        "op": op,
        "ts_ms": processed_us // 1000,
        "ts_us": processed_us,
        "ts_ns": processed_us * 1000,
    }


def confluent_wire(schema_id: int, parsed: Any, record: dict[str, Any]) -> bytes:
    """Magic byte 0, the 4-byte schema id, the Avro body: what AvroConverter writes."""
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


WRITER = fastavro.parse_schema(DEBEZIUM_ENVELOPE)
KEY_WRITER = fastavro.parse_schema(DEBEZIUM_KEY)


def _wire(record: dict[str, Any]) -> bytes:
    return confluent_wire(schemas.register(CDC_PAYMENTS, DEBEZIUM_ENVELOPE), WRITER, record)


def _key(pid: str) -> bytes:
    """Debezium's key: an Avro record in the wire format (its id is the key subject's; ingest never decodes it)."""
    return confluent_wire(schemas.schema_id_of(DEBEZIUM_KEY), KEY_WRITER, {"payment_id": pid})


# -- schema resolution ------------------------------------------------------------------------


def test_our_reader_schema_resolves_debeziums_writer_schema() -> None:
    reader = schemas.subject(CDC_PAYMENTS).parsed
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, WRITER, debezium_event(snapshot="first_in_data_collection", op="r"))
    buf.seek(0)

    got = fastavro.schemaless_reader(buf, WRITER, reader)

    assert isinstance(got, dict)
    assert got["op"] == "r" and got["before"] is None and got["after"] == row()
    assert got["ts_ms"] == 1_767_229_170_010
    assert got["source"] == {
        "version": "2.7.3.Final",
        "connector": "postgresql",
        "name": PREFIX,
        "ts_ms": 1_767_229_170_000,
        "snapshot": "first_in_data_collection",
        "db": "shop",
        "sequence": '["24022928","24023128"]',
        "schema": "public",
        "table": "payments",
        "txId": 555,  # with lsn: the downstream dedup key
        "lsn": 24_023_128,
        "xmin": None,
    }
    assert "transaction" not in got and "ts_us" not in got  # writer-only fields are skipped


def test_codec_decodes_debezium_messages_in_confluent_wire_format() -> None:
    codec = AvroCodec(CDC_PAYMENTS)
    before, after = row(device=None), row(amount=10.0) | {"status": "refunded"}

    update = codec.decode(_wire(debezium_event("u", before, after)))
    delete = codec.decode(_wire(debezium_event("d", after, None, snapshot=None)))

    assert (update["op"], update["before"], update["after"]) == ("u", before, after)
    assert (delete["op"], delete["before"], delete["after"]) == ("d", after, None)
    assert delete["source"]["snapshot"] is None and delete["source"]["lsn"] == 24_023_128


@given(
    amount=st.floats(allow_nan=True, allow_infinity=True),
    device=st.none() | st.text(max_size=20),
    pid=st.text(min_size=1, max_size=20),
)
def test_any_debezium_row_decodes_to_the_same_row(amount: float, device: str | None, pid: str) -> None:
    written = row(pid, amount, device)
    got = AvroCodec(CDC_PAYMENTS).decode(_wire(debezium_event("c", None, written)))["after"]
    assert got["amount"] == amount or (math.isnan(got["amount"]) and math.isnan(amount))
    got.pop("amount")
    written.pop("amount")
    assert got == written


# -- ingest -----------------------------------------------------------------------------------


def stage() -> IngestStage:
    return IngestStage(
        SHOP,
        4,
        dedup=MemoryDedup(3_600_000, clock=lambda: NOW),
        pseudonymizer=Pseudonymizer(b"test-key"),
        event_time=EventTimeGuard(
            max_future_ms=300_000, max_age_ms=86_400_000, allowed_lateness_ms=60_000, clock=lambda: NOW
        ),
    )


def message(offset: int, key: bytes, value: bytes | None) -> Message:
    return Message(CDC_PAYMENTS, 0, offset, key, value, int(NOW * 1000))


def test_ingest_turns_a_debezium_create_into_a_payment_once() -> None:
    ingest = stage()
    create = _wire(debezium_event("c"))
    batch = [
        message(0, _key("p1"), create),
        message(1, _key("p1"), create),  # Debezium re-sent it after a restart: same lsn and txId
        message(2, _key("p1"), _wire(debezium_event("d", row(), None, lsn=24_100_000, tx_id=556))),
        message(3, _key("p1"), None),  # the delete's tombstone
    ]

    result = ingest.handle(batch)

    (produced,) = [p for p in result.produce if p.topic == SILVER_PAYMENTS]
    (payment,) = AvroCodec(SILVER_PAYMENTS).decode(produced.value)["items"]
    assert (payment["payment_id"], payment["card_id"], payment["amount"]) == ("p1", "card-1", 12.5)
    assert payment["ts_ms"] == 1_767_229_140_123  # created_at, the ZonedTimestamp string
    assert payment["device_id"] != "dev-1"  # PII: pseudonymized on the way in
    assert [(r.message.offset, r.error.reason) for r in result.rejected] == [(1, Reason.DUPLICATE)]
    assert ingest.counts["accepted"] == 1 and ingest.counts["skipped"] == 2

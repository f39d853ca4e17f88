"""The Confluent wire-format codec: round trips, and every malformed input is a typed DecodeError."""

from __future__ import annotations

import io
import struct
from datetime import UTC, datetime

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.fraud_shop.project import project as SHOP
from streams import schemas
from streams.base import Reason
from streams.codec import AvroCodec, DecodeError
from streams.project.contracts import generated

CLICK = {
    "event_id": "e1", "event_type": "login", "user_id": "u1", "session_id": "s1",
    "ts": datetime(2026, 1, 1, tzinfo=UTC), "device_id": "d1", "ip": None, "page": None, "query": None,
    "product_id": None, "amount": None,
}


def test_round_trip_and_header() -> None:
    codec = AvroCodec("clickstream.events")
    data = codec.encode(CLICK)
    assert data[0] == 0 and struct.unpack(">I", data[1:5])[0] == codec.schema_id
    assert codec.decode(data) == CLICK | {"user_agent": None}


def test_a_record_written_with_an_older_version_decodes_into_the_current_one() -> None:
    v1 = schemas.local_versions("clickstream.events", SHOP.schemas)[0]
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", schemas.schema_id_of(v1)))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v1), CLICK)
    codec = AvroCodec("clickstream.events")
    assert codec.subject.version >= 2 and codec.schema_id != schemas.schema_id_of(v1)
    assert codec.decode(buf.getvalue()) == CLICK | {"user_agent": None}


def test_every_schema_parses_and_ids_are_unique() -> None:
    ids: dict[int, set[str]] = {}
    every = [*schemas.topics(), *schemas.topics(SHOP.schemas), *generated(SHOP)]  # Weir's, the shop's, generated
    assert len(every) == len(set(every)) and {"alerts", "clickstream.events", "weir.fraud_shop.silver.payments"} <= set(every)
    for topic in every:
        sub = schemas.subject(topic)
        ids.setdefault(sub.schema_id, set()).add(sub.raw["name"])
    # identical schemas may share an id, as a registry would give them
    assert all(len(names) == 1 for names in ids.values())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.UNDECODABLE),
        (b"\x01\x00\x00\x00\x01abc", Reason.UNDECODABLE),
        (b"\x00\x7f\xff\xff\xfe", Reason.UNKNOWN_SCHEMA),
        (None, Reason.UNDECODABLE),
    ],
)
def test_malformed_input_is_classified(data: bytes | None, reason: Reason) -> None:
    with pytest.raises(DecodeError) as err:
        AvroCodec("clickstream.events").decode(data)
    assert err.value.reason is reason


def test_other_topics_schema_is_a_mismatch() -> None:
    alert = AvroCodec("alerts").encode({"alert_id": "a", "ts": 0, "detector": "d", "metric": "m", "value": 1.0,
                                        "threshold": 0.0, "model_version": "v", "message": "x"})
    with pytest.raises(DecodeError) as err:
        AvroCodec("clickstream.events").decode(alert)
    assert err.value.reason in (Reason.SCHEMA_MISMATCH, Reason.UNDECODABLE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=60), st.integers(min_value=0, max_value=7))
def test_truncated_and_bit_flipped_never_raise_anything_else(noise: bytes, cut: int, bit: int) -> None:
    codec = AvroCodec("clickstream.events")
    good = bytearray(codec.encode(CLICK))
    variants = [bytes(good[:cut]), noise, bytes(good) + noise]
    if cut < len(good):
        flipped = bytearray(good)
        flipped[cut] ^= 1 << bit
        variants.append(bytes(flipped))
    for data in variants:
        try:
            codec.decode(data)
        except DecodeError:
            pass


def test_an_unknown_schema_id_is_asked_for_once_not_once_per_message() -> None:
    """A burst of garbage framed with one schema id cost one registry round trip per record (300 of them took
    10 s, past the consumer's poll interval, and their batch never completed)."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from streams.schemas import Catalog

    class Registry:
        calls = 0

        def get_schema(self, schema_id: int) -> None:
            Registry.calls += 1
            raise SchemaRegistryError(404, 40403, f"Schema {schema_id} not found")

    catalog = Catalog(Registry(), roots=(), generated={})
    assert [catalog.writer(1) for _ in range(300)] == [None] * 300
    assert Registry.calls == 1
    assert catalog.writer(2) is None and Registry.calls == 2  # another id is asked for

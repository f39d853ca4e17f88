"""Weir's schema registry against the real embedded Kafka, driven by Confluent's own client and serializers.

Each test gets its own ``_schemas_<uuid>`` topic, so no state is shared. The
``compat`` and ``check`` tests at the end are pure and need no services.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from examples.fraud_shop.project import project as SHOP
from streams.registry import RegistryServer, SchemaStore, start_registry
from streams.registry.check import check_repository
from streams.registry.compat import problems
from streams.schemas import SCHEMA_DIR, schema_id_of
from streams.stack import Endpoints

# --- schemas used throughout ---


def record(*fields: dict[str, Any], name: str = "Click") -> str:
    return json.dumps({"type": "record", "name": name, "namespace": "weir.test", "fields": list(fields)})


A = {"name": "a", "type": "int"}
B = {"name": "b", "type": "string"}
B_DEFAULT = {"name": "b", "type": "string", "default": "x"}
COUNTRY = {"name": "country", "type": "string", "pii": True}
COUNTRY_DEFAULT = {"name": "country", "type": "string", "default": "", "pii": True}

V1 = record(A, B)
ADD_NO_DEFAULT = record(A, B, COUNTRY)  # BACKWARD breaks, FORWARD fine
ADD_DEFAULT = record(A, B, COUNTRY_DEFAULT)  # every level fine
REMOVE_B = record(A)  # FORWARD breaks (b has no default), BACKWARD fine


# --- fixtures ---


@pytest.fixture
def topic() -> str:
    return f"_schemas_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def registry(endpoints: Endpoints, topic: str) -> Iterator[RegistryServer]:
    server = start_registry(endpoints.kafka_bootstrap, topic)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(registry: RegistryServer) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry.url, "max.retries": 0})


def avro(text: str) -> Schema:
    return Schema(text, "AVRO")


def http(server: RegistryServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A raw request, for what the client hides (status, error_code, messages)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "application/vnd.schemaregistry.v1+json"
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def refused(call: Any, *args: Any, **kwargs: Any) -> SchemaRegistryError:
    with pytest.raises(SchemaRegistryError) as info:
        call(*args, **kwargs)
    return info.value


# --- the REST API through Confluent's client ---


def test_register_lookup_get_by_id_versions_latest(client: SchemaRegistryClient, registry: RegistryServer) -> None:
    first = client.register_schema("clicks-value", avro(V1))
    second = client.register_schema("clicks-value", avro(ADD_DEFAULT))
    assert first == schema_id_of(json.loads(V1))  # deterministic: CRC-31 of the canonical form
    assert second != first

    assert client.get_subjects() == ["clicks-value"]
    assert client.get_versions("clicks-value") == [1, 2]
    latest = client.get_latest_version("clicks-value")
    assert (latest.version, latest.schema_id) == (2, second)
    assert json.loads(str(latest.schema.schema_str)) == json.loads(ADD_DEFAULT)
    v1 = client.get_version("clicks-value", 1)
    assert (v1.version, v1.schema_id, v1.subject) == (1, first, "clicks-value")
    assert json.loads(str(client.get_schema(first).schema_str)) == json.loads(V1)

    found = client.lookup_schema("clicks-value", avro(V1))
    assert (found.version, found.schema_id) == (1, first)
    assert [(v.subject, v.version) for v in client.get_schema_versions(second)] == [("clicks-value", 2)]
    assert client.get_schema_types() == ["AVRO"]
    assert http(registry, "GET", "/") == (200, {})
    assert http(registry, "GET", "/subjects/clicks-value/versions/1/schema") == (200, json.loads(V1))


def test_same_schema_in_two_subjects_has_one_id(client: SchemaRegistryClient) -> None:
    in_a = client.register_schema("a-value", avro(V1))
    in_b = client.register_schema("b-value", avro(V1))
    assert in_a == in_b
    assert sorted((v.subject, v.version) for v in client.get_schema_versions(in_a)) == [("a-value", 1), ("b-value", 1)]


def test_reregistering_an_identical_schema_returns_its_id_without_a_new_version(
        client: SchemaRegistryClient, registry: RegistryServer) -> None:
    first = client.register_schema("clicks-value", avro(V1))
    # Same schema, other key order and whitespace: the same schema to the registry.
    reordered = json.dumps({"fields": [A, B], "namespace": "weir.test", "name": "Click", "type": "record"}, indent=4)
    status, body = http(registry, "POST", "/subjects/clicks-value/versions", {"schema": reordered})
    assert (status, body["id"], body["version"]) == (200, first, 1)
    assert client.get_versions("clicks-value") == [1]
    # Adding a default changes the schema, though not its Parsing Canonical Form: the CRC id is
    # taken by a different schema, so it gets the next free one.
    assert client.register_schema("clicks-value", avro(record(A, B_DEFAULT))) == first + 1
    assert client.get_versions("clicks-value") == [1, 2]


def test_backward_incompatible_change_is_refused_with_field_and_rule(
        client: SchemaRegistryClient, registry: RegistryServer) -> None:
    client.register_schema("clicks-value", avro(V1))
    err = refused(client.register_schema, "clicks-value", avro(ADD_NO_DEFAULT))
    assert (err.http_status_code, err.error_code) == (409, 409)
    assert "country" in err.error_message and "READER_FIELD_MISSING_DEFAULT_VALUE" in err.error_message
    assert "version 1" in err.error_message
    assert client.get_versions("clicks-value") == [1]

    assert client.test_compatibility("clicks-value", avro(ADD_NO_DEFAULT)) is False
    assert client.test_compatibility("clicks-value", avro(ADD_DEFAULT), version=1) is True
    status, body = http(registry, "POST", "/compatibility/subjects/clicks-value/versions/latest?verbose=true",
                        {"schema": ADD_NO_DEFAULT})
    assert status == 200 and body["is_compatible"] is False
    assert body["messages"] == [
        ("BACKWARD vs version 1: field 'country' (/fields/2) has no default and version 1 does not write it: "
        "READER_FIELD_MISSING_DEFAULT_VALUE")]


@pytest.mark.parametrize(("level", "change", "accepted"), [
    ("BACKWARD", ADD_NO_DEFAULT, False), ("BACKWARD", REMOVE_B, True),
    ("FORWARD", ADD_NO_DEFAULT, True), ("FORWARD", REMOVE_B, False),
    ("FULL", ADD_NO_DEFAULT, False), ("FULL", REMOVE_B, False), ("FULL", ADD_DEFAULT, True),
    ("NONE", ADD_NO_DEFAULT, True), ("NONE", record({"name": "a", "type": "string"}), True),
])
def test_each_level_decides_registration(client: SchemaRegistryClient, level: str, change: str,
                                         accepted: bool) -> None:
    # Confluent answers {"compatibility": L}; the client passes the body through as is.
    answer: object = client.set_compatibility("clicks-value", level)
    assert answer == {"compatibility": level}
    client.register_schema("clicks-value", avro(V1))
    assert client.test_compatibility("clicks-value", avro(change)) is accepted
    if accepted:
        client.register_schema("clicks-value", avro(change))
        assert client.get_versions("clicks-value") == [1, 2]
    else:
        err = refused(client.register_schema, "clicks-value", avro(change))
        assert err.error_code == 409 and "vs version 1" in err.error_message


@pytest.mark.parametrize(("level", "accepted"), [("BACKWARD", True), ("BACKWARD_TRANSITIVE", False)])
def test_transitive_level_checks_every_earlier_version(client: SchemaRegistryClient, level: str,
                                                       accepted: bool) -> None:
    client.set_compatibility("clicks-value", level)
    client.register_schema("clicks-value", avro(record(A)))
    client.register_schema("clicks-value", avro(record(A, B_DEFAULT)))
    v3 = avro(record(A, B))  # reads v2's data (b is there), not v1's (no b, no default)
    if accepted:
        client.register_schema("clicks-value", v3)
        assert client.get_versions("clicks-value") == [1, 2, 3]
    else:
        err = refused(client.register_schema, "clicks-value", v3)
        assert "version 1" in err.error_message and "version 2" not in err.error_message
        assert "field 'b'" in err.error_message


def test_subject_config_overrides_the_global_one(client: SchemaRegistryClient, registry: RegistryServer) -> None:
    assert client.get_compatibility() == "BACKWARD"
    answers: list[object] = [client.set_compatibility(level="forward"), client.set_compatibility("loose-value", "NONE")]
    assert answers == [{"compatibility": "FORWARD"}, {"compatibility": "NONE"}]
    assert client.get_compatibility() == "FORWARD"
    assert client.get_compatibility("loose-value") == "NONE"
    assert refused(client.get_compatibility, "strict-value").error_code == 40408  # no subject-level config
    assert http(registry, "GET", "/config/strict-value?defaultToGlobal=true") == (200, {"compatibilityLevel": "FORWARD"})

    for subject in ("loose-value", "strict-value"):
        client.register_schema(subject, avro(V1))
    client.register_schema("loose-value", avro(record({"name": "a", "type": "string"})))  # NONE: anything
    client.register_schema("strict-value", avro(ADD_NO_DEFAULT))  # FORWARD: fine
    assert refused(client.register_schema, "strict-value", avro(REMOVE_B)).error_code == 409

    assert http(registry, "DELETE", "/config/loose-value") == (200, {"compatibilityLevel": "NONE"})
    assert http(registry, "GET", "/config/loose-value?defaultToGlobal=true")[1] == {"compatibilityLevel": "FORWARD"}
    assert refused(client.set_compatibility, "x-value", "SIDEWAYS").error_code == 42203


def test_state_survives_a_restart(endpoints: Endpoints, topic: str) -> None:
    first = start_registry(endpoints.kafka_bootstrap, topic)
    try:
        c = SchemaRegistryClient({"url": first.url})
        c.set_compatibility(level="FULL")
        c.set_compatibility("loose-value", "NONE")
        ids = [c.register_schema("clicks-value", avro(s)) for s in (V1, ADD_DEFAULT)]
        ids.append(c.register_schema("loose-value", avro(V1)))
        c.register_schema("loose-value", avro(REMOVE_B))
        c.register_schema("gone-value", avro(V1))
        c.delete_subject("gone-value")
        c.delete_version("loose-value", 2)
        before = first.store.dump()
    finally:
        first.stop()

    second = RegistryServer(SchemaStore(endpoints.kafka_bootstrap, topic).start()).start()
    try:
        assert second.store.dump() == before
        c = SchemaRegistryClient({"url": second.url})
        assert c.get_subjects() == ["clicks-value", "loose-value"]
        assert c.get_subjects(deleted=True) == ["clicks-value", "gone-value", "loose-value"]
        assert c.get_versions("clicks-value") == [1, 2]
        assert c.get_versions("loose-value") == [1]
        assert [c.get_version("clicks-value", v).schema_id for v in (1, 2)] == ids[:2]
        assert c.get_latest_version("loose-value").schema_id == ids[2]
        assert json.loads(str(c.get_schema(ids[1]).schema_str)) == json.loads(ADD_DEFAULT)
        assert c.get_compatibility() == "FULL"
        assert c.get_compatibility("loose-value") == "NONE"
        # The restarted registry keeps checking and numbering where the first left off.
        assert refused(c.register_schema, "clicks-value", avro(REMOVE_B)).error_code == 409  # FULL
        assert c.register_schema_full_response("loose-value", avro(ADD_DEFAULT)).version == 3
    finally:
        second.stop()


def test_avro_serializer_round_trip_uses_the_registry_id(client: SchemaRegistryClient,
                                                        registry: RegistryServer) -> None:
    ctx = SerializationContext("clicks", MessageField.VALUE)
    serialize = AvroSerializer(client, ADD_DEFAULT)
    deserialize = AvroDeserializer(client)
    event = {"a": 7, "b": "hello", "country": "NL"}

    data = serialize(event, ctx)
    assert data is not None
    magic, schema_id = struct.unpack(">bI", data[:5])
    assert magic == 0
    assert schema_id == client.get_latest_version("clicks-value").schema_id  # TopicNameStrategy subject
    fresh = SchemaRegistryClient({"url": registry.url})  # no cached schemas: asks the server
    assert AvroDeserializer(fresh)(data, ctx) == event
    assert deserialize(data, ctx) == event


def test_error_codes(client: SchemaRegistryClient, registry: RegistryServer) -> None:
    assert refused(client.get_latest_version, "nope-value").error_code == 40401
    assert refused(client.get_versions, "nope-value").error_code == 40401
    client.register_schema("clicks-value", avro(V1))
    err = refused(client.get_version, "clicks-value", 9)
    assert (err.http_status_code, err.error_code) == (404, 40402)
    err = refused(client.get_schema, 12345)
    assert (err.http_status_code, err.error_code) == (404, 40403)
    assert refused(client.lookup_schema, "clicks-value", avro(ADD_DEFAULT)).error_code == 40403
    assert http(registry, "GET", "/subjects/clicks-value/versions/abc")[1]["error_code"] == 42202
    assert http(registry, "GET", "/subjects/clicks-value/versions/0")[1]["error_code"] == 42202
    err = refused(client.register_schema, "clicks-value", avro('{"type": "recrd"}'))
    assert (err.http_status_code, err.error_code) == (422, 42201)
    bad_default = ('{"type": "record", "name": "R", "fields": '
                   '[{"name": "s", "type": ["null", "string"], "default": "x"}]}')
    err = refused(client.register_schema, "clicks-value", avro(bad_default))  # Confluent refuses it too
    assert err.error_code == 42201 and "first branch" in err.error_message and "'s'" in err.error_message
    err = refused(client.register_schema, "p-value", Schema('syntax = "proto3";', "PROTOBUF"))
    assert err.error_code == 42201 and "AVRO" in err.error_message
    status, body = http(registry, "GET", "/no/such/path")
    assert status == 404 and "error_code" in body


def test_soft_and_permanent_delete(client: SchemaRegistryClient, registry: RegistryServer) -> None:
    one = client.register_schema("clicks-value", avro(V1))
    client.register_schema("clicks-value", avro(ADD_DEFAULT))
    assert client.delete_version("clicks-value", 2) == 2
    assert client.get_versions("clicks-value") == [1]
    assert client.get_versions("clicks-value", deleted=True) == [1, 2]
    assert client.get_version("clicks-value", 2, deleted=True).version == 2
    assert refused(client.delete_subject, "clicks-value", permanent=True).error_code == 40405
    assert client.delete_subject("clicks-value") == [1]
    assert client.get_subjects() == []
    assert refused(client.get_latest_version, "clicks-value").error_code == 40401
    assert json.loads(str(client.get_schema(one).schema_str)) == json.loads(V1)  # ids outlive soft deletes
    assert client.delete_subject("clicks-value", permanent=True) == [1, 2]
    assert client.get_subjects(deleted=True) == []
    assert refused(SchemaRegistryClient({"url": registry.url}).get_schema, one).error_code == 40403


def test_a_write_kafka_does_not_acknowledge_changes_nothing(tmp_path: Path) -> None:
    """Durability: the reply (and the state) follow Kafka's acknowledgement, never precede it."""
    from streams.embedded.kafka import EmbeddedKafka

    kafka = EmbeddedKafka(tmp_path / "logs")  # a broker of its own: this test kills it
    kafka.start()
    try:
        server = RegistryServer(SchemaStore(kafka.bootstrap, timeout=3.0).start()).start()
        client = SchemaRegistryClient({"url": server.url, "max.retries": 0})
        client.register_schema("clicks-value", avro(V1))
        before = server.store.dump()
        kafka.stop()
        err = refused(client.register_schema, "clicks-value", avro(ADD_DEFAULT))
        assert (err.http_status_code, err.error_code) == (500, 50001)
        assert server.store.dump() == before
        assert client.get_versions("clicks-value") == [1]
        server.stop()
    finally:
        kafka.stop()


# --- compat.problems: pure ---


@pytest.mark.parametrize(("level", "new", "expected"), [
    ("BACKWARD", ADD_NO_DEFAULT, [("BACKWARD vs version 1: field 'country' (/fields/2) has no default and version 1 "
                                  "does not write it: READER_FIELD_MISSING_DEFAULT_VALUE")]),
    ("BACKWARD", REMOVE_B, []),
    ("FORWARD", ADD_NO_DEFAULT, []),
    ("FORWARD", REMOVE_B, [("FORWARD vs version 1: field 'b' (/fields/1) has no default and the new schema does "
                           "not write it: READER_FIELD_MISSING_DEFAULT_VALUE")]),
    ("FULL", ADD_DEFAULT, []),
    ("FULL", REMOVE_B, [("FORWARD vs version 1: field 'b' (/fields/1) has no default and the new schema does "
                        "not write it: READER_FIELD_MISSING_DEFAULT_VALUE")]),
    ("NONE", record({"name": "a", "type": "string"}), []),
])
def test_problems_per_level(level: str, new: str, expected: list[str]) -> None:
    assert problems(new, [V1], level) == expected


def test_problems_transitive_checks_all_earlier_versions() -> None:
    history = [record(A), record(A, B_DEFAULT)]
    assert problems(record(A, B), history, "BACKWARD") == []
    assert problems(record(A, B), history, "FULL") == []
    assert [m.split(":")[0] for m in problems(record(A, B), history, "BACKWARD_TRANSITIVE")] == ["BACKWARD vs version 1"]
    assert [m.split(":")[0] for m in problems(record(A, B), history, "FULL_TRANSITIVE")] == ["BACKWARD vs version 1"]
    assert problems(REMOVE_B, [V1, ADD_DEFAULT], "FORWARD_TRANSITIVE", versions=[3, 5]) == [
        f"FORWARD vs version {n}: field 'b' (/fields/1) has no default and the new schema does not write it: "
        "READER_FIELD_MISSING_DEFAULT_VALUE" for n in (3, 5)]


def test_problems_name_nested_fields_and_each_rule() -> None:
    old = record(
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["view", "buy"]}},
        {"name": "addr", "type": ["null", {"type": "record", "name": "Addr", "fields": [B]}], "default": None},
        {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "Item",
                                                                "fields": [{"name": "sku", "type": "string"}]}}},
        {"name": "amount", "type": "int"},
    )
    new = record(
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["view"]}},
        {"name": "addr", "type": ["null", {"type": "record", "name": "Addr", "fields": [B, COUNTRY]}],
         "default": None},
        {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "Item",
                                                                "fields": [{"name": "sku", "type": "long"}]}}},
        {"name": "amount", "type": "long"},  # int -> long is a promotion: fine
    )
    found = problems(new, [old], "BACKWARD")
    assert found == [
        ("BACKWARD vs version 1: field 'kind' (/fields/0/type/symbols) lacks symbols ['buy'] in the new schema "
        "that version 1 may write: MISSING_ENUM_SYMBOLS"),
        ("BACKWARD vs version 1: field 'addr.country' (/fields/1/type/1/fields/1) has no default and version 1 "
        "does not write it: READER_FIELD_MISSING_DEFAULT_VALUE"),
        ("BACKWARD vs version 1: field 'items[].sku' (/fields/2/type/items/fields/0/type) is long in the new schema "
        "but string in version 1: TYPE_MISMATCH"),
    ]
    renamed = json.dumps({**json.loads(V1), "name": "Other"})
    assert problems(renamed, [V1], "BACKWARD") == [
        ("BACKWARD vs version 1: top level (/name) is named weir.test.Other in the new schema but weir.test.Click "
        "in version 1: NAME_MISMATCH")]
    union = record({"name": "a", "type": ["null", "int"], "default": None})
    assert problems(union, [record({"name": "a", "type": ["null", "string"], "default": None})], "BACKWARD") == [
        ("BACKWARD vs version 1: field 'a' (/fields/0/type/1) has no union branch in the new schema for the string "
        "that version 1 may write: MISSING_UNION_BRANCH")]


def test_problems_reject_bad_input() -> None:
    from streams.registry.compat import SchemaParseError, UnknownLevel

    with pytest.raises(SchemaParseError):
        problems('{"type": "recrd"}', [V1], "BACKWARD")
    with pytest.raises(UnknownLevel):
        problems(V1, [V1], "SIDEWAYS")
    assert problems(V1, [], "FULL_TRANSITIVE") == []


# --- check_repository: pure ---


def write_subject(root: Path, topic: str, *versions: str, level: str | None = None) -> None:
    folder = root / topic
    folder.mkdir(parents=True)
    for n, text in enumerate(versions, 1):
        (folder / f"v{n}.avsc").write_text(text)
    if level is not None:
        (folder / "compatibility").write_text(level + "\n")


def test_check_repository_passes_on_the_repos_schemas() -> None:
    assert check_repository(SCHEMA_DIR) == []  # Weir's own
    assert check_repository(SHOP.schemas) == []  # the example project's


def test_check_repository_names_field_and_rule(tmp_path: Path) -> None:
    write_subject(tmp_path, "clickstream.events", V1, ADD_NO_DEFAULT)
    write_subject(tmp_path, "fine", V1, ADD_DEFAULT, level="FULL")
    write_subject(tmp_path, "strict", V1, REMOVE_B, level="FULL")
    assert check_repository(tmp_path) == [
        ("clickstream.events v2: BACKWARD vs v1: field 'country' (/fields/2) has no default and v1 does not write "
        "it: READER_FIELD_MISSING_DEFAULT_VALUE"),
        ("strict v2: FORWARD vs v1: field 'b' (/fields/1) has no default and the new schema does not write it: "
        "READER_FIELD_MISSING_DEFAULT_VALUE"),
    ]


def test_check_repository_finds_gaps_bad_files_and_levels(tmp_path: Path) -> None:
    write_subject(tmp_path, "gappy", V1)
    (tmp_path / "gappy" / "v3.avsc").write_text(ADD_DEFAULT)
    write_subject(tmp_path, "broken", V1, "{not json")
    write_subject(tmp_path, "odd", V1, level="SIDEWAYS")
    found = check_repository(tmp_path)
    assert len(found) == 3
    assert found[0].startswith("broken v2.avsc: does not parse")
    assert found[1] == "gappy: versions [1, 3] are not numbered 1..2 without gaps"
    assert found[2].startswith("odd: unknown compatibility level 'SIDEWAYS'")


def test_schemas_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from streams.registry.check import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["schemas", "check"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    write_subject(tmp_path, "t", V1, ADD_NO_DEFAULT)
    args = parser.parse_args(["schemas", "check", "--dir", str(tmp_path)])
    assert args.handler(args) == 1
    assert "READER_FIELD_MISSING_DEFAULT_VALUE" in capsys.readouterr().out

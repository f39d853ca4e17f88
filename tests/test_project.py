"""Projects: loading a declaration, every validation error naming its object and field, request-feature
expressions, and the contracts generated from a project."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from examples.fraud_shop.project import card, fraud, user
from streams.project import (
    Agg,
    Cdc,
    Feature,
    FeatureView,
    LabelField,
    LabelStream,
    Model,
    Project,
    Range,
    RequestFeature,
    Rules,
    Sliding,
    Source,
    ViewFeatures,
)
from streams.project.contracts import generated, prediction_fields, silver_ddl, tables
from streams.project.expr import ExpressionError, compile_expr, names_in
from streams.project.load import ProjectError, load, validate
from streams.schemas import local_versions
from tests.conftest import FRAUD_SHOP, SHOP

HOUR = 3_600_000


def test_the_shop_is_declared_through_the_project_api() -> None:
    assert load(FRAUD_SHOP) is SHOP or load(FRAUD_SHOP) == SHOP
    assert validate(SHOP) == []
    assert [s.name for s in SHOP.sources] == ["clicks", "payments", "labels", "customers", "merchants", "orders"]
    assert fraud.feature_names == (*card.features, *user.features, "amount", "log_amount", "is_digital_goods")
    assert (fraud.prediction_topic, fraud.online_topic, fraud.shadow_topic, fraud.online_name) == (
        "predictions.fraud", "predictions.fraud.online", "predictions.shadow.fraud", "fraud-online")
    assert [s.cdc.table for s in SHOP.cdc_sources if s.cdc] == ["payments", "payment_labels", "customers",
                                                               "merchants", "orders"]


def test_a_project_loads_from_a_file_and_from_a_factory(tmp_path: Path) -> None:
    schemas = tmp_path / "schemas"
    _schema(schemas, "readings", READING)
    (tmp_path / "proj.py").write_text(
        "from pathlib import Path\n"
        "from streams.project import Project, Source\n"
        "def make():\n"
        "    return Project('sensors', Path(__file__).parent / 'schemas', sources=(Source('readings', 'readings',\n"
        "        event_id='id', event_time='ts', keys=('sensor',), fields=('sensor', 'value')),))\n"
        "project = make()\n")
    assert load(f"{tmp_path / 'proj.py'}").name == "sensors"
    assert load(f"{tmp_path / 'proj.py'}:make").name == "sensors"
    with pytest.raises(ProjectError, match="no attribute 'nope'"):
        load(f"{tmp_path / 'proj.py'}:nope")
    with pytest.raises(ProjectError, match="no such file"):
        load(f"{tmp_path / 'missing.py'}")
    with pytest.raises(ProjectError, match="no module named 'no_such_package'"):
        load("no_such_package.project:project")
    with pytest.raises(ProjectError, match="not a streams.project.Project"):
        load("examples.fraud_shop.project:card")


# ---------------------------------------------------------------------------------------------------
# validation: a small project of the test's own, then one mistake at a time

READING = {"type": "record", "name": "Reading", "namespace": "t", "fields": [
    {"name": "id", "type": "string"},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "sensor", "type": "string"},
    {"name": "site", "type": ["null", "string"], "default": None},
    {"name": "value", "type": "double"},
    {"name": "ok", "type": "boolean"},
    {"name": "note", "type": ["null", "string"], "default": None, "pii": True},
    {"name": "raw", "type": "bytes"},
]}
CHECK = {"type": "record", "name": "Check", "namespace": "t", "fields": [
    {"name": "reading_id", "type": "string"}, {"name": "at", "type": "long"}, {"name": "faulty", "type": "boolean"},
    {"name": "minutes", "type": "double"}]}


def _schema(root: Path, topic: str, raw: dict[str, Any]) -> None:
    (root / topic).mkdir(parents=True, exist_ok=True)
    (root / topic / "v1.avsc").write_text(json.dumps(raw))


def sensor_project(root: Path, **model_changes: Any) -> Project:
    _schema(root, "readings", READING)
    _schema(root, "checks", CHECK)
    readings = Source("readings", "readings", event_id="id", event_time="ts", keys=("sensor",),
                      fields=("sensor", "site", "value", "ok", "note"), ranges=(Range("value", 0, 100),))
    checks = Source("checks", "checks", event_id="reading_id", event_time="at", keys=("reading_id",),
                    fields=("reading_id", "faulty", "minutes"))
    view = FeatureView("sensor", "sensor", 1, source="readings", ttl_ms=2 * HOUR, specs=(
        Feature("mean_1h", Agg.MEAN, Sliding(HOUR), "mean reading", value="value"),
        Feature("n_1h", Agg.COUNT, Sliding(HOUR), "readings")))
    model = Model("faulty", "binary", source="readings",
                  features=(ViewFeatures(view), RequestFeature("value", "value"),
                            RequestFeature("high", "value > 80")),
                  label=LabelStream("checks", key="reading_id", value="faulty"),
                  fallback=Rules({"high": 2.0}, bias=-3.0))
    model = dataclasses.replace(model, **model_changes)
    return Project("sensors", root, sources=(readings, checks), views=(view,), models=(model,))


def test_a_valid_project_has_no_problem(tmp_path: Path) -> None:
    assert validate(sensor_project(tmp_path)) == []


def _problems(project: Project) -> str:
    found = validate(project)
    assert found, "expected a problem"
    return "\n".join(found)


def test_source_mistakes_name_the_source_and_field(tmp_path: Path) -> None:
    p = sensor_project(tmp_path)
    readings = p.sources[0]

    def with_source(**changes: Any) -> Project:
        return dataclasses.replace(p, sources=(dataclasses.replace(readings, **changes), p.sources[1]))

    assert "source readings: field 'temperature' is not a field of the schema of readings (fields: id, ts, " \
           "sensor, site, value, ok, note, raw)" in _problems(with_source(fields=(*readings.fields, "temperature")))
    assert "source readings: field 'raw' is bytes, not a number, string, boolean or enum" in \
        _problems(with_source(fields=(*readings.fields, "raw")))
    assert "source readings: event_time 'value' is double, not a timestamp-millis" in \
        _problems(with_source(event_time="value"))
    assert "source readings: range [0, 100] field 'sensor' is string, not a number" in \
        _problems(with_source(ranges=(Range("sensor", 0, 100),)))
    assert "source readings: key 'site' must also be one of its fields" in \
        _problems(with_source(keys=("site",), fields=("sensor", "value", "ok")))
    assert "source readings: no schema for topic 'nowhere'" in _problems(with_source(topic="nowhere"))
    assert "is not a valid Kafka topic name outside Weir's own" in _problems(with_source(topic="weir.readings"))
    assert "a CDC source of table 'readings' is published to 'cdc.readings', not 'readings'" in \
        _problems(with_source(cdc=Cdc("readings")))
    assert "field 'served' is a name Weir gives every event record" in \
        _problems(with_source(fields=(*readings.fields, "served")))


def test_view_mistakes_name_the_view_and_field(tmp_path: Path) -> None:
    p = sensor_project(tmp_path)
    view = p.views[0]

    def with_view(**changes: Any) -> Project:
        changed = dataclasses.replace(view, **changes)
        model = dataclasses.replace(p.models[0], features=(ViewFeatures(changed), *p.models[0].request))
        return dataclasses.replace(p, views=(changed,), models=(model,))

    assert "view sensor: keyed by 'site', but source readings is partitioned by 'sensor'" in \
        _problems(with_view(entity="site"))
    assert "view sensor: feature mean_1h: mean of 'temp' is not a field ingest keeps" in \
        _problems(with_view(specs=(Feature("mean_1h", Agg.MEAN, Sliding(HOUR), "m", value="temp"),)))
    assert "view sensor: feature mean_1h: mean of 'site' is nullable string, not a number" in \
        _problems(with_view(specs=(Feature("mean_1h", Agg.MEAN, Sliding(HOUR), "m", value="site"),)))
    assert "view sensor: feature n_1h: condition field 'colour' is not a field ingest keeps" in \
        _problems(with_view(specs=(Feature("n_1h", Agg.COUNT, Sliding(HOUR), "n", where=(("colour", "red"),)),)))
    assert "view sensor: project sensors: no source named 'gauges'" in _problems(with_view(source="gauges"))
    assert "view sensor" in _problems(with_view(ttl_ms=1000))  # shorter than the lateness and the window


def test_model_mistakes_name_the_model_and_field(tmp_path: Path) -> None:
    root = tmp_path
    view = sensor_project(root).views[0]
    assert "model faulty: feature view sensor: key 'sensor_id' is not a field of source readings" in \
        _problems(sensor_project(root, features=(ViewFeatures(view, key="sensor_id"),)))
    assert "model faulty: request feature high: 'valu > 80' reads 'valu', not fields of source readings" in \
        _problems(sensor_project(root, features=(RequestFeature("high", "valu > 80"),), fallback=Rules()))
    assert "model faulty: request feature high: 'value.real': attribute access is not allowed" in \
        _problems(sensor_project(root, features=(RequestFeature("high", "value.real"),), fallback=Rules()))
    assert "model faulty: request feature x: declare exactly one of expr" in \
        _problems(sensor_project(root, features=(RequestFeature("x"),), fallback=Rules()))
    assert "model faulty: feature 'value' appears 2 times" in _problems(sensor_project(
        root, features=(RequestFeature("value", "value"), RequestFeature("value", "value * 2")), fallback=Rules()))
    assert "model faulty: label value 'minutes' is double, not boolean (a binary model)" in \
        _problems(sensor_project(root, label=LabelStream("checks", key="reading_id", value="minutes")))
    assert "model faulty: label key 'id' is not a field of source checks" in \
        _problems(sensor_project(root, label=LabelStream("checks", key="id", value="faulty")))
    assert validate(sensor_project(root, task="regression", fallback=Rules(), features=(RequestFeature("v", "value"),),
                                   label=LabelStream("checks", key="reading_id", value="minutes"))) == []
    assert "model faulty: label field 'value' is double, not boolean" in \
        _problems(sensor_project(root, label=LabelField("value")))
    assert "model faulty: threshold 1.5 is not within [0, 1]" in _problems(sensor_project(root, threshold=1.5))
    assert "model faulty: fallback rules weigh 'hot', not features of the model" in \
        _problems(sensor_project(root, fallback=Rules({"hot": 1.0})))
    assert "model faulty: online learner 'svm'" in _problems(sensor_project(root, online="svm"))
    assert "model faulty: task 'ranking' is not one of binary, regression" in \
        _problems(sensor_project(root, task="ranking"))
    assert "model faulty: carried field 'colour' is not a field of source readings" in \
        _problems(sensor_project(root, carry=("colour",)))
    assert "model faulty: project sensors: no source named 'gauges'" in _problems(sensor_project(root, source="gauges"))


def test_a_declared_prediction_schema_must_be_writable(tmp_path: Path) -> None:
    p = sensor_project(tmp_path)
    _schema(tmp_path, "predictions.faulty", {"type": "record", "name": "P", "fields": [
        {"name": "event_id", "type": "string"}, {"name": "site_code", "type": "string"},
        {"name": "score", "type": "double"}]})
    assert "the schema of predictions.faulty (v1) requires 'site_code', which Weir does not write there" in \
        _problems(p)


def test_every_problem_is_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = type(sys)("sensor_bad")
    module.project = sensor_project(tmp_path, threshold=2.0, fallback=Rules({"hot": 1.0}))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sensor_bad", module)
    with pytest.raises(ProjectError) as info:
        load("sensor_bad:project")
    assert len(info.value.problems) == 2 and "2 problems" in str(info.value)
    assert all(p.startswith("model faulty: ") for p in info.value.problems)


# ---------------------------------------------------------------------------------------------------
# request-feature expressions


@pytest.mark.parametrize(("text", "row", "expected"), [
    ("log1p(max(amount, 0))", {"amount": math.e - 1}, 1.0),
    ("merchant_category == 'digital_goods'", {"merchant_category": "digital_goods"}, 1.0),
    ("kind in ('a', 'b')", {"kind": "c"}, 0.0),
    ("amount / items if items else 0", {"amount": 9.0, "items": 0}, 0.0),
    ("coalesce(tip, 0) + 1", {"tip": None}, 1.0),
    ("amount * 2", {"amount": None}, -1.0),  # not computable: the default
    ("log(amount)", {"amount": 0.0}, -1.0),
])
def test_expressions_compute_a_float_or_the_default(text: str, row: dict[str, Any], expected: float) -> None:
    assert compile_expr(text, set(row), default=-1.0)(row) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "amount.__class__", "[x for x in amount]",
                                  "open('/etc/passwd')", "lambda: 1", "amount[0]", "(a := 1)", "f'{amount}'"])
def test_anything_outside_the_subset_is_refused(text: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expr(text, {"amount", "a", "x"})


@given(st.text(max_size=30))
def test_any_text_either_compiles_or_is_refused_cleanly(text: str) -> None:
    try:
        fn = compile_expr(text, {"a", "b"})
    except ExpressionError:
        return
    assert names_in(text) <= {"a", "b"}
    out = fn({"a": 1.5, "b": 2.0})
    assert isinstance(out, float)


# ---------------------------------------------------------------------------------------------------
# contracts


def test_contracts_are_generated_from_the_project(tmp_path: Path) -> None:
    p = sensor_project(tmp_path)
    subjects = generated(p)
    assert set(subjects) == {"weir.sensors.silver.readings", "weir.sensors.silver.checks",
                             "weir.sensors.scoring.readings", "predictions.faulty", "predictions.faulty.online",
                             "predictions.shadow.faulty", "weir.sensors.scored", "weir.sensors.outcomes",
                             "weir.sensors.audit", "weir.sensors.feature_log", "weir.sensors.feature_drift"}
    assert subjects["weir.sensors.scored"] == local_versions("weir.scored")[-1]  # Weir's own schema, the project's topic
    items = subjects["weir.sensors.silver.readings"]["fields"][0]["type"]["items"]["fields"]
    assert [(f["name"], f["type"]) for f in items] == [
        ("event_id", "string"), ("ts_ms", "long"), ("source_ms", "long"), ("sensor", ["null", "string"]),
        ("site", ["null", "string"]), ("value", ["null", "double"]), ("ok", ["null", "boolean"]),
        ("note", ["null", "string"])]
    assert [f["name"] for f in prediction_fields(p, p.models[0], online=True)][:3] == ["event_id", "sensor", "score"]
    assert "`value` Nullable(Float64)" in silver_ddl(p, p.sources[0]) and len(tables(p)) == 2
    for raw in subjects.values():  # every generated schema is valid Avro
        fastavro.parse_schema(raw)
    assert "weir.fraud_shop.silver.payments" in generated(SHOP) and "predictions.fraud" not in generated(SHOP)

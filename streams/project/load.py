"""Import a project and check it: every problem found, each naming its object and field.

A project is referenced as ``package.module:attribute`` (``WEIR_PROJECT`` or
``--project``; the attribute defaults to ``project``) or as a file,
``path/to/project.py[:attribute]``. The current directory is importable, as
for ``python -m``. :func:`load` imports the reference and :func:`validate`
checks the declaration against the Avro schemas of its topics:

* every name is unique (sources, topics, views, models; features within a
  model's vector);
* every field a source, view or model names exists in the source's newest
  schema (a CDC source: in the table's row) with a type it can be used as
  (event time: ``timestamp-millis``, a long of epoch ms or an ISO-8601 string;
  aggregated values and ranges: numbers; keys: strings; a binary label a
  boolean, a regression label a number);
* a view is keyed by its source's partition key (the first of its keys), and
  a model's view key is a field of the scored event;
* request feature expressions parse, stay in the allowed subset and read
  fields of the scored event; the online learner's spec builds; the fallback
  rules name features of the model; a model's decision threshold is in [0, 1].

Errors come back as one :class:`ProjectError` listing every problem, e.g.
``model eta: feature view kitchen: key 'shop_id' is not a field of source
orders (fields: ...)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from models.base import InvalidModelInput
from streams.features.definitions import FeatureView
from streams.features.engine import ViewState
from streams.project.contracts import RESERVED, prediction_fields, source_fields
from streams.project.expr import ExpressionError, names_in
from streams.project.fields import FieldType
from streams.project.spec import TASKS, LabelField, LabelStream, Model, Project, Source
from streams.schemas import local_versions

__all__ = ["DEFAULT_ATTRIBUTE", "DEFAULT_FILE", "ProjectError", "load", "project_of", "project_ref", "validate"]

DEFAULT_ATTRIBUTE = "project"
DEFAULT_FILE = "project.py"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
PROJECT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")  # it names the project's ClickHouse database
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
RESERVED_PREFIXES = ("weir.", "dlq.", "_")  # Weir's internal topics, dead letters, the registry's own


class ProjectError(Exception):
    """A project that cannot be imported or does not validate; ``problems`` lists each one."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"project {where}: {len(problems)} problem{'s' if len(problems) != 1 else ''}\n{lines}")


# ---------------------------------------------------------------------------------------------------
# importing


def _import(ref: str) -> Any:
    """The object ``ref`` names (``module:attr`` or ``file.py[:attr]``)."""
    target, _, attr = ref.partition(":")
    attr = attr or DEFAULT_ATTRIBUTE
    if target.endswith(".py") or "/" in target:
        module = _import_file(ref, Path(target))
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the current directory's packages
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name is not None and target.startswith(exc.name):
                raise ProjectError(ref, [f"no module named {exc.name!r} (set WEIR_PROJECT or --project to "
                                         "package.module:attribute, or to a file path.py:attribute)"]) from None
            raise
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ProjectError(ref, [f"module {module.__name__} has no attribute {attr!r}"]) from None


def _import_file(ref: str, path: Path) -> Any:
    """A project file as a module: inside a package (folders with ``__init__.py``), as that package's module,
    so its own imports of sibling modules work; else as a module of its own, its folder importable."""
    if not path.is_file():
        raise ProjectError(ref, [f"no such file: {path}"])
    path = path.resolve()
    parts, folder = [path.stem], path.parent
    while (folder / "__init__.py").is_file() and folder.name.isidentifier():
        parts.insert(0, folder.name)
        folder = folder.parent
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    if len(parts) > 1:
        return importlib.import_module(".".join(parts))
    name = f"weir_project_{path.stem}_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ProjectError(ref, [f"{path} cannot be imported as a Python module"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load(ref: str) -> Project:
    """Import the project ``ref`` names and validate it; raises :class:`ProjectError` with every problem.

    A reference to a module whose attribute is a function is called (a project factory)."""
    obj = _import(ref)
    if callable(obj) and not isinstance(obj, Project):
        obj = obj()
    if not isinstance(obj, Project):
        raise ProjectError(ref, [f"{ref} is a {type(obj).__name__}, not a streams.project.Project"])
    problems = validate(obj)
    if problems:
        raise ProjectError(f"{obj.name} ({ref})", problems)
    return obj


def project_ref(explicit: str | None = None) -> str:
    """Which project to run: ``explicit`` (``--project``), else ``WEIR_PROJECT``, else ``project.py`` in the
    current directory; :class:`ProjectError` when there is none."""
    from streams.settings import WeirSettings

    ref = explicit or WeirSettings().project
    if ref:
        return ref
    if Path(DEFAULT_FILE).is_file():
        return DEFAULT_FILE
    raise ProjectError("(none)", [f"no project to run: pass --project or set WEIR_PROJECT to package.module:attribute "
                                  f"or path/to/project.py, or run where a {DEFAULT_FILE} is (`weir init DIR` "
                                  "scaffolds one; the repository's examples are under examples/)"])


def project_of(args: Any) -> Project:
    """The project a command runs (see :func:`project_ref`; its ``--project`` option first), loaded once per
    process and reference."""
    ref = project_ref(getattr(args, "project", None))
    if ref not in _loaded:
        _loaded[ref] = load(ref)
    return _loaded[ref]


_loaded: dict[str, Project] = {}


# ---------------------------------------------------------------------------------------------------
# checking


class _Checker:
    """Collects problems; each check reads the declaration and appends sentences."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.problems: list[str] = []
        self.fields: dict[str, dict[str, FieldType]] = {}  # source name -> its event fields (readable ones)

    def add(self, where: str, problem: str) -> None:
        self.problems.append(f"{where}: {problem}")

    def run(self) -> list[str]:
        p = self.project
        if not PROJECT_RE.match(p.name or ""):
            self.add("project", f"name {p.name!r} must start with a letter and hold letters, digits or _ "
                                "(it names the project's ClickHouse database and internal topics)")
        if not p.schemas.is_dir():
            self.add("project", f"schemas folder {p.schemas} does not exist")
        if not p.sources:
            self.add("project", "declares no source")
        self._unique("source", [s.name for s in p.sources])
        self._unique("source topic", [s.topic for s in p.sources])
        self._unique("feature view", [v.name for v in p.views])
        self._unique("model", [m.name for m in p.models])
        for s in p.sources:
            self.source(s)
        for v in p.views:
            self.view(v)
        for m in p.models:
            self.model(m)
        return self.problems

    def _unique(self, what: str, names: Iterable[str]) -> None:
        for name, n in Counter(names).items():
            if n > 1:
                self.add("project", f"{what} {name!r} is declared {n} times")

    # --- sources

    def source(self, s: Source) -> None:
        where = f"source {s.name}"
        if not NAME_RE.match(s.name or ""):
            self.add(where, "name must start with a letter and hold letters, digits, _ or -")
        if not TOPIC_RE.match(s.topic or "") or s.topic.startswith(RESERVED_PREFIXES):
            self.add(where, f"topic {s.topic!r} is not a valid Kafka topic name outside Weir's own "
                            f"({', '.join(RESERVED_PREFIXES)}*)")
        if s.cdc is not None and s.topic != f"cdc.{s.cdc.table}":
            self.add(where, f"a CDC source of table {s.cdc.table!r} is published to 'cdc.{s.cdc.table}', "
                            f"not {s.topic!r}")
        try:
            fields = source_fields(self.project, s)
        except KeyError:
            self.add(where, f"no schema for topic {s.topic!r}: expected {self.project.schemas / s.topic}/v1.avsc")
            return
        except (ValueError, json.JSONDecodeError) as exc:
            self.add(where, str(exc))
            return
        schema = f"the schema of {s.topic}" + (" (the table's row)" if s.cdc is not None else "")
        known = ", ".join(fields)

        def need(role: str, name: str, ok: Callable[[FieldType], bool] = lambda t: t.primitive,
                 kind: str = "a number, string, boolean or enum") -> None:
            if name not in fields:
                self.add(where, f"{role} {name!r} is not a field of {schema} (fields: {known})")
            elif not ok(fields[name]):
                self.add(where, f"{role} {name!r} is {fields[name].describe()}, not {kind}")

        need("event_id", s.event_id, lambda t: t.kind in ("string", "long", "int") and not t.nullable,
             "a non-null string or integer")
        if s.event_time or s.cdc is None:
            need("event_time", s.event_time, _is_time,
                 "a timestamp-millis, a long of epoch ms or an ISO-8601 string")
        if not s.keys:
            self.add(where, "declares no key (the entity key fields; the first partitions its events)")
        if not s.fields:
            self.add(where, "declares no field to keep")
        for name in s.fields:
            need("field", name)
        for name in s.keys:
            need("key", name, lambda t: t.kind == "string", "a string")
            if name not in s.fields:
                self.add(where, f"key {name!r} must also be one of its fields (ingest keeps it)")
        for name in s.required:
            need("required field", name)
        for r in s.ranges:
            need(f"range {r.describe()} field", r.field, lambda t: t.numeric, "a number")
        for reserved in RESERVED:
            if reserved in s.fields:
                self.add(where, f"field {reserved!r} is a name Weir gives every event record; a source cannot "
                                "keep a field so named")
        self.fields[s.name] = {n: fields[n] for n in s.fields if n in fields}
        self.fields[s.name]["ts_ms"] = FieldType("long")
        self.fields[s.name].setdefault("event_id", FieldType("string"))

    # --- views

    def view(self, v: FeatureView) -> None:
        where = f"view {v.name}"
        if not NAME_RE.match(v.name or ""):
            self.add(where, "name must start with a letter and hold letters, digits, _ or -")
        try:
            source = self.project.source(v.source)
        except KeyError as exc:
            self.add(where, exc.args[0])
            return
        fields = dict(self.fields.get(source.name, {}))
        if v.entity != source.partition_key:
            self.add(where, f"keyed by {v.entity!r}, but source {source.name} is partitioned by "
                            f"{source.partition_key!r} (the first of its keys): every view over a source is "
                            "keyed by it")
        for d in v.derive:
            self._field(where, fields, f"derived {d.out}: field", d.field)
            for name, _ in d.where:
                self._field(where, fields, f"derived {d.out}: condition field", name)
            fields[d.out] = FieldType("boolean")
        for f in v.specs:
            if f.value is not None:
                self._field(where, fields, f"feature {f.name}: {f.agg.value} of", f.value, numeric=True)
            if f.distinct is not None:
                self._field(where, fields, f"feature {f.name}: distinct", f.distinct)
            for name, _ in f.where:
                self._field(where, fields, f"feature {f.name}: condition field", name)
        try:
            ViewState(v)
        except ValueError as exc:
            self.add(where, str(exc))

    def _field(self, where: str, fields: dict[str, FieldType], role: str, name: str, *,
               numeric: bool = False) -> None:
        if not fields:
            return  # the source itself did not check out: already reported
        if name not in fields:
            self.add(where, f"{role} {name!r} is not a field ingest keeps (fields: {', '.join(fields)})")
        elif numeric and not (fields[name].numeric or fields[name].kind == "boolean"):
            self.add(where, f"{role} {name!r} is {fields[name].describe()}, not a number")
        elif not fields[name].primitive:
            self.add(where, f"{role} {name!r} is {fields[name].describe()}, not a number, string or boolean")

    # --- models

    def model(self, m: Model) -> None:
        where = f"model {m.name}"
        if not NAME_RE.match(m.name or ""):
            self.add(where, "name must start with a letter and hold letters, digits, _ or -")
        if m.task not in TASKS:
            self.add(where, f"task {m.task!r} is not one of {', '.join(TASKS)}")
        try:
            source = self.project.source(m.source)
        except KeyError as exc:
            self.add(where, exc.args[0])
            return
        fields = self.fields.get(source.name, {})
        known = ", ".join(fields)
        if not m.features:
            self.add(where, "declares no feature")
        for ref in m.views:
            view = ref.view
            mine = f"feature view {view.name}"
            if view not in self.project.views:
                self.add(where, f"{mine} v{view.version} is not one of the project's views")
            if fields and ref.key_field not in fields:
                self.add(where, f"{mine}: key {ref.key_field!r} is not a field of source {source.name} "
                                f"(fields: {known}); name it with ViewFeatures(view, key=...)")
            elif fields and fields[ref.key_field].kind != "string":
                self.add(where, f"{mine}: key {ref.key_field!r} is {fields[ref.key_field].describe()}, not a string")
            if view.source == source.name and ref.key_field != source.partition_key:
                self.add(where, f"{mine} is computed from the scored source {source.name}; it can only be "
                                f"looked up by that source's partition key {source.partition_key!r}")
        for r in m.request:
            mine = f"request feature {r.name}"
            if (r.fn is None) == (not r.expr):
                self.add(where, f"{mine}: declare exactly one of expr (an expression) or fn (a function)")
            elif r.expr:
                try:
                    unknown = sorted(names_in(r.expr) - set(fields))
                except ExpressionError as exc:
                    self.add(where, f"{mine}: {exc}")
                else:
                    if unknown and fields:
                        self.add(where, f"{mine}: {r.expr!r} reads {', '.join(map(repr, unknown))}, not fields "
                                        f"of source {source.name} (fields: {known})")
        for name, n in Counter(m.feature_names).items():
            if n > 1:
                self.add(where, f"feature {name!r} appears {n} times in the model's vector: names must be unique")
        self.label(where, m)
        self.serving(where, m, fields)

    def label(self, where: str, m: Model) -> None:
        label, want = m.label, ("boolean" if m.task == "binary" else "a number")

        def usable(t: FieldType) -> bool:
            return t.kind == "boolean" if m.task == "binary" else (t.numeric or t.kind == "boolean")

        if isinstance(label, LabelField):
            fields = self.fields.get(m.source, {})
            if fields and label.field not in fields:
                self.add(where, f"label field {label.field!r} is not a field of source {m.source}")
            elif fields and not usable(fields[label.field]):
                self.add(where, f"label field {label.field!r} is {fields[label.field].describe()}, not {want}")
            return
        if not isinstance(label, LabelStream):
            self.add(where, "label must be a LabelStream or a LabelField")
            return
        try:
            self.project.source(label.source)
        except KeyError as exc:
            self.add(where, f"label: {exc.args[0]}")
            return
        fields = self.fields.get(label.source, {})
        if not fields:
            return
        if label.key not in fields:
            self.add(where, f"label key {label.key!r} is not a field of source {label.source} "
                            f"(fields: {', '.join(fields)})")
        if label.value not in fields:
            self.add(where, f"label value {label.value!r} is not a field of source {label.source} "
                            f"(fields: {', '.join(fields)})")
        elif not usable(fields[label.value]):
            self.add(where, f"label value {label.value!r} is {fields[label.value].describe()}, not {want} "
                            f"(a {m.task} model)")
        if label.maturity_s < 0 or label.horizon_s <= 0:
            self.add(where, "label maturity_s must be >= 0 and horizon_s > 0")

    def detectors(self, where: str, m: Model) -> None:
        from models.drift_detectors import InvalidDetector, parse_detector

        for signal in ("error", "missed_positive", "score"):
            text = getattr(m.drift, signal)
            if not text:
                continue
            if signal == "missed_positive" and m.task != "binary":
                self.add(where, f"drift.missed_positive {text!r}: only a binary model has positives to miss")
                continue
            try:
                spec = parse_detector(text)
            except InvalidDetector as exc:
                self.add(where, f"drift.{signal}: {exc}")
                continue
            if spec.binary and (signal == "score" or m.task != "binary"):
                what = "scores" if signal == "score" else "a regression's errors"
                self.add(where, f"drift.{signal} {text!r}: {spec.name} takes 0/1 values, not {what}; choose one "
                                "of ADWIN, PageHinkley, KSWIN")

    def serving(self, where: str, m: Model, fields: dict[str, FieldType]) -> None:
        if m.task == "binary" and not 0.0 <= m.threshold <= 1.0:
            self.add(where, f"threshold {m.threshold} is not within [0, 1] (a binary model's score is a probability)")
        unknown = sorted(set(m.fallback.weights) - set(m.feature_names))
        if unknown:
            self.add(where, f"fallback rules weigh {', '.join(map(repr, unknown))}, not features of the model")
        self.detectors(where, m)
        for name, spec in (("online", m.online_learner), *((f"challenger {n}", s) for n, s in m.challengers)):
            try:
                from models.online import RiverLearner

                RiverLearner(spec, task=m.task)
            except (InvalidModelInput, TypeError, ValueError) as exc:
                self.add(where, f"{name} learner {spec!r}: {exc}")
        if fields:
            key = m.key or self.project.source(m.source).partition_key
            bad = [n for n in (key, *m.carry) if n not in fields]
            if key not in fields:
                self.add(where, f"prediction key {key!r} is not a field of source {m.source}")
            elif fields[key].kind != "string":
                self.add(where, f"prediction key {key!r} is {fields[key].describe()}, not a string")
            for name in m.carry:
                if name not in fields:
                    self.add(where, f"carried field {name!r} is not a field of source {m.source}")
            if not bad:
                self.prediction_schemas(where, m)
        t = m.trainer
        if min(t.max_epochs, t.batch_size, t.window_rows, t.min_rows, t.bootstrap_rows, *t.hidden, 1) < 1 \
                or not 0 < t.val_fraction < 1 or t.lr <= 0:
            self.add(where, "trainer: epochs, batch size, rows and hidden widths must be positive, "
                            "val_fraction within (0, 1) and lr > 0")
        r = m.retrain
        if min(r.cooldown_labels, r.min_new_labels, r.min_new_positives, r.every_labels) < 0 \
                or not r.recency_weight >= 1:
            self.add(where, f"retrain: cooldown_labels, min_new_labels, min_new_positives and every_labels must be "
                            f">= 0 and recency_weight >= 1, got {r}")
        w = m.monitor
        if not (w.window_s > 0 and w.grace_s >= 0 and w.min_rows >= 1) or not all(
                0 < x <= 1 for x in (w.drift_share, w.null_rate, w.default_rate_increase, w.out_of_range_rate)):
            self.add(where, f"monitor: window_s must be > 0, grace_s >= 0, min_rows >= 1 and drift_share, null_rate, "
                            f"default_rate_increase and out_of_range_rate within (0, 1], got {w}")


    def prediction_schemas(self, where: str, m: Model) -> None:
        """A prediction topic's declared schema must be writable: Weir fills every field without a default."""
        for topic, online in ((m.prediction_topic, False), (m.shadow_topic, False), (m.online_topic, True)):
            if not (self.project.schemas / topic).is_dir():
                continue
            try:
                versions = local_versions(topic, self.project.schemas)
            except (KeyError, ValueError) as exc:
                self.add(where, f"prediction schema {topic}: {exc}")
                continue
            written = [f["name"] for f in prediction_fields(self.project, m, online=online)]
            needed = [f["name"] for f in versions[-1].get("fields", ()) if "default" not in f]
            missing = [n for n in needed if n not in written]
            if missing:
                self.add(where, f"the schema of {topic} (v{len(versions)}) requires {', '.join(map(repr, missing))}, "
                                f"which Weir does not write there (it writes {', '.join(written)}): give them "
                                "defaults" + ("" if online else ", or carry them"))


def _is_time(t: FieldType) -> bool:
    return not t.nullable and (t.logical == "timestamp-millis" or (t.kind == "long" and t.logical is None)
                               or t.kind == "string")


def validate(project: Project) -> list[str]:
    """Every problem of ``project`` (empty when it is valid), each naming its object and field."""
    return _Checker(project).run()

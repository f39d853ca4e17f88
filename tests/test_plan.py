"""``weir init``, ``weir plan`` and ``weir apply``: scaffolding a project, and what applying one changes on the
running stack (the session's registry and broker), refused when a definition changed under its version or a
schema change is incompatible."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from streams import cli
from streams.project import (
    Agg,
    Feature,
    FeatureView,
    LabelField,
    Model,
    Project,
    RequestFeature,
    Sliding,
    Source,
    ViewFeatures,
)
from streams.project.cli import InitError, scaffold
from streams.project.load import load, validate
from streams.project.plan import Applied, PlanRefused, applied_state, apply, make_plan
from streams.settings import WeirSettings
from streams.stack import Endpoints, Stack
from tests.conftest import FREE_PORTS

HOUR = 3_600_000


@pytest.mark.parametrize("template", ["fraud", "delivery_eta", "minimal"])  # a prefix of an example, or its name
def test_init_scaffolds_a_project_of_its_own_that_validates(tmp_path: Path, template: str) -> None:
    package = f"proj_{template}_{uuid.uuid4().hex[:6]}"
    written = scaffold(tmp_path / package, template)
    assert (tmp_path / package / "project.py") in written and (tmp_path / package / "README.md").is_file()
    assert all("examples." not in p.read_text() for p in written if p.suffix == ".py")  # its own package now
    project = load(str(tmp_path / package / "project.py"))
    assert project.name == package and validate(project) == [] and project.scenario is not None
    assert project.schemas == tmp_path / package / "schemas"
    assert f"weir init {tmp_path / package} --template {template}" in (tmp_path / package / "README.md").read_text()


def test_init_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    for target, template, words in ((tmp_path / "taken", "minimal", "not empty"),
                                    (tmp_path / "my-proj", "minimal", "identifier"),
                                    (tmp_path / "p", "churn", "no template 'churn'; choose one of delivery_eta, "
                                                              "fraud_shop, minimal")):
        with pytest.raises(InitError, match=words):
            scaffold(target, template)


# ---------------------------------------------------------------------------------------------------
# plan and apply against the session's stack

READING = {"type": "record", "name": "Reading", "namespace": "t", "fields": [
    {"name": "id", "type": "string"}, {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "sensor", "type": "string"}, {"name": "value", "type": "double"},
    {"name": "bad", "type": ["null", "boolean"], "default": None}]}


def sensors(root: Path, run: str, *, view_version: int = 1, window_h: int = 1, model_version: int = 1) -> Project:
    (root / f"{run}.readings").mkdir(parents=True, exist_ok=True)
    if not (root / f"{run}.readings" / "v1.avsc").exists():
        (root / f"{run}.readings" / "v1.avsc").write_text(json.dumps(READING))
    # one stack runs one project: its internal topics and tables are named by source, so the test's are unique
    source = Source(run, f"{run}.readings", event_id="id", event_time="ts", keys=("sensor",),
                    fields=("sensor", "value", "bad"))
    view = FeatureView("sensor", "sensor", view_version, source=run, ttl_ms=3 * HOUR, specs=(
        Feature("mean", Agg.MEAN, Sliding(window_h * HOUR), "mean value", value="value"),))
    model = Model("bad", "binary", source=run, version=model_version,
                  features=(ViewFeatures(view), RequestFeature("value", "value")), label=LabelField("bad"),
                  predictions=f"{run}.predictions")
    return Project(f"sensors_{run}", root, sources=(source,), views=(view,), models=(model,))


def actions(plan: Any) -> dict[str, str]:
    return {f"{c.kind} {c.name}": c.action for c in plan.changes}


def test_apply_then_plan_says_what_changed_and_refuses_what_it_must(endpoints: Endpoints, tmp_path: Path) -> None:
    boot, reg = endpoints.kafka_bootstrap, endpoints.schema_registry_url
    run = f"plan{uuid.uuid4().hex[:8]}"
    first = sensors(tmp_path, run)
    assert applied_state(boot, reg, first.name) is None
    plan = apply(first, boot, reg)
    assert set(actions(plan).values()) == {"new"} and len(plan.changes) == 13  # 11 subjects, the view, the model
    again = make_plan(first, reg, applied_state(boot, reg, first.name))
    assert set(actions(again).values()) == {"unchanged"} and again.lines()[0].endswith("nothing to change")

    # a view whose definition changed under its version: refused, and nothing is applied
    changed = sensors(tmp_path, run, window_h=2)
    with pytest.raises(PlanRefused, match="view sensor: refused .*bump its version") as info:
        apply(changed, boot, reg)
    refused = {c.name for c in info.value.plan.refused}
    assert refused == {"sensor", "bad"}  # the model's features are the view's: it changed too
    assert applied_state(boot, reg, first.name) == Applied.of(first)  # still the first one
    assert make_plan(first, reg, applied_state(boot, reg, first.name)).refused == []

    # bumped: new versions of both, applied
    bumped = sensors(tmp_path, run, window_h=2, view_version=2, model_version=2)
    plan = apply(bumped, boot, reg)
    assert actions(plan)["view sensor"] == actions(plan)["model bad"] == "new version"
    assert "v1 -> v2" in next(c.detail for c in plan.changes if c.name == "sensor")
    with pytest.raises(PlanRefused, match="older than the applied v2"):
        apply(first, boot, reg)

    # a schema change: compatible (a field with a default) is a new version, incompatible is refused with why
    folder = tmp_path / f"{run}.readings"
    compatible = dict(READING, fields=[*READING["fields"], {"name": "note", "type": ["null", "string"],
                                                           "default": None}])
    (folder / "v2.avsc").write_text(json.dumps(compatible))
    plan = make_plan(bumped, reg, applied_state(boot, reg, bumped.name))
    assert actions(plan)[f"schema {run}.readings-value"] == "new version" and not plan.refused
    incompatible = dict(READING, fields=[f if f["name"] != "value" else {"name": "value", "type": "string"}
                                         for f in READING["fields"]])
    (folder / "v2.avsc").write_text(json.dumps(incompatible))
    plan = make_plan(bumped, reg, applied_state(boot, reg, bumped.name))
    refused = {c.name: c.detail for c in plan.refused}
    assert f"{run}.readings-value" in refused and {c.kind for c in plan.refused} == {"schema"}
    assert "not BACKWARD-compatible" in refused[f"{run}.readings-value"] and "value" in refused[f"{run}.readings-value"]
    assert f"weir.sensors_{run}.silver.{run}-value" in refused  # the silver events it generates change type too


def test_weir_up_and_demo_refuse_a_project_the_stack_must_not_take(endpoints: Endpoints, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    boot, reg = endpoints.kafka_bootstrap, endpoints.schema_registry_url
    run = f"stack{uuid.uuid4().hex[:8]}"
    apply(sensors(tmp_path / "schemas", run), boot, reg)
    changed = sensors(tmp_path / "schemas", run, window_h=2)
    settings = WeirSettings(data_dir=tmp_path / "d", kafka_bootstrap=boot, redis_url=endpoints.redis_url,
                            schema_registry_url=reg, clickhouse_url=f"chdb://{tmp_path / 'ch'}")
    with pytest.raises(PlanRefused, match="bump its version"):
        Stack(settings, changed).start()
    # the command line says so, without a traceback, and exits non-zero
    (tmp_path / "proj.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from pathlib import Path\n"
        "from tests.test_plan import sensors\n"
        f"project = sensors(Path({str(tmp_path / 'schemas')!r}), {run!r}, window_h=2)\n")
    code = cli.main(["--project", str(tmp_path / "proj.py"), "plan", "--bootstrap", boot, "--registry", reg])
    out = capsys.readouterr().out
    assert code == 1 and "view sensor: refused" in out and "Traceback" not in out


def test_a_scaffolded_project_runs_with_weir_demo_on_a_fresh_stack(tmp_path: Path) -> None:
    """As a new user would: `weir init`, then `weir demo --project` on its own embedded stack."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    weir = [sys.executable, "-c", "import sys; from streams.cli import main; sys.exit(main())"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WEIR_DATA_DIR": str(tmp_path / ".weir"),
           "PYTHONPATH": str(root)} | FREE_PORTS
    init = subprocess.run([*weir, "init", str(tmp_path / "plant"), "--template", "minimal"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    summary = tmp_path / "summary.json"
    demo = subprocess.run([*weir, "--project", "plant/project.py", "demo", "--events", "3000", "--rate", "0",
                           "--no-progress", "--summary-json", str(summary)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    got = json.loads(summary.read_text())
    assert got["model"] == "fault" and got["requests"] == got["predictions"] == got["predictions_online"] == 3000
    assert got["labels"] == 3000 and got["dlq"] == 0 and got["silver"] == {"silver_readings": 3000}

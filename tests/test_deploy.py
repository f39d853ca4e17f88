"""deploy/ checked without running it: the Kubernetes manifests against Kubernetes' schemas
(kubernetes-validate) and the KEDA ScaledObjects field by field, the Compose file against the Compose
specification, every ``weir`` command line against the real argument parser, every ``WEIR_`` variable against
:class:`~streams.settings.WeirSettings`, the autoscaling triggers against the consumer groups and input topics
the example project's stages really use, and the Grafana dashboards' SQL against the ClickHouse tables of
``sinks/clickhouse.py`` (by name, then by running it on chdb). No service, no network; a few seconds.

The ``test_checks_*`` tests feed each checker something wrong, so a check that can no longer fail is noticed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from streams.cli import parser, setting_variables
from streams.settings import WeirSettings
from streams.worker import HOT_PATH, parse_stages

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "kubernetes"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
# the Compose specification's JSON schema, vendored (no PyPI package ships it usably: tests/data/README.md)
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
EXAMPLE = "examples.fraud_shop.project:project"  # the project the manifests run and scale for
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # the oldest we claim, the newest known

WEIR_VARIABLE = re.compile(r"\bWEIR_[A-Z0-9_]+")


# --- reading the files --------------------------------------------------------------------------------------

def yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml_documents(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_objects() if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (doc,) = of_kind(kind)
    return doc


def compose() -> dict[str, Any]:
    return yaml_documents(COMPOSE)[0]


def interpolate(value: Any) -> str:
    """A Compose value with ``${VAR:-default}`` as its default and ``${VAR:?error}`` as a placeholder."""
    def sub(m: re.Match[str]) -> str:
        return {"-": m.group(3), "?": "placeholder"}.get(m.group(2) or "", "")
    return re.sub(r"\$\{(\w+)(?::?([-?])([^}]*))?\}", sub, str(value)).replace("$$", "$")


def is_weir_service(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == "weir"


def weir_services() -> dict[str, dict[str, Any]]:
    services = {name: s for name, s in compose()["services"].items() if is_weir_service(s)}
    assert services, "no service of docker-compose.yml runs the weir image"
    return services


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment: as a mapping (the checks read it)"
    return {k: interpolate(v) for k, v in env.items()}


def config_env() -> dict[str, str]:
    """What every pod reads from the ConfigMap and the Secret."""
    secret = one("Secret")
    return {**{k: str(v) for k, v in one("ConfigMap")["data"].items()},
            **{k: str(v) for k, v in secret.get("stringData", {}).items()}}


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in of_kind("Deployment")}


def weir_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                    if c["image"].split(":")[0] == "weir"]
    return container


def k8s_argv(container: dict[str, Any]) -> list[str]:
    command = container.get("command", [])
    assert command in ([], ["weir"]), f"{container['name']}: the image's entrypoint is weir; give args only"
    return [str(a) for a in container.get("args", [])]


def dockerfile_instruction(name: str) -> list[str]:
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, f"the Dockerfile needs exactly one {name}"
    value = json.loads(lines[0][len(name) + 1:])  # the exec form: a JSON array
    assert isinstance(value, list)
    return [str(v) for v in value]


# --- weir command lines and settings ------------------------------------------------------------------------

def parse_weir(argv: list[str]) -> Any:
    """``weir argv`` through streams.cli's own parser; an AssertionError with argparse's message if refused."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`weir {' '.join(argv)}` does not parse: {err.getvalue().strip()}") from None


def check_command(argv: list[str], where: str, *, beside_workers: bool = True) -> Any:
    """Parse a deployed command line; a worker's must name hot-path stages and join their consumer groups (no
    --member), the hub's must start no supervised workers."""
    assert argv and argv[0] in ("up", "worker"), f"{where}: deploy `weir up` or `weir worker`, not {argv}"
    args = parse_weir(argv)
    if args.command == "worker":
        stages = parse_stages(args.stages)
        assert set(stages) <= set(HOT_PATH), f"{where}: workers run hot-path stages, not {stages}"
        assert args.member is None, f"{where}: --member takes fixed partitions; replicas must join the groups"
    else:
        assert args.workers == 0, f"{where}: the hub must not start its own workers (they are services here)"
        assert args.no_hot_path or not beside_workers, \
            f"{where}: the hub must leave the hot path to the worker services (--no-hot-path)"
    return args


def unknown_variables(text: str) -> set[str]:
    """The ``WEIR_`` names in ``text`` that are no setting."""
    return set(WEIR_VARIABLE.findall(text)) - set(setting_variables())


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> WeirSettings:
    """WeirSettings as a process with exactly ``env`` (for WEIR_ variables) would build them."""
    for name in [n for n in os.environ if n.startswith("WEIR_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        return WeirSettings()
    except pydantic.ValidationError as exc:
        raise AssertionError(str(exc)) from None


# --- KEDA: what its CRD would refuse, and what Weir needs ---------------------------------------------------

def keda_problems(obj: dict[str, Any], *, targets: set[str], partitions: int, bootstrap: str) -> list[str]:
    """Why ``obj`` is not a ScaledObject that scales one of ``targets`` on Kafka lag within ``partitions``."""
    problems = []
    if obj.get("apiVersion") != "keda.sh/v1alpha1":
        problems.append(f"apiVersion {obj.get('apiVersion')!r} is not keda.sh/v1alpha1")
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if not meta.get("name") or not meta.get("namespace"):
        problems.append("metadata needs name and namespace")
    if (spec.get("scaleTargetRef") or {}).get("name") not in targets:
        problems.append(f"scaleTargetRef.name is none of the Deployments {sorted(targets)}")
    low, high = spec.get("minReplicaCount"), spec.get("maxReplicaCount")
    if low != 1:
        problems.append(f"minReplicaCount {low!r}: want 1 (a stage with no member stops)")
    if not isinstance(high, int) or not 1 <= high <= partitions:
        problems.append(f"maxReplicaCount {high!r}: want 1..{partitions} (WEIR_PARTITIONS: a member beyond the "
                        "partitions gets none)")
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        problems.append("spec.triggers: none")
        triggers = []
    for i, trigger in enumerate(triggers):
        md = trigger.get("metadata") or {}
        if trigger.get("type") != "kafka":
            problems.append(f"trigger {i}: type {trigger.get('type')!r}, not kafka")
        for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
            if not isinstance(md.get(key), str) or not md[key]:
                problems.append(f"trigger {i}: metadata.{key} must be a non-empty string (KEDA's metadata is "
                                "strings)")
        if isinstance(md.get("lagThreshold"), str) and not (md["lagThreshold"].isdigit()
                                                             and int(md["lagThreshold"]) > 0):
            problems.append(f"trigger {i}: lagThreshold {md['lagThreshold']!r} is not a positive integer")
        if md.get("bootstrapServers") not in (None, bootstrap):
            problems.append(f"trigger {i}: bootstrapServers {md['bootstrapServers']!r} is not WEIR_KAFKA_BOOTSTRAP "
                            f"({bootstrap!r})")
    return problems


# --- ClickHouse tables and dashboard SQL --------------------------------------------------------------------

def ddl_tables() -> dict[str, set[str]]:
    """Every table of sinks/clickhouse.py's DDL with its columns (ALTER ... ADD COLUMN included)."""
    from sinks.clickhouse import DDL

    tables: dict[str, set[str]] = {}
    for statement in DDL:
        if m := re.match(r"\s*CREATE TABLE IF NOT EXISTS (\w+) \((.*)\) ENGINE", statement, re.DOTALL):
            parts, depth, current = [], 0, ""
            for ch in m.group(2):  # split the column list at commas outside parentheses (Map(String, ...))
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if ch == "," and depth == 0:
                    parts.append(current)
                    current = ""
                else:
                    current += ch
            tables[m.group(1)] = {p.split()[0] for p in [*parts, current] if p.strip()}
        elif m := re.match(r"\s*ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+)", statement):
            tables[m.group(1)].add(m.group(2))
    return tables


SQL_WORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "GROUP", "BY", "ORDER", "ASC", "DESC",
             "LIMIT", "AS", "FINAL", "HAVING", "IS", "NULL"}


def sql_problems(sql: str, tables: dict[str, set[str]]) -> list[str]:
    """Tables (after FROM or JOIN) missing from the DDL, and identifiers that are neither a column of those
    tables, a keyword, a function, an alias nor a Grafana macro or variable."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", sql)  # string literals say nothing about the schema
    text = re.sub(r"\$\{database\}\.", "", text)  # tables are qualified by the project's database variable
    text = re.sub(r"\$__\w+|\$\{\w+\}|\$\w+", " ", text)  # macros and other variables
    used = re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", text, re.IGNORECASE)
    problems = [f"no table {t} in sinks/clickhouse.py" for t in used if t not in tables]
    columns = set().union(*(tables.get(t, set()) for t in used))
    aliases = set(re.findall(r"\bAS\s+(\w+)", text, re.IGNORECASE))
    for m in re.finditer(r"\b([A-Za-z_]\w*)\b(\s*\()?", text):
        word, is_call = m.group(1), m.group(2)
        if is_call or word.upper() in SQL_WORDS or word in aliases or word in used or word in columns:
            continue
        problems.append(f"no column {word} in {', '.join(used) or 'its tables'}")
    return problems


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']}", panel, target


# --- the example project's stages, from the code that runs them ---------------------------------------------

STAGE_TOPICS = """
import json, sys
from pathlib import Path
from streams.pipeline import PipelineConfig
from streams.project.contracts import use_project
from streams.project.load import load
from streams.stages.features import FeaturesStage
from streams.stages.inference import InferenceStage
from streams.stages.ingest import IngestStage

project = load(sys.argv[1])
use_project(project)  # the stages' codecs need the project's schemas
prefix = PipelineConfig(data_dir=Path()).group_prefix  # Pipeline._run: group weir-<step id>
stages = {"ingest": [IngestStage(project, 4, dedup=None, pseudonymizer=None, event_time=None)],
          "features": [FeaturesStage(project, None)],
          "inference": [InferenceStage(project, m, None, None) for m in project.models]}
print(json.dumps({name: {f"{prefix}-{s.step_id}": list(s.topics) for s in built} for name, built in stages.items()}))
"""


@pytest.fixture(scope="module")
def example_groups() -> dict[str, dict[str, list[str]]]:
    """For each hot-path stage, its consumer groups and their input topics in the example project. In a process
    of its own: building the stages sets this process's schema catalog."""
    out = subprocess.run([sys.executable, "-c", STAGE_TOPICS, EXAMPLE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    groups: dict[str, dict[str, list[str]]] = json.loads(out.stdout.splitlines()[-1])
    assert set(groups) == set(HOT_PATH)
    return groups


# === Kubernetes ==============================================================================================

def test_kubernetes_manifests_validate_against_kubernetes_schemas() -> None:
    checked = 0
    for path, doc in k8s_objects():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD kubernetes-validate cannot know: test_keda_scaled_objects
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                            f"{where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                pytest.fail(f"{path.name}: {exc.message}")
        checked += 1
    kinds = {doc["kind"] for _, doc in k8s_objects()}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "ScaledObject"} <= kinds
    assert checked >= 8


def test_kustomization_lists_every_manifest_and_one_namespace() -> None:
    (kustomization,) = yaml_documents(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    namespace = one("Namespace")["metadata"]["name"]
    for _, doc in k8s_objects():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']}/{doc['metadata']['name']}"


def test_keda_scaled_objects() -> None:
    env = config_env()
    partitions = int(env.get("WEIR_PARTITIONS", WeirSettings.model_fields["partitions"].default))
    workers = {name for name, d in deployments().items() if check_command(
        k8s_argv(weir_container(d)), name).command == "worker"}
    scaled = of_kind("ScaledObject")
    for obj in scaled:
        assert keda_problems(obj, targets=workers, partitions=partitions,
                             bootstrap=env["WEIR_KAFKA_BOOTSTRAP"]) == [], obj["metadata"]["name"]
    assert sorted(obj["spec"]["scaleTargetRef"]["name"] for obj in scaled) == sorted(workers), \
        "one ScaledObject per worker Deployment"


def test_scaling_triggers_follow_the_example_stages_groups_and_topics(
        example_groups: dict[str, dict[str, list[str]]]) -> None:
    by_target = {obj["spec"]["scaleTargetRef"]["name"]: obj for obj in of_kind("ScaledObject")}
    stages_seen = []
    for name, deployment in deployments().items():
        args = check_command(k8s_argv(weir_container(deployment)), name)
        if args.command != "worker":
            continue
        (stage,) = parse_stages(args.stages)  # one stage per Deployment: each scales on its own lag
        stages_seen.append(stage)
        wanted = {(group, topic) for group, topics in example_groups[stage].items() for topic in topics}
        got = {(t["metadata"]["consumerGroup"], t["metadata"]["topic"]) for t in by_target[name]["spec"]["triggers"]}
        assert got == wanted, f"{name}: triggers on {sorted(got)}; the stage consumes {sorted(wanted)}"
    assert sorted(stages_seen) == sorted(HOT_PATH), "a worker Deployment per hot-path stage"


def test_kubernetes_hub_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    env = config_env()
    assert env.get("WEIR_HEALTH_HOST") == "0.0.0.0", "probes reach /healthz from outside the pod"
    assert "WEIR_SCHEMA_REGISTRY_URL" not in env, "shared by the hub, which must serve the registry itself"
    for name in ("WEIR_KAFKA_BOOTSTRAP", "WEIR_REDIS_URL", "WEIR_CLICKHOUSE_URL", "WEIR_POSTGRES_DSN"):
        assert env.get(name), f"{name}: unset would start an embedded service inside a pod"
    health_port = int(env["WEIR_HEALTH_PORT"])
    registry_port = int(env.get("WEIR_SCHEMA_REGISTRY_PORT", WeirSettings.model_fields["schema_registry_port"].default))
    configmap, secret = one("ConfigMap")["metadata"]["name"], one("Secret")["metadata"]["name"]
    claims = {c["metadata"]["name"] for c in of_kind("PersistentVolumeClaim")}
    service = one("Service")
    hubs = []
    for name, deployment in deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        container = weir_container(deployment)
        args = check_command(k8s_argv(container), name)
        own = {e["name"]: str(e["value"]) for e in container.get("env", [])}
        settings_from({**env, **own}, monkeypatch)  # every value valid
        assert {"configMapRef": {"name": configmap}} in container["envFrom"], name
        assert {"secretRef": {"name": secret}} in container["envFrom"], name
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": health_port}, f"{name} {probe}"
        assert container["resources"]["requests"] and container["resources"]["limits"], name
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        data = [m for m in mounts.values() if m["mountPath"] == env["WEIR_DATA_DIR"]]
        for m in mounts.values():
            assert volumes[m["name"]]["persistentVolumeClaim"]["claimName"] in claims, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        if args.command == "up":
            hubs.append(name)
            assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
            assert "WEIR_SCHEMA_REGISTRY_URL" not in own, "the hub serves the registry: no URL for it"
            assert data and not data[0].get("readOnly"), "the hub writes model artifacts to its data dir"
            assert service["spec"]["selector"].items() <= labels.items(), "the Service selects the hub"
            assert registry_port in [p["containerPort"] for p in container["ports"]]
        else:
            assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"
            service_url = f"http://{service['metadata']['name']}:{registry_port}"
            assert own.get("WEIR_SCHEMA_REGISTRY_URL") == service_url, f"{name}: the hub's registry"
            if "inference" in parse_stages(args.stages):
                assert data, f"{name}: inference loads model artifacts from the hub's data dir (same path)"
    assert len(hubs) == 1
    assert {p["port"] for p in service["spec"]["ports"]} == {registry_port, health_port}


# === Compose =================================================================================================

def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []


def test_compose_services(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = compose()
    services = weir_services()
    parsed = {name: check_command([str(a) for a in s["command"]], f"compose service {name}")
              for name, s in services.items()}
    (hub,) = [name for name, args in parsed.items() if args.command == "up"]
    hub_env = service_env(services[hub])
    for name in ("WEIR_KAFKA_BOOTSTRAP", "WEIR_REDIS_URL", "WEIR_CLICKHOUSE_URL", "WEIR_POSTGRES_DSN"):
        assert hub_env.get(name), f"{name}: unset, the hub would start an embedded service"
    assert "WEIR_SCHEMA_REGISTRY_URL" not in hub_env, "the hub serves the registry: no URL for it"
    registry_port = int(hub_env.get("WEIR_SCHEMA_REGISTRY_PORT", 18081))
    hub_data = [v for v in services[hub]["volumes"] if v.split(":")[1] == hub_env["WEIR_DATA_DIR"]]
    assert hub_data, "the hub's data dir (model artifacts) is a volume"
    for name, service in services.items():
        env = service_env(service)
        settings = settings_from(env, monkeypatch)  # every value valid
        assert settings.health_host == "0.0.0.0"
        assert f":{settings.health_port}/healthz" in " ".join(service["healthcheck"]["test"]), name
        assert settings.pseudonym_key.get_secret_value() != WeirSettings.model_fields["pseudonym_key"].default \
            .get_secret_value(), f"{name}: set WEIR_PSEUDONYM_KEY, not the development key"
        if name == hub:
            continue
        assert env.get("WEIR_SCHEMA_REGISTRY_URL") == f"http://{hub}:{registry_port}", name
        assert env.get("WEIR_KAFKA_BOOTSTRAP") and env.get("WEIR_REDIS_URL"), name
        assert hub in service["depends_on"], f"{name} starts after the hub (topics, schemas, registry)"
        assert 1 <= int(service["deploy"]["replicas"]) <= settings.partitions, name
        assert "ports" not in service, f"{name}: published ports would collide between replicas"
        if "inference" in parse_stages(parsed[name].stages):
            mounts = [v for v in service.get("volumes", []) if v.split(":")[:2] == hub_data[0].split(":")[:2]]
            assert mounts, f"{name}: inference loads model artifacts from the hub's data dir (same path)"
    assert sorted(s for args in parsed.values() if args.command == "worker" for s in parse_stages(args.stages)) \
        == sorted(HOT_PATH), "a worker service per hot-path stage"
    assert doc["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft


def test_compose_postgres_allows_logical_replication_for_the_weir_role() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert "wal_level=logical" in postgres["command"]
    (init,) = [v.split(":")[0] for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v]
    sql = (COMPOSE.parent / init).read_text()
    role = re.search(r"CREATE ROLE (\w+) WITH (?=[^;]*\bLOGIN\b)(?=[^;]*\bREPLICATION\b)", sql)
    assert role, "the init script creates a role WITH LOGIN REPLICATION"
    (hub,) = [n for n, s in weir_services().items() if s["command"][0] == "up"]
    dsn = service_env(services[hub])["WEIR_POSTGRES_DSN"]
    assert dsn.startswith(f"postgresql://{role.group(1)}:"), "the hub's CDC connects as that role"


# === Dockerfile ==============================================================================================

def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    torch = text.index("torch==2.13.0")
    assert "--index-url https://download.pytorch.org/whl/cpu" in text[torch:text.index("\n", torch)]
    assert torch < text.index("pip install -e ."), "torch (CPU) before Weir, or pip pulls a CUDA build"
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0"), "a non-root user"
    assert dockerfile_instruction("ENTRYPOINT") == ["weir"]
    check_command(dockerfile_instruction("CMD"), "Dockerfile CMD", beside_workers=False)  # the image alone: all
    health_port, exposed = re.search(r"WEIR_HEALTH_PORT=(\d+)", text), re.search(r"^EXPOSE (.*)$", text, re.MULTILINE)
    assert health_port and exposed and health_port.group(1) in exposed.group(1).split()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".weir"} <= set(ignored)


# === Settings named anywhere under deploy/ ====================================================================

def test_every_weir_variable_is_a_setting() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "docs" / "deploy.md"]
    named = {p.relative_to(ROOT).as_posix(): unknown_variables(p.read_text()) for p in files}
    assert {path: names for path, names in named.items() if names} == {}
    assert sum(len(WEIR_VARIABLE.findall(p.read_text())) for p in files) > 20  # the scan does see them


# === Grafana =================================================================================================

def test_dashboards_query_only_tables_and_columns_of_the_ddl() -> None:
    tables = ddl_tables()
    assert {"predictions", "dlq", "alerts", "model_events"} <= set(tables)
    assert "latency_ms" in tables["predictions"] and "reason" in tables["dlq"]
    seen = set()
    for where, _, target in dashboard_targets():
        assert sql_problems(target["rawSql"], tables) == [], where
        seen |= set(re.findall(r"\$\{database\}\.(\w+)", target["rawSql"]))
    assert {"predictions", "dlq", "alerts", "model_events"} <= seen


def test_dashboard_sql_runs_on_clickhouse() -> None:
    """Every panel's SQL, Grafana's macros expanded, on chdb with sinks/clickhouse.py's tables: ClickHouse's own
    analyzer checks names, types and functions. In a process of its own: chdb is one engine per process."""
    queries = [(where, target["rawSql"]) for where, _, target in dashboard_targets()]
    script = """
import json, re, sys, tempfile
from sinks.clickhouse import ClickHouse
ch = ClickHouse.for_project("chdb://" + tempfile.mkdtemp(), "fraud_shop")
ch.ensure_schema()
failed = {}
for where, sql in json.loads(sys.stdin.read()):
    sql = sql.replace("${database}", "fraud_shop")
    sql = re.sub(r"\\$__timeFilter\\((\\w+)\\)", r"\\1 >= toDateTime(0) AND \\1 <= toDateTime(2000000000)", sql)
    try:
        ch.rows(sql)
    except Exception as exc:
        failed[where] = str(exc).splitlines()[0][:400]
print(json.dumps(failed))
"""
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(queries), cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {}
    assert len(queries) >= 5


def test_dashboards_use_the_provisioned_clickhouse_data_source() -> None:
    (provisioned,) = yaml_documents(GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml")[0]["datasources"]
    assert provisioned["type"] == "grafana-clickhouse-datasource"
    assert DASHBOARDS
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["query"] == "grafana-clickhouse-datasource"
        assert variables["datasource"]["current"]["value"] == provisioned["uid"], path.name
        assert variables["database"]["current"]["value"] == provisioned["jsonData"]["defaultDatabase"]
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"]), f"{path.name}: panel ids"
    for where, panel, target in dashboard_targets():
        assert panel["datasource"] == target["datasource"] == {"type": "grafana-clickhouse-datasource",
                                                               "uid": "${datasource}"}, where
        assert target["editorType"] == "sql" and target["rawSql"].strip(), where
        # the plugin's formats (sqlds): 0 time series, 1 table
        assert (target["format"], target["queryType"]) in ((0, "timeseries"), (1, "table")), where
        assert (panel["type"] == "timeseries") == (target["format"] == 0), where
        assert "$__timeFilter(" in target["rawSql"], f"{where}: follows the dashboard's time range"
    (provider,) = yaml_documents(GRAFANA / "provisioning" / "dashboards" / "weir.yaml")[0]["providers"]
    grafana = compose()["services"]["grafana"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_PLUGINS_PREINSTALL"]


# === the checks themselves can fail =========================================================================

def test_checks_catch_a_misspelled_variable_and_an_invalid_value(monkeypatch: pytest.MonkeyPatch) -> None:
    assert unknown_variables("WEIR_PARTITONS: 4\nWEIR_PARTITIONS: 4") == {"WEIR_PARTITONS"}
    with pytest.raises(AssertionError, match="partitions"):
        settings_from({"WEIR_PARTITIONS": "four"}, monkeypatch)


def test_checks_catch_a_bad_command_line() -> None:
    with pytest.raises(AssertionError, match="does not parse"):
        check_command(["worker", "--stagez", "ingest"], "test")
    with pytest.raises(Exception, match="unknown infrence"):
        check_command(["worker", "--stages", "infrence"], "test")
    with pytest.raises(AssertionError, match="own workers"):
        check_command(["up", "--workers", "2"], "test")


def test_checks_catch_a_bad_scaled_object() -> None:
    (obj,) = [o for o in of_kind("ScaledObject") if o["metadata"]["name"] == "weir-ingest"]
    ok = {"targets": {"weir-ingest"}, "partitions": 4, "bootstrap": obj["spec"]["triggers"][0]["metadata"]
          ["bootstrapServers"]}
    assert keda_problems(obj, **ok) == []
    bad = json.loads(json.dumps(obj))
    bad["spec"]["maxReplicaCount"] = 8
    del bad["spec"]["triggers"][0]["metadata"]["lagThreshold"]
    problems = keda_problems(bad, **ok)
    assert any("maxReplicaCount 8" in p for p in problems) and any("lagThreshold" in p for p in problems)


def test_checks_catch_a_bad_manifest_compose_file_and_query() -> None:
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "weir-hub"]
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = compose()
    broken["services"]["hub"]["healthcheck"]["intervall"] = "5s"
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))
    tables = ddl_tables()
    assert sql_problems("SELECT quantile(0.5)(latency_msec) FROM ${database}.predictions", tables) == \
        ["no column latency_msec in predictions"]
    assert sql_problems("SELECT count() FROM ${database}.prediction", tables) == \
        ["no table prediction in sinks/clickhouse.py"]
